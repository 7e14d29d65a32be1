"""AlpacaEval 2's length-controlled win rate computed offline, checked against alpaca_eval's
own GLM; alpaca_eval itself run offline through scripts/eval_ckpt.sh against a loopback judge."""

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from harness.evaluation.length_controlled import GLMS, length_controlled_win_rate
from serving_helpers import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import alpaca_eval_lc  # noqa: E402


def annotations(n=60, seed=0) -> list[dict]:
    """A judge that likes longer outputs: raw win rate above the length-controlled one."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        l1, l2 = rng.randint(20, 200), rng.randint(20, 400)
        p = 2.0 if rng.random() < 0.3 + 0.4 * (l2 > l1) else 1.0
        p = 1.5 if rng.random() < 0.1 else None if i == 7 else p
        rows.append({"instruction": f"q{i}", "output_1": "a" * l1, "output_2": "b" * l2,
                     "preference": p, "generator_1": "base", "generator_2": "model",
                     "annotator": "ours"})
    return rows


def gamed_file(path: Path, n=60, seed=1) -> Path:
    """A df_gamed.csv in alpaca_eval's layout: a not-gamed baseline and two gamed ones."""
    rng = random.Random(seed)
    difficulty = [rng.gauss(0, 1) for _ in range(n)]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "index", "preference", "std_delta_len", "instruction_difficulty",
                    "not_gamed_baseline"])
        for model, gamed in (("other", False), ("verbose", True), ("concise", True)):
            for i in range(n):
                pref = rng.random() if not gamed else (0.8 if model == "verbose" else 0.2)
                w.writerow([model, i, round(pref, 3), rng.gauss(0.8 if model == "verbose" else
                                                                -0.8 if gamed else 0, 1),
                            difficulty[i], str(not gamed)])
    return path


@pytest.mark.parametrize("glm", sorted(GLMS))
def test_the_same_numbers_as_alpaca_evals_glm(tmp_path, monkeypatch, glm):
    pd = pytest.importorskip("pandas")
    glm_winrate = pytest.importorskip("alpaca_eval.metrics.glm_winrate")
    gamed, rows = str(gamed_file(tmp_path / "df_gamed.csv")), annotations()
    # alpaca_eval fetches df_gamed.csv from the hub: hand it the local file
    monkeypatch.setattr(glm_winrate, "hf_hub_download", lambda **kwargs: gamed)
    theirs = glm_winrate.get_length_controlled_winrate(pd.DataFrame(rows), glm_name=glm,
                                                       save_weights_dir=None)
    ours = length_controlled_win_rate(rows, glm, gamed=gamed)
    assert ours["win_rate"] == pytest.approx(theirs["win_rate"], abs=1e-9)
    assert ours["length_controlled_winrate"] == pytest.approx(
        theirs["length_controlled_winrate"], abs=1e-6)
    assert ours["lc_standard_error"] == pytest.approx(theirs["lc_standard_error"], abs=1e-6)
    assert (ours["n"], ours["failed"]) == (59, 1)


def test_length_control_discounts_a_length_biased_judge(tmp_path):
    pytest.importorskip("sklearn")  # requirements-eval.txt (in the test requirements)
    result = alpaca_eval_lc.main([str(_write(tmp_path / "a.json", annotations(200)))])
    assert result["length_controlled_winrate"] < result["win_rate"] - 3
    assert result["weights"]["np.tanh(std_delta_len)"] < 0  # longer output_2: more wins
    assert json.loads((tmp_path / "length_controlled.json").read_text())["n"] == 199
    with pytest.raises(ValueError, match="needs the instruction difficulty"):
        length_controlled_win_rate(annotations(), "length_controlled_noreg")
    with pytest.raises(ValueError, match="needs at least 5"):
        length_controlled_win_rate(annotations(4), "length_controlled_minimal")


def _write(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.slow
def test_eval_ckpt_runs_alpaca_eval_offline_against_a_loopback_judge(tmp_path):
    """scripts/eval_ckpt.sh end to end: outputs, our pairwise labels and LC, then alpaca_eval
    itself (installed from requirements-eval.txt) with our annotator config, all offline."""
    alpaca_eval = Path(sys.executable).parent / "alpaca_eval"
    if not alpaca_eval.exists():
        pytest.skip("alpaca_eval is not installed (pip install -r requirements-eval.txt)")
    from harness.data.toy_task import toy_records
    from serving_helpers import running_server, toy_judge
    from harness.data.dialogue import instruction_of
    records = toy_records("test", 8)
    prompts = _write(tmp_path / "prompts.json", [{"prompt": p} for p in records])
    # the reference outputs: the toy task's own first response (AlpacaEval's outputs format)
    reference = _write(tmp_path / "reference.json", [
        {"instruction": instruction_of(p), "output": r["responses"][0].strip(),
         "generator": "toy"} for p, r in records.items()])
    env = {**os.environ, "PROMPTS": str(prompts), "REFERENCE": str(reference),
           "MAX_NEW_TOKENS": "16", "TEMPLATE": "toy",
           "OUT_ROOT": str(tmp_path / "eval"), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "ALPACA_EVAL": str(alpaca_eval), "HF_HUB_OFFLINE": "1"}
    with running_server({"judge": toy_judge()}) as (_, url):
        env["JUDGE_BASE_URL"] = url
        done = subprocess.run(["bash", str(ROOT / "scripts" / "eval_ckpt.sh"),
                               str(ROOT / "assets" / "tiny_model"), "tiny", "llm", "1.0"],
                              env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "eval" / "tiny"
    ours = json.loads((out / "pairwise" / "annotations.json").read_text())
    lc = json.loads((out / "pairwise" / "length_controlled.json").read_text())
    assert len(ours) == 8 and lc["n"] + lc["failed"] == 8
    theirs = json.loads((out / "alpaca_eval" / "results" / "annotations.json").read_text())
    assert len(theirs) == 8 and (out / "alpaca_eval" / "results" / "leaderboard.csv").exists()
    assert (out / "alpaca_eval" / "results" / "length_controlled.json").exists()
    # both ask the same scripted judge (it answers from the gold reward): where our two orders
    # agreed on a winner, alpaca_eval's single (random) order found the same one
    mine = {r["output_2"]: r["preference"] for r in ours}
    agreed = [(mine[r["output_2"]], r["preference"]) for r in theirs
              if mine.get(r["output_2"]) in (1.0, 2.0)]
    assert agreed and all(a == b for a, b in agreed)
