#!/usr/bin/env bash
# Trains the two committed SmolLM2-135M codebooks (models/smollm2-135m/,
# docs/models.md) from the calibration essays, on the CPU, with the
# project's own trainers. Budget: under an hour on 2 cores.
#
#   scripts/train-smollm2.sh            # writes models/smollm2-135m/*.cvq
#
# Environment:
#   ESSAYS  the essay folder (default ../shared/data/pg-essays); calibration
#           uses the essays whose names sort before "l" (the README of the
#           data folder fixes that split), at most 1024 tokens of each
#   WORK    scratch folder (default build/train-smollm2)
#   OUT     output folder (default models/smollm2-135m)
#   SEED    seed of every random choice (default 1)
#
# Steps:
#   1. commvq-llama dump: q/k/v before RoPE of every layer (fp16 .npy)
#   2. two jobs side by side, one thread each:
#      2 bits: keys R=10 (1.875 key bits/dim), values in 3 per-head groups
#              (F=64, Nc=128, I=128)
#      1 bit:  keys R=5 (0.94 key bits/dim), values in one joint group
#              (F=192, Nc=192, I=192)
#      Keys: hard EM on 10000 tokens drawn per layer, 40 steps per stage.
#      Training is greedy over stages with the same seed and samples, so the
#      1-bit key stages are the first 5 stages of the 2-bit ones (checked
#      at the end). Values: 800 AdamW steps with the attention loss.
#   3. the final files are stored in float16 (--fp16).
set -euo pipefail
cd "$(dirname "$0")/.."

ESSAYS="${ESSAYS:-../shared/data/pg-essays}"
WORK="${WORK:-build/train-smollm2}"
OUT="${OUT:-models/smollm2-135m}"
SEED="${SEED:-1}"
T=build/tools/commvq
L=build/examples/commvq-llama

[ -x "$T" ] && [ -x "$L" ] || bash scripts/build.sh
model="$(bash scripts/fetch-model.sh)"
mkdir -p "$WORK/cal" "$OUT"

start=$(date +%s)
shopt -s nullglob
cal=("$ESSAYS"/[a-k]*.txt)
[ ${#cal[@]} -gt 0 ] || { echo "no calibration essays in $ESSAYS" >&2; exit 1; }
if [ -f "$WORK/cal/meta.txt" ]; then
  echo "== reusing the dump in $WORK/cal (delete it to dump again)" >&2
else
  echo "== dump: ${#cal[@]} calibration essays" >&2
  "$L" -m "$model" --max-tokens 1024 dump "$WORK/cal" "${cal[@]}" >&2
fi

# geometry shared by both codebooks (the model's own: 30 layers, 9 query
# heads, 3 KV heads, head dim 64, RoPE base 100000 on interleaved pairs, as
# GGUF stores LLaMA's q/k weights)
geo=(--pair-layout interleaved --rope-base 100000)
keys=(--hard --samples 10000 --steps 40 --threads 1 --seed "$SEED" --quiet)
vals=(--steps 800 --threads 1 --seed "$SEED" --quiet)

job() { # bits R F Nc I
  local b=$1 r=$2 f=$3 nc=$4 i=$5
  "$T" train-keys --data "$WORK/cal" --out "$WORK/keys-${b}bit.cvq" --key-stages "$r" \
      --value-bits "$nc" --value-group "$f" --value-hidden "$i" "${geo[@]}" "${keys[@]}"
  "$T" train-values --data "$WORK/cal" --init "$WORK/keys-${b}bit.cvq" \
      --out "$OUT/commvq-${b}bit.cvq" --fp16 "${vals[@]}"
}
echo "== training (two jobs, one thread each)" >&2
job 2 10 64 128 128 > "$WORK/train-2bit.log" 2>&1 &
p2=$!
job 1 5 192 192 192 > "$WORK/train-1bit.log" 2>&1 &
p1=$!
rc=0
wait $p2 || rc=$?
wait $p1 || rc=$?
cat "$WORK/train-2bit.log" "$WORK/train-1bit.log"
[ $rc -eq 0 ] || { echo "training failed" >&2; exit $rc; }

# the 1-bit key stages must be the 2-bit codebook's first 5 stages, bit for bit
"$T" extract-stages "$WORK/keys-2bit.cvq" --stages 5 --out "$WORK/keys-2bit-r5.cvq"
if ! python3 tools/dev/compare_key_stages.py "$WORK/keys-2bit-r5.cvq" "$WORK/keys-1bit.cvq"; then
  echo "error: the 1-bit key stages differ from the 2-bit codebook's first 5 (docs/models.md promises them equal)" >&2
  exit 1
fi
echo "== done in $(( $(date +%s) - start )) s: $OUT/commvq-1bit.cvq $OUT/commvq-2bit.cvq" >&2
ls -l "$OUT"/*.cvq >&2
