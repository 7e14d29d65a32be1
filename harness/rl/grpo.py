"""Critic-free online RL on the shared rollout loop: `loss=grpo` (Shao et al. 2024, DeepSeekMath,
with its Dr. GRPO and DAPO variants) here, `loss=rloo` (harness/rl/rloo.py) on the same method.

    python train.py loss=grpo loss.scorer=gold:toy model.archive=SFT/LATEST/policy.pt
    python train.py loss=grpo loss.scorer=reward_model:RM_RUN loss.beta=0 loss.aggregation=token

One step: `loss.num_generations` responses per prompt for `batch_size` prompts (keyed sampling)
-> scores from `loss.scorer` (harness/rl/scorers.py; a response cut at max_new_tokens may get
loss.no_eos_penalty instead) -> optionally minus beta * KL(policy || reference) of the response
(loss.kl_in=reward) -> advantages within each prompt's group (GRPO: normalised by the group's
std, loss.scale_rewards; RLOO: leave-one-out baseline) -> `ppo_epochs` passes of minibatches with
the clipped surrogate (DAPO's clip-higher as loss.clip_range_high), plus beta * KL per token when
loss.kl_in=loss, reduced as loss.aggregation names (sequence: GRPO's per-sequence mean; token:
DAPO's mean over the minibatch's tokens; constant: Dr. GRPO; sum: REINFORCE on the sequence's
log-prob). beta = 0: no reference model is loaded.

A group with a failed or non-finite score is skipped (counted in {grpo,rloo}/skipped_groups):
its episodes stay in the batch layout, so every rank runs the same passes, but they weigh 0 in
the loss and its normaliser; a minibatch without a usable episode takes no optimizer step.
"""

import math
from dataclasses import dataclass

import torch

import losses
from harness.data.gold import check_scorer
from harness.objectives import LossSpec, loss_options, register_loss
from harness.rl.loop import RolloutLoop, check_rollout_batch
from harness.rl.rollout import policy_logprobs
from harness.rl.scorers import make_scorer, parse_scorer


@dataclass
class GroupOptions:
    """The loss.* options GRPO and RLOO share (config/loss/grpo.yaml, rloo.yaml: sources)."""
    scorer: str | None = None
    scorer_import: str | None = None
    judge: dict | None = None
    normalize_reward: bool = True
    num_generations: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 64
    no_eos_penalty: float | None = None
    beta: float = 0.04
    kl_estimator: str = "k3"
    kl_in: str = "loss"
    aggregation: str = "sequence"
    ppo_epochs: int = 1
    mini_batch_size: int | None = None
    clip_range: float = 0.2
    clip_range_high: float | None = None
    drop_uniform_groups: bool = False
    gold_reward: str | None = None
    max_approx_kl: float = 10.0
    static_cache: bool = False

    def __post_init__(self):
        kind, _ = parse_scorer("loss.scorer", self.scorer, self.judge, self.scorer_import)
        if self.num_generations is None or isinstance(self.num_generations, bool) or \
                not isinstance(self.num_generations, int) or self.num_generations < 2:
            raise ValueError(f"loss.num_generations={self.num_generations!r} must be an integer "
                             ">= 2: advantages compare each response with the others of its "
                             "prompt's group, and a group of 1 has none (e.g. 4 or 8)")
        if not (isinstance(self.beta, (int, float)) and 0 <= self.beta < math.inf):
            raise ValueError(f"loss.beta={self.beta!r} must be a finite number >= 0 (0: no KL "
                             "term and no reference model)")
        choices = {"kl_estimator": ("k1", "k3"), "kl_in": ("loss", "reward"),
                   "aggregation": losses.AGGREGATIONS}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ValueError(f"loss.{key}={getattr(self, key)!r}: use one of {allowed}")
        for key in ("temperature", "max_new_tokens", "ppo_epochs", "clip_range"):
            if not getattr(self, key) > 0:
                raise ValueError(f"loss.{key}={getattr(self, key)} must be > 0")
        if self.mini_batch_size is not None and not self.mini_batch_size > 0:
            raise ValueError(f"loss.mini_batch_size={self.mini_batch_size} must be > 0 (null: "
                             "every episode of a rollout in one optimizer step)")
        if self.clip_range_high is not None and not self.clip_range_high > 0:
            raise ValueError(f"loss.clip_range_high={self.clip_range_high} must be > 0 "
                             "(null: loss.clip_range)")
        if self.no_eos_penalty is not None and kind == "judge":
            raise ValueError("loss.no_eos_penalty replaces a response's score, and a judge "
                             "scores pairs: set loss.no_eos_penalty=null with judge:llm")
        if self.gold_reward:
            check_scorer("loss.gold_reward", self.gold_reward)

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class GRPOOptions(GroupOptions):
    num_generations: int = 8
    scale_rewards: str = "group"

    def __post_init__(self):
        super().__post_init__()
        if self.scale_rewards not in ("group", "batch", "none"):
            raise ValueError(f"loss.scale_rewards={self.scale_rewards!r}: use group (GRPO), "
                             "batch or none (Dr. GRPO)")

    def advantages(self, rewards):
        return losses.group_advantages(rewards, self.scale_rewards)


class GroupRL:
    """GRPO's and RLOO's part of the rollout loop: no critic; advantages within each group."""

    def __init__(self, loop, policy, reference):
        self.loop, self.opts = loop, loop.opts
        self.prefix = loop.name
        self.samples_per_prompt = self.opts.num_generations
        self.logprob_temperature = self.opts.temperature
        self.policy = self.trained = loop.dist.wrap(policy)
        # LoRA: the reference is the policy itself, adapters disabled (wrapped once)
        self.reference = None if reference is None else self.policy if reference is policy else \
            loop.dist.wrap(reference.requires_grad_(False), train=False)
        for model in (self.policy, self.reference):
            if model is not None:
                model.eval()  # dropout off: rollout and update see the same function
        self.scorer = make_scorer(loop, self.opts, next(self.policy.parameters()).device)

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": [p for p in self.policy.parameters() if p.requires_grad], "lr": lr}]

    def fill(self, part) -> dict:
        return {}

    def checkpoint_files(self) -> dict:
        return {}

    def restore(self, ckpt_dir):
        pass

    def rewards(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards [G, K], usable [G]): the scores, the no-EOS penalty, the KL in the reward;
        a group is usable when all its scores are finite (and, with drop_uniform_groups, they
        differ)."""
        o, K = self.opts, self.samples_per_prompt
        rewards = batch.scores
        if o.no_eos_penalty is not None:
            rewards = torch.where(batch.finished, rewards, torch.full_like(rewards, o.no_eos_penalty))
        if o.beta and o.kl_in == "reward":
            kl = (losses.kl_penalty(batch.logprobs, batch.ref_logprobs, o.kl_estimator)
                  * batch.mask).sum(-1)
            rewards = rewards - o.beta * kl
        rewards = rewards.view(-1, K)
        usable = torch.isfinite(rewards).all(1)
        if o.drop_uniform_groups:
            usable &= (rewards.amax(1) > rewards.amin(1))
        return rewards, usable

    def learn(self, batch) -> dict:
        o, K = self.opts, self.samples_per_prompt
        rewards, usable = self.rewards(batch)
        advantages = torch.zeros_like(rewards)
        if usable.any():
            advantages[usable] = o.advantages(rewards[usable])
        episodes = usable.repeat_interleave(K)
        advantages = advantages.flatten()
        stats = {}
        if episodes.any():
            stats = self.loop.update(len(episodes), o.ppo_epochs, o.mini_batch_size or
                                     len(episodes), lambda part, index, first: self.loss(
                                         batch, advantages, episodes, part, index, first),
                                     usable=episodes)
        finite, p = batch.scores[torch.isfinite(batch.scores)], self.prefix
        stats.update({f"{p}/failed_scores": float(len(batch.scores) - len(finite)),
                      f"{p}/skipped_groups": float((~usable).sum())})
        if len(finite):
            stats["rewards_train/score"] = finite.mean().item()
        if usable.any():
            stats["rewards_train/reward"] = rewards[usable].mean().item()
            stats[f"{p}/reward_std"] = rewards[usable].std(1).mean().item()
        return stats

    def loss(self, batch, advantages, episodes, part, index, first: bool):
        """The clipped surrogate (+ beta * KL per token) of rows `part` of minibatch `index`,
        over usable episodes only, normalised by the minibatch's loss.aggregation count."""
        o, mb = self.opts, batch.select(part)
        mask = mb.mask * episodes[part, None]
        logprobs, entropy = policy_logprobs(self.policy, mb, o.temperature, with_entropy=True)
        adv = advantages[part, None].expand_as(logprobs)
        high = o.clip_range if o.clip_range_high is None else o.clip_range_high
        per_token, clipped = losses.clipped_surrogate(logprobs, mb.logprobs, adv, o.clip_range,
                                                      high)
        sums = {}
        if o.beta and o.kl_in == "loss":
            kl = losses.kl_penalty(logprobs, mb.ref_logprobs, o.kl_estimator)
            per_token = per_token + o.beta * kl
            sums[f"{self.prefix}/kl"] = ((kl.detach() * mask).sum(), mask.sum())
        whole = batch.mask[index] * episodes[index, None]
        denominator = losses.aggregation_denominator(whole, o.aggregation, o.max_new_tokens)
        loss = losses.aggregate(per_token, mask, o.aggregation, denominator, o.max_new_tokens)
        log_ratio = (logprobs - mb.logprobs).detach()
        tokens, p = mask.sum(), self.prefix
        sums.update({
            "loss/policy": (loss.detach() * denominator,
                            losses.aggregation_denominator(mask, o.aggregation, o.max_new_tokens)),
            f"{p}/clipfrac": ((clipped * mask).sum(), tokens),
            f"{p}/approxkl": (((torch.expm1(log_ratio) - log_ratio) * mask).sum(), tokens),
            f"{p}/entropy": ((entropy.detach() * mask).sum(), tokens)})
        maxima = {f"{p}/first_ratio_max_dev": (log_ratio.exp() - 1).abs().mul(mask).max()} \
            if first else {}
        return loss, sums, maxima


def check(cfg, world_size: int):
    """The batch settings and the scorer's files, before any model loads."""
    o = loss_options(cfg.loss)
    episodes = cfg.batch_size * o.num_generations
    check_rollout_batch(cfg, o, world_size, episodes, o.mini_batch_size or episodes)
    kind, arg = parse_scorer("loss.scorer", o.scorer, o.judge, o.scorer_import)
    if kind == "reward_model":
        from harness.checkpoints import reward_checkpoint_dir
        reward_checkpoint_dir(arg)


def uses_reference(loss_cfg) -> bool:
    return loss_cfg.beta != 0  # beta = 0: no KL term, no reference model loaded


register_loss("grpo", LossSpec(paired=False, step=None, options=GRPOOptions, loop=RolloutLoop,
                               rollout=GroupRL, check=check, uses_reference=uses_reference))
