"""Concurrency benchmark of scripts/serve.py: many clients at once, resets and latency.

    python scripts/bench/bench_serve.py                          # ours: 64 clients x 5 requests
    python scripts/bench/bench_serve.py --peer-ref 74f0bb1       # and the server of that commit
    python scripts/bench/bench_serve.py --model --max-tokens 8 --clients 32
    python scripts/bench/bench_serve.py --peer-ref 74f0bb1 --labeller 80   # + the labeller at 64

Each server runs as `python serve.py --gold-judge judge=toy --judge-template toy` (the
scripted judge: the HTTP layer is what is measured; --model serves the bundled tiny model
instead) on a free loopback port. `clients` threads are released together and each sends `per_client` chat requests, every
one on a fresh TCP connection (the hardest case for a listen backlog: a client library that
keeps connections alive only connects once). One JSON line per server to stdout: requests,
resets (connection refused / reset / dropped before an answer), non-200 answers, p50 / p95
latency in ms (of the answered requests), wall time and answers per second; the peer's line
(a commit's scripts/serve.py, checked out with `git archive`, e.g. the stdlib server this
one replaced) adds the ratios. --labeller N also runs scripts/label_ai_preferences.py (this
tree's, the official client's connection pool) on N toy pairs (2N requests) at --concurrency
`clients` against each server: its retries and failures. Requests stay on 127.0.0.1 and end by
themselves.
"""

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BODY = {"model": "judge", "messages": [{"role": "user", "content": "Which is better? A or B"}],
        "max_tokens": 1}


def concurrent_requests(url: str, clients: int, per_client: int, body: dict = BODY,
                        timeout: float = 60.0) -> dict:
    """`clients` threads released at once, each making `per_client` requests on fresh
    connections: resets, non-200 answers and latency percentiles (ms)."""
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    data = json.dumps(body).encode()
    latencies, resets, bad, lock = [], [], [], threading.Lock()
    barrier = threading.Barrier(clients)

    def client():
        barrier.wait()
        for _ in range(per_client):
            start = time.perf_counter()
            conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
            try:
                conn.request("POST", "/v1/chat/completions", data,
                             {"Content-Type": "application/json"})
                resp = conn.getresponse()
                resp.read()
                with lock:
                    (latencies if resp.status == 200 else bad).append(
                        time.perf_counter() - start if resp.status == 200 else resp.status)
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                with lock:
                    resets.append(f"{type(e).__name__}: {e}")
            finally:
                conn.close()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    pct = lambda q: round(1000 * latencies[int(q * (len(latencies) - 1))], 1) if latencies else None  # noqa: E731
    return {"requests": clients * per_client, "resets": len(resets), "non_200": len(bad),
            "reset_errors": sorted(set(resets))[:3], "p50_ms": pct(0.5), "p95_ms": pct(0.95),
            "mean_ms": round(1000 * statistics.mean(latencies), 1) if latencies else None,
            "wall_s": round(wall, 3), "answers_per_s": round(len(latencies) / wall, 1)}


def start_server(script: Path, model: bool, threads: int = 1) -> tuple[subprocess.Popen, str]:
    backend = ["--model", f"judge={REPO / 'assets' / 'tiny_model'}"] if model else \
        ["--gold-judge", "judge=toy", "--judge-template", "toy"]
    proc = subprocess.Popen([sys.executable, str(script), *backend, "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    line = proc.stdout.readline()
    if " at http://" not in line:
        proc.kill()
        raise RuntimeError(f"{script} did not start: {line!r}")
    return proc, line.rsplit(" at ", 1)[1].strip()


def checkout(ref: str, into: Path) -> Path:
    """scripts/serve.py of commit `ref`, with the tree it imports."""
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref], capture_output=True,
                             check=True).stdout
    with tempfile.NamedTemporaryFile(suffix=".tar") as f:
        f.write(archive)
        f.flush()
        with tarfile.open(f.name) as tar:
            tar.extractall(into, filter="data")
    return into / "scripts" / "serve.py"


def run_labeller(url: str, pairs: int, concurrency: int) -> dict:
    """The labeller on `pairs` toy pairs against the served scripted judge: retries, failures."""
    sys.path.insert(0, str(REPO / "scripts"))
    sys.path.insert(0, str(REPO))
    import contextlib
    import io
    import label_ai_preferences
    from harness.data.toy_task import toy_records
    from harness.feedback.sample_files import sample_row
    with tempfile.TemporaryDirectory() as tmp:
        samples = Path(tmp) / "s.jsonl"
        samples.write_text("".join(json.dumps(sample_row(p, r["responses"], "toy", {})) + "\n"
                                   for p, r in toy_records("train", pairs).items()))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            summary = label_ai_preferences.main([
                "--samples", str(samples), "--out-dir", f"{tmp}/out", "--judge", "llm",
                "--judge-base-url", url, "--judge-model", "judge", "--template", "toy",
                "--concurrency", str(concurrency), "--backoff", "0.1"])
    return {"labeller_requests": 2 * pairs, **{f"labeller_{k}": v
                                               for k, v in summary["this_run"].items()}}


def measure(name: str, script: Path, args) -> dict:
    proc, url = start_server(script, args.model, args.threads)
    try:
        body = dict(BODY, max_tokens=args.max_tokens)
        concurrent_requests(url, min(args.clients, 4), 1, body)  # warm-up
        rounds = [concurrent_requests(url, args.clients, args.per_client, body)
                  for _ in range(args.rounds)]
        labeller = run_labeller(url, args.labeller, args.clients) if args.labeller else {}
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    total = {k: sum(r[k] for r in rounds) for k in ("requests", "resets", "non_200")}
    return {"server": name, "script": str(script.relative_to(script.parents[1])),
            "clients": args.clients, "per_client": args.per_client, "rounds": args.rounds,
            "backend": "tiny model" if args.model else "scripted judge", **total,
            "p50_ms": statistics.median(r["p50_ms"] for r in rounds if r["p50_ms"] is not None),
            "p95_ms": statistics.median(r["p95_ms"] for r in rounds if r["p95_ms"] is not None),
            "answers_per_s": statistics.median(r["answers_per_s"] for r in rounds),
            "reset_errors": sorted({e for r in rounds for e in r["reset_errors"]})[:3], **labeller}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--per-client", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="medians over this many rounds")
    p.add_argument("--model", action="store_true", help="serve the bundled tiny model")
    p.add_argument("--max-tokens", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    p.add_argument("--peer-ref", help="also measure scripts/serve.py of this git commit")
    p.add_argument("--labeller", type=int, default=0, metavar="N_PAIRS",
                   help="also run the labeller on N toy pairs at --concurrency CLIENTS")
    args = p.parse_args(argv)
    rows = [measure("ours", REPO / "scripts" / "serve.py", args)]
    print(json.dumps(rows[0]), flush=True)
    if args.peer_ref:
        with tempfile.TemporaryDirectory() as tmp:
            peer = measure(f"peer@{args.peer_ref}", checkout(args.peer_ref, Path(tmp)), args)
        peer["vs_ours"] = {"p50_ratio": round(peer["p50_ms"] / rows[0]["p50_ms"], 2),
                           "p95_ratio": round(peer["p95_ms"] / rows[0]["p95_ms"], 2)}
        print(json.dumps(peer), flush=True)
        rows.append(peer)
    return rows


if __name__ == "__main__":
    main()
