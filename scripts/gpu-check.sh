#!/bin/sh
# CUDA conformance and benchmarks on a GPU machine, one table, in a few
# minutes (docs/cuda.md). Usage:
#   scripts/gpu-check.sh [BUILD_DIR]
# BUILD_DIR: a build made elsewhere with
#   cmake -S . -B build-cuda -DCOMMVQ_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
#         -DCOMMVQ_VULKAN=OFF -DCOMMVQ_OPENMP=OFF
#   cmake --build build-cuda --target cuda_check bench_cuda
# and carried here (default: build-cuda). Needs no cmocka, glslang or apt:
# cuda_check and bench_cuda are plain programs linked with the static
# library and the static CUDA runtime (only the driver is needed here).
# Exit status: 0 when every conformance check passed. The two logs are left in
# the current folder, and copied to $OUT when it is set (the device tool).
set -u
B=${1:-build-cuda}
CHECK=$B/backends/cuda/cuda_check
BENCH=$B/backends/cuda/bench_cuda
for f in "$CHECK" "$BENCH"; do
  [ -x "$f" ] || { echo "gpu-check: $f not found (build the targets cuda_check and bench_cuda)"; exit 2; }
done
# a missing shared library (libgomp from a build with OpenMP) may be in PyTorch's folder
if ldd "$CHECK" 2>/dev/null | grep -q 'not found'; then
  TL=$(python3 -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))' 2>/dev/null)
  [ -n "$TL" ] && export LD_LIBRARY_PATH="$TL${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
T0=$(date +%s)
timeout 240 "$CHECK" > gpu-check-conformance.log 2>&1
rc=$?
T1=$(date +%s)
timeout 240 "$BENCH" 20 > gpu-check-bench.log 2>&1
brc=$?
T2=$(date +%s)
pass=$(grep -c '^pass' gpu-check-conformance.log)
fail=$(grep -c '^FAIL' gpu-check-conformance.log)
echo
echo "## CUDA conformance (cuda_check: codes bit-identical to the CPU, attention within 2e-4)"
echo
echo "| check | passed | failed | exit | seconds |"
echo "|-------|--------|--------|------|---------|"
for k in keys values interop nan attend; do
  printf '| %s | %s | %s | | |\n' "$k" "$(grep -c "^pass $k" gpu-check-conformance.log)" "$(grep -c "^FAIL $k" gpu-check-conformance.log)"
done
printf '| all | %s | %s | %s | %s |\n' "$pass" "$fail" "$rc" "$((T1 - T0))"
grep -E '^(cuda_check|FAIL)' gpu-check-conformance.log | head -20
echo
echo "## Attention per step (bench_cuda, exit $brc, $((T2 - T1)) s)"
echo
grep -E '^\|' gpu-check-bench.log || tail -5 gpu-check-bench.log
# the device tool brings back what is under $OUT: keep the whole logs
if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp gpu-check-conformance.log gpu-check-bench.log "$OUT"/ 2>/dev/null
  command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -q > "$OUT/nvidia-smi.txt" 2>&1
fi
exit $rc
