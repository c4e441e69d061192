#!/usr/bin/env bash
# Builds the libFuzzer harnesses (clang, ASan + UBSan + fuzzer coverage on
# the whole library) and runs each one for a fixed time.
#   scripts/fuzz.sh [SECONDS_PER_HARNESS] [HARNESS...]   (default 60; cvq npy api)
# The committed seed corpus (fuzz/corpus/<h>) is copied to build-fuzz/work/<h>
# and grown there; crashes land in build-fuzz/work/crash-<h>/. A crash found
# becomes a regression input: copy it to fuzz/regress/<h>/ (ctest replays it).
# COMMVQ_FUZZ_SEED (default 1) seeds libFuzzer, so a run can be repeated.
# COMMVQ_FUZZ_BUILD_ONLY=1 builds and stops (for a longer campaign by hand:
# docs/reliability.md gives its commands).
#
# Two instrumented trees:
#  - build-fuzz: the file readers (cvq, npy) with libFuzzer's full coverage,
#    comparison tracing included (it steers mutations towards header values
#    the readers test).
#  - build-fuzz-api: the API-sequence harness, whose library is built
#    without comparison tracing (-fno-sanitize-coverage=trace-cmp; edge
#    coverage stays): its bytes pick operations and sizes through small
#    tables and moduli, so the traced comparisons (mostly the kernels'
#    numeric loops) guided nothing and cost half of each execution.
# Both leave the loops of fuzz/coverage-ignore.txt out of coverage.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"; shift || true
harnesses=("$@"); [ ${#harnesses[@]} -eq 0 ] && harnesses=(cvq npy api)
san="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
# The ignorelist's hash rides in the flags so that editing it rebuilds.
ign="$PWD/fuzz/coverage-ignore.txt"
ign_hash=$(cksum < "$ign" | cut -d' ' -f1)

tree_of() { if [ "$1" = api ]; then echo build-fuzz-api; else echo build-fuzz; fi; }

build_tree() { # build_tree DIR EXTRA_FLAGS TARGET...
  local dir="$1" extra="$2"; shift 2
  CC=clang cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCOMMVQ_FUZZ=ON \
    -DCOMMVQ_BUILD_TESTS=ON -DCOMMVQ_BUILD_BENCH=OFF -DCOMMVQ_BUILD_TOOLS=OFF \
    -DCOMMVQ_VULKAN=OFF -DCOMMVQ_CUDA=OFF -DCOMMVQ_OPENMP=OFF \
    -DCMAKE_C_FLAGS="$san -fsanitize=fuzzer-no-link $extra -fsanitize-coverage-ignorelist=$ign -DCVQ_FUZZ_IGNORELIST=$ign_hash" >/dev/null
  local targets=()
  for t in "$@"; do targets+=(--target "$t"); done
  cmake --build "$dir" -j"$(nproc)" "${targets[@]}"
}

readers=(); api=0
for h in "${harnesses[@]}"; do
  if [ "$h" = api ]; then api=1; else readers+=("fuzz_$h"); fi
done
[ ${#readers[@]} -gt 0 ] && build_tree build-fuzz "" "${readers[@]}"
[ $api -eq 1 ] && build_tree build-fuzz-api "-fno-sanitize-coverage=trace-cmp" fuzz_api
[ "${COMMVQ_FUZZ_BUILD_ONLY:-0}" = 1 ] && exit 0

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
for h in "${harnesses[@]}"; do
  work="build-fuzz/work/$h"; crash="build-fuzz/work/crash-$h"
  mkdir -p "$work" "$crash"
  cp -n fuzz/corpus/"$h"/* "$work"/ 2>/dev/null || true
  [ -d fuzz/regress/"$h" ] && cp -n fuzz/regress/"$h"/* "$work"/ 2>/dev/null || true
  echo "fuzz: $h for ${secs}s"
  # -rss_limit_mb: a malformed header may ask for a large (valid) model;
  # the loader must refuse absurd sizes before allocating, not the fuzzer.
  ./"$(tree_of "$h")"/fuzz/fuzz_"$h" -max_total_time="$secs" -seed="${COMMVQ_FUZZ_SEED:-1}" -rss_limit_mb=2048 -timeout=30 \
    -artifact_prefix="$crash/" -print_final_stats=1 "$work" 2>&1 | tail -n 15
done
