"""The offline training loop, shared by SFT and the DPO family.

BasicTrainer is THE loop: evaluate when due -> one optimizer step over gradient-accumulated
micro-batches -> log -> checkpoint when due. What differs between losses is one step function
picked from the loss table (harness/objectives.py); FSDPTrainer / TensorParallelTrainer only change how the model is wrapped.
"""

import math
import time
from dataclasses import asdict, dataclass

import torch
from omegaconf import OmegaConf
from tqdm import tqdm

from harness import checkpoints, reference_cache
from harness.objectives import get_loss_spec, loss_kwargs, needs_reference
from harness.modeling import sequence_logps
from harness.run_logging import RunLogger
from preference_datasets import BatchIterator, load_examples


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


class BasicTrainer:
    def __init__(self, policy, tokenizer, config, run_dir, reference_model=None, resume=None):
        self.cfg, self.policy, self.tokenizer, self.run_dir = config, policy, tokenizer, run_dir
        self.reference_model = reference_model
        self.spec = get_loss_spec(config.loss.name)
        self.loss_kwargs = loss_kwargs(config.loss)
        self.device = next(policy.parameters()).device
        self._load_data()
        self.optimizer = getattr(torch.optim, config.optimizer)(policy.parameters(), lr=config.lr)
        warmup = config.warmup_steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
        self.state = TrainState(next_eval=0 if config.do_first_eval else config.eval_every)
        if resume is not None:
            self._restore(resume)
        self.reference_table = None
        self.logger = RunLogger(run_dir, OmegaConf.to_container(config, resolve=True),
                                config.wandb if not config.debug else OmegaConf.create(
                                    {"enabled": False}),
                                config.exp_name, resume_step=self.state.examples if resume else None)

    # ---- data -------------------------------------------------------------------------------
    def _load_data(self):
        cfg = self.cfg
        common = dict(sft_mode=not self.spec.paired, seed=cfg.seed, prefs_path=cfg.prefs_path,
                      num_turns=cfg.num_turns, cache_dir=self.cache_dir)
        train = load_examples(list(cfg.datasets), "train", data_fraction=cfg.data_fraction, **common)
        test = load_examples(list(cfg.datasets), "test", **common)
        # a seeded subset of the test split, fixed for the whole run
        order = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))
        test = [test[i] for i in order[:cfg.n_eval_examples].tolist()]
        tok = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length)
        self.train_batches = BatchIterator(train, self.tokenizer, batch_size=cfg.batch_size,
                                           shuffle=True, seed=cfg.seed, drop_last=cfg.drop_last,
                                           **tok)
        self.eval_batches = BatchIterator(test, self.tokenizer, batch_size=cfg.eval_batch_size,
                                          shuffle=False, seed=cfg.seed, **tok)
        print(f"data: {len(train)} train / {len(test)} eval examples from {list(cfg.datasets)}")

    @property
    def cache_dir(self):
        return checkpoints.first_usable_dir(self.cfg.local_dirs)

    # ---- forward passes ---------------------------------------------------------------------
    def forward(self, model, batch):
        """Summed log-probs: (chosen, n_chosen) for SFT; (chosen, rejected, n_c, n_r) for pairs,
        from ONE forward over the concatenated [chosen; rejected] batch."""
        chunk = self.cfg.logits_chunk_size
        ids, mask, labels = (batch[f"chosen_{k}"] for k in ("input_ids", "attention_mask", "labels"))
        if not self.spec.paired:
            return sequence_logps(model, ids.to(self.device), mask.to(self.device),
                                  labels.to(self.device), chunk)
        length = max(ids.shape[1], batch["rejected_input_ids"].shape[1])
        pad = self.tokenizer.pad_token_id
        cat = lambda k, v: torch.cat([pad_to(batch[f"chosen_{k}"], length, v),  # noqa: E731
                                      pad_to(batch[f"rejected_{k}"], length, v)]).to(self.device)
        logps, n = sequence_logps(model, cat("input_ids", pad), cat("attention_mask", 0),
                                  cat("labels", -100), chunk)
        half = ids.shape[0]
        return logps[:half], logps[half:], n[:half], n[half:]

    def reference_logps(self, batch):
        if self.reference_table is not None:
            return reference_cache.lookup(self.reference_table, batch["uid"], self.device)
        with torch.no_grad():
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
            [e.uid for e in examples])
        self.reference_table = reference_cache.load_or_compute(
            self.cache_dir, key, lambda: reference_cache.compute_reference_logps(
                lambda m, b: self.forward(m, b)[:2], self.reference_model,
                loader.epoch_batches(0), len(loader)))
        self.reference_model = None  # training holds no reference model from here on

    # ---- one loss evaluation: the loss's own step function (never a branch on its name) ----
    def step_metrics(self, batch, split: str):
        """(loss, per-example metric tensors) for one (micro-)batch."""
        return self.spec.step(self, batch, split)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Across ranks (distributed trainers override); here the identity."""
        return t

    # ---- evaluation and sampling ------------------------------------------------------------
    def evaluate(self):
        self.policy.eval()
        sums, count = {}, 0
        with torch.no_grad():
            for batch in tqdm(self.eval_batches.epoch_batches(0), total=len(self.eval_batches),
                              desc="eval", leave=False):
                _, metrics = self.step_metrics(batch, "eval")
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + self.gather(v.detach().float()).sum().item()
                count += len(batch["uid"])
        results = {k: v / count for k, v in sums.items()}
        self.state.last_eval = self.state.examples
        if self.spec.samples and self.cfg.sample_during_eval and self.cfg.n_eval_model_samples > 0:
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
                    for row, text in zip(batch_rows, self.generate(model, batch, len(batch_rows))):
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
                             pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)

    # ---- the loop -----------------------------------------------------------------------------
    def train(self):
        cfg, st = self.cfg, self.state
        self.prepare_reference()
        per_epoch = len(self.train_batches.examples) if not cfg.drop_last else \
            len(self.train_batches) * cfg.batch_size
        total = cfg.n_epochs * per_epoch if cfg.n_epochs else math.inf
        if cfg.n_examples:
            total = min(total, cfg.n_examples)
        bar = tqdm(total=total, initial=st.examples, unit="ex", desc="train", dynamic_ncols=True)
        last_log = 0.0
        while st.examples < total:
            for batch in self.train_batches.epoch_batches(st.epoch, st.epoch_offset):
                if st.examples >= st.next_eval:
                    self.evaluate()
                    while st.next_eval <= st.examples:
                        st.next_eval += cfg.eval_every
                    if cfg.save_every is None and st.examples > 0:
                        self.save()
                metrics = self.train_step(batch)
                bar.update(len(batch["uid"]))
                bar.set_postfix(loss=f"{metrics['loss/train']:.4f}")
                if time.time() - last_log >= cfg.minimum_log_interval_secs:
                    self.logger.log(metrics, st.examples)
                    last_log = time.time()
                if st.epoch_offset >= per_epoch:
                    st.epoch, st.epoch_offset = st.epoch + 1, 0
                if self._save_due(len(batch["uid"])):
                    self.save(f"epoch-{st.epoch}" if st.epoch_offset == 0 and
                              str(cfg.save_every).startswith("epoch_") else None)
                if st.examples >= total:
                    break
        bar.close()
        if st.last_eval != st.examples:
            self.evaluate()
        if st.last_save != st.examples:
            self.save()
        self.logger.close()

    def _save_due(self, batch_examples: int) -> bool:
        """save_every=N: when the example count crosses a multiple of N; epoch_N: at the end of
        every N-th epoch."""
        every, st = self.cfg.save_every, self.state
        if isinstance(every, str) and every.startswith("epoch_"):
            return st.epoch_offset == 0 and st.epoch % int(every[len("epoch_"):]) == 0
        if not every:
            return False
        return st.examples // every > (st.examples - batch_examples) // every

    def train_step(self, batch) -> dict:
        """One optimizer step over `gradient_accumulation_steps` micro-batches."""
        start = time.time()
        self.policy.train()
        micro = split_batch(batch, self.cfg.gradient_accumulation_steps)
        collected = {}
        for mb in micro:
            loss, metrics = self.step_metrics(mb, "train")
            (loss * len(mb["uid"]) / len(batch["uid"])).backward()
            for k, v in metrics.items():
                collected.setdefault(k, []).append(self.gather(v.detach().float()))
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
        out = {k: torch.cat(v).mean().item() for k, v in collected.items()}
        out.update({"grad_norm": grad_norm, "examples_per_second": n_examples / elapsed,
                    "tokens_per_second": tokens / elapsed, "lr": self.scheduler.get_last_lr()[0],
                    "counters/examples": st.examples, "counters/updates": st.steps})
        return out

    def clip_gradients(self) -> float:
        return torch.nn.utils.clip_grad_norm_(self.policy.parameters(),
                                              self.cfg.max_grad_norm).item()

    # ---- checkpoints --------------------------------------------------------------------------
    def save(self, name: str | None = None):
        if self.cfg.debug:
            return
        st = self.state
        name = name or f"step-{st.examples}"
        trainer_state = {"train_state": asdict(st), "rng": checkpoints.rng_state()}
        path = checkpoints.save_checkpoint(
            self.run_dir, name, st.examples, {"examples": st.examples}, self.policy_state_dict(),
            self.optimizer.state_dict(), self.scheduler.state_dict(), trainer_state,
            self.write_extra_files)
        st.last_save = st.examples
        checkpoints.prune_checkpoints(self.run_dir, self.cfg.keep_last)
        print(f"saved {path}")

    def write_extra_files(self, tmp_dir):
        """Inside the atomic checkpoint dir: the loss's own files, then the optional HF export."""
        if self.spec.checkpoint_files is not None:
            self.spec.checkpoint_files(self, tmp_dir)
        if self.cfg.export_hf:
            self.export_hf(tmp_dir / "hf")

    def policy_state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.policy.state_dict().items()}

    def export_hf(self, out_dir):
        self.policy.save_pretrained(out_dir, safe_serialization=True)
        self.tokenizer.save_pretrained(out_dir)

    def _restore(self, resume: dict):
        self.policy.load_state_dict(resume["policy"]["state"])
        self.optimizer.load_state_dict(resume["optimizer"]["state"])
        self.scheduler.load_state_dict(resume["scheduler"]["state"])
        self.state = TrainState(**resume["trainer"]["train_state"])
        checkpoints.set_rng_state(resume["trainer"]["rng"])
        print(f"resumed from {resume['dir']} at {self.state.examples} examples")


class FSDPTrainer(BasicTrainer):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("trainer=FSDPTrainer is not available yet (it lands with the "
                                  "scale-out issue #6); use trainer=BasicTrainer")


class TensorParallelTrainer(BasicTrainer):
    def __init__(self, *args, **kwargs):
        raise NotImplementedError("trainer=TensorParallelTrainer is not available yet (it lands "
                                  "with the scale-out issue #6); use trainer=BasicTrainer")


TRAINERS = {cls.__name__: cls for cls in (BasicTrainer, FSDPTrainer, TensorParallelTrainer)}
