"""`loss=ppo`: RLHF with PPO against a trained reward model (Ziegler et al. 2019; Stiennon et
al. 2020; Ouyang et al. 2022), following Huang et al. 2024, "The N+ implementation details of
RLHF with PPO".

    python train.py loss=ppo model.archive=SFT_RUN/LATEST/policy.pt loss.reward_model=RM_RUN

One PPO step: sample a response for each of `batch_size` prompts (harness/rollout.py) ->
score it at its EOS with the frozen reward model (normalised by the held-out mean / std stored
with it; a response without EOS gets `no_eos_penalty` instead) -> per-token reward
-kl_coef * KL(policy || reference) plus the score on the last token -> GAE advantages
(whitened) and returns -> `ppo_epochs` passes over shuffled minibatches with the clipped policy
and value losses -> adapt kl_coef. The actor is model.* (the SFT policy), the reference a frozen
copy of it, the critic a copy of the reward model (value head initialised from the reward
head). Dropout stays off in every model. Checkpoints: policy.pt (the actor, loadable as
model.archive anywhere), optimizer.pt, scheduler.pt, critic.pt, trainer_state.pt.
"""

import copy
import math
import time
from dataclasses import asdict, dataclass

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

import losses
from harness import checkpoints, schedule
from harness.objectives import LossSpec, register_loss
from harness import reward_model as rm  # a module: the loss table imports both in turn
from harness.rollout import (critic_values, encode_prompts, fill, generate, policy_logprobs)
from harness.run_logging import RunLogger
from preference_datasets import BatchIterator, load_examples


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
    lora: bool = False
    static_cache: bool = False

    def __post_init__(self):
        if not self.reward_model:
            raise ValueError(
                "loss=ppo needs a reward model: set loss.reward_model=RM_RUN_DIR. Train one on "
                "preference pairs first: `python train.py loss=reward "
                "model.archive=SFT_RUN/LATEST/policy.pt` (README, 'Reward models and PPO')")
        if self.lora:
            raise ValueError("loss.lora=true: LoRA for the PPO actor and critic needs the peft "
                             "integration of the scale-out issue (#6, model.lora.*), which this "
                             "branch does not have; set loss.lora=false")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"loss.kl_estimator={self.kl_estimator!r}: use k1 or k3")
        for key in ("temperature", "ppo_epochs", "mini_batch_size", "max_new_tokens",
                    "kl_target", "kl_horizon", "clip_range", "clip_range_value"):
            if not getattr(self, key) > 0:
                raise ValueError(f"loss.{key}={getattr(self, key)} must be > 0")
        if self.gold_reward:
            rm.check_scorer("loss.gold_reward", self.gold_reward)


@dataclass
class PPOState:
    """Everything besides weights and optimizer that exact resume needs."""
    epoch: int = 0
    epoch_offset: int = 0   # prompts of `epoch` already used
    examples: int = 0       # prompts rolled out in total: the x axis of every metric
    rollouts: int = 0
    steps: int = 0          # optimizer steps
    kl_coef: float = 0.0
    next_eval: int = 0
    last_save: int = -1
    last_eval: int = -1


class TrainingDiverged(FloatingPointError):
    pass


class PPOTrainer:
    """The rollout loop. Constructed like the offline trainers (train.py picks it via the loss
    table); only trainer=BasicTrainer's single-process setting is supported for now."""

    def __init__(self, policy, tokenizer, config, run_dir, reference_model=None, resume=None):
        if config.trainer.name != "BasicTrainer":
            raise NotImplementedError(f"loss=ppo runs with trainer=BasicTrainer only; "
                                      f"trainer={config.trainer.name} wrapping is not wired in yet")
        self.cfg, self.tokenizer, self.run_dir = config, tokenizer, run_dir
        self.opts = PPOOptions(**{k: v for k, v in OmegaConf.to_container(
            config.loss, resolve=True).items() if k != "name"})
        if config.gradient_accumulation_steps != 1:
            raise ValueError("loss=ppo: set loss.mini_batch_size (episodes per optimizer step) "
                             "instead of gradient_accumulation_steps, which the PPO loop does "
                             "not use; keep gradient_accumulation_steps=1")
        if config.max_prompt_length + self.opts.max_new_tokens > config.max_length:
            raise ValueError(f"max_prompt_length={config.max_prompt_length} + loss.max_new_tokens="
                             f"{self.opts.max_new_tokens} exceeds max_length={config.max_length}")
        if config.batch_size % self.opts.mini_batch_size:
            raise ValueError(f"batch_size={config.batch_size} (prompts per rollout) must be a "
                             f"multiple of loss.mini_batch_size={self.opts.mini_batch_size}")
        if tokenizer.pad_token_id == tokenizer.eos_token_id:
            print("note: this tokenizer pads with its EOS token; PPO's masks come from lengths and "
                  "the first EOS (harness/rollout.py), so EOS is still scored and trained")
        self.device = next(policy.parameters()).device
        self.policy, self.reference = policy, reference_model.requires_grad_(False)
        self.reward_model, _, self.rm_meta = rm.load_reward_model(self.opts.reward_model)
        rm.check_same_tokenizer(self.rm_meta, tokenizer, f"loss.reward_model={self.opts.reward_model}")
        self.reward_model.to(self.device).requires_grad_(False)
        self.critic = copy.deepcopy(self.reward_model).requires_grad_(True)
        for model in (self.policy, self.reference, self.critic, self.reward_model):
            model.eval()  # dropout off everywhere: rollout and update see the same function
        self._load_prompts()
        groups = [{"params": self.policy.parameters(), "lr": config.lr},
                  {"params": self.critic.parameters(), "lr": self.opts.critic_lr or config.lr}]
        self.optimizer = getattr(torch.optim, config.optimizer)(groups)
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        self.state = PPOState(kl_coef=self.opts.kl_coef,
                              next_eval=0 if config.do_first_eval else config.eval_every)
        if resume is not None:
            self._restore(resume)
        self.logger = RunLogger(run_dir, OmegaConf.to_container(config, resolve=True),
                                config.wandb if not config.debug else OmegaConf.create(
                                    {"enabled": False}),
                                config.exp_name, resume_step=self.state.examples if resume else None)

    # ---- data ---------------------------------------------------------------------------------
    def _load_prompts(self):
        cfg = self.cfg
        common = dict(sft_mode=True, seed=cfg.seed, prefs_path=cfg.prefs_path,
                      num_turns=cfg.num_turns,
                      cache_dir=checkpoints.first_usable_dir(cfg.local_dirs))
        train = load_examples(list(cfg.datasets), "train", data_fraction=cfg.data_fraction, **common)
        test = load_examples(list(cfg.datasets), "test", **common)
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))
        self.eval_examples = [test[i] for i in order[:cfg.n_eval_examples].tolist()]
        # BatchIterator gives the seeded per-epoch order; only prompts are used here
        self.prompt_order = BatchIterator(train, self.tokenizer, batch_size=cfg.batch_size,
                                          shuffle=True, seed=cfg.seed, drop_last=True,
                                          max_length=cfg.max_length,
                                          max_prompt_length=cfg.max_prompt_length)
        if len(train) < cfg.batch_size:
            raise ValueError(f"{len(train)} train prompts in datasets={list(cfg.datasets)}: fewer "
                             f"than one rollout batch (batch_size={cfg.batch_size})")
        self.train_examples = train
        print(f"data: {len(train)} train / {len(self.eval_examples)} eval prompts")

    def prompt_batches(self, epoch: int, start: int):
        order = self.prompt_order.epoch_order(epoch)
        size = self.cfg.batch_size
        for begin in range(start, len(order) - size + 1, size):
            yield [self.train_examples[i] for i in order[begin:begin + size]]

    def rollout(self, examples, seed: int):
        ids = encode_prompts(self.tokenizer, examples, self.cfg.max_prompt_length)
        batch = generate(self.policy, self.tokenizer, ids, [e.prompt for e in examples],
                         self.opts.max_new_tokens, self.opts.temperature, seed, self.device,
                         static_cache=self.opts.static_cache)
        return fill(batch, self.policy, self.reference, self.critic, self.reward_model,
                    self.opts.temperature, self.opts.mini_batch_size)

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
        o, st = self.opts, self.state
        start = time.time()
        batch = self.rollout(examples, seed=self.cfg.seed * 1_000_003 + st.rollouts)
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
        """ppo_epochs passes over shuffled minibatches; returns the mean statistics."""
        o, B = self.opts, batch.input_ids.shape[0]
        collected = {}
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.state.rollouts)
        for epoch in range(o.ppo_epochs):
            order = torch.randperm(B, generator=gen).to(self.device)
            for start in range(0, B, o.mini_batch_size):
                index = order[start:start + o.mini_batch_size]
                mb_stats = self.minibatch_step(batch.select(index), advantages[index],
                                               returns[index])
                if epoch == 0 and start == 0:  # nothing has changed since the rollout: ratio 1
                    collected["ppo/first_ratio_max_dev"] = [mb_stats.pop("ratio_max_dev")]
                mb_stats.pop("ratio_max_dev", None)
                for k, v in mb_stats.items():
                    collected.setdefault(k, []).append(v)
        return {k: sum(v) / len(v) for k, v in collected.items()}

    def minibatch_step(self, mb, advantages, returns) -> dict:
        o = self.opts
        logprobs, entropy = policy_logprobs(self.policy, mb, o.temperature, with_entropy=True)
        values = critic_values(self.critic, mb)
        pg_loss, clipfrac, approx_kl = losses.ppo_policy_loss(logprobs, mb.logprobs, advantages,
                                                              mb.mask, o.clip_range)
        vf_loss, vf_clipfrac = losses.ppo_value_loss(values, mb.values, returns, mb.mask,
                                                     o.clip_range_value)
        entropy = losses.masked_mean(entropy, mb.mask)
        loss = pg_loss + o.vf_coef * vf_loss - o.entropy_coef * entropy
        stats = {"loss/policy": pg_loss.item(), "loss/value": vf_loss.item(),
                 "ppo/clipfrac": clipfrac.item(), "ppo/approxkl": approx_kl.item(),
                 "ppo/value_clipfrac": vf_clipfrac.item(), "ppo/entropy": entropy.item(),
                 "ratio_max_dev": ((logprobs - mb.logprobs).exp() - 1).abs().mul(mb.mask)
                 .max().item()}
        self.check_finite({"loss/total": loss, "ppo/approxkl": approx_kl})
        if approx_kl.item() > o.max_approx_kl:
            self.diverged("ppo/approxkl", approx_kl.item(), f"> loss.max_approx_kl={o.max_approx_kl}")
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm).item()
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.diverged("grad_norm", grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.steps += 1
        stats["grad_norm"] = grad_norm
        return stats

    # ---- NaN / explosion guard -------------------------------------------------------------------
    def check_finite(self, stats: dict):
        for key, value in stats.items():
            value = torch.as_tensor(value, dtype=torch.float32)
            if not torch.isfinite(value).all():
                self.diverged(key, value[~torch.isfinite(value)].flatten()[0].item())

    def diverged(self, key: str, value: float, why: str = "is not finite"):
        """Save the current weights for inspection, then stop with the offending statistic."""
        path = self.save(f"diverged-{self.state.examples}")
        raise TrainingDiverged(f"PPO stopped at rollout {self.state.rollouts} (after "
                               f"{self.state.examples} prompts, optimizer step "
                               f"{self.state.steps}): {key}={value} {why}; weights saved in "
                               f"{path}. Lower lr, raise kl_coef, or check the reward model.")

    # ---- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Sample on the held-out prompts: reward-model score, KL to the reference, the gold
        reward when loss.gold_reward names one; writes samples/step-N.jsonl."""
        o, st = self.opts, self.state
        scores, kls, gold, rows = [], [], [], []
        size = self.cfg.eval_batch_size
        with torch.random.fork_rng(devices=[]):
            for i in range(0, len(self.eval_examples), size):
                examples = self.eval_examples[i:i + size]
                batch = self.rollout(examples, seed=self.cfg.seed + 7 * i)
                scores.append(batch.scores)
                kls.append((losses.kl_penalty(batch.logprobs, batch.ref_logprobs, "k1")
                            * batch.mask).sum(-1))
                rows.extend({"prompt": s.prompt, "policy": s.completion} for s in batch.samples)
        results = {"rewards_eval/score": torch.cat(scores).mean().item(),
                   "kl_eval/kl": torch.cat(kls).mean().item()}
        if o.gold_reward:
            from harness.toy_task import get_gold_reward
            fn = get_gold_reward(o.gold_reward)
            gold = [fn(r["prompt"], r["policy"]) for r in rows]
            results["rewards_eval/gold"] = sum(gold) / len(gold)
        st.last_eval = st.examples
        if self.cfg.sample_during_eval:
            self.logger.log_samples(st.examples, rows[:self.cfg.n_eval_model_samples])
        self.logger.log(results, st.examples)
        print(f"eval @ {st.examples} prompts: " +
              ", ".join(f"{k}={v:.4g}" for k, v in results.items()))
        return results

    # ---- the loop -----------------------------------------------------------------------------
    def train(self):
        cfg, st = self.cfg, self.state
        per_epoch = self.prompt_order.examples_per_epoch
        total = schedule.total_examples(cfg, per_epoch)
        bar = tqdm(total=total, initial=st.examples, unit="prompt", desc="ppo", dynamic_ncols=True)
        while st.examples < total:
            for examples in self.prompt_batches(st.epoch, st.epoch_offset):
                schedule.evaluate_if_due(self)
                stats = self.ppo_step(examples)
                self.logger.log(stats, st.examples)
                bar.update(len(examples))
                bar.set_postfix(score=f"{stats['rewards_train/score']:.3f}",
                                kl=f"{stats['kl_train/kl']:.2f}")
                if isinstance(cfg.save_every, int) and cfg.save_every > 0 and \
                        schedule.crossed_multiple(cfg.save_every, st.examples, len(examples)):
                    self.save()
                if st.examples >= total:
                    break
            if st.epoch_offset >= per_epoch or st.examples < total:
                st.epoch, st.epoch_offset = st.epoch + 1, 0
        bar.close()
        schedule.finish(self)

    # ---- checkpoints ----------------------------------------------------------------------------
    def save(self, name: str | None = None):
        if self.cfg.debug:
            return None
        st = self.state
        name = name or f"step-{st.examples}"
        critic = {k: v.detach().cpu() for k, v in self.critic.state_dict().items()}
        write_critic = lambda d: torch.save({"step_idx": st.examples, "state": critic},  # noqa
                                            d / "critic.pt")
        path = checkpoints.save_checkpoint(
            self.run_dir, name, st.examples, {"examples": st.examples},
            {k: v.detach().cpu() for k, v in self.policy.state_dict().items()},
            self.optimizer.state_dict(), self.scheduler.state_dict(),
            {"ppo_state": asdict(st), "rng": checkpoints.rng_state()}, write_critic)
        st.last_save = st.examples
        checkpoints.prune_checkpoints(self.run_dir, self.cfg.keep_last)
        print(f"saved {path}")
        return path

    def _restore(self, resume: dict):
        self.policy.load_state_dict(resume["policy"]["state"])
        critic = torch.load(f"{resume['dir']}/critic.pt", map_location="cpu", weights_only=True)
        self.critic.load_state_dict(critic["state"])
        self.optimizer.load_state_dict(resume["optimizer"]["state"])
        self.scheduler.load_state_dict(resume["scheduler"]["state"])
        self.state = PPOState(**resume["trainer"]["ppo_state"])
        checkpoints.set_rng_state(resume["trainer"]["rng"])
        print(f"resumed from {resume['dir']} at {self.state.examples} prompts")


def load_policy(cfg, archive, device_map=None, meta: bool = False):
    """The actor (model.* as usual), after checking that the reward model exists, so a bad
    loss.reward_model fails before a large model loads."""
    from harness.modeling import load_model
    rm.checkpoint_dir(cfg.loss.reward_model)
    if cfg.model.get("lora", {}).get("r"):  # PPO's actor/critic checkpoints are full models, for now
        raise ValueError("loss=ppo does not support model.lora yet (actor and critic are saved as "
                         "full models); unset model.lora.r")
    return load_model(cfg.model.name_or_path, cfg.model.policy_dtype, archive, device_map, meta)


register_loss("ppo", LossSpec(losses.ppo_policy_loss, paired=False, step=None,
                              uses_reference=True, options=PPOOptions, load_policy=load_policy,
                              trainer=PPOTrainer))
