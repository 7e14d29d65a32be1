"""FSDPTrainer and TensorParallelTrainer under real torchrun (2 CPU processes, gloo) against one
process on the same global batches; sharded save -> resume on 1 and 2 ranks; LoRA DPO."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.training.run_logging import read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# 2 optimizer steps of 8 examples in 2 micro-batches; 9 eval examples, so the last eval batch
# (1 example) leaves rank 1 without a real one; a checkpoint after each step
COMMON = ["wandb.enabled=false", "data_fraction=0.02", "n_examples=16", "batch_size=8",
          "gradient_accumulation_steps=2", "n_eval_examples=9", "eval_batch_size=8",
          "eval_every=8", "save_every=8", "n_eval_model_samples=2", "sample_max_new_tokens=4",
          "max_length=64", "max_prompt_length=32", "lr=1e-3", "seed=1", "gold_eval_prompts=0"]
DPO = ["loss=dpo", "loss.beta=0.1"]
COMPARED = ("loss/train", "loss/eval", "grad_norm", "rewards_train/margins",
            "rewards_eval/accuracies", "logps_eval/chosen")


def env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


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
def runs(tmp_path_factory, train_run):
    def in_process(base: Path, name: str, *overrides) -> Path:
        return train_run(base, f"exp_name={name}", *COMMON, *overrides, fast=[])

    base = tmp_path_factory.mktemp("dist")
    return {
        "sft": in_process(base, "sft1"),
        "sft_fsdp": launch(base, "sftfsdp", "trainer=FSDPTrainer", torchrun=False),
        "sft_tp": launch(base, "sfttp", "trainer=TensorParallelTrainer"),
        "dpo": in_process(base, "dpo1", *DPO),
        "dpo_fsdp": launch(base, "dpofsdp", *DPO, "trainer=FSDPTrainer"),
        # micro-batches by token budget instead of 2 equal ones: 2 x ceil(n / 2 ranks) x longest
        # <= 140 splits each batch of 8 pairs (30-37 tokens) into 2 + 2 + 4
        "dpo_fsdp_tokens": launch(base, "dpofsdptok", *DPO, "trainer=FSDPTrainer",
                                  "gradient_accumulation_steps=1", "micro_batch_tokens=140"),
        "dpo_tp": launch(base, "dpotp", *DPO, "trainer=TensorParallelTrainer",
                         "precompute_reference=false"),
        "base": base,
    }


@pytest.mark.parametrize("name", ["sft_fsdp", "sft_tp", "dpo_fsdp", "dpo_tp", "dpo_fsdp_tokens"])
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
    # no staging or temp dirs left behind (the run-dir lock file stays, emptied of its owner)
    left = [p.name for p in runs["sft_fsdp"].glob(".*")]
    assert left == [".lock"] and (runs["sft_fsdp"] / ".lock").stat().st_size == 0


@pytest.mark.parametrize("ranks", [1, 2])
def test_sharded_resume_on_one_and_two_ranks(runs, ranks, train_run):
    """Resume the 2-rank FSDP run from its first checkpoint (as after a kill there) on 1 or 2
    ranks: the rest of the run matches the uninterrupted one."""
    full = runs["sft_fsdp"]
    killed = runs["base"] / f"resume{ranks}" / full.name
    shutil.copytree(full, killed, symlinks=True)
    shutil.rmtree(killed / "step-16")
    os.remove(killed / "LATEST")
    os.symlink("step-8", killed / "LATEST")
    if ranks == 1:
        train_run(killed.parent, f"resume={killed}", fast=[])
    else:
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nproc_per_node", "2", str(ROOT / "train.py"), f"resume={killed}"],
                             env=env(), capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-4000:]
    assert_same_run(full, killed)


def test_lora_dpo_under_fsdp(runs):
    """LoRA DPO on 2 ranks: the reference is the policy with adapters off (so the first eval sits
    exactly at log 2), training moves only the adapters, and the checkpoint's peft adapter, its
    merged policy.pt and its merged HF export are the same model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    from harness.models.modeling import load_model, sequence_logps
    run_dir = launch(runs["base"], "lora", *DPO, "trainer=FSDPTrainer", "model.lora.r=4",
                     "model.lora.alpha=8", "precompute_reference=false", "export_hf=true",
                     "lr=1e-2")
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss/eval" in r]
    assert evals[0]["loss/eval"] == pytest.approx(0.693147, abs=1e-5)
    assert evals[0]["rewards_eval/margins"] == pytest.approx(0.0, abs=1e-6)
    assert evals[-1]["rewards_eval/margins"] != evals[0]["rewards_eval/margins"]
    ckpt = run_dir / "LATEST"
    base = load_model("assets/tiny_model", "float32")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    merged = torch.load(ckpt / "policy.pt", weights_only=True)["state"]
    assert set(merged) == set(base_state)
    changed = {k for k in merged if not torch.equal(merged[k], base_state[k])}
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    adapted = PeftModel.from_pretrained(base, ckpt / "adapter").eval()
    exported = AutoModelForCausalLM.from_pretrained(ckpt / "hf").eval()
    ids = torch.randint(2, 768, (2, 12), generator=torch.Generator().manual_seed(0))
    mask, labels = torch.ones_like(ids), ids.clone()
    with torch.no_grad():
        a = sequence_logps(adapted.get_base_model(), ids, mask, labels)[0]
        b = sequence_logps(exported, ids, mask, labels)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
