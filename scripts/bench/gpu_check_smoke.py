"""The smoke steps of scripts/bench/gpu_check.py: which paths of scripts/bench/gpu_smoke.py run
on which model, their budgets, and the watcher that runs them in worker processes, stops a path
that runs over its budget (or past the check's deadline) and starts a fresh worker for the
paths after a timeout or a crash. Standard library only."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SMOKE_SCRIPT = Path(__file__).resolve().parent / "gpu_smoke.py"
DPO_PATHS = ["dpo_amp_bf16", "dpo_activation_checkpointing", "dpo_packing_sdpa", "dpo_lora",
             "dpo_fsdp_bf16", "ppo_rollout_update"]
# seconds each path may take on the GPU (first calls compile; the 1B loads 4 GB per model)
PATH_BUDGET = {"env": 30, "prepare": 60, "plain_fp32": 45, "sft_fsdp_bf16": 45,
               "dpo_fsdp_bf16": 45, "ppo_rollout_update": 60, "dpo_compile": 100,
               "dpo_packing_flex": 100, "sample_static_cache": 100}
DEFAULT_PATH_BUDGET = 30
SMOKE = {  # model -> what gpu_smoke.py builds, and its paths (cheap ones first)
    "tiny": dict(source="assets/tiny_model", batch_size=8, max_length=128, new_tokens=32,
                 steps=3, ppo_dtype="float32",
                 paths=["env", "prepare", "plain_fp32", "sft_amp_bf16", "sft_fsdp_bf16",
                        *DPO_PATHS, "sample_static_cache"]),
    # the 1.1B adds what needs real sizes (compile, flex_attention kernels, memory); SFT and
    # the static cache run on it in the benchmarks
    "1b": dict(source="h100-1b", batch_size=8, max_length=1024, new_tokens=32, steps=3,
               ppo_dtype="bfloat16", paths=["prepare", "plain_fp32", *DPO_PATHS,
                                            "dpo_compile", "dpo_packing_flex"]),
}
DRY_SMOKE = {"tiny": dict(batch_size=4), "1b": dict(source="cpu-tiny", batch_size=4,
                                                    max_length=256, new_tokens=16, steps=2)}


def stop(proc: subprocess.Popen):
    """End a step's process and everything it started."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def smoke_spec(run, model: str) -> dict:
    spec = dict(SMOKE[model], **(DRY_SMOKE[model] if run.args.dry_run else {}))
    spec.update(model=model, device="cpu" if run.args.dry_run else "cuda",
                workdir=str(run.work / "smoke"), build_dir=str(run.work / "bench" / "model"))
    return spec


class SmokeWorker:
    """One gpu_smoke.py process over some paths: follows its progress file, stops it when the
    path it is on runs over budget or the deadline passes, records each path's result."""

    def __init__(self, run, model: str, spec: dict, todo: list[str], attempt: int):
        self.run, self.model, self.todo = run, model, todo
        self.progress = run.work / f"smoke_{model}_{attempt}.jsonl"
        self.progress.write_text("")
        self.proc = run.launch([sys.executable, str(SMOKE_SCRIPT), "--spec",
                                json.dumps(dict(spec, paths=todo, progress=str(self.progress)))])
        self.launched, self.seen, self.ready, self.done = time.monotonic(), 0, False, 0
        self.current = self.started = None

    def budget(self, path: str) -> float:
        return PATH_BUDGET.get(path, DEFAULT_PATH_BUDGET) * self.run.scale

    def record(self, path: str, status: str, seconds: float, **extra):
        self.todo.remove(path)
        self.run.record({"step": f"smoke/{self.model}/{path}", "status": status,
                         "seconds": round(seconds, 2), "budget_s": round(self.budget(path)),
                         **extra})
        if path == self.current:
            self.current = None

    def consume(self):
        """Handle the complete lines the worker appended since the last call."""
        text = self.progress.read_text()
        end = text.rfind("\n") + 1  # a line still being written waits for the next call
        for line in text[self.seen:end].splitlines():
            event = json.loads(line)
            if event["event"] == "ready":
                self.ready = True
            elif event["event"] == "start":
                self.current, self.started = event["path"], time.monotonic()
            else:
                self.done += 1
                self.record(event["path"], event["status"], event["seconds"],
                            figures=event["figures"], error=event["error"])
        self.seen = max(self.seen, end)

    def follow(self) -> list[str]:
        """Wait for the worker; the paths a fresh worker should still run ([]: none)."""
        while True:
            self.consume()
            now, rc = time.monotonic(), self.proc.poll()
            if not self.todo:
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    stop(self.proc)
                return []
            if rc is not None:
                self.consume()
                return self.after_exit(rc)
            if self.current and (now - self.started > self.budget(self.current)
                                 or self.run.left() <= 0):
                stop(self.proc)
                why = "its budget" if self.run.left() > 0 else "the check's deadline"
                self.record(self.current, "timeout", now - self.started,
                            error=f"stopped at {why}; a fresh worker runs the paths after it")
                return self.todo
            if not self.ready and now - self.launched > 120 * self.run.scale:
                stop(self.proc)
                return self.abandon("the worker did not start within 120 s")
            time.sleep(0.2)

    def after_exit(self, rc) -> list[str]:
        """The worker ended with paths left: a path it died in fails; a fresh worker runs the
        rest, unless this one finished none (it would die the same way)."""
        if self.current:
            self.record(self.current, "fail", time.monotonic() - self.started,
                        error=f"the worker exited with code {rc} during this path "
                              "(gpu_check.log has its output)")
            return self.todo
        if not self.done and self.todo:
            return self.abandon(f"the worker exited with code {rc} before finishing a path")
        return self.todo

    def abandon(self, why: str) -> list[str]:
        for path in list(self.todo):
            self.record(path, "fail", 0.0, error=why + " (gpu_check.log has its output)")
        return []


def run_smoke(run, model: str):
    spec = smoke_spec(run, model)
    todo, attempt = [p for p in spec["paths"] if run.wanted(f"smoke/{model}/{p}")], 0
    while todo:
        if run.left() <= 0:
            for path in todo:
                run.record({"step": f"smoke/{model}/{path}", "status": "skipped",
                            "seconds": 0.0, "error": "past the check's deadline"})
            return
        attempt += 1
        todo = SmokeWorker(run, model, spec, list(todo), attempt).follow()
