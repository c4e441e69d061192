#!/usr/bin/env bash
# Installs the Debian packages the build and tests need, when missing.
# Used by scripts/demo.sh, scripts/test.sh and .ci/run. Needs root (or sudo).
set -euo pipefail
pkgs=(build-essential cmake pkg-config libcmocka-dev valgrind
      libvulkan-dev mesa-vulkan-drivers vulkan-validationlayers glslang-tools spirv-tools
      clang libclang-rt-14-dev)  # clang + its runtimes: scripts/sanitize.sh, scripts/fuzz.sh
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "deps: installing ${missing[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Python packages of the Python tests (tools/convert_official.py's test; the
# logits check of examples/llama against a numpy forward pass: gguf).
py_missing=()
for m in numpy gguf; do
  python3 -c "import $m" 2>/dev/null || py_missing+=("$m")
done
if [ ${#py_missing[@]} -gt 0 ]; then
  echo "deps: pip installing ${py_missing[*]}"
  python3 -m pip install -q "${py_missing[@]}"
fi
# Where nvcc is (the CUDA backend gets built): cuobjdump and nvdisasm for the
# test that reads the encoders' PTX and SASS back (tests/cuda/check_machine_code.sh);
# NVIDIA's PyPI wheels, so that no full toolkit is needed. Versions pinned to
# the ones the test was checked with (nvcc 13.0 objects).
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  cu_tools=(nvidia-cuda-cuobjdump==13.5.37 nvidia-cuda-nvdisasm==13.5.37)
  for t in "${cu_tools[@]}"; do
    python3 -m pip show "${t%%==*}" >/dev/null 2>&1 || { echo "deps: pip installing ${cu_tools[*]}"; python3 -m pip install -q "${cu_tools[@]}"; break; }
  done
fi
