"""Smoke tests of the harness's GPU paths on one model; scripts/bench/gpu_check.py runs it.

    python scripts/bench/gpu_smoke.py --spec '{"model": "tiny", "paths": ["env", ...], ...}'

Each path builds what train.py builds (the config composed as scripts/bench/bench.py composes it,
the harness's loaders, BasicTrainer or the rollout loop) and checks it; the training paths and their
checks (log-probs vs the plain path, gradients vs a twin path, finite losses, peak memory) are
in scripts/bench/gpu_smoke_train.py. Here: the environment, the static-cache sampler, one PPO
rollout + update, and the worker. Progress goes to spec["progress"] as JSON lines:
{"event": "ready"}, then {"event": "start", "path"} and {"event": "result", ...} per path.
After a path the worker exits with code 3 if the CUDA context no longer works (a sticky CUDA
error), so that gpu_check.py starts a fresh worker for the remaining paths.
"""

import argparse
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

START = time.perf_counter()
import torch  # noqa: E402  (after START: the import time is reported)

from benchlib import Memory, synchronize  # noqa: E402
from gpu_smoke_train import (LEVERS, CheckFailed, Context, check_steps, cleanup,  # noqa: E402
                             finish, lever_path, memory_figures, plain_path, prepare_path)

# PPO: max |exp(log-prob at the update - log-prob at the rollout) - 1| before any update
RATIO_TOL = {"float32": 1e-3, "bfloat16": 5e-2}


def env_path(ctx: Context) -> dict:
    """Versions, the device, and the bf16 matmul rate measured here (MFU's practical ceiling)."""
    import importlib.metadata as md
    import platform
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda, "device": ctx.device}
    for name in ("transformers", "peft", "accelerate", "trl", "datasets", "hydra-core",
                 "omegaconf", "triton"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    if ctx.device == "cuda":
        out["gpu"] = torch.cuda.get_device_name()
        out["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        for _ in range(3):
            a @ b
        times = []
        for _ in range(10):
            synchronize("cuda")
            start = time.perf_counter()
            a @ b
            synchronize("cuda")
            times.append(time.perf_counter() - start)
        out["bf16_matmul_tflops"] = round(2 * 8192**3 / statistics.median(times) / 1e12, 1)
    missing = [k for k in ("transformers", "peft", "trl", "datasets", "hydra-core", "omegaconf")
               if out[k] is None]
    return finish(out, [f"not installed: {', '.join(missing)}"] if missing else [])


def static_cache_path(ctx: Context) -> dict:
    """Greedy samples with the static KV cache (on a GPU transformers compiles the decode step)
    against the dynamic cache: the same tokens, and both speeds after a warm-up."""
    from dataclasses import replace
    from harness.models.generation import SamplingConfig, sample
    from harness.models.modeling import load_model
    mem = Memory(ctx.device)
    mem.reset_peak()
    model = load_model(ctx.model_dir, "float32").to(ctx.device).eval()
    prompts = [json.loads(line)["prompt"] for line in ctx.data.read_text().splitlines()]
    prompts = prompts[:ctx.spec["batch_size"]]
    cfg = SamplingConfig(max_new_tokens=ctx.spec["new_tokens"], temperature=0,
                         batch_size=len(prompts))
    runs, figures = {}, {}
    for name, config in (("dynamic", cfg), ("static", replace(cfg, static_cache=True))):
        for attempt in ("warmup", "timed"):
            synchronize(ctx.device)
            start = time.perf_counter()
            runs[name] = sample(model, ctx.tokenizer, prompts, config, progress=False)
            synchronize(ctx.device)
            figures[f"{name}_{attempt}_s"] = round(time.perf_counter() - start, 3)
    tokens = sum(len(s.completion_ids) for s in runs["static"])
    figures["static_new_tokens_per_s"] = round(tokens / figures["static_timed_s"], 1)
    same = total = 0
    for a, b in zip(runs["dynamic"], runs["static"]):
        total += max(len(a.completion_ids), len(b.completion_ids))
        for x, y in zip(a.completion_ids, b.completion_ids):
            if x != y:
                break
            same += 1
    figures.update(token_match=round(same / max(total, 1), 4), **memory_figures(mem))
    failures = [] if figures["token_match"] >= 0.9 else [
        f"static-cache greedy tokens match the dynamic cache's only {figures['token_match']:.1%} "
        "(up to each row's first difference; want >= 90%)"]
    return finish(figures, failures)


def ppo_path(ctx: Context) -> dict:
    """A reward model trained one step (loss=reward, saved as PPO reads it), then one PPO
    rollout of batch_size prompts and one update epoch."""
    import train
    from harness.models.modeling import load_model
    from harness.parallel.parallelize import single_process_device_map
    from harness.rl.loop import RolloutLoop
    dtype, batch = ctx.spec["ppo_dtype"], ctx.spec["batch_size"]
    mem = Memory(ctx.device)
    mem.reset_peak()
    rm_cfg = ctx.config("reward", dtype=dtype, reference="none")
    rm_cfg.debug, rm_cfg.n_examples, rm_cfg.n_eval_examples = False, batch, 8
    rm_cfg.optimizer = "SGD"  # no optimizer state to write
    start = time.perf_counter()
    rm_run = train.run(rm_cfg)
    figures = {"reward_run_s": round(time.perf_counter() - start, 2)}
    cleanup()  # the reward run's models
    cfg = ctx.config("ppo", [f"loss.reward_model={rm_run}", f"loss.mini_batch_size={batch}",
                             "loss.ppo_epochs=1", f"loss.max_new_tokens={ctx.spec['new_tokens']}",
                             "loss.temperature=1.0"], dtype=dtype, reference="none")
    device_map = single_process_device_map()
    policy, reference = (load_model(ctx.model_dir, dtype, device_map=device_map)
                         for _ in range(2))
    os.makedirs(cfg.local_run_dir, exist_ok=True)
    trainer = RolloutLoop(policy, ctx.tokenizer, cfg, cfg.local_run_dir, reference)  # PPO's
    examples = next(trainer.prompt_batches(0, 0))
    mem.start_steps()
    synchronize(ctx.device)
    start = time.perf_counter()
    stats = trainer.step(examples)  # raises TrainingDiverged on a non-finite statistic
    synchronize(ctx.device)
    tol = RATIO_TOL[dtype]
    figures.update({"ppo_step_s": round(time.perf_counter() - start, 3), "dtype": dtype,
                    "first_ratio_max_dev": round(stats["ppo/first_ratio_max_dev"], 6),
                    "ratio_tol": tol, "score": round(stats["rewards_train/score"], 4),
                    "kl": round(stats["kl_train/kl"], 4),
                    "response_length": stats["ppo/response_length"],
                    "losses": [stats["loss/policy"], stats["loss/value"]],
                    "grad_norms": [stats["grad_norm"]]}, **memory_figures(mem))
    failures = []
    check_steps(figures, failures)
    if figures["first_ratio_max_dev"] > tol:
        failures.append(f"rollout and update log-probs differ: max |ratio - 1| "
                        f"{figures['first_ratio_max_dev']:.3g} before any update (tolerance "
                        f"{tol})")
    return finish(figures, failures)


PATHS = {"env": env_path, "prepare": prepare_path, "plain_fp32": plain_path,
         "sample_static_cache": static_cache_path, "ppo_rollout_update": ppo_path,
         **{name: (lambda ctx, name=name: lever_path(ctx, name)) for name in LEVERS}}


# ---------------------------------------------------------------------------- the worker
def run_path(ctx: Context, name: str) -> dict:
    """One path: its figures and pass, or fail with the reason; never raises."""
    start = time.perf_counter()
    status, error, figures = "pass", None, {}
    try:
        if name not in ("env", "prepare"):
            ctx.prepare()
        figures = PATHS[name](ctx)
    except CheckFailed as e:
        status, error, figures = "fail", str(e), e.figures
    except Exception as e:  # noqa: BLE001  (a path's failure is a result, the next one runs)
        traceback.print_exc()
        status, error = "fail", f"{type(e).__name__}: {e}"[:2000]
    cleanup()
    return {"path": name, "status": status, "seconds": round(time.perf_counter() - start, 2),
            "figures": figures, "error": error}


def cuda_healthy() -> bool:
    try:
        torch.zeros(1, device="cuda").add_(1).item()
        torch.cuda.synchronize()
        return True
    except Exception:  # noqa: BLE001  (a sticky CUDA error: every later call fails too)
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", required=True, help="JSON: model, source, device, batch_size, "
                   "max_length, new_tokens, steps, ppo_dtype, paths, workdir, progress")
    spec = json.loads(p.parse_args(argv).spec)
    progress = Path(spec["progress"])

    def emit(**line):
        with progress.open("a") as f:
            f.write(json.dumps(line) + "\n")
    emit(event="ready", import_s=round(time.perf_counter() - START, 2))
    ctx = Context(spec)
    for name in spec["paths"]:
        emit(event="start", path=name)
        print(f"[gpu_smoke] {spec['model']}/{name}", file=sys.stderr, flush=True)
        emit(event="result", **run_path(ctx, name))
        if ctx.device == "cuda" and not cuda_healthy():
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
