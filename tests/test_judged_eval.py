"""eval_judge: a judged win rate against the reference during training (position-swapped LLM
judging through the same client, or a gold reward), logged as a metric; off by default."""

import json

import pytest

from harness.data.dialogue import human_prompt
from harness.data.gold import get_gold_reward
from harness.training.judged_eval import JudgeEvalOptions, check_eval_judge, judge_options
from harness.training.run_logging import read_metrics
from serving_helpers import running_server, toy_judge

GOLD = get_gold_reward("toy")


def test_options_shorthand_mapping_and_refusals(compose):
    assert judge_options(None).judge is None and judge_options("gold:toy").judge == "gold:toy"
    assert compose().eval_judge.judge is None  # off by default
    options = judge_options(compose("eval_judge=gold:toy").eval_judge)
    assert options == JudgeEvalOptions(judge="gold:toy")
    options = judge_options(compose("eval_judge.judge=llm", "eval_judge.base_url=http://h:1/v1",
                                    "eval_judge.model=j", "eval_judge.n_prompts=8").eval_judge)
    assert (options.judge, options.base_url, options.n_prompts) == ("llm", "http://h:1/v1", 8)
    with pytest.raises(ValueError, match="eval_judge.n_promts is not an option"):
        judge_options({"judge": "gold:toy", "n_promts": 3})
    with pytest.raises(ValueError, match="needs eval_judge.base_url and eval_judge.model"):
        judge_options({"judge": "llm"})
    with pytest.raises(ValueError, match="eval_judge.concurrency=0 must be"):
        judge_options({"judge": "gold:toy", "concurrency": 0})
    with pytest.raises(ValueError, match="registered judges"):
        check_eval_judge("oracle")
    with pytest.raises(ValueError, match="NO_SUCH_KEY_VAR is not set"):
        check_eval_judge({"judge": "llm", "base_url": "http://h:1/v1", "model": "j",
                          "api_key_env": "NO_SUCH_KEY_VAR"})


def test_a_loss_that_cannot_sample_refuses_eval_judge(compose):
    import train
    overrides = ["loss=reward", "eval_judge=gold:toy"]
    with pytest.raises(ValueError, match="eval_judge is not read by loss=reward"):
        train.check_config(compose(*overrides), overrides=overrides)
    train.check_config(compose("loss=reward"), overrides=["loss=reward"])


def judged_rows(run_dir, step):
    return [json.loads(x) for x in (run_dir / "judge" / f"step-{step}.jsonl").read_text().splitlines()]


def sign(row):
    prompt = human_prompt(row["instruction"])
    diff = GOLD(prompt, " " + row["output_2"]) - GOLD(prompt, " " + row["output_1"])
    return (diff > 0) - (diff < 0)


@pytest.mark.slow
def test_gold_judge_during_sft_training(tmp_path, train_run):
    run_dir = train_run(tmp_path, "loss=sft", "n_examples=64", "lr=1e-3", "optimizer=AdamW",
                        "warmup_steps=0", "eval_judge.judge=gold:toy", "eval_judge.n_prompts=12",
                        "eval_judge.max_new_tokens=24")
    evals = [m for m in read_metrics(run_dir / "metrics.jsonl") if "judge_eval/win_rate" in m]
    assert [m["step"] for m in evals] == [0, 64]
    # at step 0 the policy is the reference: the same keyed samples, all ties
    assert evals[0]["judge_eval/win_rate"] == 0.5 and evals[0]["judge_eval/ties"] == 12
    reference = [json.loads(x) for x in (run_dir / "judge" / "reference.jsonl").read_text().splitlines()]
    rows = judged_rows(run_dir, 64)
    assert len(reference) == len(rows) == 12
    assert [r["output_1"] for r in rows] == [r["completion"] for r in reference]
    for row in rows:  # the gold judge's verdicts
        assert row["preference"] == 1.5 + 0.5 * sign(row)
    expected = sum(r["preference"] - 1 for r in rows) / 12
    assert evals[1]["judge_eval/win_rate"] == pytest.approx(expected)
    assert evals[1]["judge_eval/wins"] + evals[1]["judge_eval/losses"] + \
        evals[1]["judge_eval/ties"] == 12 and evals[1]["judge_eval/failed"] == 0


@pytest.mark.slow
def test_llm_judge_during_dpo_training_asks_both_orders(tmp_path, train_run):
    with running_server({"judge": toy_judge()}) as (state, url):
        run_dir = train_run(tmp_path, "loss=dpo", "loss.beta=0.1", "n_examples=32", "lr=1e-3",
                            "optimizer=AdamW", "warmup_steps=0",
                            "eval_judge.judge=llm", f"eval_judge.base_url={url}",
                            "eval_judge.model=judge", "eval_judge.template=toy",
                            "eval_judge.n_prompts=8", "eval_judge.max_new_tokens=16",
                            "eval_judge.temperature=1.5")
        requests = sum(state.requests_per_body.values())
    rows = judged_rows(run_dir, 32)
    judged = [r for r in rows if r["output_1"] != r["output_2"]]
    assert judged and requests == 2 * len(judged)  # step 0: all identical, nothing asked
    for row in judged:  # the scripted judge answers from the gold reward, in both orders
        assert (row["preference"] > 1.5) - (row["preference"] < 1.5) == sign(row)
    last = [m for m in read_metrics(run_dir / "metrics.jsonl") if "judge_eval/win_rate" in m][-1]
    assert last["step"] == 32 and last["judge_eval/failed"] == 0
