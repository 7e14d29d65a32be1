"""FSDPTrainer and TensorParallelTrainer under real torchrun (2 CPU processes, gloo) against one
process on the same global batches; sharded save -> resume on 1 and 2 ranks; LoRA DPO."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import train
from harness.run_logging import read_metrics

ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = str(ROOT / "config")
# 2 optimizer steps of 8 examples in 2 micro-batches; 9 eval examples, so the last eval batch
# (1 example) leaves rank 1 without a real one; a checkpoint after each step
COMMON = ["wandb.enabled=false", "data_fraction=0.02", "n_examples=16", "batch_size=8",
          "gradient_accumulation_steps=2", "n_eval_examples=9", "eval_batch_size=8",
          "eval_every=8", "save_every=8", "n_eval_model_samples=2", "sample_max_new_tokens=4",
          "max_length=64", "max_prompt_length=32", "lr=1e-3", "seed=1"]
DPO = ["loss=dpo", "loss.beta=0.1"]
COMPARED = ("loss/train", "loss/eval", "grad_norm", "rewards_train/margins",
            "rewards_eval/accuracies", "logps_eval/chosen")


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def in_process(base: Path, name: str, *overrides) -> Path:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"local_dirs=[{base}]", f"exp_name={name}",
                                                       *COMMON, *overrides])
    return Path(train.run(cfg))


def launch(base: Path, name: str, *overrides, torchrun: bool = True) -> Path:
    """2 ranks through torchrun, or through train.py's own spawning (torchrun=False)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2"] if torchrun else [sys.executable]
    args = [str(ROOT / "train.py"), f"local_dirs=[{base}]", f"exp_name={name}", *COMMON,
            *overrides]
    if not torchrun:
        args.append("nproc_per_node=2")
    out = subprocess.run([*cmd, *args], env=env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    (run_dir,) = base.glob(f"{name}_*")
    return run_dir


def assert_same_run(expected: Path, got: Path, rtol=1e-4, atol=1e-5):
    rows_e, rows_g = read_metrics(expected / "metrics.jsonl"), read_metrics(got / "metrics.jsonl")
    assert [r["step"] for r in rows_g] == [r["step"] for r in rows_e]
    compared = 0
    for e, g in zip(rows_e, rows_g):
        for key in COMPARED:
            if key in e:
                assert g[key] == pytest.approx(e[key], rel=rtol, abs=atol), (e["step"], key)
                compared += 1
    assert compared >= 6
    we = torch.load(expected / "LATEST" / "policy.pt", weights_only=True)
    wg = torch.load(got / "LATEST" / "policy.pt", weights_only=True)
    assert wg["step_idx"] == we["step_idx"] == 16 and set(wg["state"]) == set(we["state"])
    for k, v in we["state"].items():
        torch.testing.assert_close(wg["state"][k], v, rtol=rtol, atol=atol, msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    return {
        "sft": in_process(base, "sft1"),
        "sft_fsdp": launch(base, "sftfsdp", "trainer=FSDPTrainer", torchrun=False),
        "sft_tp": launch(base, "sfttp", "trainer=TensorParallelTrainer"),
        "dpo": in_process(base, "dpo1", *DPO),
        "dpo_fsdp": launch(base, "dpofsdp", *DPO, "trainer=FSDPTrainer"),
        "dpo_tp": launch(base, "dpotp", *DPO, "trainer=TensorParallelTrainer",
                         "precompute_reference=false"),
        "base": base,
    }


@pytest.mark.parametrize("name", ["sft_fsdp", "sft_tp", "dpo_fsdp", "dpo_tp"])
def test_two_ranks_match_one_process(runs, name):
    single = runs[name.split("_")[0]]
    assert_same_run(single, runs[name])
    # training moved the weights (a comparison of untouched weights could not fail)
    first = read_metrics(single / "metrics.jsonl")
    assert first[0]["loss/eval"] != read_metrics(single / "metrics.jsonl")[-1]["loss/eval"]


def test_distributed_checkpoint_layout(runs):
    ckpt = runs["sft_fsdp"] / "LATEST"
    assert (ckpt / "sharded" / ".metadata").exists()
    assert set(torch.load(ckpt / "policy.pt", weights_only=True)) == {"step_idx", "state",
                                                                      "metrics"}
    assert len(list((runs["sft_fsdp"] / "samples").glob("*.jsonl"))) == 3
    assert not list(runs["sft_fsdp"].glob(".*"))  # no staging or temp dirs left behind


@pytest.mark.parametrize("ranks", [1, 2])
def test_sharded_resume_on_one_and_two_ranks(runs, ranks):
    """Resume the 2-rank FSDP run from its first checkpoint (as after a kill there) on 1 or 2
    ranks: the rest of the run matches the uninterrupted one."""
    full = runs["sft_fsdp"]
    killed = runs["base"] / f"resume{ranks}" / full.name
    shutil.copytree(full, killed, symlinks=True)
    shutil.rmtree(killed / "step-16")
    os.remove(killed / "LATEST")
    os.symlink("step-8", killed / "LATEST")
    if ranks == 1:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"resume={killed}"])
        train.run(cfg, [f"resume={killed}"])
    else:
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", "2", str(ROOT / "train.py"), f"resume={killed}"],
                             env=env(), capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-4000:]
    assert_same_run(full, killed)
