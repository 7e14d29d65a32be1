"""scripts/bench/bench_generate.py runs our generation paths against plain generate and prints one JSON
line per configuration."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

sys.path.insert(0, str(REPO / "scripts" / "bench"))
import bench_generate  # noqa: E402
import benchlib  # noqa: E402


@pytest.mark.slow
def test_bench_generate_cpu_tiny(tmp_path, run_bench):
    out = tmp_path / "gen.jsonl"
    rows = run_bench(tmp_path, "--preset", "cpu-tiny", "--prompts", "6", "--new-tokens", "5",
                 "--batch-size", "4", "--repeats", "2", "--configs", "sample_token_budget",
                 "--out", str(out), script="bench_generate.py")
    assert [(r["config"], r["path"]) for r in rows] == [
        ("generate", "plain"), ("sample_token_budget", "sample")]
    assert len(out.read_text().splitlines()) == 2
    lengths = rows[0]["prompt_tokens"]
    # the KV-cache bound of 4 prompts of the longest length
    assert rows[1]["levers"] == {"sort_by_length": True, "batch_tokens": 4 * (lengths["max"] + 5)}
    for row in rows:
        assert (row["n_prompts"], row["new_tokens"], row["batch_size"]) == (6, 5, 4)
        assert row["new_tokens_per_pass"] == 30  # every row ran the full length
        assert len(row["times_s"]) == 2 and row["time_s"] > 0 and row["warmup_s"] > 0
        assert row["new_tokens_per_s"] == pytest.approx(30 / row["time_s"], rel=1e-3)
        assert row["prompts_per_s"] == pytest.approx(6 / row["time_s"], rel=1e-3)
        assert row["peak_memory_mib"] > 0 and row["device"] == "cpu"
    assert "vs_generate" not in rows[0]
    assert rows[1]["vs_generate"]["new_tokens_per_s_ratio"] == pytest.approx(
        rows[1]["new_tokens_per_s"] / rows[0]["new_tokens_per_s"], abs=1e-3)


@pytest.mark.parametrize("preset", ["cpu-tiny", "h100-1b"])
def test_every_path_generates_the_full_length(tmp_path, preset):
    """Every configuration's worker, in this process, on the tiny model; h100-1b runs its GPU
    workload's dtype (bf16) and batch size here on the CPU."""
    from harness.models.modeling import load_tokenizer
    tok = load_tokenizer(str(REPO / "assets" / "tiny_model"))
    on_cpu = argparse.Namespace(model="cpu-tiny", device="cpu")
    spec = dict(benchlib.apply_model_args(dict(bench_generate.PRESETS[preset]), on_cpu),
                preset=preset, threads=None, n_prompts=5, new_tokens=3, repeats=1,
                model_dir=str(tmp_path / "model"), data=str(tmp_path / "prompts.jsonl"),
                batch_tokens=200)
    benchlib.build_model_dir(tmp_path / "model", spec, tok)
    rows = benchlib.make_rows(tok, 5, spec["max_length"], spec["max_length"] // 2)[:5]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for config, path, levers in bench_generate.CONFIGS:
        result = tmp_path / f"{config}.json"
        bench_generate.worker(dict(spec, config=config, path=path, levers=levers,
                                   result=str(result)))
        row = json.loads(result.read_text())
        assert row["new_tokens_per_pass"] == 15 and row["new_tokens_per_s"] > 0, config


@pytest.mark.slow
def test_gpu_preset_fails_clearly_without_cuda():
    import torch
    if torch.cuda.is_available():
        return
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench" / "bench_generate.py"),
                           "--preset", "h100-1b"], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "--device cpu" in proc.stderr and not proc.stdout
