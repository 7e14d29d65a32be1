"""scripts/real_model/report.py on a hand-made results folder of results.sh's layout: the
frontier rows, CoH's steering verdicts, and the judge's agreement and position bias, by hand."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "real_model"))
import report  # noqa: E402


def evaluation(gold, ci=0.05, kl=1.0, checkpoint="x"):
    return {"checkpoint": checkpoint, "gold_reward": gold, "gold_reward_ci95": ci, "kl": kl,
            "kl_ci95": 0.1, "length": 20.0, "win_rate": 0.5, "n_prompts": 64}


def run(folder: Path, name: str, config: str, gold: float):
    d = folder / name
    (d / "step-8").mkdir(parents=True)
    (d / "LATEST").symlink_to("step-8")
    (d / "config.yaml").write_text(config)
    (d / "metrics.jsonl").write_text("{}\n")
    (d / "step-8" / "eval_toy_seed0.json").write_text(json.dumps(evaluation(gold)))


def write_json(path: Path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


@pytest.fixture
def results(tmp_path):
    out = tmp_path / "out"
    write_json(out / "sft" / "base_model_eval.json",
               evaluation(0.05, kl=9.0, checkpoint="packaged:smollm2_135m"))
    run(out / "sft", "sft_1", "loss:\n  name: sft\n", 0.20)
    run(out / "dpo", "dpo_1", "loss:\n  name: dpo\n  beta: 0.1\n", 0.45)
    run(out / "coh", "coh_1", "loss:\n  name: coh\n", 0.30)
    run(out / "sft_continued", "sft_1", "loss:\n  name: sft\n", 0.18)
    write_json(out / "steering" / "coh_positive.json", evaluation(0.30))
    write_json(out / "steering" / "coh_negative.json", evaluation(0.10))
    ai = out / "ai_feedback"
    # 5 pairs; gold: output_2, output_1, output_2, tie, output_1. The judge: right, wrong,
    # right, a tie on pair d, and pair e failed (null); it picked the first-shown answer in 7
    # of its 8 judgments
    gold = {"a": 2.0, "b": 1.0, "c": 2.0, "d": 1.5, "e": 1.0}
    llm = {"a": 1.55, "b": 1.6, "c": 1.7, "d": 1.5, "e": None}
    for folder, prefs in (("labels", llm), ("gold_labels", gold)):
        write_json(ai / folder / "annotations.json",
                   [{"pair_id": k, "preference": v} for k, v in prefs.items()])
    # (unit, p_output_2): "ab" shows output_1 first, "ba" output_2
    units = {"a": (0.3, 0.8), "b": (0.4, 0.8), "c": (0.6, 0.8), "d": (0.2, 0.8)}
    (ai / "labels" / "results.jsonl").write_text("".join(
        json.dumps({"pair": k, "unit": u, "status": "ok", "p_output_2": p}) + "\n"
        for k, ps in units.items() for u, p in zip(("ab", "ba"), ps)))
    write_json(ai / "labels" / "summary.json", {"order_disagreements": 3})
    write_json(ai / "dpo_ai_eval.json", evaluation(0.25))
    return out


def test_report_reads_results_sh_layout(results, tmp_path):
    md = tmp_path / "docs" / "real_model.md"
    md.parent.mkdir()
    got = report.main([str(results), "--md", str(md), "--png", str(md.with_suffix(".png")),
                       "--seconds", "600", "--reused", "sft dpo"])
    coh, judge = got["coh"], got["judge"]
    assert coh["positive_beats_negative_beyond_ci"]  # 0.30 - 0.05 > 0.10 + 0.05
    assert coh["coh_beats_control_beyond_ci"] and coh["coh_at_least_control"]
    assert judge["pairs"] == 5 and judge["decisive_both"] == 3 and judge["gold_ties"] == 1
    assert judge["llm_ties"] == 2  # the tie and the failed pair
    assert judge["agreement"] == pytest.approx(2 / 3)
    # first shown picked: ab of a, b, d (p < 0.5) and all four ba (p > 0.5)
    assert judge["first_shown_rate"] == pytest.approx(7 / 8)
    assert judge["dpo_on_ai_labels"]["gold_reward"] == 0.25
    text = md.read_text()
    assert "| base |" in text and "packaged:smollm2_135m" in text  # the base row names its model
    assert "CoH better beyond the 95% intervals" in text and "0.875" in text
    assert "10 minutes for this invocation, which reused the training runs of an earlier one " \
        "(sft dpo)" in text
    saved = json.loads(md.with_suffix(".json").read_text())
    assert saved["seconds"] == 600 and md.with_suffix(".png").stat().st_size > 0
