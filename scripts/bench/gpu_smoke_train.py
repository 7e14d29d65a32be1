"""The training paths of scripts/bench/gpu_smoke.py and what every path shares: the model under
test with its data (Context), building a trainer as train.py builds it, the log-prob, gradient
and loss checks, peak memory.

The checks, in nats per scored token for log-probs:
- log-probs: the summed log-probs of one fixed batch (the first `batch_size` train pairs, in
  file order) through the path's forward equal the plain path's (plain_fp32: float32 weights,
  padded batch, no lever) within min(0.05, a quarter of `context_effect`), where
  context_effect is how far the plain path's log-probs of the same responses move after
  another row's prompt. A deviation within rounding passes; a broken mask, which moves them by
  about context_effect, cannot. (A random-init model's log-probs depend little on context, so
  a fixed bf16 tolerance would pass anything there.)
- gradients: the first step's gradient norm equals that of the path's twin (the same loss under
  plain bf16 autocast, run earlier) within 5% (relative);
- losses: `steps` optimizer steps, every loss and gradient norm finite.
"""

import gc
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from bench import compose_config
from benchlib import MODELS, REPO, Memory, build_model_dir, make_rows, synchronize

LOGP_TOL = 5e-2      # |log-prob difference| per scored token in nats, at most this
CONTEXT_SHARE = 0.25  # ... and at most this share of what a wrong prompt does (context_effect)
GRAD_RTOL = 5e-2     # first gradient norm vs the twin path's, relative
AMP = ("amp_dtype=bfloat16",)
FSDP = ("trainer=FSDPTrainer", "model.fsdp_policy_mp=bfloat16")
PACK = ("packing=true", "prefix_sharing=true")
# name -> (loss, config overrides, attention implementation, twin path for the gradient check)
LEVERS = {
    "sft_amp_bf16": ("sft", AMP, None, None),
    "dpo_amp_bf16": ("dpo", AMP, None, None),
    "sft_fsdp_bf16": ("sft", FSDP, None, "sft_amp_bf16"),
    "dpo_fsdp_bf16": ("dpo", FSDP, None, "dpo_amp_bf16"),
    "dpo_activation_checkpointing": ("dpo", AMP + ("activation_checkpointing=true",), None,
                                     "dpo_amp_bf16"),
    "dpo_compile": ("dpo", AMP + ("compile=true",), None, "dpo_amp_bf16"),
    "dpo_packing_flex": ("dpo", AMP + PACK, "flex_attention", "dpo_amp_bf16"),
    "dpo_packing_sdpa": ("dpo", AMP + PACK, "sdpa", "dpo_amp_bf16"),
    "dpo_lora": ("dpo", AMP + ("model.lora.r=16", "model.lora.alpha=32"), None, None),
}


class CheckFailed(Exception):
    def __init__(self, failures: list[str], figures: dict):
        super().__init__("; ".join(failures))
        self.figures = figures


def finish(figures: dict, failures: list[str]) -> dict:
    if failures:
        raise CheckFailed(failures, figures)
    return figures


class Context:
    """The model under test, its data and what earlier paths in this process measured."""

    def __init__(self, spec: dict):
        self.spec, self.device = spec, spec["device"]
        self.dir = Path(spec["workdir"]) / spec["model"]
        self.dir.mkdir(parents=True, exist_ok=True)
        self.prepared = None

    @property
    def first_grad_norms(self) -> dict:
        """path -> its first step's gradient norm, kept on disk across restarted workers."""
        path = self.dir / "first_grad_norms.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def keep_first_grad_norm(self, name: str, value: float):
        (self.dir / "first_grad_norms.json").write_text(json.dumps(
            {**self.first_grad_norms, name: value}))

    def prepare(self) -> dict:
        """The model dir (the bundled tiny model, or a random-init preset built once) and
        HH-like pairs for it; idempotent."""
        if self.prepared is None:
            from harness.models.modeling import load_tokenizer
            spec = self.spec
            tok = load_tokenizer("assets/tiny_model")  # as bench.py loads it: one model dir
            if spec["source"] in MODELS:
                preset = dict(MODELS[spec["source"]], max_length=spec["max_length"])
                preset["device"] = self.device
                self.model_dir = spec.get("build_dir") or str(self.dir / "model")
                params = build_model_dir(Path(self.model_dir), preset, tok)
            else:
                self.model_dir = str(REPO / spec["source"])
                params = None
            self.data = self.dir / "pairs.jsonl"
            rows = make_rows(tok, 8 * spec["batch_size"], spec["max_length"],
                             spec["max_length"] // 2)
            self.data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            self.tokenizer = load_tokenizer(self.model_dir)
            self.prepared = {"model_dir": self.model_dir, "params": params, "pairs": len(rows)}
        return self.prepared

    def config(self, loss: str, levers=(), dtype: str = "float32", reference: str = "precomputed"):
        tmp = self.dir / "runs" / f"{loss}_{time.monotonic_ns()}"
        tmp.mkdir(parents=True)
        spec = dict(model_dir=self.model_dir, dtype=dtype, loss=loss, data=str(self.data),
                    batch_size=self.spec["batch_size"], max_length=self.spec["max_length"],
                    lr=1e-6, beta=0.1, optimizer="AdamW", tmp=str(tmp), reference=reference,
                    levers=list(levers), epoch=False)
        return compose_config(spec)

    def fixed_batch(self, rotate_prompts: bool = False) -> dict:
        """The first batch_size train pairs in file order; rotate_prompts: each row's responses
        after the next row's prompt (a wrong context, to measure the check's resolution)."""
        from preference_datasets import BatchIterator, load_examples, make_example
        examples = load_examples([f"json:{self.data}"], "train", sft_mode=False)
        examples = examples[:self.spec["batch_size"]]
        if rotate_prompts:
            examples = [make_example(examples[(i + 1) % len(examples)].prompt, e.chosen,
                                     e.rejected, e.truncation_mode) for i, e in enumerate(examples)]
        length = self.spec["max_length"]
        return next(BatchIterator(examples, self.tokenizer, batch_size=len(examples),
                                  shuffle=False, seed=0, max_length=length,
                                  max_prompt_length=length // 2).epoch_batches(0))


# ---------------------------------------------------------------------------- building blocks
def build_trainer(ctx: Context, cfg, attn: str | None = None):
    """A BasicTrainer as train.py builds it (FSDPTrainer in one process: in a process group of
    one, which cleanup() ends). `attn`: the policy's attention implementation (the reference
    keeps sdpa, so its pre-pass compiles nothing)."""
    from harness.models import lora
    from harness.models.modeling import load_model
    from harness.objectives import needs_reference
    from harness.parallel import distributed
    from harness.parallel.parallelize import single_process_device_map
    from trainers import BasicTrainer
    distributed.init(cfg)
    device_map = None if distributed.trainer_layout(cfg).processes else single_process_device_map()
    policy = load_model(cfg.model.name_or_path, cfg.model.policy_dtype, device_map=device_map)
    reference = None
    if lora.enabled(cfg.model):
        policy = reference = lora.apply_lora(policy, cfg.model.lora)
    elif needs_reference(cfg.loss):
        reference = load_model(cfg.model.name_or_path, cfg.model.reference_dtype,
                               device_map=device_map).eval()
    if attn:
        lora.causal_lm(policy).set_attn_implementation(attn)
    os.makedirs(cfg.local_run_dir, exist_ok=True)
    return BasicTrainer(policy, ctx.tokenizer, cfg, cfg.local_run_dir, reference)


def batch_logps(trainer, batch, backward: bool = False) -> tuple[list, list]:
    """Summed log-probs and scored-token counts of every response of `batch`, chosen then
    rejected, through the trainer's own forward (autocast, packing, sharding). backward=True
    computes them as a step does (train mode, autograd, a backward whose gradients are then
    dropped), so compiled and checkpointed code runs the graphs the steps reuse."""
    policy = trainer.policy
    policy.train(backward)
    with torch.set_grad_enabled(backward):
        out = trainer.forward(policy, batch)
        half = len(out) // 2
        if backward:
            torch.cat(out[:half]).sum().backward()
            trainer.optimizer.zero_grad(set_to_none=True)
    policy.train()
    return (torch.cat(out[:half]).float().tolist(),
            torch.cat(out[half:]).float().tolist())


def per_token_dev(logps, counts, ref_logps, ref_counts) -> float:
    """The largest |difference| of two runs' log-probs per scored token, over the sequences
    both score (SFT paths score the chosen half only)."""
    pairs = list(zip(logps, counts, ref_logps, ref_counts))
    if any(n != m for _, n, _, m in pairs):
        raise ValueError("the two forwards scored different tokens")
    return max(abs(a - b) / max(n, 1) for a, n, b, _ in pairs)


def train_steps(trainer, n: int, mem: Memory, device: str) -> dict:
    """n optimizer steps over the first train batches: losses, gradient norms, times."""
    batches = [b for _, b in zip(range(n), trainer.train_batches.epoch_batches(0))]
    mem.start_steps()
    losses, norms, times = [], [], []
    for batch in batches:
        synchronize(device)
        start = time.perf_counter()
        metrics = trainer.train_step(batch)
        synchronize(device)
        times.append(round(time.perf_counter() - start, 4))
        losses.append(float(metrics["loss/train"]))
        norms.append(float(metrics["grad_norm"]))
    return {"losses": losses, "grad_norms": norms, "step_s": times}


def memory_figures(mem: Memory) -> dict:
    s = mem.summary()
    return {"memory_kind": s["memory_kind"], "peak_mib": s["peak_memory_mib"],
            "steps_peak_mib": round(s["peak_memory_mib"] - s["peak_memory_delta_mib"]
                                    + s["step_peak_memory_delta_mib"], 1)}


def check_steps(figures: dict, failures: list):
    bad = [x for x in figures["losses"] + figures["grad_norms"] if not math.isfinite(x)]
    if bad or not figures["losses"]:
        failures.append(f"non-finite loss or gradient norm: {figures['losses']}, "
                        f"{figures['grad_norms']}")


def load_plain(ctx: Context) -> dict:
    path = ctx.dir / "plain_fp32.json"
    if not path.exists():
        raise RuntimeError("no plain_fp32 log-probs to compare with (that path failed or was "
                           "not run)")
    return json.loads(path.read_text())


def cleanup():
    """Free what a path left behind (its process group too), so that the next one starts from
    an empty device."""
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()
    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_path(ctx: Context) -> dict:
    return ctx.prepare()


def plain_path(ctx: Context) -> dict:
    """The plain path (float32, padded, no lever): the log-probs every other path is held to,
    how far a wrong context moves them, and its steps' time and memory."""
    mem = Memory(ctx.device)
    mem.reset_peak()
    trainer = build_trainer(ctx, ctx.config("dpo"))
    trainer.prepare_reference()
    logps, counts = batch_logps(trainer, ctx.fixed_batch())
    wrong, wrong_counts = batch_logps(trainer, ctx.fixed_batch(rotate_prompts=True))
    effect = statistics.median(abs(a / n - b / m) for a, n, b, m in
                               zip(logps, counts, wrong, wrong_counts))
    tol = min(LOGP_TOL, CONTEXT_SHARE * effect)
    figures = {"context_effect": round(effect, 6), "logp_tol": round(tol, 6), **train_steps(
        trainer, ctx.spec["steps"], mem, ctx.device), **memory_figures(mem)}
    failures = []
    check_steps(figures, failures)
    if effect < 1e-4:
        failures.append(f"a wrong prompt moves the log-probs by only {effect:.3g} nats per "
                        "token: this model's log-probs cannot show a broken mask")
    (ctx.dir / "plain_fp32.json").write_text(json.dumps(
        {"logps": logps, "counts": counts, "context_effect": effect, "tol": tol}))
    return finish(figures, failures)


def lever_path(ctx: Context, name: str) -> dict:
    """A training path with levers (bf16 autocast or FSDP mixed precision, checkpointing,
    compile, packing, LoRA): log-probs vs the plain path, first gradient vs its twin, steps."""
    loss, levers, attn, twin = LEVERS[name]
    plain = load_plain(ctx)
    mem = Memory(ctx.device)
    mem.reset_peak()
    trainer = build_trainer(ctx, ctx.config(loss, levers), attn)
    try:
        prepass = time.perf_counter()
        trainer.prepare_reference()
        figures = {"prepass_s": round(time.perf_counter() - prepass, 3)}
        backward = not (attn == "flex_attention" and ctx.device == "cpu")
        logps, counts = batch_logps(trainer, ctx.fixed_batch(), backward)
        dev, tol = per_token_dev(logps, counts, plain["logps"], plain["counts"]), plain["tol"]
        figures.update(logp_dev=round(dev, 6), logp_tol=round(tol, 6))
        failures = [] if dev <= tol else [
            f"log-probs {dev:.3g} nats/token from the plain path (tolerance {tol:.3g}: a wrong "
            f"prompt moves them {plain['context_effect']:.3g})"]
        if not backward:
            figures["note"] = "no train steps: flex_attention has no backward on a CPU"
            return finish({**figures, **memory_figures(mem)}, failures)
        figures.update(train_steps(trainer, ctx.spec["steps"], mem, ctx.device))
        figures.update(memory_figures(mem))
    finally:
        del trainer
        cleanup()
    check_steps(figures, failures)
    ctx.keep_first_grad_norm(name, figures["grad_norms"][0])
    if twin in ctx.first_grad_norms:
        rel = abs(figures["grad_norms"][0] / ctx.first_grad_norms[twin] - 1)
        figures.update(grad_norm_twin=twin, grad_norm_rel_dev=round(rel, 6))
        if rel > GRAD_RTOL:
            failures.append(f"first gradient norm {rel:.3g} (relative) from {twin}'s "
                            f"(tolerance {GRAD_RTOL})")
    return finish(figures, failures)
