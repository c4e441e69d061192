#!/usr/bin/env bash
# Sanitizer builds of the whole test suite (clang).
#   scripts/sanitize.sh address   ASan + UBSan (+ LeakSanitizer) -> build-asan/
#   scripts/sanitize.sh thread    ThreadSanitizer (test_threads) -> build-tsan/
#   scripts/sanitize.sh emulated  the CUDA kernels on CPU threads (cuda_emulated)
#                                 under ThreadSanitizer (a missing __syncthreads
#                                 is a data race between the emulated threads)
#                                 and under ASan + UBSan (out-of-bounds global and
#                                 shared memory), with the whole CUDA backend on the
#                                 emulated device under ASan + LSan (cuda_check_emulated,
#                                 cuda_faults_emulated) -> build-emu-tsan/, build-emu-asan/;
#                                 needs nvcc (the CUDA backend's build), else skips
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
  emulated)
    if ! command -v nvcc >/dev/null 2>&1 && [ ! -x /usr/local/cuda/bin/nvcc ]; then
      echo "sanitize emulated: SKIP: no nvcc, the CUDA backend is not built here"
      exit 0
    fi
    bash scripts/deps.sh
    export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1"
    export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1"
    export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
    for san in tsan asan; do
      if [ $san = tsan ]; then flags="-fsanitize=thread -fno-omit-frame-pointer -g"
      else flags="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g"; fi
      # Only the C and C++ flags carry the sanitizer: in the linker flags it
      # would reach CMake's probe of nvcc's host link, which then adds gcc's
      # sanitizer runtime beside clang's. One architecture: the host code is
      # what runs here.
      CC=clang CXX=clang++ cmake -S . -B "build-emu-$san" -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DCOMMVQ_WERROR=ON -DCOMMVQ_BUILD_BENCH=OFF -DCOMMVQ_BUILD_EXAMPLES=OFF -DCOMMVQ_CUDA=ON \
        -DCMAKE_CUDA_ARCHITECTURES=90 -DCOMMVQ_VULKAN=OFF -DCOMMVQ_OPENMP=OFF \
        -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" >/dev/null
      targets=(cuda_emulated)
      # ASan + LSan also over the CUDA host glue, on the emulated device
      # (tests/cuda/fake_device.cpp): the conformance program and the fault sweep
      [ $san = asan ] && targets+=(cuda_check_emulated cuda_faults_emulated)
      cmake --build "build-emu-$san" -j"$(nproc)" --target "${targets[@]}"
      echo "sanitize emulated: cuda_emulated under $san"
      "build-emu-$san/backends/cuda/cuda_emulated" | grep -v "^pass"
      if [ $san = asan ]; then
        echo "sanitize emulated: cuda_check_emulated, cuda_faults_emulated under asan"
        COMMVQ_FAKE_CUDA_STRICT=1 "build-emu-$san/cuda_check_emulated" | grep -v "^pass"
        COMMVQ_FAKE_CUDA_STRICT=1 "build-emu-$san/cuda_faults_emulated"
      fi
    done
    exit 0
    ;;
  *) echo "usage: $0 address|thread|emulated" >&2; exit 2 ;;
esac
bash scripts/deps.sh
CC=clang cmake -S . -B "$dir" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCOMMVQ_WERROR=ON \
  -DCOMMVQ_BUILD_BENCH=OFF -DCOMMVQ_BUILD_EXAMPLES=OFF -DCOMMVQ_CUDA=OFF "${extra[@]}" \
  -DCMAKE_C_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="$flags" -DCMAKE_SHARED_LINKER_FLAGS="$flags" >/dev/null
cmake --build "$dir" -j"$(nproc)" "${targets[@]}"
ctest --test-dir "$dir" --output-on-failure -j2 --timeout 1800 -E "$exclude" "${@:2}"
