"""Sweep support: run dirs that never clash, the sweep summary table, and the quick frontier."""

import csv
import datetime
import io
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from harness import checkpoints
from harness.checkpoints import REPO_ROOT
from harness.evaluation.sweep_summary import collect, to_csv, to_markdown

sys.path.insert(0, str(REPO_ROOT / "scripts"))
import summarize_runs  # noqa: E402

pytestmark = pytest.mark.slow


def test_run_dirs_never_clash_within_one_microsecond(tmp_path, monkeypatch):
    """Even with the clock frozen (jobs starting in the same microsecond), every caller gets
    its own, freshly created directory."""
    frozen = datetime.datetime(2026, 1, 1, 12, 0, 0, 123456)

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return frozen

    monkeypatch.setattr(checkpoints.datetime, "datetime", Clock)
    with ThreadPoolExecutor(8) as pool:
        dirs = list(pool.map(lambda _: checkpoints.get_local_run_dir("sweep", [str(tmp_path)]),
                             range(16)))
    assert len(set(dirs)) == 16 and all(os.path.isdir(d) for d in dirs)
    assert sorted(os.listdir(tmp_path))[0] == "sweep_2026-01-01_12-00-00_123456"


def _fake_run(folder, beta, eval_loss, gold=None):
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(
        f"exp_name: dpo\nlocal_run_dir: {folder}\nloss:\n  name: dpo\n  beta: {beta}\n"
        "lr: 0.001\n")
    rows = [{"step": 0, "loss/eval": 0.69}, {"step": 64, "loss/train": 0.5, "grad_norm": 1.0},
            {"step": 64, "loss/eval": eval_loss, "rewards_eval/accuracies": 0.75}]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if gold is not None:
        (folder / "step-64").mkdir()
        (folder / "LATEST").symlink_to("step-64")
        (folder / "step-64" / "eval_toy_seed0.json").write_text(json.dumps(
            {"gold_reward": gold, "gold_reward_ci95": 0.05, "kl": 1.5, "kl_ci95": 0.2,
             "length": 10.0, "win_rate": 0.6}))


def test_summarize_runs(tmp_path, capsys):
    _fake_run(tmp_path / "dpo" / "a", 0.1, 0.4, gold=0.3)
    _fake_run(tmp_path / "dpo" / "b", 0.5, 0.6)
    rows = collect(tmp_path)
    assert [r["run"] for r in rows] == ["dpo/a", "dpo/b"]
    assert [r["loss.beta"] for r in rows] == [0.1, 0.5]
    assert "lr" not in rows[0] and "local_run_dir" not in rows[0]  # only what varies
    assert rows[0]["loss/eval"] == 0.4 and rows[0]["eval/gold_reward"] == 0.3
    assert "eval/gold_reward" not in rows[1]
    table = to_markdown(rows, ["run", "loss.beta", "loss/eval"])
    assert table.splitlines()[2] == "| dpo/a | 0.1 | 0.4 |"
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert parsed[1]["loss/eval"] == "0.6" and parsed[1]["eval/gold_reward"] == ""
    summarize_runs.main([str(tmp_path), "--csv", str(tmp_path / "t.csv")])
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert "loss.beta" in header and "eval/gold_reward" in header and "loss/eval" in header
    assert "loss/train" not in header and "grad_norm" not in header
    assert (tmp_path / "t.csv").exists()
    with pytest.raises(ValueError, match="no runs"):
        collect(tmp_path / "dpo" / "a" / "step-64")


@pytest.mark.long
def test_quick_frontier(tmp_path):
    """bash scripts/sweeps/frontier.sh --quick: SFT, then each method from it, every checkpoint
    evaluated; DPO must beat SFT on gold reward."""
    out = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "sweeps" / "frontier.sh"), "--quick",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=1500,
                         env={**os.environ, "PYTHON": sys.executable})
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "frontier.md").exists() and (tmp_path / "frontier.png").stat().st_size > 0
    report = json.loads((tmp_path / "frontier.json").read_text())
    methods = {r["method"] for r in report["rows"]}
    assert {"base", "sft", "dpo", "ipo", "cdpo", "ppo", "kto", "simpo", "orpo", "grpo", "rloo",
            "online_dpo"} <= methods
    gold = {r["method"]: r["gold"] for r in report["rows"]}
    assert gold["dpo"] > gold["sft"], report["verdicts"]
    assert report["verdicts"]["methods"]["dpo"]["minus_sft"] > 0
