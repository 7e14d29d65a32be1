"""Win-rate maths, order combination, verdict parsing and judge templates, by hand."""

import math

import pytest

from harness.feedback.judges import load_template, verdict_from_logprobs, verdict_from_text
from harness.feedback.openai_client import RetryableError
from harness.feedback.win_rate import Z_95, win_rate
from harness.feedback.judges import combine_orders


@pytest.mark.parametrize("p_first, p_swapped, expected", [
    (1.0, 1.0, (2.0, False)),     # both orders: output_2
    (0.0, 0.0, (1.0, False)),     # both orders: output_1
    (1.0, 0.0, (1.5, True)),      # position bias: the orders disagree -> tie, flagged
    (0.0, 1.0, (1.5, True)),
    (0.8, 0.6, (1.7, False)),     # soft, agreeing: 1 + (0.8 + 0.6) / 2
    (0.5, 1.0, (1.75, False)),    # one order undecided is no disagreement
    (0.9, 0.3, (1.5, True)),
])
def test_combine_orders(p_first, p_swapped, expected):
    pref, disagreed = combine_orders(p_first, p_swapped)
    assert (pytest.approx(pref), disagreed) == expected


@pytest.mark.parametrize("p_first, p_swapped, expected", [
    (0.2, 0.9, (1.55, True)),     # biased to A in both orders, more sure of output_2 when it is A
    (0.26, 0.76, (1.51, True)),   # a SmolLM2 judgment: 1 + 1.02 / 2
    (1.0, 0.0, (1.5, True)),      # hard verdicts that disagree: still a tie
    (0.8, 0.6, (1.7, False)),     # agreeing: the same as rule "tie"
])
def test_balanced_position_calibration_lets_the_mean_decide(p_first, p_swapped, expected):
    pref, disagreed = combine_orders(p_first, p_swapped, "mean")
    assert (pytest.approx(pref), disagreed) == expected


def test_combine_orders_rejects_probabilities_outside_unit_interval():
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        combine_orders(1.2, 0.5)
    with pytest.raises(ValueError, match="rule 'median'.*'tie', 'mean'"):
        combine_orders(0.2, 0.5, "median")


def test_win_rate_by_hand():
    # scores s = pref - 1: [1, 0, 0.5, 1]; mean 0.625; deviations 0.375, -0.625, -0.125, 0.375
    # sum of squares 0.6875, sample variance 0.6875 / 3, standard error sqrt(0.6875 / 3 / 4)
    rate = win_rate([2.0, 1.0, 1.5, 2.0, None])
    se = math.sqrt(0.6875 / 3 / 4)
    assert (rate.n, rate.wins, rate.losses, rate.ties, rate.failed) == (4, 2, 1, 1, 1)
    assert rate.win_rate == pytest.approx(0.625)
    assert rate.std_error == pytest.approx(se)
    assert rate.ci_low == pytest.approx(0.625 - Z_95 * se)
    assert rate.ci_high == 1.0  # 0.625 + 0.469 clipped
    assert "62.5%" in str(rate) and "1 failed" in str(rate)


def test_win_rate_soft_preferences_and_edge_cases():
    rate = win_rate([1.25, 1.75])  # s = 0.25, 0.75: mean 0.5, sd sqrt(0.125), se 0.25
    assert (rate.win_rate, rate.std_error, rate.wins, rate.losses, rate.ties) == (0.5, 0.25, 1, 1, 0)
    assert rate.ci_low == pytest.approx(0.5 - Z_95 * 0.25)
    one = win_rate([2.0])
    assert one.win_rate == 1.0 and (one.ci_low, one.ci_high) == (0.0, 1.0)
    assert math.isnan(win_rate([None, None]).win_rate) and win_rate([None]).failed == 1
    with pytest.raises(ValueError, match="\\[1, 2\\]"):
        win_rate([0.0])


@pytest.mark.parametrize("text, p", [
    ("B", 1.0), ("A", 0.0), (" (B)", 1.0), ("Response A.", 0.0), ("**B**", 1.0),
    ("Output (a)".replace("a", "A"), 0.0), ("B\nBecause...", 1.0),
])
def test_verdict_from_text(text, p):
    assert verdict_from_text(text, ("A", "B")) == p


@pytest.mark.parametrize("text", ["", None, "I think A", "Both are fine", "AB", "a"])
def test_unusable_text_verdicts_are_retryable(text):
    with pytest.raises(RetryableError, match="garbage verdict"):
        verdict_from_text(text, ("A", "B"))


def test_verdict_from_logprobs_chat_and_completions_schemas():
    la, lb = math.log(0.2), math.log(0.6)  # P(B) / (P(A) + P(B)) = 0.75
    chat = {"logprobs": {"content": [{"token": "B", "logprob": lb, "top_logprobs": [
        {"token": "B", "logprob": lb}, {"token": " A", "logprob": la}, {"token": "C", "logprob": -1}]}]}}
    assert verdict_from_logprobs(chat, ("A", "B")) == pytest.approx(0.75)
    completion = {"logprobs": {"top_logprobs": [{" B": lb, "A": la}]}}
    assert verdict_from_logprobs(completion, ("A", "B")) == pytest.approx(0.75)
    with pytest.raises(RetryableError, match="no top_logprobs"):
        verdict_from_logprobs({"logprobs": None}, ("A", "B"))


def test_template_renders_literally_and_parses_back(tmp_path):
    template = load_template("toy")
    tricky = "uses {output_b} and \\1 literally"
    messages = template.messages("Write {instruction}", tricky, "fine")
    assert messages[0]["role"] == "system" and tricky in messages[1]["content"]
    assert template.parse_user(messages[1]["content"]) == {
        "instruction": "Write {instruction}", "output_a": tricky, "output_b": "fine"}
    assert template.parse_user("something else") is None
    bad = tmp_path / "bad.json"
    bad.write_text('{"user": "no placeholders"}')
    with pytest.raises(ValueError, match="lacks placeholder"):
        load_template(str(bad))
    with pytest.raises(FileNotFoundError, match="named templates"):
        load_template("nope")
