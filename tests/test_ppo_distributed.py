"""PPO under FSDPTrainer and TensorParallelTrainer on 2 CPU processes (gloo) against one process
with the same global batch: every logged statistic and the final actor and critic match (keyed
sampling draws the same responses on any number of ranks); LoRA under FSDP; a sharded
checkpoint resumed on one rank; the mini-batch / ranks check."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train
from harness.models.generation import SamplingConfig, sample
from harness.models.modeling import load_model, load_tokenizer
from harness.rl.loop import rollout_seed
from harness.training.run_logging import read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# 2 rollouts of 16 prompts, minibatches of 8 (4 per rank), a checkpoint after each rollout;
# 9 eval prompts in batches of 8, so in the last one rank 1 only has a stand-in row
COMMON = ["loss=ppo", "batch_size=16", "loss.mini_batch_size=8", "loss.ppo_epochs=2",
          "loss.max_new_tokens=16", "n_eval_examples=9", "eval_batch_size=8",
          "n_eval_model_samples=8", "loss.gold_reward=toy", "lr=1e-3", "warmup_steps=0",
          "n_examples=32", "save_every=16", "wandb.enabled=false", "gold_eval_prompts=0"]
LORA = ["model.lora.r=4", "model.lora.alpha=8", "lr=1e-2"]


def two_ranks(base: Path, name: str, *overrides, torchrun: bool = True) -> Path:
    """torchrun with 2 processes, or train.py spawning them itself (torchrun=False)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2"] if torchrun else [sys.executable]
    args = [str(ROOT / "train.py"), f"local_dirs=[{base}]", f"exp_name={name}", *overrides]
    if not torchrun:
        args.append("nproc_per_node=2")
    out = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    (run_dir,) = base.glob(f"{name}_*")
    return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_run):
    def in_process(base: Path, name: str, *overrides) -> Path:
        return train_run(base, f"exp_name={name}", *overrides, fast=[])

    base = tmp_path_factory.mktemp("ppo_dist")
    rm = in_process(base, "rm", "loss=reward", "n_examples=64", "batch_size=16",
                    "n_eval_examples=32", "sample_during_eval=false", "wandb.enabled=false")
    ppo = [*COMMON, f"loss.reward_model={rm}"]
    return {
        "one": in_process(base, "one", *ppo),
        "fsdp": two_ranks(base, "fsdp", *ppo, "trainer=FSDPTrainer"),
        "tp": two_ranks(base, "tp", *ppo, "trainer=TensorParallelTrainer"),
        "lora_one": in_process(base, "loraone", *ppo, *LORA),
        "lora_fsdp": two_ranks(base, "lorafsdp", *ppo, *LORA, "trainer=FSDPTrainer",
                               torchrun=False),
        "base": base,
    }


def assert_same_run(expected: Path, got: Path, rtol=1e-4, atol=1e-5):
    """Every logged number (but timings) and the final policy.pt / critic.pt agree. A clip
    fraction counts tokens past a threshold: float noise may move one token of a minibatch's
    ~70 across it (0.004 in the mean over 4 minibatches), so those get an absolute 0.006."""
    rows_e, rows_g = read_metrics(expected / "metrics.jsonl"), read_metrics(got / "metrics.jsonl")
    assert [r["step"] for r in rows_g] == [r["step"] for r in rows_e] == [0, 16, 32, 32]
    for e, g in zip(rows_e, rows_g):
        keys = {k for k in e if "per_second" not in k}
        assert keys == {k for k in g if "per_second" not in k}
        for k in keys:
            tol = 0.006 if k.endswith("clipfrac") else atol
            assert g[k] == pytest.approx(e[k], rel=rtol, abs=tol), (e["step"], k)
    for name in ("policy.pt", "critic.pt"):  # 8 Adam steps: a weight whose gradient is near 0
        # moves by up to lr either way, so float noise shows up to ~lr / 10 (1e-4 at lr 1e-3)
        we = torch.load(expected / "LATEST" / name, weights_only=True)["state"]
        wg = torch.load(got / "LATEST" / name, weights_only=True)["state"]
        assert set(wg) == set(we), name
        for k, v in we.items():
            torch.testing.assert_close(wg[k], v, rtol=rtol, atol=1e-4, msg=f"{name} {k}")


@pytest.mark.parametrize("name", ["fsdp", "tp", "lora_fsdp"])
def test_two_ranks_match_one_process(runs, name):
    single = runs["lora_one" if name.startswith("lora") else "one"]
    assert_same_run(single, runs[name])
    train_rows = [r for r in read_metrics(single / "metrics.jsonl") if "loss/policy" in r]
    assert train_rows[1]["kl_train/kl"] > 0  # the second rollout came from an updated actor
    assert train_rows[0]["ppo/first_ratio_max_dev"] == 0.0


def test_ranks_finish_generating_at_different_steps(runs):
    """The 8 logged eval prompts of step 0 are the first eval batch, sampled from the base
    model: rank 0 drew the first 4 responses, rank 1 the last 4. Drawn again here in one process
    (the same responses: keyed sampling), rank 1's longest is shorter than rank 0's and than
    max_new_tokens, so it was done first and had to keep stepping its sharded model until rank 0
    was (else the run would have hung, not finished)."""
    tok = load_tokenizer("assets/tiny_model")
    rows = read_metrics(runs["fsdp"] / "samples" / "step-0.jsonl")
    again = sample(load_model("assets/tiny_model", "float32"), tok, [r["prompt"] for r in rows],
                   SamplingConfig(max_new_tokens=16, temperature=0.7, seed=rollout_seed(0, -1)),
                   progress=False, keys=list(range(8)))
    assert [s.completion for s in again] == [r["policy"] for r in rows]
    steps = [max(len(s.completion_ids) for s in part) for part in (again[:4], again[4:])]
    assert steps[1] < steps[0] <= 16


def test_sharded_ppo_checkpoint_resumes_on_one_rank(runs, train_run):
    """The 2-rank FSDP run cut back to its first checkpoint (as if killed there) and resumed in
    one process from its sharded/ state continues as the uninterrupted run did."""
    full = runs["fsdp"]
    assert (full / "LATEST" / "sharded" / ".metadata").exists()
    killed = runs["base"] / "resumed" / full.name
    shutil.copytree(full, killed, symlinks=True)
    shutil.rmtree(killed / "step-32")
    os.remove(killed / "LATEST")
    os.symlink("step-16", killed / "LATEST")
    train_run(killed.parent, f"resume={killed}", fast=[])
    assert_same_run(full, killed)


def test_ranks_must_divide_the_minibatch(compose):
    cfg = compose("loss=ppo", "loss.reward_model=R", "trainer=FSDPTrainer",
                      "batch_size=12", "loss.mini_batch_size=6")
    train.check_config(cfg, world_size=2)
    with pytest.raises(ValueError, match=r"mini_batch_size=6 must be a multiple of the 4 "
                                         "data-parallel ranks"):
        train.check_config(cfg, world_size=4)
    # tensor-parallel ranks share their rows: 4 ranks in groups of 2 are 2 data-parallel ranks
    train.check_config(compose("loss=ppo", "loss.reward_model=R", "batch_size=12",
                                   "loss.mini_batch_size=6", "trainer=TensorParallelTrainer",
                                   "trainer.tp_size=2"), world_size=4)
