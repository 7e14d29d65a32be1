"""End to end on the bundled tiny model: SFT -> DPO / IPO / cDPO, checkpoints, export, errors."""

import json
import math

import pytest
import torch

from harness import checkpoints
from harness.training.run_logging import read_metrics

pytestmark = pytest.mark.slow



def evals(run_dir):
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss/eval" in r]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, train_run):
    return train_run(tmp_path_factory.mktemp("sft"), "n_examples=64", "sample_during_eval=true",
               "n_eval_model_samples=4", "save_every=32")


def test_sft_run_dir(sft_run):
    assert (sft_run / "config.yaml").exists() and (sft_run / "curves.png").stat().st_size > 0
    assert sorted(p.name for p in sft_run.glob("step-*")) == ["step-32", "step-64"]
    assert (sft_run / "LATEST").resolve() == (sft_run / "step-64").resolve()
    policy = torch.load(sft_run / "LATEST" / "policy.pt", weights_only=True)
    assert set(policy) == {"step_idx", "state", "metrics"} and policy["step_idx"] == 64
    for name in ("optimizer.pt", "scheduler.pt"):
        assert set(torch.load(sft_run / "LATEST" / name, weights_only=False)) == set(policy)
    rows = read_metrics(sft_run / "metrics.jsonl")
    assert [r["step"] for r in rows if "loss/train" in r] == [16, 32, 48, 64]
    assert {"grad_norm", "examples_per_second", "tokens_per_second",
            "logps_train/chosen"} <= set(rows[1])
    samples = [json.loads(x) for x in (sft_run / "samples" / "step-64.jsonl").read_text().split("\n")
               if x]
    assert len(samples) == 4 and all(s["prompt"].endswith("Assistant:") for s in samples)


@pytest.mark.parametrize("loss, expected_first_eval_loss", [
    (["loss=dpo", "loss.beta=0.1"], math.log(2)),                       # h = 0 at the start
    (["loss=dpo", "loss.beta=0.1", "loss.label_smoothing=0.2"], math.log(2)),
    (["loss=ipo", "loss.beta=0.5"], 1.0),                                 # (0 - 1/(2*0.5))^2
])
def test_preference_losses_start_from_the_reference(tmp_path, sft_run, loss, expected_first_eval_loss, train_run):
    run_dir = train_run(tmp_path, *loss, f"model.archive={sft_run}/LATEST/policy.pt", "n_examples=32",
                  "lr=1e-4")
    first, last = evals(run_dir)[0], evals(run_dir)[-1]
    assert first["loss/eval"] == pytest.approx(expected_first_eval_loss, abs=1e-5)
    assert first["rewards_eval/margins"] == pytest.approx(0.0, abs=1e-5)
    assert last["rewards_eval/margins"] != first["rewards_eval/margins"]
    assert {"rewards_train/accuracies", "logps_train/rejected", "rewards_train/chosen"} <= set(
        read_metrics(run_dir / "metrics.jsonl")[1])


def test_precomputed_reference_equals_reference_in_memory(tmp_path, sft_run, train_run):
    common = ["loss=dpo", "loss.beta=0.1", f"model.archive={sft_run}/LATEST/policy.pt",
              "n_examples=32", "lr=1e-4", "seed=3"]
    cached = train_run(tmp_path / "a", *common, "precompute_reference=true")
    assert len(list((tmp_path / "a" / "reference_logps").glob("*.pt"))) == 1
    live = train_run(tmp_path / "b", *common, "precompute_reference=false")
    for a, b in zip(read_metrics(cached / "metrics.jsonl"), read_metrics(live / "metrics.jsonl")):
        for key in ("loss/train", "loss/eval", "rewards_train/margins"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5)


def test_reference_free_dpo_runs_without_reference(tmp_path, sft_run, train_run):
    run_dir = train_run(tmp_path, "loss=dpo", "loss.beta=0.1", "loss.reference_free=true",
                  f"model.archive={sft_run}/LATEST/policy.pt", "n_examples=16")
    assert not (tmp_path / "reference_logps").exists()
    assert evals(run_dir)[0]["loss/eval"] != pytest.approx(math.log(2))


def test_epoch_checkpoints_and_hf_export(tmp_path, train_run):
    run_dir = train_run(tmp_path, "data_fraction=0.02", "n_epochs=2", "save_every=epoch_1",
                  "export_hf=true")
    assert {p.name for p in run_dir.glob("epoch-*")} == {"epoch-1", "epoch-2"}
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(run_dir / "LATEST" / "hf")
    AutoTokenizer.from_pretrained(run_dir / "LATEST" / "hf")
    saved = torch.load(run_dir / "LATEST" / "policy.pt", weights_only=True)["state"]
    torch.testing.assert_close(model.state_dict()["model.norm.weight"], saved["model.norm.weight"])


def test_missing_model_dir_fails_before_loading(tmp_path, train_run):
    with pytest.raises(FileNotFoundError, match="model.name_or_path"):
        train_run(tmp_path, f"model.name_or_path={tmp_path}/no_model")
    assert not list(tmp_path.glob("toy_sft_*"))  # no run dir was made for a run that never started


def test_empty_data_is_a_clear_error(tmp_path, train_run):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty|no examples|No examples"):
        train_run(tmp_path, f"datasets=[json:{empty}]")


def test_crash_mid_save_leaves_previous_checkpoint(tmp_path):
    state = {"w": torch.zeros(2)}
    checkpoints.save_checkpoint(tmp_path, "step-1", 1, {}, state, {}, {}, {"x": 1})

    def boom(_dir):
        raise RuntimeError("disk full")
    with pytest.raises(checkpoints.CheckpointWriteError, match="disk full.*LATEST still points"):
        checkpoints.save_checkpoint(tmp_path, "step-2", 2, {}, state, {}, {}, {"x": 2}, boom)
    assert not (tmp_path / "step-2").exists()
    assert (tmp_path / "LATEST").resolve() == (tmp_path / "step-1").resolve()
    assert torch.load(tmp_path / "LATEST" / "policy.pt", weights_only=True)["step_idx"] == 1
