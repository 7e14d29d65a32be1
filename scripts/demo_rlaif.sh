#!/usr/bin/env bash
# The RLAIF loop on the bundled toy task, offline on CPU (about 5-10 minutes on 2 cores):
#   1. SFT the tiny model on the toy task's SFT targets
#   2. sample two completions per train prompt from the SFT policy
#   3. label the pairs with a judge served by scripts/serve.py (both orders, verdict from the
#      answer token's logprobs); the tiny model cannot judge, so the served judge is the
#      scripted judge that answers from the toy gold reward. JUDGE=gold labels with the gold
#      reward directly; JUDGE_BASE_URL + JUDGE_MODEL use any other OpenAI-compatible judge.
#   4. DPO from the SFT checkpoint on those labels (prefs_path=annotations.json)
#   5. evaluate on the test prompts: judged win rates (SFT vs base, DPO vs SFT; both orders,
#      ties, 95% CI) with scripts/eval_ckpt.sh, and the gold reward of every model
#
#   bash scripts/demo_rlaif.sh                 # results in .cache/demo_rlaif_<time>/report.*
# Sizes: N_PAIRS (train prompts sampled, default 800), SFT_EXAMPLES (default 2000),
# DPO_EPOCHS (default 3), PYTHON (default python).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} HF_HUB_OFFLINE=1 WANDB_MODE=offline
OUT=${OUT:-.cache/demo_rlaif_$(date +%Y%m%d_%H%M%S)}
N_PAIRS=${N_PAIRS:-800}; SFT_EXAMPLES=${SFT_EXAMPLES:-2000}; DPO_EPOCHS=${DPO_EPOCHS:-3}
JUDGE=${JUDGE:-served}
mkdir -p "$OUT"
START=$(date +%s)
COMMON=(wandb.enabled=false sample_during_eval=false eval_every=100000 gold_eval_prompts=0)
log() { echo "== [$(( $(date +%s) - START ))s] $*"; }

log "1. SFT -> $OUT/sft"
"$PY" train.py loss=sft n_examples="$SFT_EXAMPLES" local_run_dir="$OUT/sft" "${COMMON[@]}" > "$OUT/sft.log" 2>&1
SFT="$OUT/sft/LATEST/policy.pt"

log "2. sample 2 completions for $N_PAIRS train prompts from the SFT policy"
"$PY" scripts/generate_samples.py "$SFT" --prompts toy --split train --end "$N_PAIRS" \
    --n-samples 2 --temperature 1.0 --max-new-tokens 48 --batch-size 64 --generator sft \
    --out "$OUT/samples.jsonl" 2> "$OUT/sample.log"

SERVER_PID=""
trap '[ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2> /dev/null || true' EXIT
if [ "$JUDGE" = gold ]; then
  JUDGE_ARGS=(--judge gold:toy)
else
  if [ -z "${JUDGE_BASE_URL:-}" ]; then
    log "3a. serve the judge on 127.0.0.1"
    "$PY" scripts/serve.py --gold-judge judge=toy --judge-template toy --port 0 --quiet \
        > "$OUT/serve.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 600); do grep -q "^serving" "$OUT/serve.log" && break; sleep 0.1; done
    JUDGE_BASE_URL=$(grep -o 'http://[^ ]*' "$OUT/serve.log")
  fi
  export JUDGE_BASE_URL JUDGE_MODEL=${JUDGE_MODEL:-judge} TEMPLATE=${TEMPLATE:-toy}
  JUDGE_ARGS=(--judge llm --judge-base-url "$JUDGE_BASE_URL" --judge-model "$JUDGE_MODEL"
              --template "$TEMPLATE" --verdict logprobs)
fi
log "3. label $N_PAIRS pairs (${JUDGE_ARGS[*]:0:2})"
"$PY" scripts/label_ai_preferences.py --samples "$OUT/samples.jsonl" --out-dir "$OUT/labels" \
    "${JUDGE_ARGS[@]}" 2> "$OUT/label.log" | tail -3

log "4. DPO on the AI labels -> $OUT/dpo"
"$PY" train.py loss=dpo loss.beta=0.1 lr=1e-3 model.archive="$SFT" datasets=[toy] \
    prefs_path="$OUT/labels/annotations.json" n_epochs="$DPO_EPOCHS" local_run_dir="$OUT/dpo" \
    "${COMMON[@]}" > "$OUT/dpo.log" 2>&1

log "5. evaluate on the test prompts"
EVAL_JUDGE=$([ "$JUDGE" = gold ] && echo gold:toy || echo llm)
export OUT_ROOT="$OUT/eval" PYTHON="$PY" MAX_NEW_TOKENS=48
REFERENCE_CKPT=assets/tiny_model bash scripts/eval_ckpt.sh "$SFT" sft "$EVAL_JUDGE" 0.7 \
    > "$OUT/eval_sft.log" 2>&1
REFERENCE="$OUT/eval/sft/model_outputs.json" bash scripts/eval_ckpt.sh "$OUT/dpo/LATEST/policy.pt" \
    dpo "$EVAL_JUDGE" 0.7 > "$OUT/eval_dpo.log" 2>&1
"$PY" scripts/rlaif_report.py --out-dir "$OUT" --outputs base="$OUT/eval/sft/reference_outputs.json" \
    sft="$OUT/eval/sft/model_outputs.json" dpo="$OUT/eval/dpo/model_outputs.json" \
    --winrate "sft vs base=$OUT/eval/sft/pairwise/summary.json" \
    "dpo vs sft=$OUT/eval/dpo/pairwise/summary.json"
log "done in $(( $(date +%s) - START ))s: $OUT/report.json, $OUT/report.png"
