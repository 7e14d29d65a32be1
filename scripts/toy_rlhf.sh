#!/usr/bin/env bash
# The classic RLHF pipeline on the bundled toy task and tiny model, on a CPU:
#   SFT -> reward model (from the SFT model) -> PPO (from the SFT model, against the reward model)
#   -> gold-reward evaluation of PPO and SFT against the SFT reference on held-out prompts
# Usage: bash scripts/toy_rlhf.sh [--quick] [extra overrides for every run, e.g. seed=1]
#   full mode: the README's figures (SFT 20 epochs, reward model 10 epochs, PPO 3,840 prompts,
#              200 eval prompts); see the README for its measured time
#   --quick:   the same pipeline at a tenth of the size (SFT 2 epochs, reward model 2 epochs,
#              PPO 384 prompts, 64 eval prompts), for trying it out and for CI
# Prints the three run dirs; each holds metrics.jsonl and curves.png. Every stage's output goes
# to stderr as it runs (appended, so `bash scripts/toy_rlhf.sh > log 2>&1` keeps all of it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# the old tiny-preset settings the README's figures were measured with, spelled out
SFT_ARGS="n_epochs=20 lr=1e-3 batch_size=32 warmup_steps=10"
RM_ARGS=""
PPO_ARGS=""
EVAL_ARGS="--n-prompts 200"
if [ "${1:-}" = --quick ]; then
  shift
  SFT_ARGS="n_epochs=2 lr=1e-3 batch_size=32 warmup_steps=10"
  RM_ARGS="n_epochs=2"
  PPO_ARGS="n_examples=384 eval_every=384"
  EVAL_ARGS="--n-prompts 64"
fi
LOG=$(mktemp)
trap 'rm -f "$LOG"' EXIT
run() {  # run train.py, its output to stderr; echo the run dir it reports on its last line
  # (tee's stdout is the script's stderr itself, never reopened: a redirected log is appended to)
  "$PY" -u train.py wandb.enabled=false gold_eval_prompts=0 "$@" 2>&1 | tee "$LOG" >&2
  sed -n 's/^done: //p' "$LOG" | tail -1
}
# shellcheck disable=SC2086  # the settings are meant to split into overrides
SFT=$(run loss=sft $SFT_ARGS sample_during_eval=false exp_name=toy_rlhf_sft "$@")
# shellcheck disable=SC2086
RM=$(run +preset=reward_toy model.archive="$SFT/LATEST/policy.pt" exp_name=toy_rlhf_reward \
     $RM_ARGS "$@")
# shellcheck disable=SC2086
PPO=$(run +preset=ppo_toy model.archive="$SFT/LATEST/policy.pt" loss.reward_model="$RM" \
      exp_name=toy_rlhf_ppo $PPO_ARGS "$@")
# shellcheck disable=SC2086
"$PY" scripts/evaluate.py "$PPO/LATEST/policy.pt" "$SFT/LATEST/policy.pt" \
  --reference "$SFT/LATEST/policy.pt" $EVAL_ARGS
echo "sft: $SFT"
echo "reward model: $RM ($(grep heldout_accuracy "$RM/LATEST/reward_model.json"))"
echo "ppo: $PPO"
