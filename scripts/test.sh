#!/usr/bin/env bash
# The test command: build, then run every test under ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
ctest --test-dir build --output-on-failure -j2 --timeout 1200
