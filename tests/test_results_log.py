"""The append-only results log: torn tails, foreign configurations, superseded failures."""

import json

import pytest

from harness.feedback.openai_client import GaveUp, OpenAIClient, PermanentError, RetryableError, RetryPolicy
from harness.feedback.results_log import ResultsLog


def test_torn_tail_is_dropped_and_later_records_win(tmp_path):
    path = tmp_path / "r.jsonl"
    with ResultsLog(str(path), "fp") as log:
        log.append("a", "failed", errors=["HTTP 500"])
        log.append("b", "ok", p=1.0)
    with open(path, "a") as f:
        f.write('{"key": "c", "status": "o')  # a write cut short by SIGKILL
    with ResultsLog(str(path), "fp") as log:
        assert set(log.records) == {"a", "b"} and log.done("a") and not log.done("a", retry_failed=True)
        log.append("a", "ok", p=0.0)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["key"] for r in lines] == ["a", "b", "a"]  # append-only: history kept
    assert ResultsLog(str(path), "fp").records["a"]["status"] == "ok"


def test_a_log_from_another_configuration_is_refused(tmp_path):
    path = tmp_path / "r.jsonl"
    ResultsLog(str(path), "judge-1").append("a", "ok")
    with pytest.raises(ValueError, match="line 1 was written under a different configuration"):
        ResultsLog(str(path), "judge-2")
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        ResultsLog(str(path), "judge-1")


def test_retry_policy_counts_attempts_and_stops_on_permanent_errors():
    client = OpenAIClient("http://127.0.0.1:9/v1", policy=RetryPolicy(3, 1.0, 0.0, 0.0))
    calls = []

    def flaky(_):
        calls.append(1)
        if len(calls) < 3:
            raise RetryableError(f"HTTP 500 #{len(calls)}")
        return "ok"
    assert client.call(flaky) == ("ok", 3)
    with pytest.raises(GaveUp) as info:
        client.call(lambda _: (_ for _ in ()).throw(RetryableError("HTTP 429")))
    assert info.value.errors == ["HTTP 429"] * 3
    calls.clear()

    def bad(_):
        calls.append(1)
        raise PermanentError("HTTP 400: bad")
    with pytest.raises(GaveUp, match="HTTP 400"):
        client.call(bad)
    assert len(calls) == 1
    with pytest.raises(ValueError, match="must look like"):
        OpenAIClient("localhost:8000")
    assert "Bearer" not in repr(OpenAIClient("http://127.0.0.1:1/v1", api_key="sk-x"))


def test_backoff_is_jittered_exponential_and_honours_retry_after():
    import random
    policy, rng = RetryPolicy(backoff_base=1.0, backoff_max=10.0), random.Random(0)
    for attempt, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 10.0)]:
        waits = [policy.delay(attempt, None, rng) for _ in range(200)]
        assert 0 <= min(waits) and max(waits) <= cap and max(waits) > cap / 2
    assert policy.delay(1, 7.0, rng) == 7.0      # a server's Retry-After wins over jitter
    assert policy.delay(1, 99.0, rng) == 99.0    # in full: it is the server's word, not ours
