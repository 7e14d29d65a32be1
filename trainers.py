"""THE offline training loop, shared by SFT, the DPO family, Chain of Hindsight and reward
modelling.

BasicTrainer: evaluate when due -> one optimizer step over micro-batches -> log -> checkpoint
when due. What differs between losses is one step function from the loss table
(harness/objectives), which gets a StepContext, never the trainer. What differs between
trainer=BasicTrainer, FSDPTrainer and TensorParallelTrainer is the strategy the loop holds as
`self.dist` (harness/training/strategy.py): how models are wrapped, which share of a batch a
rank sees, how gradients are clipped and checkpoints gathered. The parallelism itself lives in
harness/parallel/.
"""

import math
import time
from contextlib import nullcontext

import torch
from tqdm import tqdm

from harness import checkpoints
from harness.data.packing import pack
from harness.data.tokens import pad_id, pad_to
from harness.models import lora
from harness.models.modeling import packed_sequence_logps, sequence_logps
from harness.objectives import (StepContext, get_loss_spec, loss_options, needs_reference,
                                sampling_prompt_suffix)
from harness.parallel import distributed
from harness.training import reference_cache, schedule
from harness.training.checkpoint_writer import CheckpointWriter, TrainState, restore
from harness.training.health import HealthGuard, TrainingDiverged
from harness.training.judged_eval import JudgedEval, judge_options
from harness.training.setup import load_splits, make_logger, make_optimizer, make_scheduler
from harness.training.strategy import make_strategy
from preference_datasets import BatchIterator, ExampleFormat, split_by_tokens


def split_batch(batch: dict, n: int) -> list[dict]:
    size = len(batch["uid"])
    step = math.ceil(size / n)
    return [{k: v[i:i + step] for k, v in batch.items()} for i in range(0, size, step)]


class BasicTrainer:
    def __init__(self, policy, tokenizer, config, run_dir, reference_model=None, resume=None):
        self.cfg, self.tokenizer, self.run_dir = config, tokenizer, run_dir
        self.spec = get_loss_spec(config.loss.name)
        self.dist = make_strategy(config)
        self.policy = self.dist.wrap(policy)
        # the LoRA policy doubles as its own reference (adapters disabled): wrap it only once
        self.reference_model = reference_model if reference_model in (None, policy) else \
            self.dist.wrap(reference_model, train=False)
        self.device = next(self.policy.parameters()).device
        self._load_data()
        self.optimizer = make_optimizer(
            [{"params": [p for p in self.policy.parameters() if p.requires_grad]}], config)
        self.scheduler = make_scheduler(self.optimizer, config)
        self.state = TrainState(next_eval=0 if config.do_first_eval else config.eval_every)
        if resume is not None:
            self.state = restore(resume, self.dist, self.policy, self.policy, self.optimizer,
                                 self.scheduler, TrainState)
        self.reference_table = None
        self.guard = HealthGuard(config)
        self.writer = CheckpointWriter(run_dir, config, self.dist, tokenizer)
        self.logger = make_logger(config, run_dir, self.dist.is_main, self.state,
                                  resume is not None)
        self.ctx = StepContext(
            policy=self.policy, forward=self.forward, options=loss_options(config.loss),
            reference_logps=self.reference_logps if needs_reference(config.loss) else None,
            device=self.device, tokenizer=tokenizer, autocast=self.autocast,
            data=self.example_format, micro_batches=config.gradient_accumulation_steps)
        judge = judge_options(config.get("eval_judge")) if self.spec.samples else None
        self.judged = JudgedEval(judge, run_dir, config.seed, sampling_prompt_suffix(config)) \
            if judge is not None and judge.judge else None

    @staticmethod
    def reads(spec, cfg) -> set[str]:
        """The top-level options this loop reads for loss spec `spec` (the others are refused
        when given: harness/training/options.py)."""
        out = {"gradient_accumulation_steps", "micro_batch_tokens", "drop_last", "amp_dtype",
               "activation_checkpointing", "logits_chunk_size", "packing",
               "health"}  # the rollout loop has its own guard (non-finite, loss.max_approx_kl)
        if cfg.packing:
            out.add("pack_length")
        if spec.paired:
            out.add("prefix_sharing")
        if needs_reference(cfg.loss):
            out.add("precompute_reference")
        if spec.samples:
            out |= {"sample_during_eval", "n_eval_model_samples", "sample_max_new_tokens",
                    "sample_top_p", "sample_temperature", "eval_judge"}
        return out - set(spec.ignores)

    @staticmethod
    def behaves_as(spec, cfg) -> dict:
        """Values of options it does not read that the loop behaves as (may be stated)."""
        return {} if spec.samples else {"sample_during_eval": False, "eval_judge": None}

    # ---- data -------------------------------------------------------------------------------
    def _load_data(self):
        cfg = self.cfg
        # the loss's own example format (CoH chains), or the standard SFT / pair examples
        fmt = self.spec.data(cfg, self.tokenizer) if self.spec.data else ExampleFormat()
        self.example_format = fmt
        train, test = load_splits(cfg, sft_mode=not self.spec.paired,
                                  record_examples=fmt.record_examples)
        train, test = fmt.finish(train), fmt.finish(test)  # e.g. KTO's mismatched completions
        tok = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                   tokenize=fmt.tokenize)
        # every example is tokenized (and checked) here, before the first step
        bar = (lambda name: f"tokenizing {name}") if self.dist.is_main else (lambda name: None)
        self.train_batches = BatchIterator(train, self.tokenizer, batch_size=cfg.batch_size,
                                           shuffle=True, seed=cfg.seed, drop_last=cfg.drop_last,
                                           progress=bar("train"), **tok)
        self.eval_batches = BatchIterator(test, self.tokenizer, batch_size=cfg.eval_batch_size,
                                          shuffle=False, seed=cfg.seed, progress=bar("eval"),
                                          **tok)
        self.print(f"data: {len(train)} train / {len(test)} eval examples from "
                   f"{list(cfg.datasets)}{fmt.describe(train)}")

    def print(self, text: str):
        if self.dist.is_main:  # one line per run, not one per rank
            print(text)

    # ---- forward passes ---------------------------------------------------------------------
    def autocast(self):
        """The autocast context of amp_dtype (a no-op when it is null)."""
        amp = self.cfg.amp_dtype
        return torch.autocast(self.device.type, dtype=getattr(torch, amp or "float32"),
                              enabled=amp is not None)

    def forward(self, model, batch, paired: bool | None = None):
        """Summed log-probs: (chosen, n_chosen) for SFT; (chosen, rejected, n_c, n_r) for pairs,
        from ONE forward over the batch: packed rows (packing / prefix_sharing) or the padded
        [chosen; rejected] concatenation. paired=False scores only the chosen side of a pair
        batch (None: as the loss trains)."""
        paired = self.spec.paired if paired is None else paired
        with self.autocast():
            return self._forward(model, batch, self.cfg, paired)

    def packed(self, batch, paired: bool):
        """The batch as packed rows when packing or prefix sharing applies, else None."""
        cfg = self.cfg
        if not (cfg.packing or (cfg.prefix_sharing and paired)):
            return None
        return pack(batch, paired, prefix_sharing=cfg.prefix_sharing and paired,
                    row_tokens=(cfg.pack_length or 2 * cfg.max_length) if cfg.packing else 0,
                    pad_token_id=pad_id(self.tokenizer))

    def _forward(self, model, batch, cfg, paired):
        packed = self.packed(batch, paired)
        if packed is not None:
            logps, n = self.dist.logps(model, packed_sequence_logps, packed.to(self.device))
        else:
            logps, n = self._padded_logps(model, batch, paired)
        if not paired:
            return logps, n
        half = batch["chosen_input_ids"].shape[0]
        return logps[:half], logps[half:], n[:half], n[half:]

    def _padded_logps(self, model, batch, paired: bool):
        keys = ("input_ids", "attention_mask", "labels")
        if not paired:
            return self.dist.logps(model, sequence_logps,
                              *(batch[f"chosen_{k}"].to(self.device) for k in keys))
        length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        pad = {"input_ids": pad_id(self.tokenizer), "attention_mask": 0, "labels": -100}
        cat = lambda k: torch.cat([pad_to(batch[f"{side}_{k}"], length, pad[k])  # noqa: E731
                                   for side in ("chosen", "rejected")]).to(self.device)
        return self.dist.logps(model, sequence_logps, *(cat(k) for k in keys))

    def reference_logps(self, batch):
        if self.reference_table is not None:
            return reference_cache.lookup(self.reference_table, batch["uid"], self.device)
        return self.reference_forward(batch)

    def reference_forward(self, batch):
        """(chosen, rejected) log-probs under the reference: a frozen model, or the LoRA policy
        with its adapters switched off."""
        with torch.no_grad(), lora.adapters_disabled(self.reference_model):
            return self.forward(self.reference_model, batch)[:2]

    def prepare_reference(self, total: float = math.inf):
        """Precompute the reference log-probs of the examples this run will use (the eval set
        and the train examples of the next `total` examples seen; all by default), then free
        the model."""
        if not (needs_reference(self.cfg.loss) and self.cfg.precompute_reference):
            return
        train = self.train_batches
        rows = sorted(set(schedule.rows_to_visit(train, self.state, total)))
        examples = [train.examples[i] for i in rows] + self.eval_batches.examples
        loader = BatchIterator(examples, self.tokenizer, batch_size=self.cfg.eval_batch_size,
                               shuffle=False, seed=0, max_length=self.cfg.max_length,
                               max_prompt_length=self.cfg.max_prompt_length,
                               items=[train.items[i] for i in rows] + self.eval_batches.items)
        key = reference_cache.cache_key(
            self.cfg.model, {"tokenizer": self.cfg.model.tokenizer_name_or_path or
                             self.cfg.model.name_or_path, "max_length": self.cfg.max_length,
                             "max_prompt_length": self.cfg.max_prompt_length,
                             # the rendering (none: keys of runs before templates stay valid)
                             **({"chat_template": self.tokenizer.chat_template}
                                if self.tokenizer.chat_template else {})},
            [e.uid for e in examples], self.cfg.amp_dtype)
        self.reference_table = self.dist.reference_table(
            checkpoints.first_usable_dir(self.cfg.local_dirs), key, loader,
            lambda m, b: self.reference_forward(b), self.reference_model)
        self.reference_model = None  # training holds no reference model from here on

    # ---- one loss evaluation: the loss's own step function (never a branch on its name) ----
    def step_metrics(self, batch, split: str):
        """(loss, per-example metric tensors) for one (micro-)batch."""
        return self.spec.step(self.ctx, batch, split)

    def batch_statistics(self, parts: list[tuple[dict, int]]) -> dict | None:
        """The loss's statistics of a whole batch (spec.batch_stats: sums over this rank's parts,
        then over the ranks, in one collective) before its micro-batches' steps (KTO's KL
        estimate), so that accumulation and ranks leave them unchanged."""
        if self.spec.batch_stats is None:
            return None
        sums = {}
        for part, n in parts:
            for key, value in self.spec.batch_stats(self.ctx, part, n).items():
                sums[key] = sums.get(key, 0.0) + value
        return dict(zip(sums, distributed.sum_across_ranks(list(sums.values()))))

    @staticmethod
    def add_metrics(sums: dict, metrics: dict, n: int):
        for k, v in metrics.items():  # only the n real rows (a rank's stand-in row counts 0)
            sums[k] = sums.get(k, 0.0) + v.detach().float()[:n].sum()

    @staticmethod
    def reduce_means(sums: dict, count: int) -> dict:
        """Means over all ranks' examples, from ONE collective (none in a single process)."""
        totals = distributed.sum_across_ranks([*sums.values(), count])
        return {k: v / totals[-1] for k, v in zip(sums, totals)}

    # ---- evaluation and sampling ------------------------------------------------------------
    def evaluate(self):
        self.policy.eval()
        sums, count = {}, 0
        with torch.no_grad():
            for batch in tqdm(self.eval_batches.epoch_batches(0), total=len(self.eval_batches),
                              desc="eval", leave=False, disable=not self.dist.is_main):
                part, n = self.dist.shard(batch)
                self.ctx.batch_stats = self.batch_statistics([(part, n)])
                self.add_metrics(sums, self.step_metrics(part, "eval")[1], n)
                count += n
        results = self.reduce_means(sums, count)
        self.state.last_eval = self.state.examples
        if self.spec.samples and self.cfg.sample_during_eval and self.cfg.n_eval_model_samples > 0:
            # every rank samples the same prompts: sharded forwards are collective
            self.logger.log_samples(self.state.examples, self.sample())
        if self.judged is not None:  # every rank samples, rank 0 judges
            results.update(self.judged.evaluate(self.policy, self.tokenizer, self.state.examples,
                                                distributed.world_size() > 1, self.dist.is_main))
        self.logger.log(results, self.state.examples)
        self.print(f"eval @ {self.state.examples} examples: " +
                   ", ".join(f"{k}={v:.4g}" for k, v in results.items()))
        return results

    def sample(self) -> list[dict]:
        """Completions for the first n_eval_model_samples eval prompts, seeded so that sampling
        never perturbs the training RNG (exact resume) and repeats for the same step."""
        rows, n = [], self.cfg.n_eval_model_samples
        models = {"policy": self.policy}
        if self.reference_model is not None:
            models["reference"] = self.reference_model
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            for batch in self.eval_batches.epoch_batches(0):
                batch_rows = [{"prompt": p} for p in batch["prompt"][:n - len(rows)]]
                for name, model in models.items():
                    torch.manual_seed(self.cfg.seed + self.state.examples + len(rows))
                    with lora.adapters_disabled(model) if name == "reference" else nullcontext():
                        texts = self.generate(model, batch, len(batch_rows))
                    for row, text in zip(batch_rows, texts):
                        row[name] = text
                rows.extend(batch_rows)
                if len(rows) >= n:
                    break
        return rows

    def generate(self, model, batch, n: int) -> list[str]:
        cfg = self.cfg
        ids = batch["prompt_input_ids"][:n].to(self.device)
        out = model.generate(input_ids=ids, attention_mask=batch["prompt_attention_mask"][:n]
                             .to(self.device), max_new_tokens=cfg.sample_max_new_tokens,
                             do_sample=True, top_p=cfg.sample_top_p,
                             temperature=cfg.sample_temperature,
                             pad_token_id=pad_id(self.tokenizer),
                             # ranks stop together, or a sharded model's gathers would hang
                             synced_gpus=distributed.world_size() > 1)
        return self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)

    # ---- the loop -----------------------------------------------------------------------------
    def prepare_judge(self):
        """eval_judge's reference completions, before the reference model is freed: the frozen
        reference, the LoRA policy with adapters off, or the starting policy."""
        if self.judged is None:
            return
        model = self.reference_model if self.reference_model is not None else self.policy
        with torch.no_grad(), lora.adapters_disabled(model):
            self.judged.prepare([e.prompt for e in self.eval_batches.examples], model,
                                self.tokenizer, distributed.world_size() > 1, self.dist.is_main)

    def train(self):
        per_epoch = self.train_batches.examples_per_epoch
        total = schedule.total_examples(self.cfg, per_epoch)
        self.prepare_judge()
        self.prepare_reference(total)
        try:
            self._train(per_epoch, total)
        except TrainingDiverged:
            self.logger.close()  # the curves up to the bad step, for a look at what happened
            raise

    def _train(self, per_epoch: int, total: float):
        st = self.state
        bar = tqdm(total=total, initial=st.examples, unit="ex", desc="train", dynamic_ncols=True,
                   disable=not self.dist.is_main)
        while st.examples < total:
            for batch in self.train_batches.epoch_batches(st.epoch, st.epoch_offset):
                schedule.evaluate_if_due(self)
                metrics = self.train_step(batch)
                bar.update(len(batch["uid"]))
                bar.set_postfix(loss=f"{metrics['loss/train']:.4f}")
                self.logger.log_train(metrics, st.examples)
                schedule.advance_epoch(st, per_epoch)
                schedule.save_if_due(self, len(batch["uid"]))
                if st.examples >= total:
                    break
        bar.close()
        schedule.finish(self)

    def micro_batches(self, batch) -> list[tuple[dict, int]]:
        """This rank's (micro-batch, real examples): the batch is split into
        gradient_accumulation_steps micro-batches, or by micro_batch_tokens (padded token
        positions per rank), each shared out over the data-parallel ranks. The split is made
        from the whole batch, the same on every rank, so every rank runs the same number of
        forward/backward passes."""
        budget = self.cfg.get("micro_batch_tokens")  # absent from runs saved before it existed
        if budget:
            parts = split_by_tokens(batch, budget, self.dist.dp_size)
        else:
            parts = split_batch(batch, self.cfg.gradient_accumulation_steps)
        return [self.dist.shard(mb) for mb in parts]

    def train_step(self, batch) -> dict:
        """One optimizer step over `gradient_accumulation_steps` micro-batches."""
        start = time.time()
        self.policy.train()
        micro = self.micro_batches(batch)
        self.ctx.step = self.state.steps
        self.ctx.batch_stats = self.batch_statistics(micro)
        sums, count = {}, 0
        for i, (mb, n) in enumerate(micro):
            # reduce gradients once, after the last micro-batch
            self.dist.sync_gradients(self.policy, i == len(micro) - 1)
            loss, metrics = self.step_metrics(mb, "train")
            # data-parallel gradients are averaged over ranks: this weight makes that average
            # the mean over the global batch, whatever each rank's share of it
            (loss * n * self.dist.dp_size / len(batch["uid"])).backward()
            self.add_metrics(sums, metrics, n)
            count += n
        grad_norm = self.dist.clip(self.policy.parameters(), self.cfg.max_grad_norm)
        out = self.reduce_means(sums, count)
        self.guard.check_step(self.state, out.get("loss/train"), grad_norm)  # before the step
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        n_examples = len(batch["uid"])
        tokens = sum(batch[k].sum().item() for k in ("chosen_attention_mask",
                                                     "rejected_attention_mask") if k in batch)
        st = self.state
        st.examples += n_examples
        st.epoch_offset += n_examples
        st.steps += 1
        elapsed = max(time.time() - start, 1e-9)
        out.update({"grad_norm": grad_norm, "examples_per_second": n_examples / elapsed,
                    "tokens_per_second": tokens / elapsed, "lr": self.scheduler.get_last_lr()[0],
                    "counters/examples": st.examples, "counters/updates": st.steps})
        return out

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, name: str | None = None):
        """A checkpoint (default step-N) through the shared writer, with the loss's own files."""
        self.guard.check_weights(self.policy, self.state)  # never write NaN weights
        files = self.spec.checkpoint_files
        extras = None if files is None else \
            (lambda ckpt_dir: files(self.ctx, ckpt_dir, self.eval_batches, self.cfg))
        self.writer.save(self.state, self.policy, self.policy, self.optimizer, self.scheduler,
                         name, extras=extras)
