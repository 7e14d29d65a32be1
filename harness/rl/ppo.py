"""`loss=ppo`: RLHF with PPO against a trained reward model (Ziegler et al. 2019; Stiennon et
al. 2020; Ouyang et al. 2022), following Huang et al. 2024, "The N+ implementation details of
RLHF with PPO".

    python train.py loss=ppo model.archive=SFT_RUN/LATEST/policy.pt loss.reward_model=RM_RUN

One PPO step: sample a response for each of `batch_size` prompts (harness/rl/rollout.py) ->
score it at its EOS with the frozen reward model (normalised by the held-out mean / std stored
with it; a response without EOS gets `no_eos_penalty` instead) -> per-token reward
-kl_coef * KL(policy || reference) plus the score on the last token -> GAE advantages
(whitened) and returns -> `ppo_epochs` passes over shuffled minibatches with the clipped policy
and value losses -> adapt kl_coef. The actor is model.* (the SFT policy), the reference a frozen
copy of it, the critic a copy of the reward model (value head initialised from the reward
head); with model.lora.r the reference and the reward model are the LoRA actor and critic with
adapters disabled (harness/rl/ppo_models.py: building, wrapping, checkpoints). Dropout stays off.

PPO is a method of the shared rollout loop (harness/rl/loop.py: sampling, scoring, the update's
minibatches over ranks and micro-batches, evaluation, checkpoints, the divergence guard); this
module holds what is PPO's own: the critic, the per-token reward with its KL penalty, GAE, the
clipped policy and value losses (weighted by tokens, so ranks and micro-batches add up to the
minibatch's loss) and the adaptive KL coefficient. trainer=FSDPTrainer / TensorParallelTrainer
wrap all four models.
"""

from dataclasses import dataclass

import torch

import losses
from harness import checkpoints
from harness.data.gold import check_scorer
from harness.objectives import LossSpec, loss_options, register_loss
from harness.rl.loop import RolloutLoop, check_rollout_batch
from harness.rl.ppo_models import build_models, critic_state, load_critic
from harness.rl.rollout import chunked, critic_values, policy_logprobs
from harness.rl.scorers import RewardModelScorer


@dataclass
class PPOOptions:
    """The loss.* options of loss=ppo; config/loss/ppo.yaml gives each default's source."""
    reward_model: str | None = None
    normalize_reward: bool = True
    temperature: float = 0.7
    max_new_tokens: int = 53
    no_eos_penalty: float | None = -1.0
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: float = 10000
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    ppo_epochs: int = 4
    mini_batch_size: int = 8
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    critic_lr: float | None = None
    gold_reward: str | None = None
    max_approx_kl: float = 10.0
    static_cache: bool = False

    def __post_init__(self):
        if not self.reward_model:
            raise ValueError(
                "loss=ppo needs a reward model: set loss.reward_model=RM_RUN_DIR. Train one on "
                "preference pairs first: `python train.py loss=reward "
                "model.archive=SFT_RUN/LATEST/policy.pt` (README, 'Reward models and PPO')")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"loss.kl_estimator={self.kl_estimator!r}: use k1 or k3")
        for key in ("temperature", "ppo_epochs", "mini_batch_size", "max_new_tokens",
                    "kl_target", "kl_horizon", "clip_range", "clip_range_value"):
            if not getattr(self, key) > 0:
                raise ValueError(f"loss.{key}={getattr(self, key)} must be > 0")
        if self.gold_reward:
            check_scorer("loss.gold_reward", self.gold_reward)


class PPO:
    """PPO's part of the rollout loop: the four models (harness/rl/ppo_models.py), the critic's
    values at rollout, GAE and the clipped losses."""
    prefix = "ppo"
    samples_per_prompt = 1

    def __init__(self, loop, policy, reference):
        self.loop, o = loop, loop.opts
        self.opts = o
        m = self.models = build_models(loop.dist, loop.cfg, loop.tokenizer, policy, reference,
                                       o.reward_model)
        self.policy, self.reference, self.critic, self.trained = \
            m.policy, m.reference, m.critic, m.trained
        self.reward_model, self.rm_meta = m.reward_model, m.rm_meta
        self.logprob_temperature = o.temperature
        # raw scores (logged as rewards_train/score); token_rewards normalises them
        self.scorer = RewardModelScorer(m.reward_model, m.rm_meta, False, loop.chunk)

    def param_groups(self, lr: float) -> list[dict]:
        trained = lambda model: [p for p in model.parameters() if p.requires_grad]  # noqa: E731
        return [{"params": trained(self.policy), "lr": lr},
                {"params": trained(self.critic), "lr": self.opts.critic_lr or lr}]

    def fill(self, part) -> dict:
        return {"values": chunked(part, self.loop.chunk, lambda mb: critic_values(self.critic, mb))}

    def checkpoint_files(self) -> dict:
        """Collective: critic.pt's state."""
        return {"critic.pt": critic_state(self.loop.dist, self.models)}

    def restore(self, ckpt_dir):
        if not self.loop.dist.sharded_checkpoints:  # the shards hold the critic; else critic.pt
            load_critic(self.models, ckpt_dir)

    # ---- rewards and advantages -----------------------------------------------------------------
    def token_rewards(self, batch):
        """(per-token rewards [B, T], per-token KL [B, T], final scores [B])."""
        o, mask = self.opts, batch.mask
        scores = batch.scores
        if o.normalize_reward:
            scores = (scores - self.rm_meta["reward_mean"]) / max(self.rm_meta["reward_std"], 1e-8)
        if o.no_eos_penalty is not None:
            scores = torch.where(batch.finished, scores, torch.full_like(scores, o.no_eos_penalty))
        kl = losses.kl_penalty(batch.logprobs, batch.ref_logprobs, o.kl_estimator) * mask
        rewards = -self.loop.state.kl_coef * kl
        last = (mask.sum(-1).long() - 1).clamp(min=0)  # the EOS (or last) response token
        rewards[torch.arange(len(last)), last] += scores
        return rewards * mask, kl, scores

    def learn(self, batch) -> dict:
        """Advantages over the whole batch (every rank holds it), ppo_epochs of minibatch
        updates, the adaptive KL coefficient."""
        o, loop = self.opts, self.loop
        loop.check_finite({"rewards_train/score": batch.scores, "ppo/values": batch.values,
                           "ppo/logprobs": batch.logprobs})
        rewards, kl, scores = self.token_rewards(batch)
        advantages, returns = losses.gae(rewards, batch.values, batch.mask, o.gamma, o.lam)
        if o.whiten_advantages:
            advantages = losses.masked_whiten(advantages, batch.mask)
        stats = loop.update(len(batch.samples), o.ppo_epochs, o.mini_batch_size,
                            lambda part, index, first: self.minibatch_loss(
                                batch, advantages, returns, part, index, first))
        seq_kl = loop.sequence_kl(batch)
        if o.adaptive_kl:
            st = loop.state
            st.kl_coef = losses.adaptive_kl_coef(st.kl_coef, seq_kl.mean().item(), o.kl_target,
                                                 o.kl_horizon, len(batch.samples))
        stats.update({
            "rewards_train/score": batch.scores.mean().item(),
            "rewards_train/score_used": scores.mean().item(),
            "rewards_train/total": rewards.sum(-1).mean().item(),
            "kl_train/coef": loop.state.kl_coef,
            "ppo/explained_variance": losses.explained_variance(batch.values, returns, batch.mask)})
        return stats

    def minibatch_loss(self, batch, advantages, returns, part, index, first: bool):
        """The loss of rows `part` of minibatch `index`: token means over the part, weighted by
        its share of the minibatch's response tokens."""
        o, mb = self.opts, batch.select(part)
        logprobs, entropy = policy_logprobs(self.policy, mb, o.temperature, with_entropy=True)
        values = critic_values(self.critic, mb)
        pg_loss, clipfrac, approx_kl = losses.ppo_policy_loss(
            logprobs, mb.logprobs, advantages[part], mb.mask, o.clip_range)
        vf_loss, vf_clipfrac = losses.ppo_value_loss(values, mb.values, returns[part], mb.mask,
                                                     o.clip_range_value)
        entropy = losses.masked_mean(entropy, mb.mask)
        loss = pg_loss + o.vf_coef * vf_loss - o.entropy_coef * entropy
        local = mb.mask.sum().item()
        terms = {"loss/total": loss, "loss/policy": pg_loss, "loss/value": vf_loss,
                 "ppo/clipfrac": clipfrac, "ppo/approxkl": approx_kl,
                 "ppo/value_clipfrac": vf_clipfrac, "ppo/entropy": entropy}
        sums = {k: (v.detach() * local, local) for k, v in terms.items()}
        maxima = {}
        if first:  # ratio 1 up to numerics: how far from it (ppo/first_ratio_max_dev)
            maxima["ppo/first_ratio_max_dev"] = \
                ((logprobs - mb.logprobs).exp() - 1).abs().mul(mb.mask).max()
        return loss * (local / max(batch.mask[index].sum().item(), 1)), sums, maxima


def check(cfg, world_size: int):
    """PPO's batch settings, before any model loads."""
    o = loss_options(cfg.loss)
    check_rollout_batch(cfg, o, world_size, cfg.batch_size, o.mini_batch_size)


def load_policy(cfg, archive, device_map=None, meta: bool = False):
    """The actor (model.* as usual), after checking that the reward model exists, so a bad
    loss.reward_model fails before a large model loads."""
    from harness.models.modeling import load_model
    checkpoints.reward_checkpoint_dir(cfg.loss.reward_model)
    return load_model(cfg.model.name_or_path, cfg.model.policy_dtype, archive, device_map, meta)


register_loss("ppo", LossSpec(paired=False, step=None, uses_reference=True, options=PPOOptions,
                              load_policy=load_policy, check=check, loop=RolloutLoop,
                              rollout=PPO))
