#!/usr/bin/env bash
# Sanitizer builds of the whole test suite (clang).
#   scripts/sanitize.sh address   ASan + UBSan (+ LeakSanitizer) -> build-asan/
#   scripts/sanitize.sh thread    ThreadSanitizer (test_threads) -> build-tsan/
# Extra arguments after the mode go to ctest (e.g. -R test_api).
# Any report fails the run (halt_on_error / exitcode). Vulkan runs too (its
# tests use lavapipe); see tests/sanitizer-lsan.supp / -tsan.supp for the narrow, commented
# suppressions of third-party noise.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-address}"
supp="$PWD/tests/sanitizer"
case "$mode" in
  address)
    dir=build-asan
    flags="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g"
    export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1"
    export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
    export LSAN_OPTIONS="suppressions=$supp-lsan.supp:print_suppressions=0"
    extra=(-DCOMMVQ_OPENMP=ON)
    exclude="memcheck_|package_install"
    targets=()
    ;;
  thread)
    dir=build-tsan
    flags="-fsanitize=thread -fno-omit-frame-pointer -g"
    # libgomp is not built with TSan: its barriers look like races. The
    # TSan build runs without OpenMP (threads come from the tests).
    export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:suppressions=$supp-tsan.supp"
    extra=(-DCOMMVQ_OPENMP=OFF)
    exclude="memcheck_|package_install"
    # the concurrency test is what TSan is for; other tests may be named after the mode
    targets=(--target test_threads)
    [ $# -ge 2 ] || set -- "$mode" -R test_threads
    ;;
  *) echo "usage: $0 address|thread" >&2; exit 2 ;;
esac
bash scripts/deps.sh
CC=clang cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCOMMVQ_WERROR=ON \
  -DCOMMVQ_BUILD_BENCH=OFF -DCOMMVQ_BUILD_EXAMPLES=OFF -DCOMMVQ_CUDA=OFF "${extra[@]}" \
  -DCMAKE_C_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="$flags" -DCMAKE_SHARED_LINKER_FLAGS="$flags" >/dev/null
cmake --build "$dir" -j"$(nproc)" "${targets[@]}"
ctest --test-dir "$dir" --output-on-failure -j2 --timeout 1800 -E "$exclude" "${@:2}"
