#!/usr/bin/env bash
# The main job: build, then run the built-in demo on every available backend.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
./build/tools/commvq demo "$@"
