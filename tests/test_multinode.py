"""Several nodes, simulated on loopback: two torchrun agents (--nnodes 2 --nproc_per_node 1)
meet through a c10d rendezvous and train FSDP into one shared run dir; both are killed mid-run
and the run resumes on one node, ending on the uninterrupted run's final loss."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.training.run_logging import read_metrics

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
COMMON = ["trainer=FSDPTrainer", "wandb.enabled=false", "n_examples=320", "batch_size=8",
          "eval_every=160", "save_every=32", "n_eval_examples=16", "eval_batch_size=16",
          "sample_during_eval=false", "max_length=64", "max_prompt_length=32", "lr=1e-3",
          "seed=2", "gold_eval_prompts=0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(base: Path, name: str) -> list[subprocess.Popen]:
    """Two torchrun agents, one rank each, as two nodes meeting at one rendezvous endpoint."""
    endpoint = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node",
           "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", name,
           str(ROOT / "train.py"), f"local_dirs=[{base}]", f"exp_name={name}", *COMMON]
    return [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, start_new_session=True) for _ in range(2)]


def finish(procs: list[subprocess.Popen]):
    for proc in procs:
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-4000:]


def final_eval_loss(run_dir: Path) -> float:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss/eval" in r][-1]["loss/eval"]


def test_two_nodes_killed_mid_run_resume_on_one_node(tmp_path):
    finish(two_nodes(tmp_path / "full", "full"))
    (full,) = (tmp_path / "full").glob("full_*")

    procs = two_nodes(tmp_path / "killed", "killed")
    deadline = time.time() + 600
    while time.time() < deadline:  # kill both nodes once a mid-run checkpoint is in place
        done = list((tmp_path / "killed").glob("killed_*/step-64/trainer_state.pt"))
        if done or any(p.poll() is not None for p in procs):
            break
        time.sleep(0.2)
    for proc in procs:
        os.killpg(proc.pid, signal.SIGKILL)  # the agent and its worker
        proc.wait()
    (killed,) = (tmp_path / "killed").glob("killed_*")
    assert done, "the two-node run ended before a mid-run checkpoint"
    assert not (killed / "step-320").exists(), "killed too late to test a resume"

    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "1", str(ROOT / "train.py"), f"resume={killed}"],
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "resumed from" in out.stdout
    assert final_eval_loss(killed) == pytest.approx(final_eval_loss(full), rel=1e-5, abs=1e-6)
