#!/usr/bin/env bash
# Configures and builds into build/ (Release, warnings as errors).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=Release -DCOMMVQ_WERROR=ON -DCOMMVQ_VULKAN_STRICT_SHADERS=ON "$@" >/dev/null
cmake --build build -j"$(nproc)"
