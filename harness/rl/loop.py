"""THE rollout loop, shared by loss=ppo, grpo, rloo and online_dpo (one loop, not a copy).

One step per `batch_size` prompts: sample `samples_per_prompt` responses for each (keyed by the
seed, the rollout, the prompt's row and the sample's index, so a response does not depend on the
other prompts of its batch or on the rank that samples it) -> per-token log-probs of the policy
and, when there is one, the reference -> the method's own per-token tensors (PPO: values) ->
scores (the method's scorer, harness/rl/scorers.py) -> the method's `learn`: advantages or
labelled pairs, then `update`: epochs of shuffled minibatches, each split over the data-parallel
ranks and each rank's share into gradient_accumulation_steps micro-batches, one optimizer step
per minibatch. The schedule (evaluate, save, stop), the prompts, evaluation, checkpoints (the
shared CheckpointWriter) and the divergence guard are the loop's.

A method (LossSpec.rollout, built as method(loop, policy, reference)) provides: policy,
reference (None: no reference model, e.g. GRPO at beta 0), trained (what the optimizer updates
and sharded checkpoints hold), scorer, samples_per_prompt, logprob_temperature, prefix (of its
metric names), param_groups(lr), fill(part) -> {name: [rows, T] tensor}, learn(batch) -> stats,
checkpoint_files() (collective) and restore(ckpt_dir). harness/rl/ppo.py (critic, GAE, clipped
value loss), grpo.py / rloo.py (group advantages) and online_dpo.py (scored pairs, a DPO-family
step) are the methods.

Every rank holds the whole rollout (each samples and scores its share, then all gather), so
group statistics and advantages are those of one process with the same global batch; the update
weights each rank's share by the minibatch's own normaliser, so 2 ranks, or k micro-batches,
give one process's gradient (tests/test_ppo_distributed.py, tests/test_online_rl.py).
"""

import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

import losses
from harness.data.gold import get_gold_reward
from harness.data.tokens import pad_id
from harness.models.lora import adapters_disabled
from harness.objectives import get_loss_spec, loss_options
from harness.parallel import distributed
from harness.rl.rollout import build_batch, chunked, encode_prompts, generate, policy_logprobs
from harness.training import schedule
from harness.training.checkpoint_writer import CheckpointWriter, TrainState, restore
from harness.training.setup import load_splits, make_logger, make_optimizer, make_scheduler
from harness.training.strategy import make_strategy
from preference_datasets import BatchIterator


@dataclass
class RolloutState(TrainState):
    """The shared resume state (examples count prompts here) plus the rollout count and PPO's
    (adaptive) KL coefficient."""
    rollouts: int = 0
    kl_coef: float = 0.0


def rollout_seed(seed: int, rollout: int) -> int:
    """The sampling seed of a rollout (rollout -1: evaluations); rows are keyed within it."""
    return seed * 1_000_003 + rollout


class TrainingDiverged(FloatingPointError):
    pass


class RolloutLoop:
    """The rollout loop on any strategy (trainer=BasicTrainer: one process; FSDPTrainer /
    TensorParallelTrainer: sharded models). Constructed like the offline BasicTrainer (train.py
    picks it through the loss table)."""

    def __init__(self, policy, tokenizer, config, run_dir, reference_model=None, resume=None):
        self.cfg, self.tokenizer, self.run_dir = config, tokenizer, run_dir
        self.opts = loss_options(config.loss)
        self.name = config.loss.name
        self.dist = make_strategy(config)
        # rows per no-grad forward (log-probs, values, reward-model scores)
        self.chunk = getattr(self.opts, "mini_batch_size", None) or config.eval_batch_size
        if tokenizer.pad_token_id == tokenizer.eos_token_id and self.dist.is_main:
            print("note: this tokenizer pads with its EOS token; the rollout masks come from "
                  "lengths and the first EOS (harness/rl/rollout.py), so EOS is still trained")
        self.method = m = get_loss_spec(self.name).rollout(self, policy, reference_model)
        self.policy, self.reference = m.policy, m.reference
        self.device = next(self.policy.parameters()).device
        self._load_prompts()
        self.optimizer = make_optimizer(m.param_groups(config.lr), config)
        self.scheduler = make_scheduler(self.optimizer, config)
        self.state = RolloutState(kl_coef=getattr(self.opts, "kl_coef", 0.0),
                                  next_eval=0 if config.do_first_eval else config.eval_every)
        if resume is not None:
            self.state = restore(resume, self.dist, self.policy, m.trained, self.optimizer,
                                 self.scheduler, RolloutState)
            m.restore(resume["dir"])
        self.writer = CheckpointWriter(run_dir, config, self.dist, tokenizer)
        self.logger = make_logger(config, run_dir, self.dist.is_main, self.state,
                                  resume is not None)

    @staticmethod
    def reads(spec, cfg) -> set[str]:
        """The top-level options the rollout loop reads (harness/training/options.py)."""
        return {"sample_during_eval", "n_eval_model_samples", "gradient_accumulation_steps"}

    @staticmethod
    def behaves_as(spec, cfg) -> dict:
        """Values of options it does not read that the loop behaves as (may be stated): whole
        rollout batches, plain padded forwards in the models' own dtype, eval-mode models."""
        return {"micro_batch_tokens": None, "drop_last": True, "packing": False,
                "prefix_sharing": False, "amp_dtype": None, "activation_checkpointing": False}

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

    def prompt_batches(self, epoch: int, start: int):
        order = self.prompt_order.epoch_order(epoch)
        size = self.cfg.batch_size
        for begin in range(start, len(order) - size + 1, size):
            yield [self.train_examples[i] for i in order[begin:begin + size]]

    def save(self, name: str | None = None, latest: bool = True):
        """Collective: the shared writer's files plus the method's own (PPO's critic.pt);
        latest=False leaves LATEST where it is (a diverged run's weights, kept for a look)."""
        if self.cfg.debug:
            return
        self.writer.save(self.state, self.policy, self.method.trained, self.optimizer,
                         self.scheduler, name, files=self.method.checkpoint_files(),
                         latest=latest)

    # ---- rollouts -----------------------------------------------------------------------------
    def gather(self, part: list) -> list:
        """The data-parallel ranks' lists, concatenated in rank order (identity in one process;
        the ranks of a tensor-parallel group hold the same rows, one of them counts)."""
        if distributed.world_size() == 1:
            return part
        return [x for got in distributed.all_gather_objects(part)[::self.dist.tp_size] for x in got]

    def gather_rows(self, part: torch.Tensor) -> torch.Tensor:
        if distributed.world_size() == 1:
            return part
        return torch.cat(self.gather([part.cpu()])).to(self.device)

    def rollout(self, examples, seed: int, first_key: int = 0, k: int = 1, scored: bool = True):
        """k episodes per example, episode j of example i keyed (first_key + i) * k + j: this
        rank samples its share, then every rank lays out the whole batch as one process would,
        computes its share of the rows' log-probs (and the method's tensors) and its share of the
        groups' scores, and receives the others'."""
        o, dp, rank = self.opts, self.dist.dp_size, self.dist.dp_rank
        rows, n = distributed.even_share(len(examples) * k, rank, dp)
        mine = [examples[i // k] for i in rows]
        samples = generate(self.policy, self.tokenizer,
                           encode_prompts(self.tokenizer, mine, self.cfg.max_prompt_length),
                           [e.prompt for e in mine], o.max_new_tokens, o.temperature, seed,
                           [first_key * k + i for i in rows], distributed.world_size() > 1,
                           static_cache=o.static_cache)
        batch = build_batch(self.gather(samples[:n]), pad_id(self.tokenizer), self.device)
        rows, n = distributed.even_share(len(batch.samples), rank, dp)
        for key, value in self.fill(batch.select(rows)).items():
            setattr(batch, key, self.gather_rows(value[:n]))
        if scored:
            groups, n = distributed.even_share(len(examples), rank, dp)
            scorer = self.method.scorer
            groups = groups if scorer.collective else groups[:n]  # stand-ins: equal forwards
            part = batch.select([g * k + j for g in groups for j in range(k)])
            batch.scores = self.gather_rows(scorer.score(part, k)[:n * k])
        return batch

    @torch.no_grad()
    def fill(self, part) -> dict:
        """Rollout-time per-token tensors of this rank's rows: log-probs under the policy and
        the reference (possibly the LoRA policy itself, adapters disabled), and the method's."""
        T = self.method.logprob_temperature
        out = {"logprobs": chunked(part, self.chunk,
                                   lambda mb: policy_logprobs(self.policy, mb, T))}
        if self.reference is not None:
            with adapters_disabled(self.reference):
                out["ref_logprobs"] = chunked(part, self.chunk,
                                              lambda mb: policy_logprobs(self.reference, mb, T))
        out.update(self.method.fill(part))
        return out

    # ---- the update ---------------------------------------------------------------------------
    def update(self, units: int, epochs: int, mini_batch_size: int, loss_fn,
               usable: torch.Tensor | None = None) -> dict:
        """`epochs` passes over `units` (episodes, or online DPO's prompts) in shuffled
        minibatches, the same order on every rank, one optimizer step each (a minibatch with no
        usable unit is skipped). loss_fn(part, minibatch, first) -> (loss, sums, maxima) for the
        units `part` of `minibatch` (index tensors): the loss normalised by the whole
        minibatch's count (so that micro-batches and ranks add up to its loss), statistics
        {name: (sum, count)} and {name: max}; first: no optimizer step since the rollout."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 7919 + self.state.rollouts)
        collected, first = {}, True
        for _ in range(epochs):
            order = torch.randperm(units, generator=gen).to(self.device)
            for start in range(0, units, mini_batch_size):
                index = order[start:start + mini_batch_size]
                if usable is not None and not usable[index].any():
                    continue
                for key, value in self.optimizer_step(index, loss_fn, first).items():
                    collected.setdefault(key, []).append(value)
                first = False
        return {k: sum(v) / len(v) for k, v in collected.items()}

    def optimizer_step(self, index, loss_fn, first: bool) -> dict:
        """One optimizer step on minibatch `index`: this rank's equal share of it (the checks
        make the ranks and micro-batches divide it), in gradient_accumulation_steps micro-batches
        whose gradients are reduced once. Returns the minibatch's statistics."""
        share = len(index) // self.dist.dp_size
        mine = index[self.dist.dp_rank * share:(self.dist.dp_rank + 1) * share]
        micro = torch.tensor_split(mine, self.cfg.gradient_accumulation_steps)
        trained = self.method.trained
        models = list(trained.values()) if isinstance(trained, torch.nn.ModuleDict) else [trained]
        sums, maxima = {}, {}
        for i, part in enumerate(micro):
            for model in models:
                self.dist.sync_gradients(model, i == len(micro) - 1)
            loss, part_sums, part_max = loss_fn(part, index, first)
            # ranks' gradients are averaged: the loss is already normalised by the minibatch's
            (loss * self.dist.dp_size).backward()
            for key, (total, count) in part_sums.items():
                got = sums.get(key, (0.0, 0.0))
                sums[key] = (got[0] + total, got[1] + count)
            for key, value in part_max.items():
                maxima[key] = max(maxima.get(key, -math.inf), float(value))
        totals = distributed.sum_across_ranks([s for s, _ in sums.values()] +
                                              [c for _, c in sums.values()])
        stats = {k: totals[i] / max(totals[len(sums) + i], 1) for i, k in enumerate(sums)}
        stats.update({k: distributed.max_across_ranks(torch.tensor(v)) for k, v in maxima.items()})
        self.guard(stats)
        stats.pop("loss/total", None)
        grad_norm = self.dist.clip(trained.parameters(), self.cfg.max_grad_norm)
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
    def guard(self, stats: dict):
        """Before the optimizer steps: every statistic finite, the policy's approx KL to the
        rollout policy under loss.max_approx_kl."""
        self.check_finite(stats)
        for key, value in stats.items():
            if key.endswith("/approxkl") and value > self.opts.max_approx_kl:
                self.optimizer.zero_grad(set_to_none=True)
                self.diverged(key, value, f"> loss.max_approx_kl={self.opts.max_approx_kl}")

    def check_finite(self, stats: dict):
        for key, value in stats.items():
            value = torch.as_tensor(value, dtype=torch.float32)
            if not torch.isfinite(value).all():
                self.optimizer.zero_grad(set_to_none=True)
                self.diverged(key, value[~torch.isfinite(value)].flatten()[0].item())

    def diverged(self, key: str, value: float, why: str = "is not finite"):
        """Save the current weights for inspection, then stop with the offending statistic."""
        name = f"diverged-{self.state.examples}"
        self.save(name, latest=False)
        saved = "not saved (debug=true)" if self.cfg.debug else f"saved in {self.run_dir}/{name}"
        raise TrainingDiverged(f"loss={self.name} stopped at rollout {self.state.rollouts} (after "
                               f"{self.state.examples} prompts, optimizer step "
                               f"{self.state.steps}): {key}={value} {why}; weights {saved}. "
                               "Lower lr, raise the KL coefficient, or check the scorer.")

    # ---- one step and evaluation --------------------------------------------------------------
    def step(self, examples) -> dict:
        """Rollout, the method's advantages and updates, the shared statistics."""
        st, m, start = self.state, self.method, time.time()
        batch = self.rollout(examples, rollout_seed(self.cfg.seed, st.rollouts),
                             k=m.samples_per_prompt)
        stats = m.learn(batch)
        st.rollouts += 1
        st.examples += len(examples)
        st.epoch_offset += len(examples)
        if batch.ref_logprobs is not None:
            stats["kl_train/kl"] = self.sequence_kl(batch).mean().item()
        stats.update({
            f"{m.prefix}/response_length": batch.mask.sum(-1).mean().item(),
            f"{m.prefix}/eos_fraction": batch.finished.float().mean().item(),
            "lr": self.scheduler.get_last_lr()[0], "counters/examples": st.examples,
            "counters/updates": st.steps,
            "examples_per_second": len(examples) / (time.time() - start)})
        self.check_finite(stats)
        return stats

    @staticmethod
    def sequence_kl(batch) -> torch.Tensor:
        """KL(policy || reference) of each sampled response, the sum of its k1 log-ratios [B]."""
        return (losses.kl_penalty(batch.logprobs, batch.ref_logprobs, "k1") * batch.mask).sum(-1)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Sample one response per held-out prompt (keyed by prompt: every evaluation draws with
        the same noise, whatever the ranks): the scorer's mean (scorers that score a response on
        its own), KL to the reference, the gold reward when loss.gold_reward names one; writes
        samples/step-N.jsonl."""
        o, st, scorer = self.opts, self.state, self.method.scorer
        scores, kls, rows = [], [], []
        size = self.cfg.eval_batch_size
        for i in range(0, len(self.eval_examples), size):
            batch = self.rollout(self.eval_examples[i:i + size], rollout_seed(self.cfg.seed, -1),
                                 first_key=i, scored=scorer.scalar)
            if scorer.scalar:
                scores.append(batch.scores)
            if batch.ref_logprobs is not None:
                kls.append(self.sequence_kl(batch))
            rows.extend({"prompt": s.prompt, "policy": s.completion} for s in batch.samples)
        results = {}
        if scores:
            scores = torch.cat(scores)
            results["rewards_eval/score"] = scores[torch.isfinite(scores)].mean().item()
        if kls:
            results["kl_eval/kl"] = torch.cat(kls).mean().item()
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
        bar = tqdm(total=total, initial=st.examples, unit="prompt", desc=self.name,
                   dynamic_ncols=True, disable=not self.dist.is_main)
        while st.examples < total:
            schedule.advance_epoch(st, per_epoch)  # (a checkpoint saved at an epoch's end)
            for examples in self.prompt_batches(st.epoch, st.epoch_offset):
                schedule.evaluate_if_due(self)
                stats = self.step(examples)
                self.logger.log_train(stats, st.examples)
                bar.update(len(examples))
                bar.set_postfix({k.split("/")[-1]: f"{stats[k]:.3f}" for k in
                                 ("rewards_train/score", "kl_train/kl") if k in stats})
                schedule.advance_epoch(st, per_epoch)
                schedule.save_if_due(self, len(examples))
                if st.examples >= total:
                    break
        bar.close()
        schedule.finish(self)


def check_rollout_batch(cfg, opts, world_size: int, episodes: int, mini_batch_size: int):
    """Before any model loads: lengths, and minibatches that split evenly over the ranks and
    micro-batches (every rank must run the same forward and backward passes)."""
    dp = world_size // distributed.tensor_parallel_size(cfg, world_size)
    parts = dp * cfg.gradient_accumulation_steps
    if cfg.max_prompt_length + opts.max_new_tokens > cfg.max_length:
        raise ValueError(f"max_prompt_length={cfg.max_prompt_length} + loss.max_new_tokens="
                         f"{opts.max_new_tokens} exceeds max_length={cfg.max_length}")
    if episodes % mini_batch_size:
        raise ValueError(f"the {episodes} episodes of a rollout (batch_size={cfg.batch_size} "
                         "prompts x samples per prompt) must be a multiple of "
                         f"loss.mini_batch_size={mini_batch_size}")
    if mini_batch_size % parts:
        raise ValueError(f"loss.mini_batch_size={mini_batch_size} must be a multiple of the {dp}"
                         f" data-parallel ranks x gradient_accumulation_steps="
                         f"{cfg.gradient_accumulation_steps} (each rank takes an equal share of "
                         "every minibatch, in equal micro-batches)")
