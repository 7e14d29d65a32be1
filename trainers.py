"""The offline training loop, shared by SFT, the DPO family and Chain of Hindsight.

BasicTrainer is THE loop: evaluate when due -> one optimizer step over gradient-accumulated
micro-batches -> log -> checkpoint when due. What differs between losses is one step function
picked from the loss table (harness/objectives/__init__.py). FSDPTrainer / TensorParallelTrainer change
only how the model is wrapped, which examples a rank sees, how metrics are summed over ranks,
how gradients are clipped and how checkpoints are gathered; the parallelism itself lives in
harness/parallel/parallelize.py and the launch in harness/parallel/distributed.py.
"""

import inspect
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from harness import checkpoints
from harness.parallel import distributed
from harness.models import lora
from harness.training import reference_cache, schedule
from harness.objectives import get_loss_spec, loss_kwargs, needs_reference
from harness.models.modeling import packed_sequence_logps, save_hf_model, sequence_logps
from harness.data.packing import pack
from harness.training.run_logging import NullLogger, RunLogger
from harness.training.strategy import DistributedMixin, SingleProcess
from preference_datasets import BatchIterator, ExampleFormat, load_examples, split_by_tokens


@dataclass
class TrainState:
    """Everything besides weights and optimizer that exact resume needs."""
    epoch: int = 0
    epoch_offset: int = 0       # examples of `epoch` already consumed
    examples: int = 0           # examples seen in total: the x axis of every metric
    steps: int = 0              # optimizer steps
    next_eval: int = 0          # example count at which the next evaluation is due
    last_save: int = -1         # example count of the newest checkpoint
    last_eval: int = -1         # example count of the newest evaluation


def split_batch(batch: dict, n: int) -> list[dict]:
    size = len(batch["uid"])
    step = math.ceil(size / n)
    return [{k: v[i:i + step] for k, v in batch.items()} for i in range(0, size, step)]


def pad_to(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)


def make_optimizer(params, cfg):
    """torch.optim.<cfg.optimizer>; fused_optimizer picks the fused kernel where the class has one
    (one kernel for all parameters instead of one per tensor), else torch's default (foreach)."""
    cls = getattr(torch.optim, cfg.optimizer)
    kwargs = {"lr": cfg.lr}
    if cfg.fused_optimizer and "fused" in inspect.signature(cls).parameters:
        kwargs["fused"] = True
    return cls(params, **kwargs)


class BasicTrainer(SingleProcess):
    def __init__(self, policy, tokenizer, config, run_dir, reference_model=None, resume=None):
        self.cfg, self.tokenizer, self.run_dir = config, tokenizer, run_dir
        self.spec = get_loss_spec(config.loss.name)
        self.loss_kwargs = loss_kwargs(config.loss)
        self.policy = self.wrap(policy)
        # the LoRA policy doubles as its own reference (adapters disabled): wrap it only once
        self.reference_model = reference_model if reference_model in (None, policy) else \
            self.wrap(reference_model, train=False)
        self.device = next(self.policy.parameters()).device
        self._load_data()
        self.optimizer = make_optimizer([p for p in self.policy.parameters() if p.requires_grad],
                                        config)
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        self.state = TrainState(next_eval=0 if config.do_first_eval else config.eval_every)
        if resume is not None:
            self._restore(resume)
        self.reference_table = None
        self.logger = NullLogger() if not self.is_main else RunLogger(
            run_dir, OmegaConf.to_container(config, resolve=True),
            config.wandb if not config.debug else OmegaConf.create({"enabled": False}),
            config.exp_name, resume_step=self.state.examples if resume else None,
            evaluated_at_resume=self.state.last_eval == self.state.examples)

    @property
    def trained(self):
        """The module the optimizer updates (harness/training/strategy.py)."""
        return self.policy

    # ---- data -------------------------------------------------------------------------------
    def _load_data(self):
        cfg = self.cfg
        # the loss's own example format (CoH chains), or the standard SFT / pair examples
        fmt = self.spec.data(cfg, self.tokenizer) if self.spec.data else ExampleFormat()
        self.example_format = fmt
        common = dict(sft_mode=not self.spec.paired, seed=cfg.seed, prefs_path=cfg.prefs_path,
                      num_turns=cfg.num_turns, cache_dir=self.cache_dir,
                      record_examples=fmt.record_examples)
        train = load_examples(list(cfg.datasets), "train", data_fraction=cfg.data_fraction, **common)
        test = load_examples(list(cfg.datasets), "test", **common)
        # a seeded subset of the test split, fixed for the whole run
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))
        test = [test[i] for i in order[:cfg.n_eval_examples].tolist()]
        tok = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                   tokenize=fmt.tokenize)
        self.train_batches = BatchIterator(train, self.tokenizer, batch_size=cfg.batch_size,
                                           shuffle=True, seed=cfg.seed, drop_last=cfg.drop_last,
                                           **tok)
        self.eval_batches = BatchIterator(test, self.tokenizer, batch_size=cfg.eval_batch_size,
                                          shuffle=False, seed=cfg.seed, **tok)
        print(f"data: {len(train)} train / {len(test)} eval examples from {list(cfg.datasets)}"
              f"{fmt.describe(train)}")

    @property
    def cache_dir(self):
        return checkpoints.first_usable_dir(self.cfg.local_dirs)

    # ---- forward passes ---------------------------------------------------------------------
    def logps(self, model, fn, *args):
        """fn(causal LM, *args, chunk_size): sequence_logps or packed_sequence_logps on the model
        (distributed trainers run it inside FSDP's gathered-parameter context)."""
        return fn(lora.causal_lm(model), *args, self.cfg.logits_chunk_size)

    def forward(self, model, batch):
        """Summed log-probs: (chosen, n_chosen) for SFT; (chosen, rejected, n_c, n_r) for pairs,
        from ONE forward over the batch: packed rows (packing / prefix_sharing) or the padded
        [chosen; rejected] concatenation."""
        cfg, paired = self.cfg, self.spec.paired
        with torch.autocast(self.device.type, dtype=getattr(torch, cfg.amp_dtype or "float32"),
                            enabled=cfg.amp_dtype is not None):
            return self._forward(model, batch, cfg, paired)

    def packed(self, batch):
        """The batch as packed rows when packing or prefix sharing applies, else None."""
        cfg, paired = self.cfg, self.spec.paired
        if not (cfg.packing or (cfg.prefix_sharing and paired)):
            return None
        return pack(batch, paired, prefix_sharing=cfg.prefix_sharing and paired,
                    row_tokens=(cfg.pack_length or 2 * cfg.max_length) if cfg.packing else 0,
                    pad_token_id=self.tokenizer.pad_token_id)

    def _forward(self, model, batch, cfg, paired):
        packed = self.packed(batch)
        if packed is not None:
            logps, n = self.logps(model, packed_sequence_logps, packed.to(self.device))
        else:
            logps, n = self._padded_logps(model, batch)
        if not paired:
            return logps, n
        half = batch["chosen_input_ids"].shape[0]
        return logps[:half], logps[half:], n[:half], n[half:]

    def _padded_logps(self, model, batch):
        keys = ("input_ids", "attention_mask", "labels")
        if not self.spec.paired:
            return self.logps(model, sequence_logps,
                              *(batch[f"chosen_{k}"].to(self.device) for k in keys))
        length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])
        pad = {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "labels": -100}
        cat = lambda k: torch.cat([pad_to(batch[f"{side}_{k}"], length, pad[k])  # noqa: E731
                                   for side in ("chosen", "rejected")]).to(self.device)
        return self.logps(model, sequence_logps, *(cat(k) for k in keys))

    def reference_logps(self, batch):
        if self.reference_table is not None:
            return reference_cache.lookup(self.reference_table, batch["uid"], self.device)
        return self.reference_forward(batch)

    def reference_forward(self, batch):
        """(chosen, rejected) log-probs under the reference: a frozen model, or the LoRA policy
        with its adapters switched off."""
        with torch.no_grad(), lora.adapters_disabled(self.reference_model):
            return self.forward(self.reference_model, batch)[:2]

    def prepare_reference(self):
        """Precompute the reference log-probs of all train and eval examples, then free the model."""
        if not (needs_reference(self.cfg.loss) and self.cfg.precompute_reference):
            return
        examples = self.train_batches.examples + self.eval_batches.examples
        loader = BatchIterator(examples, self.tokenizer, batch_size=self.cfg.eval_batch_size,
                               shuffle=False, seed=0, max_length=self.cfg.max_length,
                               max_prompt_length=self.cfg.max_prompt_length)
        key = reference_cache.cache_key(
            self.cfg.model, {"tokenizer": self.cfg.model.tokenizer_name_or_path or
                             self.cfg.model.name_or_path, "max_length": self.cfg.max_length,
                             "max_prompt_length": self.cfg.max_prompt_length},
            [e.uid for e in examples], self.cfg.amp_dtype)
        self.reference_table = self.load_reference_table(key, loader)
        self.reference_model = None  # training holds no reference model from here on

    def load_reference_table(self, key: str, loader) -> dict:
        return reference_cache.load_or_compute(
            self.cache_dir, key, lambda: reference_cache.compute_reference_logps(
                lambda m, b: self.reference_forward(b), self.reference_model,
                loader.epoch_batches(0), len(loader)))

    # ---- one loss evaluation: the loss's own step function (never a branch on its name) ----
    def step_metrics(self, batch, split: str):
        """(loss, per-example metric tensors) for one (micro-)batch."""
        return self.spec.step(self, batch, split)

    def shard(self, batch) -> tuple[dict, int]:
        """This rank's part of a batch and how many real examples it holds (here: all of it)."""
        return distributed.shard_batch(batch, self.dp_rank, self.dp_size)

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
                              desc="eval", leave=False, disable=not self.is_main):
                part, n = self.shard(batch)
                self.add_metrics(sums, self.step_metrics(part, "eval")[1], n)
                count += n
        results = self.reduce_means(sums, count)
        self.state.last_eval = self.state.examples
        if self.spec.samples and self.cfg.sample_during_eval and self.cfg.n_eval_model_samples > 0:
            # every rank samples the same prompts: sharded forwards are collective
            self.logger.log_samples(self.state.examples, self.sample())
        self.logger.log(results, self.state.examples)
        print(f"eval @ {self.state.examples} examples: " +
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
                             pad_token_id=self.tokenizer.pad_token_id,
                             # ranks stop together, or a sharded model's gathers would hang
                             synced_gpus=distributed.world_size() > 1)
        return self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)

    # ---- the loop -----------------------------------------------------------------------------
    def train(self):
        cfg, st = self.cfg, self.state
        self.prepare_reference()
        per_epoch = len(self.train_batches.examples) if not cfg.drop_last else \
            len(self.train_batches) * cfg.batch_size
        total = schedule.total_examples(cfg, per_epoch)
        bar = tqdm(total=total, initial=st.examples, unit="ex", desc="train", dynamic_ncols=True,
                   disable=not self.is_main)
        last_log = 0.0
        while st.examples < total:
            for batch in self.train_batches.epoch_batches(st.epoch, st.epoch_offset):
                schedule.evaluate_if_due(self)
                metrics = self.train_step(batch)
                bar.update(len(batch["uid"]))
                bar.set_postfix(loss=f"{metrics['loss/train']:.4f}")
                if time.time() - last_log >= cfg.minimum_log_interval_secs:
                    self.logger.log(metrics, st.examples)
                    last_log = time.time()
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
            parts = split_by_tokens(batch, budget, self.dp_size)
        else:
            parts = split_batch(batch, self.cfg.gradient_accumulation_steps)
        return [self.shard(mb) for mb in parts]

    def sync_gradients(self, now: bool):
        """Whether the coming backward reduces gradients across ranks (FSDPTrainer)."""

    def train_step(self, batch) -> dict:
        """One optimizer step over `gradient_accumulation_steps` micro-batches."""
        start = time.time()
        self.policy.train()
        micro = self.micro_batches(batch)
        sums, count = {}, 0
        for i, (mb, n) in enumerate(micro):
            self.sync_gradients(i == len(micro) - 1)  # reduce once, after the last micro-batch
            loss, metrics = self.step_metrics(mb, "train")
            # data-parallel gradients are averaged over ranks: this weight makes that average
            # the mean over the global batch, whatever each rank's share of it
            (loss * n * self.dp_size / len(batch["uid"])).backward()
            self.add_metrics(sums, metrics, n)
            count += n
        grad_norm = self.clip_gradients()
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
        out = self.reduce_means(sums, count)
        out.update({"grad_norm": grad_norm, "examples_per_second": n_examples / elapsed,
                    "tokens_per_second": tokens / elapsed, "lr": self.scheduler.get_last_lr()[0],
                    "counters/examples": st.examples, "counters/updates": st.steps})
        return out

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, name: str | None = None):
        if self.cfg.debug:
            return
        st = self.state
        name = name or f"step-{st.examples}"
        trainer_state = {"train_state": asdict(st), "rng": checkpoints.rng_state()}
        state, optimizer_state = self.full_state(self.policy), self.optimizer_state_dict()
        self.save_shards(name)
        if self.is_main:
            policy_state = lora.merged_state(state, self.cfg.model.lora) \
                if lora.is_lora(self.policy) else state
            path = checkpoints.save_checkpoint(
                self.run_dir, name, st.examples, {"examples": st.examples}, policy_state,
                optimizer_state, self.scheduler.state_dict(), trainer_state,
                lambda d: self.write_extras(name, d, state, policy_state))
            checkpoints.prune_checkpoints(self.run_dir, self.cfg.keep_last)
            print(f"saved {path}")
        distributed.barrier()
        st.last_save = st.examples

    def write_extras(self, name, ckpt_dir, state: dict, policy_state: dict):
        """Files beside policy.pt, inside the same atomic checkpoint dir: the shards, the LoRA
        adapters, the loss's own files, the Hugging Face export (adapters merged)."""
        checkpoints.adopt_shards(self.run_dir, name, ckpt_dir)
        if lora.is_lora(self.policy):
            lora.save_adapter(self.policy, state, ckpt_dir / checkpoints.ADAPTER)
        if self.spec.checkpoint_files is not None:  # the loss's own files (reward statistics)
            self.spec.checkpoint_files(self, ckpt_dir)
        if self.cfg.export_hf:
            model = lora.causal_lm(self.policy)
            from transformers import PreTrainedModel
            if isinstance(model, PreTrainedModel):  # a causal LM, from the (merged) state dict
                save_hf_model(model.config, policy_state, ckpt_dir / "hf")
            else:  # a model with its own export (a reward model: backbone dir + head weights)
                model.save_pretrained(ckpt_dir / "hf", safe_serialization=True)
            self.tokenizer.save_pretrained(ckpt_dir / "hf")

    def _restore(self, resume: dict):
        self.load_training_state(resume)
        self.scheduler.load_state_dict(resume["scheduler"]["state"])
        self.state = TrainState(**resume["trainer"]["train_state"])
        checkpoints.set_rng_state(resume["trainer"]["rng"])
        print(f"resumed from {resume['dir']} at {self.state.examples} examples")


class FSDPTrainer(DistributedMixin, BasicTrainer):
    """FSDP2: every block and the root sharded over all ranks (pure data parallelism); the
    wrapping itself is parallel.parallelize, through ShardedModels.wrap."""


class TensorParallelTrainer(FSDPTrainer):
    """DTensor tensor parallelism over trainer.tp_size ranks (default: all of them), and FSDP
    over the data-parallel dimension of the 2-D mesh when there are more ranks than that
    (distributed.tensor_parallel_size reads the trainer config)."""


TRAINERS = {cls.__name__: cls for cls in (BasicTrainer, FSDPTrainer, TensorParallelTrainer)}
