"""`loss=reward`: a reward model trained on preference pairs through the offline loop.

    python train.py loss=reward model.archive=SFT_RUN/LATEST/policy.pt

Bradley-Terry on the scalar head (Ouyang et al. 2022, eq. 1: -log sigmoid(r_chosen - r_rejected),
with an optional margin and reward centering), or cross-entropy of a binned head against
absolute ratings (loss.n_bins, loss.rating_source). Evaluation reports pairwise accuracy
(`rewards_eval/accuracies`); every checkpoint also gets reward_model.json (held-out reward mean /
std for PPO to normalise, accuracy, tokenizer fingerprint) and reward_model/ (backbone config and
tokenizer), so it loads back with harness.models.reward_model.load_reward_model.
"""

import json
import math
from dataclasses import dataclass

import torch

import losses
from harness.checkpoints import REWARD_META, REWARD_MODEL_DIR, atomic_write_text
from harness.data.gold import check_scorer, get_gold_reward
from harness.data.tokens import pad_id, pad_to
from harness.models.reward_model import build_reward_model, tokenizer_fingerprint
from harness.objectives import LossSpec, StepContext, preference_metrics, register_loss
from harness.parallel import distributed


@dataclass(frozen=True)
class RewardOptions:
    """The loss.* options of loss=reward (config/loss/reward.yaml documents each)."""
    margin: float = 0.0
    center_coef: float = 0.0
    n_bins: int = 0
    rating_source: str | None = None
    rating_range: tuple = (-1.0, 1.0)

    def __post_init__(self):
        if isinstance(self.n_bins, bool) or not isinstance(self.n_bins, int) or \
                self.n_bins < 0 or self.n_bins == 1:
            raise ValueError(f"loss.n_bins={self.n_bins}: use 0 (scalar head) or K >= 2 (binned)")
        if self.n_bins and not self.rating_source:
            raise ValueError("loss.n_bins > 0 needs absolute scores: set loss.rating_source to a "
                             "registered scorer (e.g. toy) whose score is binned into 1..n_bins")
        if self.rating_source:
            check_scorer("loss.rating_source", self.rating_source)
        if len(self.rating_range) != 2 or self.rating_range[0] >= self.rating_range[1]:
            raise ValueError(f"loss.rating_range={list(self.rating_range)}: use [low, high]")
        for key in ("margin", "center_coef"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    not 0 <= value < math.inf:
                raise ValueError(f"loss.{key}={value!r} must be a finite number >= 0")


def to_ratings(scores: list[float], n_bins: int, low: float, high: float) -> torch.Tensor:
    """Absolute scores in [low, high] -> ratings 1..n_bins (equal-width bins, clamped)."""
    frac = (torch.tensor(scores, dtype=torch.float64) - low) / (high - low)
    return (frac * n_bins).floor().clamp(0, n_bins - 1).long() + 1


def _pair_inputs(ctx: StepContext, batch):
    """[chosen; rejected] ids and masks padded to one length: one forward for both halves."""
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
    pad = pad_id(ctx.tokenizer)
    ids = torch.cat([pad_to(batch[f"{k}_input_ids"], length, pad) for k in ("chosen", "rejected")])
    mask = torch.cat([pad_to(batch[f"{k}_attention_mask"], length, 0)
                      for k in ("chosen", "rejected")])
    return ids.to(ctx.device), mask.to(ctx.device)


def reward_step(ctx: StepContext, batch, split: str):
    """Bradley-Terry (scalar head) or rating cross-entropy (binned head) on one batch of pairs,
    the reward model's forward under the run's autocast."""
    opts = ctx.options
    with ctx.autocast():
        head_out = ctx.policy.head_at_last_token(*_pair_inputs(ctx, batch))
    rewards = ctx.policy.scalar(head_out)
    half = len(batch["uid"])
    chosen, rejected = rewards[:half], rewards[half:]
    if opts.n_bins:
        score = get_gold_reward(opts.rating_source)
        texts = batch["chosen_response_only"] + batch["rejected_response_only"]
        ratings = to_ratings([score(p, t) for p, t in zip(batch["prompt"] * 2, texts)],
                             opts.n_bins, *opts.rating_range).to(head_out.device)
        per_response = losses.binned_rating_loss(head_out, ratings)
        losses_ = (per_response[:half] + per_response[half:]) / 2
    else:
        losses_, _, _ = losses.bradley_terry_loss(chosen, rejected, opts.margin, opts.center_coef)
    return losses_.mean(), preference_metrics(split, losses_, chosen.detach(), rejected.detach())


def check(cfg, world_size: int):
    if distributed.trainer_layout(cfg).processes:  # the sharded strategies wrap causal LMs only
        raise ValueError(f"loss=reward runs with trainer=BasicTrainer (got trainer="
                         f"{cfg.trainer.name})")


def load_policy(cfg, archive, device_map=None, meta: bool = False):
    n_bins = cfg.loss.get("n_bins", 0)
    return build_reward_model(cfg.model.name_or_path, cfg.model.policy_dtype, n_bins, archive,
                              device_map)


@torch.no_grad()
def heldout_reward_stats(ctx: StepContext, eval_batches) -> dict:
    """Mean and std of the rewards of every held-out response, and the pairwise accuracy."""
    model = ctx.policy
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for batch in eval_batches.epoch_batches(0):
        with ctx.autocast():
            rewards = model(*_pair_inputs(ctx, batch)).float().cpu()
        chosen.append(rewards[:len(batch["uid"])])
        rejected.append(rewards[len(batch["uid"]):])
    model.train(was_training)
    chosen, rejected = torch.cat(chosen), torch.cat(rejected)
    every = torch.cat([chosen, rejected])
    return {"reward_mean": every.mean().item(), "reward_std": every.std().item(),
            "heldout_accuracy": (chosen > rejected).float().mean().item(),
            "n_heldout_pairs": len(chosen)}


def write_checkpoint_files(ctx: StepContext, tmp_dir, eval_batches, cfg):
    """reward_model.json (+ held-out stats) and reward_model/ (backbone config, tokenizer)."""
    model = ctx.policy
    model.backbone.config.save_pretrained(tmp_dir / REWARD_MODEL_DIR)
    ctx.tokenizer.save_pretrained(tmp_dir / REWARD_MODEL_DIR)
    meta = {"n_bins": model.n_bins, "dtype": str(next(model.parameters()).dtype).split(".")[-1],
            "base_model": cfg.model.name_or_path,
            "tokenizer_fingerprint": tokenizer_fingerprint(ctx.tokenizer),
            **heldout_reward_stats(ctx, eval_batches)}
    atomic_write_text(tmp_dir / REWARD_META, json.dumps(meta, indent=1) + "\n")


# its forward reads the reward head at the last token of padded [chosen; rejected] rows: no
# packed rows, no shared prompts, no log-prob head
register_loss("reward", LossSpec(
    paired=True, step=reward_step, options=RewardOptions, load_policy=load_policy,
    samples=False, checkpoint_files=write_checkpoint_files, check=check,
    ignores=("packing", "pack_length", "prefix_sharing", "logits_chunk_size")))
