"""Start scripts/serve.py's server in-process on 127.0.0.1:0 (real HTTP, uvicorn in a thread)."""

import contextlib
import importlib.util
import json
import threading
import urllib.error
import urllib.request
from pathlib import Path

from harness.feedback.judges import load_template
from harness.feedback.serving import Batcher, ScriptedJudge
from harness.data.gold import get_gold_reward

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("serve", ROOT / "scripts" / "serve.py")
serve = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(serve)


def write_samples(path: Path, n: int, split="train") -> Path:
    """A one-file sample set: the toy task's two base responses per prompt."""
    from harness.data.toy_task import toy_records
    from harness.feedback.sample_files import sample_row
    with open(path, "w") as f:
        for prompt, rec in toy_records(split, n).items():
            f.write(json.dumps(sample_row(prompt, rec["responses"], "toy-base", {})) + "\n")
    return path


def toy_judge(name="judge"):
    return ScriptedJudge(name, get_gold_reward("toy"), load_template("toy"))


@contextlib.contextmanager
def running_server(backends: dict, **kwargs):
    """Yield (the server's state, base_url) of a server on a free loopback port; shut it down
    after. The state has the backends, the batcher and the fault counters."""
    state = serve.ServerState(backends, Batcher(kwargs.pop("max_batch", 16),
                                                kwargs.pop("wait_s", 0.05)), **kwargs)
    server = serve.Server("127.0.0.1", 0, state, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.address[1]}/v1"
    finally:
        server.shutdown()
        thread.join(timeout=30)
        state.batcher.close()


def http(url: str, body=None, raw: bytes | None = None, method=None):
    """(status, parsed JSON) of one request; error statuses are returned, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())
