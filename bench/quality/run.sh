#!/usr/bin/env bash
# Regenerates docs/quality.md: SmolLM2-135M's perplexity and passkey retrieval
# with its KV cache in FP32, CommVQ-2, CommVQ-1 (the committed codebooks of
# models/smollm2-135m/) and the KIVI-2 and q4_0 baselines, on the held-out
# essays (protocol: bench/quality/quality.c and the header written below).
#
#   bench/quality/run.sh                 # the full table (about an hour on 2 cores)
#   bench/quality/run.sh --scored 1024 --trials 5    # a quicker look
#
# Environment: ESSAYS (default ../shared/data/pg-essays), OUT (default
# docs/quality.md). Extra arguments go to commvq-quality.
set -euo pipefail
cd "$(dirname "$0")/../.."
ESSAYS="${ESSAYS:-../shared/data/pg-essays}"
OUT="${OUT:-docs/quality.md}"
BIN="${QUALITY_BIN:-build/examples/commvq-quality}"   # QUALITY_BIN: another build's binary
[ -x "$BIN" ] || bash scripts/build.sh
model="$(bash scripts/fetch-model.sh)"
table="$(mktemp)"
trap 'rm -f "$table"' EXIT
"$BIN" -m "$model" --essays "$ESSAYS" \
    --cb1 models/smollm2-135m/commvq-1bit.cvq --cb2 models/smollm2-135m/commvq-2bit.cvq \
    --command "bench/quality/run.sh $*" --out "$table" "$@"
{
  cat <<'EOF'
# Quality: SmolLM2-135M with a compressed KV cache

Written by `bench/quality/run.sh` (do not edit by hand: rerun it). The model is
SmolLM2-135M-Instruct (Q4_1 weights, `scripts/fetch-model.sh`) run by `examples/llama`'s forward
pass; only its KV cache changes between the rows:

- **FP32**: the exact cache.
- **CommVQ-2**, **CommVQ-1**: the library's cache (`cvq_cache`, CPU backend) with the committed
  codebooks `models/smollm2-135m/commvq-2bit.cvq` and `commvq-1bit.cvq` (docs/models.md).
- **KIVI-2**: asymmetric 2-bit integers, keys per channel over groups of 32 tokens, values per
  token over groups of 32 channels, fp16 minimum and step per group (implemented in
  `bench/quality/baselines.c`, not in the library).
- **q4_0**: llama.cpp's block format, 4-bit integers in blocks of 32 channels with one fp16
  scale, on keys (after RoPE) and values.

Every setting keeps the same full-precision window of the W = 128 most recent tokens and
compresses at the same moments (a block of W tokens when a token arrives to a full window,
exactly as `cvq_cache` does), so every token older than the window is read from its compressed
form. Decoding is teacher-forced in batches that cut wherever a compression happens, which gives
the cache contents of one-token-at-a-time decoding.

**Perplexity**: the held-out essays (file names sorting at or after `l`; calibration used the
others), joined by blank lines and cut into consecutive chunks of L tokens, each started from an
empty cache. The first half of every chunk is a context shared by all settings and not scored;
the second half is scored (llama.cpp's convention), so each scored token reads at least L/2 - W
compressed tokens. The token budget is the same for every setting (below the table).

**Passkey**: a random 5-digit number (seeded) is hidden in essay text at 10%, 50% and 90% of the
context ("The pass key is N. Remember it. N is the pass key."), followed by "What is the pass
key? The pass key is" and the answer, fed token by token through the cache. A trial succeeds
when the model's greedy choice is the right token at every answer position. The text before the
needle is computed once per depth and setting and forked (`cvq_cache_copy`) for each trial.

**CI's margin**: ctest `quality_check` (`tests/test_quality_check.sh`) runs FP32, CommVQ-2 and
CommVQ-1 on a fixed slice (the first 2 chunks of 512 tokens, 512 scored tokens) and fails if
CommVQ-2's perplexity exceeds **1.20 x** FP32's (measured on that slice: 23.906 / 21.278 = 1.124).

EOF
  cat "$table"
} > "$OUT"
echo "wrote $OUT" >&2
