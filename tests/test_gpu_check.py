"""scripts/gpu_check.sh (scripts/bench/gpu_check.py): every step timed and independent of the
others (a path that hangs or kills its worker, a benchmark that times out, the deadline), the
figures it reports, the fixed-shape rows and the reused model dir it relies on, and the whole
dry run end to end on the CPU (the slow test CI runs so the GPU script cannot rot)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.models.modeling import load_tokenizer
from preference_datasets import load_examples, make_example, tokenize_example

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts" / "bench"))
import benchlib  # noqa: E402
import gpu_check  # noqa: E402
import gpu_check_report  # noqa: E402
import gpu_check_smoke  # noqa: E402


def test_fixed_rows_have_one_shape(tmp_path):
    tok = load_tokenizer("assets/tiny_model")
    rows = benchlib.make_fixed_rows(tok, 6, 96, seed=1)
    lengths = {len(tokenize_example(make_example(r["prompt"], r["chosen"], r["rejected"],
                                                 "keep_end"), tok, 96, 48)[f"{k}_input_ids"])
               for r in rows for k in ("chosen", "rejected")}
    assert lengths == {96}  # prompt 24 + response 71 + EOS: every batch is [batch, 96]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_examples([f"json:{path}"], "train", sft_mode=False)) == 6
    assert len(load_examples([f"json:{path}"], "test", sft_mode=False)) >= 1


def test_a_model_dir_is_reused_only_for_the_same_build(tmp_path):
    tok = load_tokenizer("assets/tiny_model")
    preset = dict(benchlib.MODELS["cpu-tiny"], max_length=128)
    weights = tmp_path / "model" / "model.safetensors"
    params = benchlib.build_model_dir(tmp_path / "model", preset, tok)
    first = weights.stat().st_mtime_ns
    time.sleep(0.01)
    assert benchlib.build_model_dir(tmp_path / "model", preset, tok) == params
    assert weights.stat().st_mtime_ns == first  # reused, not written again
    benchlib.build_model_dir(tmp_path / "model", preset, tok, seed=1)
    assert weights.stat().st_mtime_ns != first  # another seed is another model


def _line(config, impl, rate, **extra):
    return {"config": config, "impl": impl, "pairs_per_s": rate, "tokens_per_s": rate * 100,
            "wall_s": 10.0, "peak_memory_mib": 2048.0, "mfu": None, **extra}


def test_dpo_figures_are_ours_over_each_peer_with_the_targets():
    lines = [_line("dpo_ref_in_memory", "trl", 2.0), _line("dpo_precomputed", "trl", 3.0),
             _line("dpo_precomputed_packed", "ours", 5.0)]
    figures, error = gpu_check_report.bench_figures("dpo_epoch", lines)
    assert error is None
    assert (figures["vs_trl_ref"], figures["vs_trl_precomputed"]) == (2.5, 1.667)
    assert figures["targets"] == {"vs_trl_ref >= 2.0": True, "vs_trl_precomputed >= 1.5": True}
    text = gpu_check_report.figures_text({"step": "dpo_epoch", "figures": figures})
    assert "ours 2.50x" in text and "target vs_trl_ref >= 2.0: met" in text


def test_a_missing_or_failed_benchmark_line_is_an_error():
    lines = [_line("dpo_ref_in_memory", "trl", 2.0, error="worker exited with code 1"),
             _line("dpo_precomputed_packed", "ours", 5.0)]
    figures, error = gpu_check_report.bench_figures("dpo_epoch", lines)
    assert "dpo_ref_in_memory (trl): worker exited with code 1" in error
    assert "dpo_precomputed (trl): no line" in error
    assert "vs_trl_ref" not in figures and figures["targets"] == {}


def test_the_table_has_a_row_per_step():
    header = {"dry_run": True, "date": "2026-11-30", "argv": ["--dry-run"], "commit": "abc",
              "deadline_s": None}
    lines = [{"step": "wheels", "status": "skipped", "seconds": 0.0, "figures": {"note": "none"}},
             {"step": "smoke/tiny/dpo_amp_bf16", "status": "fail", "seconds": 1.5, "budget_s": 30,
              "figures": {"logp_dev": 0.2, "logp_tol": 0.05}, "error": "log-probs | far"}]
    summary = {"total_s": 2.0, "pass": 0, "fail": 1, "timeout": 0, "skipped": 1}
    table = gpu_check_report.markdown(header, lines, summary).splitlines()
    rows = [r for r in table if r.startswith("| ") and not r.startswith("| step")]
    assert [r.split(" | ")[:4] for r in rows] == [
        ["| wheels", "skipped", "0.0", ""], ["| smoke/tiny/dpo_amp_bf16", "fail", "1.5", "30"]]
    assert "**log-probs / far**" in rows[1]  # the error, with the table's separator escaped


@pytest.mark.slow
def test_the_log_prob_check_catches_a_broken_packing_mask(tmp_path, monkeypatch):
    """The smoke check is not a formality: packing whose mask lets tokens see other examples
    fails it, the correct mask passes it (the bundled tiny model, on the CPU)."""
    import torch
    import gpu_smoke_train as smoke
    from harness.data import packing
    ctx = smoke.Context(dict(model="tiny", source="assets/tiny_model", device="cpu",
                             batch_size=4, max_length=128, steps=1, workdir=str(tmp_path)))
    ctx.prepare()
    smoke.plain_path(ctx)
    figures = smoke.lever_path(ctx, "dpo_packing_sdpa")
    assert figures["logp_dev"] <= figures["logp_tol"]

    def no_document_mask(unit, segment):  # causal over the whole packed row
        rows, width = unit.shape
        return torch.ones(width, width, dtype=torch.bool).tril().expand(rows, width, width)
    monkeypatch.setattr(packing, "allowed", no_document_mask)
    with pytest.raises(smoke.CheckFailed, match="log-probs .* from the plain path"):
        smoke.lever_path(ctx, "dpo_packing_sdpa")


FAKE_WORKER = '''
import json, os, sys, time
spec = json.loads(sys.argv[2])
def emit(**line):
    with open(spec["progress"], "a") as f:
        f.write(json.dumps(line) + "\\n")
emit(event="ready", import_s=0.0)
for path in spec["paths"]:
    emit(event="start", path=path)
    if path.startswith("hang"):
        time.sleep(600)
    if path.startswith("die"):
        os._exit(3)
    emit(event="result", path=path, status="fail" if path.startswith("fail") else "pass",
         seconds=0.01, figures={"worker": os.getpid()}, error=None)
'''


def _run(tmp_path, *extra):
    args = gpu_check.parse_args(["--dry-run", "--out", str(tmp_path / "out"), "--workdir",
                                 str(tmp_path / "work"), "--budget-scale", "1", *extra])
    return gpu_check.Run(args)


@pytest.mark.slow
def test_a_path_that_hangs_or_kills_its_worker_does_not_stop_the_rest(tmp_path, monkeypatch):
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    monkeypatch.setattr(gpu_check_smoke, "SMOKE_SCRIPT", script)
    monkeypatch.setattr(gpu_check_smoke, "SMOKE", {"fake": dict(paths=[
        "ok1", "hang", "ok2", "die", "fail", "ok3"])})
    monkeypatch.setattr(gpu_check_smoke, "DRY_SMOKE", {"fake": {}})
    monkeypatch.setitem(gpu_check_smoke.PATH_BUDGET, "hang", 2)
    run = _run(tmp_path)
    gpu_check_smoke.run_smoke(run, "fake")
    got = [(x["step"], x["status"]) for x in run.lines]
    assert got == [("smoke/fake/ok1", "pass"), ("smoke/fake/hang", "timeout"),
                   ("smoke/fake/ok2", "pass"), ("smoke/fake/die", "fail"),
                   ("smoke/fake/fail", "fail"), ("smoke/fake/ok3", "pass")]
    assert 2 <= run.lines[1]["seconds"] < 10 and "budget" in run.lines[1]["error"]
    assert "exited with code 3" in run.lines[3]["error"]
    workers = {x["figures"]["worker"] for x in run.lines if x["status"] == "pass"}
    assert len(workers) == 3  # a fresh worker after the timeout and after the crash
    lines = (tmp_path / "out" / "gpu_check.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [s for s, _ in got]


@pytest.mark.slow
def test_a_worker_that_never_finishes_a_path_is_not_restarted(tmp_path, monkeypatch):
    script = tmp_path / "fake_worker.py"
    script.write_text("import sys; sys.exit(7)\n")
    monkeypatch.setattr(gpu_check_smoke, "SMOKE_SCRIPT", script)
    monkeypatch.setattr(gpu_check_smoke, "SMOKE", {"fake": dict(paths=["a", "b"])})
    monkeypatch.setattr(gpu_check_smoke, "DRY_SMOKE", {"fake": {}})
    run = _run(tmp_path)
    gpu_check_smoke.run_smoke(run, "fake")
    assert [(x["step"], x["status"]) for x in run.lines] == [("smoke/fake/a", "fail"),
                                                             ("smoke/fake/b", "fail")]
    assert "code 7 before finishing a path" in run.lines[0]["error"]


@pytest.mark.slow
def test_a_benchmark_over_budget_is_stopped_and_the_deadline_skips_the_rest(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setitem(gpu_check.STEP_BUDGET, "generation", 1)
    run = _run(tmp_path)
    start = time.monotonic()
    gpu_check.run_bench(run, "generation", [[sys.executable, "-c", "import time; "
                                             "time.sleep(600)"]])
    assert time.monotonic() - start < 10
    assert run.lines[-1]["status"] == "timeout" and "budget" in run.lines[-1]["error"]
    run.args.deadline_s = 0
    gpu_check.run_bench(run, "dpo_epoch", [[sys.executable, "-c", "pass"]])
    assert run.lines[-1]["status"] == "skipped"


@pytest.mark.slow
@pytest.mark.long
def test_dry_run_end_to_end(tmp_path):
    """The whole check on the CPU with the tiny presets: every step passes, the JSON lines and
    the table hold every step's figures (about 6 minutes on 2 busy cores)."""
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry-run", "--out",
                           str(out), "--workdir", str(tmp_path / "work"), "--wheels",
                           str(tmp_path / "no_wheels")], capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + (out / "gpu_check.log").read_text()[-3000:]
    records = [json.loads(x) for x in (out / "gpu_check.jsonl").read_text().splitlines()]
    header, steps, summary = records[0], records[1:-1], records[-1]
    assert header["dry_run"] and summary["fail"] == summary["timeout"] == 0
    status = {s["step"]: s["status"] for s in steps}
    expected = [f"smoke/{m}/{p}" for m, spec in gpu_check_smoke.SMOKE.items()
                for p in spec["paths"]]
    assert list(status) == ["wheels", *expected, "dpo_epoch", "sft_compiled", "generation"]
    assert status.pop("wheels") == "skipped" and set(status.values()) == {"pass"}
    figures = {s["step"]: s.get("figures") or {} for s in steps}
    for name, f in figures.items():
        if "logp_dev" in f:  # every training path: log-probs within tolerance, memory measured
            assert 0 <= f["logp_dev"] <= f["logp_tol"] < figures[
                name.rsplit("/", 1)[0] + "/plain_fp32"]["context_effect"], name
            assert f["peak_mib"] > 0, name
    assert figures["smoke/1b/dpo_compile"]["grad_norm_twin"] == "dpo_amp_bf16"
    assert figures["smoke/tiny/sample_static_cache"]["token_match"] == 1.0
    for step, peers in (("dpo_epoch", ("trl_ref", "trl_precomputed")),
                        ("sft_compiled", ("bare_compiled",)), ("generation", ("generate",))):
        for peer in peers:  # ours / peer on the step's rate, from the same run
            rate = gpu_check_report.RATE[step]
            assert figures[step][f"vs_{peer}"] == pytest.approx(
                figures[step]["ours"][rate] / figures[step][peer][rate], abs=1e-3)
    assert (out / "gpu_check.png").stat().st_size > 0
    table = (out / "gpu_check.md").read_text()
    assert table in proc.stdout and all(f"| {name} | " in table for name in figures)
    assert len([x for x in proc.stdout.splitlines() if x.startswith("[gpu_check] +")]) == len(steps)
