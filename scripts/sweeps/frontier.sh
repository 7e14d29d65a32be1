#!/usr/bin/env bash
# The reward-vs-KL frontier on the bundled toy task (the DPO paper's Figure 2, laptop-sized).
#
#   bash scripts/sweeps/frontier.sh            # full mode -> docs/ (README: measured time)
#   bash scripts/sweeps/frontier.sh --quick    # CI mode, a fraction of the size (minutes)
#   bash scripts/sweeps/frontier.sh --out DIR  # sweep and report into DIR (docs/ stays untouched)
#
# 1. SFT of the tiny base model on the toy SFT targets: the reference of every other method.
# 2. A reward model trained from the SFT model on the toy pairs (+preset=reward_toy): PPO's reward
#    and the scorer of GRPO, RLOO and online DPO.
# 3. Every row of METHODS below: one Hydra multirun (python train.py -m ...) over its grid,
#    each job starting from the SFT checkpoint, each in its own run dir.
# 4. scripts/evaluate.py on every final checkpoint (and on the base and SFT models), all against
#    the SFT reference, on the held-out toy test prompts with one seed.
# 5. scripts/sweeps/frontier_report.py: frontier.md (table) + frontier.png (gold reward vs KL).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python}

MODE=full
OUT=""
OUT_GIVEN=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) MODE=quick ;;
    --out) OUT="$2"; OUT_GIVEN=1; shift ;;
    *) echo "usage: bash scripts/sweeps/frontier.sh [--quick] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done

# ---- settings per mode --------------------------------------------------------------------
# SFT needs 20 epochs on the 2000 toy targets (lr 1e-3, the tiny preset's defaults) before it
# samples clearly better than the base model and gives the preference methods a reference they
# improve on by a wide margin (from an 8-epoch SFT, DPO gains only ~0.05 gold reward). The
# preference methods then train 2 epochs on the 2000 toy pairs. Quick mode is the same pipeline
# at a fraction of the size (SFT 5 epochs, one beta per method, 1-2 epochs each, 100 eval
# prompts): minutes, for CI; its points are not points of the full frontier.
SFT_ARGS="n_epochs=20"
PREF_ARGS="n_epochs=2"
COH_EPOCHS="n_epochs=10"
RM_ARGS=""
EVAL_ARGS="--n-prompts 200"
if [ "$MODE" = full ]; then
  OUT=${OUT:-.cache/frontier}
  BETAS_DPO="0.1,0.3,1.0,3.0"
  BETAS_IPO="0.03,0.1,0.3,1.0"
  PPO_ARGS="loss.kl_coef=0.05,0.2"   # otherwise the ppo_toy preset (3840 prompts)
  KTO_ARGS="loss.beta=0.1,0.3 $PREF_ARGS"
  SIMPO_ARGS="loss.beta=2.0 loss.gamma=0.5,1.5 $PREF_ARGS"
  ORPO_ARGS="loss.beta=0.1,1.0 $PREF_ARGS"
  GRPO_ARGS="loss.beta=0.04,0.2"      # otherwise the grpo_toy / rloo_toy / online_dpo_toy
  RLOO_ARGS="loss.beta=0.05,0.2"      # presets: PPO's episode budget
  ODPO_ARGS="loss.beta=0.1,0.3"
else
  OUT=${OUT:-.cache/frontier_quick}
  SFT_ARGS="n_epochs=5"
  PREF_ARGS="n_epochs=1"
  COH_EPOCHS="n_epochs=2"
  RM_ARGS="n_epochs=2"
  EVAL_ARGS="--n-prompts 100"
  BETAS_DPO="0.3"
  BETAS_IPO="0.1"
  PPO_ARGS="loss.kl_coef=0.05 n_examples=640"
  # the newer methods at one setting and a fraction of their full cost each
  KTO_ARGS="loss.beta=0.1 $PREF_ARGS data_fraction=0.5"
  SIMPO_ARGS="loss.beta=2.0 loss.gamma=0.5 $PREF_ARGS data_fraction=0.5"
  ORPO_ARGS="loss.beta=0.1 $PREF_ARGS data_fraction=0.5"
  GRPO_ARGS="loss.beta=0.04 n_examples=320"
  RLOO_ARGS="loss.beta=0.05 n_examples=320"
  ODPO_ARGS="loss.beta=0.1 n_examples=640"
fi
COH_ARGS="$COH_EPOCHS loss.feedback_set=helpful loss.chain_weights.negative_positive=0"

# ---- the methods: one row each, "name|train.py overrides (a Hydra multirun grid)" ----------
# Every row trains from the SFT checkpoint (model.archive) and is evaluated against it. The
# overrides are train.py command-line overrides; comma lists are swept (Hydra multirun). To add
# a method, add one row; its runs need only end with RUN/LATEST/policy.pt, as train.py's do.
# PPO, GRPO, RLOO and online DPO optimise the reward model of step 2, whose run dir is fixed here
# (relative paths are from the repo root, where every command runs).
RM="$OUT/reward_model/reward"
METHODS=(
  "dpo|loss=dpo loss.beta=$BETAS_DPO $PREF_ARGS"
  "ipo|loss=ipo loss.beta=$BETAS_IPO $PREF_ARGS"
  "cdpo|loss=dpo loss.label_smoothing=0.2 loss.beta=$BETAS_DPO $PREF_ARGS"
  # Chain of Hindsight; evaluate.py samples it with its positive phrase (read from its run config).
  # The tiny model learns the phrase's effect only from one wording with the helpful answer first
  # (docs/frontier.md), and needs more epochs than the contrastive losses.
  "coh|loss=coh $COH_ARGS"
  # control: SFT continued for as many epochs as CoH trains, so "CoH over SFT" can be told apart
  # from "more training on the same chosen answers"
  "sft_continued|loss=sft $COH_EPOCHS"
  "ppo|+preset=ppo_toy loss.reward_model=$RM $PPO_ARGS"
  # unpaired (each pair split into a desirable and an undesirable completion) and reference-free
  "kto|loss=kto $KTO_ARGS"
  "simpo|loss=simpo $SIMPO_ARGS"
  "orpo|loss=orpo $ORPO_ARGS"
  # critic-free online RL and online DPO, scored by the same reward model as PPO
  "grpo|+preset=grpo_toy loss.scorer=reward_model:$RM $GRPO_ARGS"
  "rloo|+preset=rloo_toy loss.scorer=reward_model:$RM $RLOO_ARGS"
  "online_dpo|+preset=online_dpo_toy loss.scorer=reward_model:$RM $ODPO_ARGS"
)

COMMON="wandb.enabled=false sample_during_eval=false eval_every=1000000 keep_last=1 gold_eval_prompts=0"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
echo "frontier ($MODE) -> $OUT"

# hydra.sweep.dir keeps Hydra's multirun.yaml inside the sweep folder, not in the cwd
train() {  # train METHOD_DIR OVERRIDES...
  local dir="$1"; shift
  $PY train.py -m $COMMON "local_dirs=[$dir]" "hydra.sweep.dir=$dir" "$@"
}

rm -rf "$OUT/sft" && mkdir -p "$OUT/sft"
train "$OUT/sft" loss=sft exp_name=sft $SFT_ARGS
SFT=$(ls -d "$OUT"/sft/sft_*/LATEST)/policy.pt

# the reward model for PPO (10 epochs from SFT); its folder holds no evaluated policy, so the
# report skips it
rm -rf "$OUT/reward_model" && mkdir -p "$OUT/reward_model"
# shellcheck disable=SC2086
train "$OUT/reward_model" +preset=reward_toy exp_name=reward "model.archive=$SFT" $RM_ARGS \
  "local_run_dir=$(cd "$OUT/reward_model" && pwd)/reward"

for row in "${METHODS[@]}"; do
  name=${row%%|*}
  overrides=${row#*|}
  rm -rf "$OUT/$name" && mkdir -p "$OUT/$name"
  # shellcheck disable=SC2086  # the overrides are meant to split into words
  train "$OUT/$name" exp_name="$name" "model.archive=$SFT" $overrides
done

# every final checkpoint, plus the base model and SFT itself, against the SFT reference
CKPTS=("$SFT")
for row in "${METHODS[@]}"; do
  CKPTS+=("$OUT/${row%%|*}"/*_*/LATEST/policy.pt)
done
# shellcheck disable=SC2086
$PY scripts/evaluate.py "${CKPTS[@]}" --reference "$SFT" $EVAL_ARGS
$PY scripts/evaluate.py assets/tiny_model --reference "$SFT" $EVAL_ARGS \
  --out "$OUT/sft/base_model_eval.json"

# the default full mode's report is the committed one; otherwise it goes into the sweep folder
REPORT_DIR=$OUT
[ "$MODE" = full ] && [ -z "$OUT_GIVEN" ] && REPORT_DIR=docs
FLAG=""
[ "$MODE" = quick ] && FLAG=" --quick"
mkdir -p "$REPORT_DIR"
LISTED=$(for row in "${METHODS[@]}"; do printf '%s `%s`; ' "${row%%|*}" "${row#*|}"; done)
$PY scripts/sweeps/frontier_report.py "$OUT" --md "$REPORT_DIR/frontier.md" \
  --png "$REPORT_DIR/frontier.png" --settings "Made by \`bash scripts/sweeps/frontier.sh$FLAG\` \
($MODE mode), every run on the tiny model with config/model/tiny.yaml defaults plus: SFT \`$SFT_ARGS\`; \
$LISTED evaluation \`$EVAL_ARGS\`, seed 0, temperature 1, top_p 1, 64 new tokens at most."
