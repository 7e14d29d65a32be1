"""The labeller end to end against the real server on loopback: LLM and gold judges, faults,
resume after SIGKILL, unmatched prompts, and annotations.json back into DPO training."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.data.gold import get_gold_reward
from harness.data.dialogue import human_prompt as prompt_of
from serving_helpers import ROOT, running_server, serve, toy_judge, write_samples  # noqa: F401

sys.path.insert(0, str(ROOT / "scripts"))
import label_ai_preferences as labeller  # noqa: E402

GOLD = get_gold_reward("toy")
FAST_RETRY = ["--backoff", "0.01", "--backoff-max", "0.05"]


def gold_sign(row) -> int:
    prompt = prompt_of(row["instruction"])
    diff = GOLD(prompt, " " + row["output_2"]) - GOLD(prompt, " " + row["output_1"])
    return (diff > 0) - (diff < 0)


def label(samples, out_dir, *extra):
    return labeller.main(["--samples", *map(str, samples), "--out-dir", str(out_dir), *extra])


def llm_args(url, *extra):
    return ["--judge", "llm", "--judge-base-url", url, "--judge-model", "judge", "--template",
            "toy", "--concurrency", "4", *FAST_RETRY, *extra]


@pytest.mark.parametrize("endpoint, verdict", [("chat", "text"), ("chat", "logprobs"),
                                               ("completions", "text"), ("completions", "logprobs")])
def test_llm_judge_end_to_end_agrees_with_the_gold_reward(tmp_path, endpoint, verdict):
    samples = write_samples(tmp_path / "s.jsonl", 24)
    with running_server({"judge": toy_judge()}) as (_, url):
        summary = label([samples], tmp_path / "out", *llm_args(url, "--verdict", verdict,
                                                                "--endpoint", endpoint))
    rows = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert len(rows) == 24 and {r["annotator"] for r in rows} == {"llm:judge"}
    for row in rows:  # the served judge reads the gold reward; both orders recover its sign
        assert (row["preference"] > 1.5) - (row["preference"] < 1.5) == gold_sign(row)
    gold_ties = sum(gold_sign(r) == 0 for r in rows)
    # on a gold tie the scripted judge says "A" in both orders: a disagreement, counted as a tie
    assert summary["order_disagreements"] == gold_ties == summary["win_rate_output_2"]["ties"]
    assert summary["prompt_tokens"] > 0 and summary["completion_tokens"] == 48
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 48 and {json.loads(x)["unit"] for x in lines} == {"ab", "ba"}
    assert (tmp_path / "out" / "summary.png").stat().st_size > 0


def test_gold_judge_labels_without_a_server(tmp_path):
    samples = write_samples(tmp_path / "s.jsonl", 20)
    summary = label([samples], tmp_path / "out", "--judge", "gold:toy")
    rows = json.loads((tmp_path / "out" / "annotations.json").read_text())
    assert all(r["preference"] == 1.5 + 0.5 * gold_sign(r) for r in rows)
    assert summary["win_rate_output_2"]["n"] == 20 and summary["cost_usd"] == 0


@pytest.mark.slow
def test_faults_are_retried_and_permanent_failures_listed(tmp_path):
    samples = write_samples(tmp_path / "s.jsonl", 5)
    broken = next(json.loads(x)["instruction"] for x in open(samples))
    faults = ["429date", "429ms", "500", "hang", "close", "garbage", "empty"]
    with running_server({"judge": toy_judge()}, faults=faults, fail_always=broken,
                        hang_s=2.0) as (srv, url):
        summary = label([samples], tmp_path / "out",
                        *llm_args(url, "--max-attempts", "8", "--timeout", "0.5"))
    # 4 good pairs x 2 orders met every fault once, then an answer; the broken pair's 2 orders
    # got 8 x 500 each and were given up
    assert srv.faults_served == {"429date": 8, "429ms": 8, "500": 8 + 16, "hang": 8, "close": 8,
                                 "garbage": 8, "empty": 8}
    assert summary["this_run"] == {"done": 8, "failed": 2, "retries": 8 * 7 + 2 * 7}
    # the backoff here is at most 0.05 s: the 8 good units waited the servers' Retry-After,
    # an HTTP date 2 s ahead (in whole seconds) and then retry-after-ms: 300
    assert sum(t[1] - t[0] > 0.9 and t[2] - t[1] >= 0.29 for t in srv.request_times.values()) == 8
    rows = json.loads((tmp_path / "out" / "annotations.json").read_text())
    failed = [r for r in rows if r["preference"] is None]
    assert [r["instruction"] for r in failed] == [broken]  # never guessed
    assert all(gold_sign(r) * (r["preference"] - 1.5) > 0 or gold_sign(r) == 0
               for r in rows if r["preference"] is not None)
    assert [f["pair_id"] for f in summary["failed_items"]] == [failed[0]["pair_id"]]
    assert "HTTP 500" in summary["failed_items"][0]["last_error"]
    assert summary["win_rate_output_2"]["failed"] == 1
    keys = [json.loads(x)["key"] for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 10  # no duplicate, none missing


def test_failed_units_stay_failed_until_retried(tmp_path):
    samples = write_samples(tmp_path / "s.jsonl", 3)
    with running_server({"judge": toy_judge()}, faults=["429", "500", "close", "garbage"]) as (_, url):
        summary = tmp_path / "out" / "summary.json"
        # every pair failed: exit non-zero, no all-null annotations.json, and no NaN in the JSON
        with pytest.raises(SystemExit, match="all 3 pairs failed, nothing was labelled"):
            label([samples], tmp_path / "out", *llm_args(url, "--max-attempts", "3"))
        first = json.loads(summary.read_text())  # strict JSON: a NaN would not parse back as None
        assert first["this_run"]["failed"] == 6 and first["win_rate_output_2"]["failed"] == 3
        assert first["win_rate_output_2"]["win_rate"] is None and "NaN" not in summary.read_text()
        assert not (tmp_path / "out" / "annotations.json").exists()
        with pytest.raises(SystemExit, match="all 3 pairs failed"):
            label([samples], tmp_path / "out", *llm_args(url, "--max-attempts", "3"))
        assert json.loads(summary.read_text())["this_run"] == {"done": 0, "failed": 0, "retries": 0}
        retried = label([samples], tmp_path / "out", *llm_args(url, "--max-attempts", "3",
                                                                "--retry-failed"))
    assert retried["this_run"]["done"] == 6 and retried["win_rate_output_2"]["n"] == 3
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == 12  # append-only


def test_mean_rule_recombines_judged_orders_without_asking_again(tmp_path):
    """--orders-disagree mean (balanced position calibration) reads the judged results again:
    a position-biased pair is decided by its mean, with no request (the endpoint is gone)."""
    samples = write_samples(tmp_path / "s.jsonl", 4)
    with running_server({"judge": toy_judge()}) as (_, url):
        label([samples], tmp_path / "out", *llm_args(url, "--verdict", "logprobs"))
    results = tmp_path / "out" / "results.jsonl"
    records = [json.loads(x) for x in results.read_text().splitlines()]
    pair = records[0]["pair"]
    for r in records:  # a judge biased to the first answer, a little surer of output_2 there
        if r["pair"] == pair:
            r["p_output_2"] = 0.3 if r["unit"] == "ab" else 0.8
    results.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = {}
    for rule in ("tie", "mean"):
        summary = label([samples], tmp_path / "out", *llm_args(url, "--verdict", "logprobs",
                                                                "--orders-disagree", rule))
        assert summary["this_run"] == {"done": 0, "failed": 0, "retries": 0}
        annotations = json.loads((tmp_path / "out" / "annotations.json").read_text())
        rows[rule] = {r["pair_id"]: r for r in annotations}
    assert rows["tie"][pair]["preference"] == 1.5
    assert rows["mean"][pair]["preference"] == pytest.approx(1.55)
    assert rows["tie"][pair]["order_disagreement"] and rows["mean"][pair]["order_disagreement"]
    others = [p for p in rows["tie"] if p != pair]
    assert [rows["tie"][p]["preference"] for p in others] == \
        [rows["mean"][p]["preference"] for p in others]


def test_unmatched_prompts_are_reported_not_silently_matched(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    rows = [json.loads(x) for x in open(write_samples(tmp_path / "s.jsonl", 6))]
    a.write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    b.write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    with pytest.raises(ValueError, match="1 only in the first, 1 only in the second"):
        label([a, b], tmp_path / "out", "--judge", "gold:toy")
    summary = label([a, b], tmp_path / "out", "--judge", "gold:toy", "--allow-unmatched")
    assert summary["pairs"] == 4 and summary["unmatched_prompts"]["only_in_first"] == 1


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_loses_duplicates_and_relabels_nothing(tmp_path):
    samples = write_samples(tmp_path / "s.jsonl", 20)
    results = tmp_path / "out" / "results.jsonl"
    with running_server({"judge": toy_judge()}, delay_s=0.1) as (srv, url):
        cmd = [sys.executable, str(ROOT / "scripts" / "label_ai_preferences.py"), "--samples",
               str(samples), "--out-dir", str(tmp_path / "out"), *llm_args(url)]
        cmd[cmd.index("--concurrency") + 1] = "2"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while len(_lines(results)) < 10 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        time.sleep(0.3)  # let the killed run's in-flight requests reach the server's counter
        before = _lines(results)
        assert 10 <= len(before) < 40, "the kill must land mid-run"
        requests_before = sum(srv.requests_per_body.values())
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        after = _lines(results)
        requests = sum(srv.requests_per_body.values())
    assert f"{len(before)} already in" in done.stdout and f"{40 - len(before)} to do" in done.stdout
    assert after[:len(before)] == before                       # nothing lost or rewritten
    keys = [json.loads(x)["key"] for x in after]
    assert len(after) == 40 and len(set(keys)) == 40          # nothing duplicated
    assert requests - requests_before == 40 - len(before)     # nothing relabelled
    assert all(json.loads(x)["status"] == "ok" for x in after)
    assert sum(r["preference"] is not None
               for r in json.loads((tmp_path / "out" / "annotations.json").read_text())) == 20


@pytest.mark.slow
def test_reward_model_checkpoint_labels_by_its_scores(tmp_path, train_run):
    from harness.models.reward_model import RewardFunction
    run_dir = train_run(tmp_path, "loss=reward", "n_examples=32", "n_eval_examples=16")
    samples = write_samples(tmp_path / "s.jsonl", 8)
    label([samples], tmp_path / "out", "--judge", f"reward_model:{run_dir}")
    rows = json.loads((tmp_path / "out" / "annotations.json").read_text())
    fn = RewardFunction(run_dir)
    for row in rows:
        r1, r2 = fn([prompt_of(row["instruction"])] * 2, [" " + row["output_1"], " " + row["output_2"]])
        assert row["preference"] == (2.0 if r2 > r1 else 1.0 if r1 > r2 else 1.5)
        assert row["annotator"] == f"reward_model:{run_dir}"


def test_api_key_comes_from_the_environment_and_is_never_written(tmp_path, monkeypatch):
    secret = "sk-test-4f9a0c7e-never-write-me"
    samples = write_samples(tmp_path / "s.jsonl", 3)
    with running_server({"judge": toy_judge()}, api_key=secret) as (_, url):
        monkeypatch.setenv("MY_JUDGE_KEY", secret)
        ok = label([samples], tmp_path / "ok", *llm_args(url, "--api-key-env", "MY_JUDGE_KEY"))
        monkeypatch.setenv("MY_JUDGE_KEY", "sk-wrong")
        with pytest.raises(SystemExit, match="HTTP 401"):  # every request failed
            label([samples], tmp_path / "bad", *llm_args(url, "--api-key-env", "MY_JUDGE_KEY"))
        bad = json.loads((tmp_path / "bad" / "summary.json").read_text())
    assert ok["win_rate_output_2"]["n"] == 3
    # 401 is not retried: another attempt cannot fix a wrong key
    assert bad["this_run"] == {"done": 0, "failed": 6, "retries": 0}
    assert "HTTP 401" in bad["failed_items"][0]["last_error"]
    for path in [*(tmp_path / "ok").iterdir(), *(tmp_path / "bad").iterdir()]:
        assert secret.encode() not in path.read_bytes()
    monkeypatch.delenv("MY_JUDGE_KEY")
    with pytest.raises(ValueError, match="MY_JUDGE_KEY is not set"):
        label([samples], tmp_path / "x", *llm_args("http://127.0.0.1:9/v1", "--api-key-env",
                                                     "MY_JUDGE_KEY"))
