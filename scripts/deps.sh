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
