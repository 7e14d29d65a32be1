"""Shared fixtures: the repo paths, composing the Hydra config, training runs on the tiny model.

    def test_x(compose):            cfg = compose("loss=dpo", "loss.beta=0.1")
    def test_y(train_run, tmp_path): run_dir = train_run(tmp_path, "loss=sft", "n_examples=32")
    def test_z(tiny):               model, tokenizer = tiny   (the bundled model, eval mode)

Tests that train end to end, launch processes or run scripts are marked `slow`;
`python -m pytest -m "not slow"` is the fast subset.
"""

from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(REPO_ROOT / "config")
TINY = str(REPO_ROOT / "assets" / "tiny_model")
# settings that make a tiny-model run quick: no wandb, small evaluations, no sampling
FAST = ["wandb.enabled=false", "n_eval_examples=32", "eval_batch_size=32", "batch_size=16",
        "sample_during_eval=false", "eval_every=1000000", "gold_eval_prompts=0", "n_epochs=1"]


def compose_config(*overrides):
    """The config train.py would compose from these command-line overrides."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def run_training(base, *overrides, fast=FAST) -> Path:
    """train.run in this process with its run dir under `base`; returns the run dir. The
    overrides reach train.run as command-line overrides (so unread options are refused)."""
    import train
    overrides = [f"local_dirs=[{base}]", *fast, *overrides]
    return Path(train.run(compose_config(*overrides), overrides))


@pytest.fixture(scope="session")
def compose():
    return compose_config


@pytest.fixture(scope="session")
def train_run():
    return run_training


@pytest.fixture(scope="session")
def tiny():
    """(the bundled tiny model in eval mode, its tokenizer), shared by the session: don't train it."""
    from harness.models.modeling import load_model, load_tokenizer
    return load_model(TINY, "float32").eval(), load_tokenizer(TINY)


def run_bench_script(cwd, *args, script="bench.py") -> list[dict]:
    """Run scripts/bench/<script> on one thread in `cwd`; its JSON lines, parsed."""
    import json
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "bench" / script),
                           "--threads", "1", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


@pytest.fixture(scope="session")
def run_bench():
    return run_bench_script


# The suite runs on xdist workers, a file per worker at a time (README: -n 2 --dist loadfile),
# handed out in collection order; the longest files go first so that none of them starts
# last and runs alone at the end (longest-first scheduling). Order within a file is kept.
LONGEST_FIRST = ("test_readme.py", "test_sweeps.py", "test_first_hour.py", "test_crash_safety.py",
                 "test_gpu_check.py", "test_online_rl.py", "test_reward_ppo.py",
                 "test_invariants.py", "test_real_model.py", "test_distributed.py",
                 "test_online_rl_distributed.py", "test_bench.py", "test_coh_train.py",
                 "test_train.py", "test_ppo_distributed.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
