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

trainer=FSDPTrainer / TensorParallelTrainer wrap all four models. Each data-parallel rank samples
its share of the prompts (keyed sampling: the responses one process would draw), then every rank
holds the whole rollout, so advantages are whitened over the global batch; each minibatch is
split over the ranks with its loss weighted by tokens, so the gradient and the logged statistics
are those of one process with the same global batch.
"""

import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import losses
from harness import checkpoints
from harness.parallel import distributed
from harness.training import schedule
from harness.data.tokens import pad_id
from harness.objectives import LossSpec, loss_options, register_loss
from harness.data.gold import check_scorer, get_gold_reward
from harness.rl.rollout import (build_batch, critic_values, encode_prompts, fill, generate,
                             policy_logprobs)
from harness.rl.ppo_models import build_models, critic_state, load_critic
from harness.training.checkpoint_writer import CheckpointWriter, TrainState, restore
from harness.training.setup import load_splits, make_logger, make_optimizer, make_scheduler
from harness.training.strategy import make_strategy
from preference_datasets import BatchIterator


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


@dataclass
class PPOState(TrainState):
    """The shared resume state (examples count prompts here) plus the rollout count and the
    (adaptive) KL coefficient."""
    rollouts: int = 0
    kl_coef: float = 0.0


def rollout_seed(seed: int, rollout: int) -> int:
    """The sampling seed of a rollout (rollout -1: evaluations); rows are keyed within it."""
    return seed * 1_000_003 + rollout


class TrainingDiverged(FloatingPointError):
    pass


class PPOTrainer:
    """The rollout loop, on any strategy (trainer=BasicTrainer: one process; FSDPTrainer /
    TensorParallelTrainer: sharded models). Constructed like the offline BasicTrainer (train.py
    picks it through the loss table)."""

    def __init__(self, policy, tokenizer, config, run_dir, reference_model=None, resume=None):
        self.cfg, self.tokenizer, self.run_dir = config, tokenizer, run_dir
        self.opts = loss_options(config.loss)
        self.dist = make_strategy(config)
        if tokenizer.pad_token_id == tokenizer.eos_token_id and self.dist.is_main:
            print("note: this tokenizer pads with its EOS token; PPO's masks come from lengths and "
                  "the first EOS (harness/rl/rollout.py), so EOS is still scored and trained")
        self.models = build_models(self.dist, config, tokenizer, policy, reference_model,
                                   self.opts.reward_model)
        m = self.models
        self.policy, self.reference, self.critic, self.reward_model = \
            m.policy, m.reference, m.critic, m.reward_model
        self.rm_meta = m.rm_meta
        self.device = next(self.policy.parameters()).device
        self._load_prompts()
        trained = lambda model: [p for p in model.parameters() if p.requires_grad]  # noqa: E731
        self.optimizer = make_optimizer(
            [{"params": trained(self.policy), "lr": config.lr},
             {"params": trained(self.critic), "lr": self.opts.critic_lr or config.lr}], config)
        self.scheduler = make_scheduler(self.optimizer, config)
        self.state = PPOState(kl_coef=self.opts.kl_coef,
                              next_eval=0 if config.do_first_eval else config.eval_every)
        if resume is not None:
            self.state = restore(resume, self.dist, self.policy, m.trained, self.optimizer,
                                 self.scheduler, PPOState)
            if not self.dist.sharded_checkpoints:  # the shards hold the critic; else critic.pt
                load_critic(m, resume["dir"])
        self.writer = CheckpointWriter(run_dir, config, self.dist, tokenizer)
        self.logger = make_logger(config, run_dir, self.dist.is_main, self.state,
                                  resume is not None)

    @staticmethod
    def reads(spec, cfg) -> set[str]:
        """The top-level options the rollout loop reads (harness/training/options.py)."""
        return {"sample_during_eval", "n_eval_model_samples"}

    @staticmethod
    def behaves_as(spec, cfg) -> dict:
        """Values of options it does not read that the loop behaves as (may be stated): one
        micro-batch per PPO minibatch (loss.mini_batch_size), whole rollout batches, plain
        padded forwards in the models' own dtype."""
        return {"gradient_accumulation_steps": 1, "micro_batch_tokens": None, "drop_last": True,
                "packing": False, "prefix_sharing": False, "amp_dtype": None,
                "activation_checkpointing": False}

    # ---- data ---------------------------------------------------------------------------------
    def _load_prompts(self):
        cfg = self.cfg
        train, self.eval_examples = load_splits(cfg, sft_mode=True)
        # BatchIterator gives the seeded per-epoch order; only prompts are used here
        self.prompt_order = BatchIterator(train, self.tokenizer, batch_size=cfg.batch_size,
                                          shuffle=True, seed=cfg.seed, drop_last=True,
                                          max_length=cfg.max_length,
                                          max_prompt_length=cfg.max_prompt_length)
        if len(train) < cfg.batch_size:
            raise ValueError(f"{len(train)} train prompts in datasets={list(cfg.datasets)}: fewer "
                             f"than one rollout batch (batch_size={cfg.batch_size})")
        self.train_examples = train
        if self.dist.is_main:
            print(f"data: {len(train)} train / {len(self.eval_examples)} eval prompts")

    def save(self, name: str | None = None):
        """Collective: the shared writer's files plus critic.pt."""
        if self.cfg.debug:
            return
        files = {"critic.pt": critic_state(self.dist, self.models)}
        self.writer.save(self.state, self.policy, self.models.trained, self.optimizer,
                         self.scheduler, name, files=files)

    def prompt_batches(self, epoch: int, start: int):
        order = self.prompt_order.epoch_order(epoch)
        size = self.cfg.batch_size
        for begin in range(start, len(order) - size + 1, size):
            yield [self.train_examples[i] for i in order[begin:begin + size]]

    def gather(self, part: list) -> list:
        """The data-parallel ranks' lists, concatenated in rank order (identity in one process;
        the ranks of a tensor-parallel group hold the same rows, one of them counts)."""
        if distributed.world_size() == 1:
            return part
        return [x for got in distributed.all_gather_objects(part)[::self.dist.tp_size] for x in got]

    def rollout(self, examples, seed: int, first_key: int = 0):
        """Episodes for `examples` (keyed first_key, first_key + 1, ...): this rank samples its
        share, then every rank lays out the whole batch as one process would, scores its share
        of the rows and receives the others'."""
        o, synced = self.opts, distributed.world_size() > 1
        rows, n = distributed.even_share(len(examples), self.dist.dp_rank, self.dist.dp_size)
        mine = [examples[i] for i in rows]
        samples = generate(self.policy, self.tokenizer,
                           encode_prompts(self.tokenizer, mine, self.cfg.max_prompt_length),
                           [e.prompt for e in mine], o.max_new_tokens, o.temperature, seed,
                           [first_key + i for i in rows], synced,
                           static_cache=o.static_cache)
        batch = build_batch(self.gather(samples[:n]), pad_id(self.tokenizer), self.device)
        rows, n = distributed.even_share(len(batch.samples), self.dist.dp_rank, self.dist.dp_size)
        part = fill(batch.select(torch.tensor(rows, device=self.device)), self.policy,
                    self.reference, self.critic, self.reward_model, o.temperature,
                    o.mini_batch_size)
        for key in ("logprobs", "ref_logprobs", "values", "scores"):
            scored = getattr(part, key)[:n]
            setattr(batch, key, scored if distributed.world_size() == 1 else
                    torch.cat(self.gather([scored.cpu()])).to(self.device))
        return batch

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
        rewards = -self.state.kl_coef * kl
        last = (mask.sum(-1).long() - 1).clamp(min=0)  # the EOS (or last) response token
        rewards[torch.arange(len(last)), last] += scores
        return rewards * mask, kl, scores

    # ---- one PPO step -----------------------------------------------------------------------------
    def ppo_step(self, examples) -> dict:
        """Rollout, advantages over the whole batch (every rank holds it), update."""
        o, st = self.opts, self.state
        start = time.time()
        batch = self.rollout(examples, seed=rollout_seed(self.cfg.seed, st.rollouts))
        self.check_finite({"rewards_train/score": batch.scores, "ppo/values": batch.values,
                           "ppo/logprobs": batch.logprobs})
        rewards, kl, scores = self.token_rewards(batch)
        advantages, returns = losses.gae(rewards, batch.values, batch.mask, o.gamma, o.lam)
        if o.whiten_advantages:
            advantages = losses.masked_whiten(advantages, batch.mask)
        stats = self.update(batch, advantages, returns)
        seq_kl = (losses.kl_penalty(batch.logprobs, batch.ref_logprobs, "k1") * batch.mask).sum(-1)
        n = len(examples)
        st.rollouts += 1
        st.examples += n
        st.epoch_offset += n
        if o.adaptive_kl:
            st.kl_coef = losses.adaptive_kl_coef(st.kl_coef, seq_kl.mean().item(), o.kl_target,
                                                 o.kl_horizon, n)
        stats.update({
            "rewards_train/score": batch.scores.mean().item(),
            "rewards_train/score_used": scores.mean().item(),
            "rewards_train/total": rewards.sum(-1).mean().item(),
            "kl_train/kl": seq_kl.mean().item(), "kl_train/coef": st.kl_coef,
            "ppo/explained_variance": losses.explained_variance(batch.values, returns, batch.mask),
            "ppo/response_length": batch.mask.sum(-1).mean().item(),
            "ppo/eos_fraction": batch.finished.float().mean().item(),
            "lr": self.scheduler.get_last_lr()[0], "counters/examples": st.examples,
            "counters/updates": st.steps, "examples_per_second": n / (time.time() - start)})
        self.check_finite(stats)
        return stats

    def update(self, batch, advantages, returns) -> dict:
        """ppo_epochs passes over shuffled minibatches (the same order on every rank, each
        taking its equal share of a minibatch); returns the mean statistics."""
        o, B = self.opts, batch.input_ids.shape[0]
        share = o.mini_batch_size // self.dist.dp_size  # PPO's check: the ranks divide it
        collected = {}
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.state.rollouts)
        for epoch in range(o.ppo_epochs):
            order = torch.randperm(B, generator=gen).to(self.device)
            for start in range(0, B, o.mini_batch_size):
                index = order[start:start + o.mini_batch_size]
                mine = index[self.dist.dp_rank * share:(self.dist.dp_rank + 1) * share]
                first = epoch == 0 and start == 0  # nothing has changed since the rollout
                mb_stats = self.minibatch_step(batch.select(mine), advantages[mine],
                                               returns[mine], batch.mask[index].sum().item(), first)
                for k, v in mb_stats.items():
                    collected.setdefault(k, []).append(v)
        return {k: sum(v) / len(v) for k, v in collected.items()}

    def minibatch_step(self, mb, advantages, returns, n_tokens: float, first: bool) -> dict:
        """One optimizer step on this rank's share `mb` of a minibatch of n_tokens response
        tokens. Each loss is a mean over the share's tokens; weighted by the share's tokens (and
        the data-parallel ranks FSDP averages over) it becomes the mean over the minibatch's."""
        o = self.opts
        logprobs, entropy = policy_logprobs(self.policy, mb, o.temperature, with_entropy=True)
        values = critic_values(self.critic, mb)
        pg_loss, clipfrac, approx_kl = losses.ppo_policy_loss(logprobs, mb.logprobs, advantages,
                                                              mb.mask, o.clip_range)
        vf_loss, vf_clipfrac = losses.ppo_value_loss(values, mb.values, returns, mb.mask,
                                                     o.clip_range_value)
        entropy = losses.masked_mean(entropy, mb.mask)
        loss = pg_loss + o.vf_coef * vf_loss - o.entropy_coef * entropy
        local = mb.mask.sum().item()
        terms = {"loss/total": loss, "loss/policy": pg_loss, "loss/value": vf_loss,
                 "ppo/clipfrac": clipfrac, "ppo/approxkl": approx_kl,
                 "ppo/value_clipfrac": vf_clipfrac, "ppo/entropy": entropy}
        totals = distributed.sum_across_ranks([v.detach() * local for v in terms.values()]
                                              + [local])
        stats = {k: v / max(totals[-1], 1) for k, v in zip(terms, totals)}
        if first:  # ratio 1 up to numerics: how far from it (ppo/first_ratio_max_dev)
            dev = ((logprobs - mb.logprobs).exp() - 1).abs().mul(mb.mask).max()
            stats["ppo/first_ratio_max_dev"] = distributed.max_across_ranks(dev)
        self.check_finite({"loss/total": stats.pop("loss/total"),
                           "ppo/approxkl": stats["ppo/approxkl"]})
        if stats["ppo/approxkl"] > o.max_approx_kl:
            self.diverged("ppo/approxkl", stats["ppo/approxkl"],
                          f"> loss.max_approx_kl={o.max_approx_kl}")
        (loss * (local * self.dist.dp_size / max(n_tokens, 1))).backward()
        grad_norm = self.dist.clip(self.models.trained.parameters(), self.cfg.max_grad_norm)
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.diverged("grad_norm", grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.steps += 1
        stats["grad_norm"] = grad_norm
        return stats

    # ---- NaN / explosion guard (on values every rank shares, so all ranks stop together) ------
    def check_finite(self, stats: dict):
        for key, value in stats.items():
            value = torch.as_tensor(value, dtype=torch.float32)
            if not torch.isfinite(value).all():
                self.diverged(key, value[~torch.isfinite(value)].flatten()[0].item())

    def diverged(self, key: str, value: float, why: str = "is not finite"):
        """Save the current weights for inspection, then stop with the offending statistic."""
        name = f"diverged-{self.state.examples}"
        self.save(name)
        saved = "not saved (debug=true)" if self.cfg.debug else f"saved in {self.run_dir}/{name}"
        raise TrainingDiverged(f"PPO stopped at rollout {self.state.rollouts} (after "
                               f"{self.state.examples} prompts, optimizer step "
                               f"{self.state.steps}): {key}={value} {why}; weights {saved}. "
                               "Lower lr, raise kl_coef, or check the reward model.")

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Sample on the held-out prompts: reward-model score, KL to the reference, the gold
        reward when loss.gold_reward names one; writes samples/step-N.jsonl."""
        o, st = self.opts, self.state
        scores, kls, rows = [], [], []
        size = self.cfg.eval_batch_size
        for i in range(0, len(self.eval_examples), size):
            # keyed by prompt: every evaluation samples with the same noise, whatever the ranks
            batch = self.rollout(self.eval_examples[i:i + size],
                                 seed=rollout_seed(self.cfg.seed, -1), first_key=i)
            scores.append(batch.scores)
            kls.append((losses.kl_penalty(batch.logprobs, batch.ref_logprobs, "k1")
                        * batch.mask).sum(-1))
            rows.extend({"prompt": s.prompt, "policy": s.completion} for s in batch.samples)
        results = {"rewards_eval/score": torch.cat(scores).mean().item(),
                   "kl_eval/kl": torch.cat(kls).mean().item()}
        if o.gold_reward:
            fn = get_gold_reward(o.gold_reward)
            gold = [fn(r["prompt"], r["policy"]) for r in rows]
            results["rewards_eval/gold"] = sum(gold) / len(gold)
        st.last_eval = st.examples
        if self.cfg.sample_during_eval:
            self.logger.log_samples(st.examples, rows[:self.cfg.n_eval_model_samples])
        self.logger.log(results, st.examples)
        if self.dist.is_main:
            print(f"eval @ {st.examples} prompts: " +
                  ", ".join(f"{k}={v:.4g}" for k, v in results.items()))
        return results

    # ---- the loop -----------------------------------------------------------------------------
    def train(self):
        cfg, st = self.cfg, self.state
        per_epoch = self.prompt_order.examples_per_epoch
        total = schedule.total_examples(cfg, per_epoch)
        bar = tqdm(total=total, initial=st.examples, unit="prompt", desc="ppo", dynamic_ncols=True,
                   disable=not self.dist.is_main)
        while st.examples < total:
            schedule.advance_epoch(st, per_epoch)  # (a checkpoint saved at an epoch's end)
            for examples in self.prompt_batches(st.epoch, st.epoch_offset):
                schedule.evaluate_if_due(self)
                stats = self.ppo_step(examples)
                self.logger.log_train(stats, st.examples)
                bar.update(len(examples))
                bar.set_postfix(score=f"{stats['rewards_train/score']:.3f}",
                                kl=f"{stats['kl_train/kl']:.2f}")
                schedule.advance_epoch(st, per_epoch)
                schedule.save_if_due(self, len(examples))
                if st.examples >= total:
                    break
        bar.close()
        schedule.finish(self)

def check(cfg, world_size: int):
    """PPO's batch settings, before any model loads."""
    o = loss_options(cfg.loss)
    dp = world_size // distributed.tensor_parallel_size(cfg, world_size)
    if cfg.max_prompt_length + o.max_new_tokens > cfg.max_length:
        raise ValueError(f"max_prompt_length={cfg.max_prompt_length} + loss.max_new_tokens="
                         f"{o.max_new_tokens} exceeds max_length={cfg.max_length}")
    if cfg.batch_size % o.mini_batch_size:
        raise ValueError(f"batch_size={cfg.batch_size} (prompts per rollout) must be a "
                         f"multiple of loss.mini_batch_size={o.mini_batch_size}")
    if o.mini_batch_size % dp:
        raise ValueError(f"loss.mini_batch_size={o.mini_batch_size} must be a multiple of the {dp}"
                         " data-parallel ranks (each takes an equal share of every minibatch)")


def load_policy(cfg, archive, device_map=None, meta: bool = False):
    """The actor (model.* as usual), after checking that the reward model exists, so a bad
    loss.reward_model fails before a large model loads."""
    from harness.models.modeling import load_model
    checkpoints.reward_checkpoint_dir(cfg.loss.reward_model)
    return load_model(cfg.model.name_or_path, cfg.model.policy_dtype, archive, device_map, meta)


register_loss("ppo", LossSpec(paired=False, step=None, uses_reference=True, options=PPOOptions,
                              load_policy=load_policy, check=check, loop=PPOTrainer))
