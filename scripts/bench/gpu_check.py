"""GPU check: every GPU path of the harness and its speed figures, one command, timed to fit a
lent GPU's budget (docs/performance.md, "GPU check").

    bash scripts/gpu_check.sh --out OUT           # on a fresh GPU machine, from the repo root
    bash scripts/gpu_check.sh --dry-run           # the same steps on a CPU, tiny presets (CI)
    bash scripts/gpu_check.sh --only generation   # rerun some steps (prefixes: smoke/1b, ...)
    python scripts/bench/gpu_check.py --fetch-wheels   # here, before: the wheels the image lacks

The steps, in order; each is timed and runs whatever became of the ones before it:

  wheels        pip install --target the wheels in .whl/ (Hydra, OmegaConf, datasets, TRL: the
                GPU image has none of them); later steps find them on PYTHONPATH
  smoke/MODEL/PATH   scripts/bench/gpu_smoke.py on the bundled tiny model and a 1.1B random-init
                Llama (bf16 autocast, FSDP2 mixed precision on a 1-rank NCCL group, activation
                checkpointing, compile=true, packing with sdpa and flex_attention, LoRA DPO, a
                PPO rollout + update, the static-cache sampler): finite losses, log-probs equal
                to the plain path's, gradients equal to the twin path's, peak memory. Which
                path runs on which model, and their budgets: scripts/bench/gpu_check_smoke.py
  dpo_epoch     scripts/bench/bench.py --epoch on h100-1b: TRL's DPOTrainer with its reference
                in memory and with precompute_ref_log_probs, then ours with its levers; pairs/s,
                non-pad tokens/s, MFU, peak memory, ratios
  sft_compiled  bench.py SFT steps on fixed shapes: ours with compile=true vs a bare step with
                compiled blocks
  generation    scripts/bench/bench_generate.py: 64 prompts x 256 new tokens, plain
                model.generate vs our sampler with the static KV cache

Every step and path has a time budget and the whole check a deadline (--deadline-s): a step
over its budget is stopped and recorded as a timeout, steps past the deadline as skipped.
OUT holds gpu_check.jsonl (a header, one line per step, a summary), gpu_check.md (the table),
gpu_check.png (each step's time against its budget, ours / peer against the targets) and
gpu_check.log (everything the steps printed). A time line per step goes to stdout as it ends,
the table at the end. Exit code 0 when every step passed (skipped ones do not count). This
file imports only the standard library (matplotlib for the PNG, when present): it runs before
the wheels are installed.
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from gpu_check_report import bench_figures, markdown, plot, time_line
from gpu_check_smoke import SMOKE, run_smoke, stop

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "scripts" / "bench"
# what the lent GPU image (Python 3.12, torch 2.11, transformers 5.17) lacks; pure Python
WHEELS = ["hydra-core==1.3.8", "omegaconf==2.3.1", "antlr4-python3-runtime==4.9.3",
          "datasets==5.2.0", "dill==0.4.1", "multiprocess==0.70.19", "trl==1.16.0"]
STEP_BUDGET = {"wheels": 60, "dpo_epoch": 150, "sft_compiled": 120, "generation": 150}


def log(msg: str):
    print(f"[gpu_check] {msg}", flush=True)


class Run:
    """The check's clock, output files and the environment its steps run in."""

    def __init__(self, args):
        self.args, self.start = args, time.monotonic()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = fresh_workdir(Path(args.workdir))
        self.log_path = self.out / "gpu_check.log"
        self.log_path.write_text("")
        self.jsonl = self.out / "gpu_check.jsonl"
        self.jsonl.write_text("")
        self.lines, self.env = [], dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1",
                                        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                                        TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
        if args.dry_run:  # dynamo traces every compiled region; the CPU skips code generation
            self.env.setdefault("TORCH_COMPILE_OVERRIDE_BACKENDS", ">=0:eager")
        self.scale = args.budget_scale or (4.0 if args.dry_run else 1.0)
        self.procs = []  # every process launched, so that an interrupted check ends them

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.args.deadline_s - self.elapsed()

    def record(self, line: dict):
        line = {"record": "step", **line}
        self.lines.append(line)
        with self.jsonl.open("a") as f:
            f.write(json.dumps(line) + "\n")
        log(time_line(line, self.elapsed()))

    def wanted(self, step: str) -> bool:
        only = self.args.only
        return not only or any(step == o or step.startswith(o.rstrip("/") + "/") for o in only)

    def launch(self, argv: list[str]) -> subprocess.Popen:
        """A step's process in a process group of its own (a timeout ends it and its workers;
        the session stays the caller's, so whoever ends the check ends them too)."""
        with self.log_path.open("a") as f:
            f.write(f"\n$ {' '.join(argv)}\n")
            f.flush()
            proc = subprocess.Popen(argv, cwd=REPO, env=self.env, process_group=0, stdout=f,
                                    stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc


def fresh_workdir(work: Path) -> Path:
    """The work dir without an earlier check's state, except a built model dir (reused while
    its shape and seed hold: a 1.1B model takes a while to write)."""
    (work / "bench").mkdir(parents=True, exist_ok=True)
    for old in [work / "smoke", *(work / "bench").iterdir()]:
        if old.is_dir() and old.name != "model":
            shutil.rmtree(old)
        elif old.is_file():
            old.unlink()
    return work


def run_command(run: Run, argv: list[str], budget: float) -> tuple[int | None, float]:
    """(exit code, or None on timeout; seconds) of one command within `budget` seconds."""
    start = time.monotonic()
    proc = run.launch(argv)
    try:
        return proc.wait(timeout=max(budget, 1)), time.monotonic() - start
    except subprocess.TimeoutExpired:
        stop(proc)
        return None, time.monotonic() - start


# ---------------------------------------------------------------------------- the steps
def install_wheels(run: Run):
    """pip install --target the carried wheels; the later steps see them on PYTHONPATH."""
    wheels = sorted(Path(run.args.wheels).glob("*.whl"))
    if not wheels:
        run.record({"step": "wheels", "status": "skipped", "seconds": 0.0, "figures": {
            "note": f"no wheels in {run.args.wheels}/: this Python must have hydra-core, "
                    "omegaconf, datasets and trl itself"}})
        return
    site = run.work / "site"
    budget = min(STEP_BUDGET["wheels"] * run.scale, run.left())
    rc, seconds = run_command(run, [sys.executable, "-m", "pip", "install", "-q", "--no-index",
                                    "--no-deps", "--no-compile", "--no-cache-dir", "--upgrade",
                                    "--target", str(site), *map(str, wheels)], budget)
    if rc == 0:
        run.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site),
                                                              run.env.get("PYTHONPATH")]))
    run.record({"step": "wheels", "status": "pass" if rc == 0 else "timeout" if rc is None
                else "fail", "seconds": round(seconds, 2), "budget_s": round(budget),
                "figures": {"wheels": [w.name for w in wheels], "site": str(site)},
                "error": None if rc == 0 else f"pip exited with {rc} (gpu_check.log)"})


def bench_plan(run: Run) -> list[tuple[str, list[list[str]]]]:
    """(step, its commands): the speed benchmarks of scripts/bench/, h100-1b on the GPU and
    cpu-tiny with a few pairs, steps and tokens in a dry run."""
    dry = run.args.dry_run
    common = ["--preset", "cpu-tiny" if dry else "h100-1b", "--workdir", str(run.work / "bench"),
              *(["--threads", "1"] if dry else [])]
    bench = [sys.executable, str(BENCH / "bench.py"), *common]
    epoch = [*bench, "--epoch", "--pairs", "8" if dry else "512"]
    return [
        ("dpo_epoch", [[*epoch, "--configs", "dpo_ref_in_memory:trl", "dpo_precomputed:trl",
                        "dpo_precomputed_packed:ours"]]),
        ("sft_compiled", [[*bench, "--configs", "sft", "--only", "bare", "ours", "--compile",
                           "--fixed-length", "--steps", "2" if dry else "10",
                           "--warmup", "1" if dry else "3"]]),
        ("generation", [[sys.executable, str(BENCH / "bench_generate.py"), *common,
                         "--configs", "sample_static_cache", "--repeats", "1" if dry else "2",
                         *(["--prompts", "8", "--new-tokens", "8", "--batch-size", "8"]
                           if dry else [])]]),
    ]


def run_bench(run: Run, name: str, commands: list[list[str]]):
    """A benchmark step: its commands in turn within the step's budget, their JSON lines."""
    budget = min(STEP_BUDGET[name] * run.scale, run.left())
    if budget <= 0:
        run.record({"step": name, "status": "skipped", "seconds": 0.0,
                    "error": "past the check's deadline"})
        return
    out = run.work / "bench" / f"{name}.jsonl"
    out.unlink(missing_ok=True)
    start, codes = time.monotonic(), []
    for argv in commands:
        rc, _ = run_command(run, [*argv, "--out", str(out)], budget - (time.monotonic() - start))
        codes.append(rc)
        if rc is None:
            break
    lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
    figures, missing = bench_figures(name, lines)
    status, error = "pass", missing
    if None in codes:
        status, error = "timeout", "; ".join(filter(None, [f"stopped at its budget of "
                                                          f"{budget:.0f} s", missing]))
    elif any(codes) or missing:
        status = "fail"
        error = "; ".join(filter(None, [missing, any(codes) and f"exit codes {codes} "
                                        "(gpu_check.log has the output)"]))
    run.record({"step": name, "status": status, "seconds": round(time.monotonic() - start, 2),
                "budget_s": round(budget), "figures": figures, "error": error,
                "lines": lines})


# ---------------------------------------------------------------------------- the command
def fetch_wheels(dest: Path, python_version: str) -> int:
    """Download WHEELS for the GPU image's Python into dest (run where pip reaches PyPI)."""
    dest.mkdir(parents=True, exist_ok=True)
    binary = [w for w in WHEELS if not w.startswith("antlr4")]
    platforms = [x for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64",
                             "manylinux2014_x86_64") for x in ("--platform", p)]
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
                    python_version, "--implementation", "cp", *platforms, "-d", str(dest),
                    *binary], check=True)
    sdist = [w for w in WHEELS if w.startswith("antlr4")]  # an sdist only: build its wheel
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "-w", str(dest), *sdist], check=True)
    size = sum(f.stat().st_size for f in dest.glob("*.whl"))
    log(f"{len(list(dest.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {dest}/ (carry it)")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with the "
                   "tiny presets (what CI runs); budgets x4, compile through dynamo's eager "
                   "backend")
    p.add_argument("--out", default=str(REPO / ".cache" / "gpu_check"),
                   help="gpu_check.jsonl, gpu_check.md and gpu_check.log go here")
    p.add_argument("--workdir", default="/tmp/gpu_check", help="models, data, run dirs")
    p.add_argument("--wheels", default=str(REPO / ".whl"), help="wheels to install first")
    p.add_argument("--only", nargs="+", metavar="STEP", help="run only these steps or step "
                   "prefixes (e.g. smoke/tiny smoke/1b/dpo_compile dpo_epoch generation)")
    p.add_argument("--deadline-s", type=float, help="stop starting work after this many "
                   "seconds (default 470 on a GPU, none in a dry run)")
    p.add_argument("--budget-scale", type=float, help="multiply every step's budget")
    p.add_argument("--fetch-wheels", action="store_true", help="download the wheels the GPU "
                   "image lacks into --wheels, and stop")
    p.add_argument("--python-version", default="3.12", help="--fetch-wheels: for this Python")
    args = p.parse_args(argv)
    steps = ["wheels", *(f"smoke/{m}/{x}" for m, spec in SMOKE.items() for x in spec["paths"]),
             *(s for s in STEP_BUDGET if s != "wheels")]
    for step in args.only or ():
        if not any(s == step or s.startswith(step.rstrip("/") + "/") for s in steps):
            p.error(f"--only {step}: no such step or prefix; the steps are {', '.join(steps)}")
    if args.deadline_s is None:
        args.deadline_s = float("inf") if args.dry_run else 470.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.fetch_wheels:
        return fetch_wheels(Path(args.wheels), args.python_version)
    run = Run(args)
    header = {"record": "header", "dry_run": args.dry_run, "argv": sys.argv[1:],
              "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "deadline_s": args.deadline_s if args.deadline_s != float("inf") else None,
              "budget_scale": run.scale, "python": platform.python_version(),
              "host": platform.node(), "commit": git_commit()}
    with run.jsonl.open("a") as f:
        f.write(json.dumps(header) + "\n")
    log(f"{'dry run on the CPU' if args.dry_run else 'GPU check'}: output in {run.out}/, "
        f"deadline {header['deadline_s']} s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        install_wheels(run)
        for model in SMOKE:
            run_smoke(run, model)
        for name, commands in bench_plan(run):
            if run.wanted(name):
                run_bench(run, name, commands)
    finally:
        for proc in run.procs:
            if proc.poll() is None:
                stop(proc)
    counts = {s: sum(1 for x in run.lines if x["status"] == s)
              for s in ("pass", "fail", "timeout", "skipped")}
    summary = {"record": "summary", "total_s": round(run.elapsed(), 1), **counts}
    with run.jsonl.open("a") as f:
        f.write(json.dumps(summary) + "\n")
    table = markdown(header, run.lines, summary)
    (run.out / "gpu_check.md").write_text(table)
    if not plot(run.lines, run.out / "gpu_check.png"):
        log("no gpu_check.png: matplotlib is not installed")
    print(table, flush=True)
    return 0 if not counts["fail"] and not counts["timeout"] else 1


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                              capture_output=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.TimeoutExpired):
        return None


if __name__ == "__main__":
    sys.exit(main())
