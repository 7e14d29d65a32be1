"""scripts/bench/bench.py runs end to end on the tiny preset and prints one JSON line per configuration."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIELDS = {"preset", "config", "impl", "loss", "reference", "device", "dtype", "batch_size",
          "max_length", "steps", "warmup", "date", "host", "step_time_s", "step_times_s",
          "examples_per_s", "tokens_per_s", "tokens_per_step", "padded_tokens_per_step",
          "prepass_s", "prepass_pairs", "e2e_s", "e2e_examples_per_s", "params", "memory_kind",
          "peak_memory_mib", "peak_memory_delta_mib", "step_peak_memory_delta_mib", "mfu"}


@pytest.mark.slow
def test_bench_cpu_tiny_ours(tmp_path):
    out = tmp_path / "results.jsonl"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench" / "bench.py"), "--preset", "cpu-tiny", "--steps", "2",
         "--warmup", "1", "--only", "bare", "ours", "--threads", "1", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)  # ~30 s on 2 idle cores
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    bare = lines.pop(0)
    assert (bare["config"], bare["impl"]) == ("sft", "bare") and bare["tokens_per_s"] > 0
    assert [(r["config"], r["impl"]) for r in lines] == [
        ("sft", "ours"), ("sft_packed", "ours"), ("dpo_ref_in_memory", "ours"),
        ("dpo_precomputed", "ours"), ("dpo_precomputed_packed", "ours")]
    assert len(out.read_text().splitlines()) == len(proc.stdout.splitlines())
    for row in lines:
        assert FIELDS <= set(row), FIELDS - set(row)
        assert len(row["step_times_s"]) == 2 and row["step_time_s"] > 0
        # positions computed >= real tokens, except where the prompt pass is shared
        assert row["tokens_per_s"] > 0 and (row["tokens_per_step"] <= row["padded_tokens_per_step"]
                                            or "prefix_sharing=true" in row["levers"])
        assert row["peak_memory_mib"] > 0 and row["mfu"] is None  # MFU only on CUDA
    sft, sft_packed, in_memory, precomputed, packed = lines
    assert set(sft["vs_bare"]) >= {"tokens_per_s_ratio", "step_time_ratio"}
    assert in_memory["tokens_per_step"] == precomputed["tokens_per_step"]  # the same batches
    # the levers see the same tokens and compute fewer positions (no padding, one prompt pass)
    assert packed["tokens_per_step"] == precomputed["tokens_per_step"]
    assert packed["padded_tokens_per_step"] < precomputed["tokens_per_step"]
    assert sft_packed["padded_tokens_per_step"] < sft["padded_tokens_per_step"]
    assert packed["levers"] == ["packing=true", "prefix_sharing=true", "fused_optimizer=true"]
    assert precomputed["prepass_s"] > 0 and precomputed["prepass_pairs"] >= 3 * 4
    assert in_memory["prepass_pairs"] == 0


@pytest.mark.slow
def test_gpu_preset_fails_clearly_without_cuda():
    import torch
    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "bench.py"), "--preset", "h100-1b"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "CUDA" in proc.stderr and not proc.stdout


@pytest.mark.slow
def test_bench_epoch_mode_times_whole_epochs_of_both_trainers(tmp_path, run_bench):
    trl, ours = run_bench(tmp_path, "--preset", "cpu-tiny", "--epoch", "--pairs", "8",
                      "--configs", "dpo_precomputed")
    for row in (trl, ours):
        assert (row["mode"], row["pairs"], row["steps"], row["batch_size"]) == ("epoch", 8, 2, 4)
        # the wall clock holds the reference pre-pass and the steps (and the loading)
        assert row["wall_s"] > row["prepass_s"] > 0
        assert row["pairs_per_s"] == pytest.approx(8 / row["wall_s"], rel=1e-3)
        assert row["tokens_per_s"] == pytest.approx(row["epoch_tokens"] / row["wall_s"], rel=1e-3)
        assert row["peak_memory_delta_mib"] > 0
    assert (trl["impl"], ours["impl"]) == ("trl", "ours")
    assert trl["epoch_tokens"] == ours["epoch_tokens"] > 8 * 2 * 10
    assert ours["vs_trl"]["pairs_per_s_ratio"] == pytest.approx(
        ours["pairs_per_s"] / trl["pairs_per_s"], abs=1e-3)


@pytest.mark.slow
def test_gpu_preset_code_path_runs_on_cpu(tmp_path, run_bench):
    """--device cpu --model cpu-tiny: the h100-1b workload (bf16, batch 8, max_length 1024, the
    levers) on the tiny model, so the GPU preset's path is checked where no GPU is."""
    [row] = run_bench(tmp_path, "--preset", "h100-1b", "--device", "cpu", "--model", "cpu-tiny",
                  "--epoch", "--pairs", "8", "--only", "ours", "--configs",
                  "dpo_precomputed_packed", "--levers", "micro_batch_tokens=4096")
    assert (row["dtype"], row["device"], row["max_length"], row["batch_size"]) == \
        ("bfloat16", "cpu", 1024, 8)
    assert row["params"] < 10**6 and row["steps"] == 1 and "micro_batch_tokens=4096" in row["levers"]
