#!/usr/bin/env bash
# Evaluate a checkpoint by judged win rate against reference outputs.
#
#   bash scripts/eval_ckpt.sh CKPT NAME [judge] [temperature]
#
#   CKPT         policy.pt, checkpoint/run dir or Hugging Face model dir
#   NAME         name of the model in the results (OUT_ROOT/NAME/)
#   judge        llm (default: an OpenAI-compatible judge at JUDGE_BASE_URL) or a judge of
#                scripts/label_ai_preferences.py such as gold:toy
#   temperature  sampling temperature of the outputs (default 0.7)
#
# Environment (all optional):
#   PROMPTS, SPLIT    instruction set: registry dataset spec or JSON/JSONL file (default toy, test)
#   REFERENCE         reference outputs (AlpacaEval outputs JSON: [{instruction, output}]);
#                     unset: generated from REFERENCE_CKPT (default assets/tiny_model) on PROMPTS
#   JUDGE_BASE_URL    default http://127.0.0.1:8000/v1 (e.g. scripts/serve.py, vllm serve, a hosted API)
#   JUDGE_MODEL       default judge;  TEMPLATE: judge template name/file (default default)
#   API_KEY_ENV       name of the environment variable holding the judge's API key (if any)
#   MAX_NEW_TOKENS    default 128;  OUT_ROOT: default .cache/eval;  PYTHON: default python
#   N_PROMPTS         only the first N prompts of the instruction set (default: all)
#   ALPACA_EVAL       the alpaca_eval command (default alpaca_eval; see requirements-eval.txt)
#
#   LC_GLM            length_controlled_minimal (default), _noreg or _v1 (these need GAMED)
#   GAMED             alpaca_eval's df_gamed.csv (for the AlpacaEval set's own instructions)
#
# Steps: (1) NAME's outputs on the instruction set, (2) the reference outputs, (3) our pairwise
# judged win rate of NAME over the reference (both orders, ties, 95% interval; no alpaca_eval
# needed) in OUT_ROOT/NAME/pairwise/summary.json, and AlpacaEval 2's length-controlled win rate
# of those annotations in OUT_ROOT/NAME/pairwise/length_controlled.json, (4) with an LLM judge
# and alpaca_eval installed, alpaca_eval on the same two files with an annotator config pointing
# at JUDGE_BASE_URL (its annotations under OUT_ROOT/NAME/alpaca_eval/, never in the installed
# package), and the length-controlled win rate of its annotations, computed offline.
set -euo pipefail
if [ $# -lt 2 ]; then sed -n '2,34p' "$0" >&2; exit 2; fi
CKPT=$1; NAME=$2; JUDGE=${3:-llm}; TEMP=${4:-0.7}
HERE="$(cd "$(dirname "$0")" && pwd)"
PY=${PYTHON:-python}
PROMPTS=${PROMPTS:-toy}; SPLIT=${SPLIT:-test}
JUDGE_BASE_URL=${JUDGE_BASE_URL:-http://127.0.0.1:8000/v1}; JUDGE_MODEL=${JUDGE_MODEL:-judge}
TEMPLATE=${TEMPLATE:-default}; MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}
OUT="${OUT_ROOT:-.cache/eval}/$NAME"; mkdir -p "$OUT"
SAMPLE=(--prompts "$PROMPTS" --split "$SPLIT" --n-samples 1 --format alpaca_eval
        --temperature "$TEMP" --max-new-tokens "$MAX_NEW_TOKENS")
[ -n "${N_PROMPTS:-}" ] && SAMPLE+=(--end "$N_PROMPTS")

echo "== 1. outputs of $NAME ($CKPT)"
"$PY" "$HERE/generate_samples.py" "$CKPT" "${SAMPLE[@]}" --generator "$NAME" --out "$OUT/model_outputs.json"
if [ -z "${REFERENCE:-}" ]; then
  echo "== 2. reference outputs from ${REFERENCE_CKPT:=assets/tiny_model}"
  REFERENCE="$OUT/reference_outputs.json"
  "$PY" "$HERE/generate_samples.py" "$REFERENCE_CKPT" "${SAMPLE[@]}" --generator reference --out "$REFERENCE"
fi

echo "== 3. pairwise judged win rate of $NAME over the reference (judge: $JUDGE)"
JUDGE_ARGS=(--judge "$JUDGE")
if [ "$JUDGE" = llm ]; then
  JUDGE_ARGS+=(--judge-base-url "$JUDGE_BASE_URL" --judge-model "$JUDGE_MODEL" --template "$TEMPLATE")
  [ -n "${API_KEY_ENV:-}" ] && JUDGE_ARGS+=(--api-key-env "$API_KEY_ENV")
fi
"$PY" "$HERE/label_ai_preferences.py" --samples "$REFERENCE" "$OUT/model_outputs.json" \
    --out-dir "$OUT/pairwise" "${JUDGE_ARGS[@]}"
LC_ARGS=(--glm "${LC_GLM:-length_controlled_minimal}")
[ -n "${GAMED:-}" ] && LC_ARGS+=(--gamed "$GAMED")
if "$PY" -c "import sklearn" 2> /dev/null; then
  "$PY" "$HERE/alpaca_eval_lc.py" "$OUT/pairwise/annotations.json" "${LC_ARGS[@]}" || true
else
  echo "length-controlled win rate skipped: scikit-learn not installed (pip install -r requirements-eval.txt)"
fi

echo "== 4. alpaca_eval"
AE=${ALPACA_EVAL:-alpaca_eval}
if [ "$JUDGE" != llm ]; then
  echo "skipped: alpaca_eval needs an LLM judge endpoint (judge=$JUDGE)"
elif ! command -v "$AE" > /dev/null; then
  echo "skipped: '$AE' not found (pip install -r requirements-eval.txt, or set ALPACA_EVAL=/path/to/alpaca_eval)"
else
  "$PY" "$HERE/alpaca_eval_config.py" --template "$TEMPLATE" --judge-model "$JUDGE_MODEL" \
      --out-dir "$OUT/alpaca_eval/config" > /dev/null
  mkdir -p "$OUT/alpaca_eval/results"
  AE_DIR="$(cd "$OUT/alpaca_eval" && pwd)"  # alpaca_eval reads a relative config path as its own
  KEY_VAR=${API_KEY_ENV:-OPENAI_API_KEY}
  # alpaca_eval reads the key from OPENAI_API_KEY; a local server needs none, so pass a dummy
  OPENAI_API_KEY="${!KEY_VAR:-no-key-local-server}" OPENAI_API_BASE="$JUDGE_BASE_URL" \
  HF_HUB_OFFLINE=1 "$AE" --model_outputs "$OUT/model_outputs.json" --reference_outputs "$REFERENCE" \
      --annotators_config "$AE_DIR/config/our_judge" --name "$NAME" \
      --output_path "$AE_DIR/results" --caching_path "$AE_DIR/annotations_cache.json" \
      --fn_metric "${AE_METRIC:-get_winrate}" --sort_by win_rate --precomputed_leaderboard None
  # alpaca_eval's own LC metric downloads its GLM data from the hub: the same GLM, offline
  "$PY" "$HERE/alpaca_eval_lc.py" "$AE_DIR/results/annotations.json" "${LC_ARGS[@]}" \
      --out "$AE_DIR/results/length_controlled.json" || true
fi
echo "results: $OUT"
