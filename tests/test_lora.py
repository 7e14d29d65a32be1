"""LoRA in one process: a killed LoRA run resumes from its adapter checkpoint exactly."""

import pytest
import os
import shutil

import torch

from harness.training.run_logging import read_metrics

pytestmark = pytest.mark.slow

COMMON = ["wandb.enabled=false", "data_fraction=0.02", "n_examples=16", "batch_size=8",
          "n_eval_examples=8", "eval_every=16", "save_every=8", "sample_during_eval=false",
          "max_length=64", "max_prompt_length=32", "lr=1e-2", "model.lora.r=4",
          "model.lora.alpha=8", "model.lora.dropout=0.1", "loss=dpo", "loss.beta=0.1",
          "gold_eval_prompts=0"]


def test_lora_resume_matches_uninterrupted_run(tmp_path, train_run):
    full = train_run(tmp_path, *COMMON, fast=[])
    assert (full / "step-8" / "adapter" / "adapter_config.json").exists()
    killed = tmp_path / "killed" / full.name
    shutil.copytree(full, killed, symlinks=True)
    shutil.rmtree(killed / "step-16")
    os.remove(killed / "LATEST")
    os.symlink("step-8", killed / "LATEST")
    train_run(tmp_path, f"resume={killed}", fast=[])
    for a, b in zip(read_metrics(full / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")):
        assert a == b or all(abs(a[k] - b[k]) < 1e-5 for k in a if "per_second" not in k)
    wa = torch.load(full / "LATEST" / "policy.pt", weights_only=True)["state"]
    wb = torch.load(killed / "LATEST" / "policy.pt", weights_only=True)["state"]
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(wa[k], torch.load(full / "step-8" / "policy.pt",
                                                 weights_only=True)["state"][k]) for k in wa)
