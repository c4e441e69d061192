#!/usr/bin/env bash
# Builds the libFuzzer harnesses (clang, ASan + UBSan + fuzzer coverage on
# the whole library) into build-fuzz/ and runs each one for a fixed time.
#   scripts/fuzz.sh [SECONDS_PER_HARNESS] [HARNESS...]   (default 60; cvq npy api)
# The committed seed corpus (fuzz/corpus/<h>) is copied to build-fuzz/work/<h>
# and grown there; crashes land in build-fuzz/work/crash-<h>/. A crash found
# becomes a regression input: copy it to fuzz/regress/<h>/ (ctest replays it).
# COMMVQ_FUZZ_SEED (default 1) seeds libFuzzer, so a run can be repeated.
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"; shift || true
harnesses=("$@"); [ ${#harnesses[@]} -eq 0 ] && harnesses=(cvq npy api)
san="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer"
CC=clang cmake -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCOMMVQ_FUZZ=ON \
  -DCOMMVQ_BUILD_TESTS=ON -DCOMMVQ_BUILD_BENCH=OFF -DCOMMVQ_BUILD_TOOLS=OFF \
  -DCOMMVQ_VULKAN=OFF -DCOMMVQ_CUDA=OFF -DCOMMVQ_OPENMP=OFF \
  -DCMAKE_C_FLAGS="$san -fsanitize=fuzzer-no-link" >/dev/null
targets=()
for h in "${harnesses[@]}"; do targets+=(--target "fuzz_$h"); done
cmake --build build-fuzz -j"$(nproc)" "${targets[@]}"
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
  ./build-fuzz/fuzz/fuzz_"$h" -max_total_time="$secs" -seed="${COMMVQ_FUZZ_SEED:-1}" -rss_limit_mb=2048 -timeout=30 \
    -artifact_prefix="$crash/" -print_final_stats=1 "$work" 2>&1 | tail -n 15
done
