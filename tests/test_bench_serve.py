"""scripts/bench/bench_serve.py prints one JSON line per server: resets, latency, the labeller."""

import json

import pytest


@pytest.mark.slow
def test_bench_serve_prints_resets_latency_and_the_labeller(tmp_path, run_bench):
    [row] = run_bench(tmp_path, "--clients", "8", "--per-client", "2", "--rounds", "1",
                      "--labeller", "4", script="bench_serve.py")
    assert row["server"] == "ours" and row["requests"] == 16
    assert row["resets"] == 0 and row["non_200"] == 0
    assert 0 < row["p50_ms"] <= row["p95_ms"] and row["answers_per_s"] > 0
    assert (row["labeller_requests"], row["labeller_done"], row["labeller_failed"]) == (8, 8, 0)
    json.dumps(row)
