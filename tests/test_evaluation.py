"""Gold-reward evaluation: the estimator maths by hand, then scripts/evaluate.py on the tiny model."""

import json
import math
import subprocess
import sys

import pytest
import torch

from harness.evaluation.gold_eval import EvalConfig, evaluate, load_prompts
from harness.evaluation.stats import Z_95, mean_ci, sequence_kl, win_scores
from harness.models.generation import SamplingConfig
from harness.checkpoints import REPO_ROOT

TINY = str(REPO_ROOT / "assets" / "tiny_model")
SCRIPT = str(REPO_ROOT / "scripts" / "evaluate.py")


# ---------------------------------------------------------------------------- estimator maths
def test_kl_estimator_on_known_distributions():
    """Sequences of T i.i.d. tokens: KL(p^T || q^T) = T * KL(p || q), known in closed form."""
    p = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float64)
    q = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    T, n = 5, 20000
    exact = T * (p * (p / q).log()).sum().item()
    # by hand: 0.7 ln 3.5 + 0.2 ln(2/3) + 0.1 ln 0.2 = 0.876934 - 0.081093 - 0.160944 = 0.634897
    assert exact == pytest.approx(5 * 0.634897, abs=1e-5)
    tokens = torch.multinomial(p, n * T, replacement=True,
                               generator=torch.Generator().manual_seed(0)).view(n, T)
    # per-token log-probs [n, T] of the samples under p (the policy) and q (the reference)
    kl = sequence_kl(p.log()[tokens], q.log()[tokens])
    assert kl.shape == (n,)
    mean, half = mean_ci(kl)
    assert abs(mean - exact) < half < 0.05       # the interval covers the truth, and is tight
    # summed per-sequence log-probs give the same estimate as per-token ones
    assert torch.allclose(sequence_kl(p.log()[tokens].sum(-1), q.log()[tokens].sum(-1)), kl)
    assert sequence_kl(p.log()[tokens], p.log()[tokens]).abs().max() == 0  # KL(p || p) = 0


def test_kl_shape_mismatch():
    with pytest.raises(ValueError, match="reference"):
        sequence_kl(torch.zeros(3), torch.zeros(4))


def test_mean_ci_by_hand():
    mean, half = mean_ci([1.0, 2.0, 3.0, 6.0])
    # mean 3, sample variance ((4 + 1 + 0 + 9) / 3) = 14/3, se = sqrt(14/3) / 2
    assert mean == 3.0
    assert half == pytest.approx(1.959964 * math.sqrt(14 / 3) / 2, rel=1e-6)
    assert Z_95 == pytest.approx(1.959964, abs=1e-6)
    assert mean_ci([2.5])[0] == 2.5 and math.isnan(mean_ci([2.5])[1])
    with pytest.raises(ValueError, match="no values"):
        mean_ci([])


def test_win_rate_counts_ties_half():
    scores = win_scores([0.5, 0.1, -0.2, 0.3], [0.2, 0.1, 0.4, 0.3])
    assert scores.tolist() == [1.0, 0.5, 0.0, 0.5]
    mean, half = mean_ci(scores)
    assert mean == 0.5
    # scores 1, .5, 0, .5: variance (0.25 + 0 + 0.25 + 0) / 3
    assert half == pytest.approx(Z_95 * math.sqrt(0.5 / 3) / 2)
    with pytest.raises(ValueError, match="3 policy rewards but 2"):
        win_scores([1, 2, 3], [1, 2])


# ------------------------------------------------------------------------------------ inputs
def test_prompt_sets(tmp_path):
    assert len(load_prompts("toy", "test", n_prompts=7)) == 7
    rows = tmp_path / "p.jsonl"
    rows.write_text('{"prompt": "a"}\n{"prompt": "b"}\n')
    assert load_prompts(prompts_file=str(rows)) == ["a", "b"]
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(ValueError, match="prompt set is empty"):
        load_prompts(prompts_file=str(empty))
    with pytest.raises(ValueError, match="at least one prompt"):
        load_prompts("toy", n_prompts=0)
    bad = tmp_path / "bad.json"
    bad.write_text('[{"text": "x"}]')
    with pytest.raises(ValueError, match="entry 1"):
        load_prompts(prompts_file=str(bad))


def test_unknown_gold_reward_lists_the_registered_ones():
    with pytest.raises(KeyError, match=r"registered: \[.*'toy'"):
        evaluate(TINY, TINY, EvalConfig(gold="nope"))


# --------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def sft_checkpoint(tmp_path_factory):
    """A few SFT steps of the tiny model: a policy that differs from its reference."""
    base = tmp_path_factory.mktemp("runs")
    out = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), f"local_dirs=[{base}]",
                          "wandb.enabled=false", "sample_during_eval=false", "n_examples=256",
                          "do_first_eval=false", "n_eval_examples=32", "gold_eval_prompts=0"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (run,) = base.glob("toy_sft_*")
    return run


def run_script(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_evaluate_end_to_end(sft_checkpoint):
    """JSON next to the checkpoint, one stdout line, deterministic for a fixed seed; the
    reference defaults to the run's base model."""
    args = [str(sft_checkpoint / "LATEST" / "policy.pt"), "--n-prompts", "24", "--batch-size", "8",
            "--max-new-tokens", "32"]
    first = run_script(*args)
    assert first.returncode == 0, first.stderr[-3000:]
    lines = [x for x in first.stdout.splitlines() if x.startswith("eval ")]
    assert len(lines) == 1 and "win rate" in lines[0] and "KL" in lines[0]
    path = sft_checkpoint / "LATEST" / "eval_toy_seed0.json"
    result = json.loads(path.read_text())
    assert result["n_prompts"] == 24 and result["reference"].endswith("tiny_model")
    assert result["kl"] > 0 and 0 <= result["win_rate"] <= 1 and -1 <= result["gold_reward"] <= 1
    assert result["gold_reward_ci95"] > 0 and 0 < result["length"] <= 32
    again = run_script(*args)
    assert again.returncode == 0
    assert json.loads(path.read_text()) == result


def test_policy_against_itself(tmp_path):
    """Same model and seed on both sides: identical samples, so KL is exactly 0 and every
    comparison a tie (win rate 0.5)."""
    cfg = EvalConfig(n_prompts=16, sampling=SamplingConfig(max_new_tokens=24, batch_size=8))
    result = evaluate(TINY, TINY, cfg)
    assert result["kl"] == 0 and result["kl_ci95"] == 0
    assert result["win_rate"] == 0.5 and result["gold_reward"] == result["reference_gold_reward"]


@pytest.mark.slow
def test_bad_checkpoints_are_named(tmp_path, sft_checkpoint):
    out = run_script(str(tmp_path / "missing.pt"), "--reference", TINY)
    assert out.returncode != 0 and "does not exist" in out.stderr
    out = run_script(TINY, "--n-prompts", "2")  # an HF dir has no run config to name its reference
    assert out.returncode != 0 and "--reference" in out.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = run_script(str(sft_checkpoint), "--prompts-file", str(empty))
    assert out.returncode != 0 and "prompt set is empty" in out.stderr
    out = run_script(str(sft_checkpoint), "--gold", "nope")
    assert out.returncode != 0 and "registered: [" in out.stderr and "Traceback" not in out.stderr
