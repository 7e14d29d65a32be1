"""train.py as users run it: the default command, and exact resume after SIGKILL."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.training.run_logging import read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, str(ROOT / "train.py")]


def run_dirs(base: Path, exp_name: str):
    return sorted(base.glob(f"{exp_name}_*"))


def test_default_run(tmp_path):
    """`python train.py` (bounded to 256 examples and 32 report prompts): run dir with
    checkpoint, metrics, PNG, wandb, and the gold reward of the base vs the trained model."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc: wandb must fall back to offline by itself
    out = subprocess.run([*TRAIN, f"local_dirs=[{tmp_path}]", "n_examples=256",
                          "gold_eval_prompts=32"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path, "toy_sft")
    for name in ("config.yaml", "metrics.jsonl", "curves.png", "LATEST/policy.pt",
                 "LATEST/optimizer.pt", "LATEST/scheduler.pt", "final_eval.json"):
        assert (run_dir / name).exists(), name
    assert any(run_dir.glob("wandb/offline-run-*"))
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert rows[0]["step"] == 0 and "loss/eval" in rows[0] and rows[-1]["step"] == 256
    report = json.loads((run_dir / "final_eval.json").read_text())
    assert report["n_prompts"] == 32 and report["start"] == "assets/tiny_model"
    assert "gold reward (toy, 32 held-out prompts, mean +- 95% interval): start" in out.stdout
    assert "win rate of the trained policy over its start" in out.stdout


@pytest.mark.long
def test_the_default_run_aligns_beyond_the_intervals(tmp_path):
    """`python train.py` exactly as the README's first command: the trained model's gold reward
    beats the base model's beyond both 95% intervals (final_eval.json, curves.png)."""
    out = subprocess.run([*TRAIN, f"local_dirs=[{tmp_path}]", "wandb.enabled=false"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    (run_dir,) = run_dirs(tmp_path, "toy_sft")
    report = json.loads((run_dir / "final_eval.json").read_text())
    assert report["n_prompts"] == 200 and report["beyond_intervals"], report
    assert "(+" in out.stdout and "beyond the 95% intervals)" in out.stdout


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    common = [f"local_dirs=[{tmp_path}]", "wandb.enabled=false", "n_examples=1024",
              "gold_eval_prompts=0",
              "batch_size=8", "save_every=64", "eval_every=256", "n_eval_examples=16",
              "n_eval_model_samples=2", "minimum_log_interval_secs=0"]
    subprocess.run([*TRAIN, *common, "exp_name=full"], check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen([*TRAIN, *common, "exp_name=killed"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        dirs = run_dirs(tmp_path, "killed")
        if dirs and (dirs[0] / "LATEST").exists() and \
                int(os.path.realpath(dirs[0] / "LATEST").rsplit("-", 1)[1]) >= 192:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (killed,) = run_dirs(tmp_path, "killed")
    resumed_at = int(os.path.realpath(killed / "LATEST").rsplit("-", 1)[1])
    if resumed_at >= 1024:
        pytest.fail("the run finished before it could be killed; raise n_examples")
    subprocess.run([*TRAIN, f"resume={killed}"], check=True, capture_output=True, timeout=600)

    (full,) = run_dirs(tmp_path, "full")
    expected, got = read_metrics(full / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for e, g in zip(expected, got):
        for key in ("loss/train", "loss/eval", "grad_norm", "lr"):
            if key in e:
                assert g[key] == pytest.approx(e[key], rel=1e-6, abs=1e-7), (e["step"], key)
    assert (killed / "samples" / "step-1024.jsonl").read_text() == \
        (full / "samples" / "step-1024.jsonl").read_text()
