"""An append-only, fsync'd JSON Lines results file that makes long labelling runs resumable.

Every finished unit of work (one judged order of one pair, one teacher completion) is one
line, written with a single write() and fsync'd before the run moves on, so a run killed at
any moment (SIGKILL included) keeps every line it finished. Reopening the file:
  - drops a torn last line (a write cut short by the kill; that unit was never acknowledged
    and is simply redone),
  - refuses lines made under another configuration (a different judge, template or model),
    since mixing them would silently blend two experiments,
  - keeps the last record per key, so a unit retried after a failure (`retry_failed`)
    supersedes its failed record without rewriting history.
"""

import hashlib
import json
import os
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from tqdm import tqdm

FAILED = "failed"


def fingerprint(config: dict) -> str:
    """A short stable hash of a JSON-able configuration: which experiment a results line
    belongs to."""
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode("utf-8")).hexdigest()[:16]


class ResultsLog:
    def __init__(self, path: str, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        self.records: dict[str, dict] = {}
        self._lock = threading.Lock()
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._load()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _load(self):
        if not os.path.exists(self.path):
            return
        with open(self.path, "rb") as f:
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]  # everything up to the last full line
        if len(complete) < len(data):
            with open(self.path, "r+b") as f:  # a torn tail from a kill mid-write
                f.truncate(len(complete))
                f.flush()
                os.fsync(f.fileno())
        for lineno, line in enumerate(complete.decode("utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path}: line {lineno} is not JSON ({err.msg}); the "
                                 "file is not a results log of this tool") from None
            if record.get("fingerprint") != self.fingerprint:
                raise ValueError(
                    f"{self.path}: line {lineno} was written under a different configuration "
                    f"(fingerprint {record.get('fingerprint')!r}, now {self.fingerprint!r}: "
                    "judge, model, template or settings changed). Use a new results file, or "
                    "the original settings to resume.")
            self.records[record["key"]] = record

    def done(self, key: str, retry_failed: bool = False) -> bool:
        record = self.records.get(key)
        return record is not None and not (retry_failed and record["status"] == FAILED)

    def append(self, key: str, status: str, **fields) -> dict:
        record = {"key": key, "status": status, "fingerprint": self.fingerprint, **fields}
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            written = os.write(self._fd, line)
            if written != len(line):  # a short write would corrupt the file: stop loudly
                raise OSError(f"{self.path}: short write ({written} of {len(line)} bytes)")
            os.fsync(self._fd)
            self.records[key] = record
        return record

    def close(self):
        os.close(self._fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_resumable(todo, work, log: ResultsLog, concurrency: int, desc: str) -> dict:
    """Run `work(payload, on_retry) -> (status, fields)` for each (key, payload) in `todo`
    on `concurrency` threads, appending each result to `log` as soon as it finishes (one writer:
    this thread). At most 2 * concurrency items are queued, so huge runs stay small in memory."""
    stats = {"done": 0, "failed": 0, "retries": 0}
    bar = tqdm(total=len(todo), desc=desc, unit="req", dynamic_ncols=True)

    def on_retry(attempt, error, wait_s):
        stats["retries"] += 1
        bar.write(f"retry {attempt} in {wait_s:.2f}s: {error[:120]}")

    pending, items = {}, iter(todo)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        while True:
            while len(pending) < 2 * concurrency:
                item = next(items, None)
                if item is None:
                    break
                pending[pool.submit(work, item[1], on_retry)] = item[0]
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                key = pending.pop(future)
                status, fields = future.result()
                log.append(key, status, **fields)
                stats["done" if status != FAILED else "failed"] += 1
                bar.update()
    bar.close()
    return stats
