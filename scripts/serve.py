"""An OpenAI-compatible HTTP server over local checkpoints (and scripted judges for tests/demos).

    python scripts/serve.py --model policy=RUN/LATEST/policy.pt --port 8000
    python scripts/serve.py --model sft=RUN_A --model dpo=/models/exported-hf-dir --port 8000
    python scripts/serve.py --gold-judge judge=toy --judge-template toy --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -d '{"model": "policy", "messages": [...]}'

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (with logprobs /
top_logprobs), GET /health. A checkpoint is anything harness.models.generation.load_checkpoint takes:
a policy.pt (base model from its run's config.yaml or --base-model), a checkpoint or run dir,
or a Hugging Face model dir. Chat prompts use the tokenizer's chat template when it has one,
else the harness dialogue format ("\\n\\nHuman: ...\\n\\nAssistant:"). Concurrent requests are
batched on one model thread. Bad input gets a 4xx JSON error with a message, never a crash.

Why the standard library (http.server.ThreadingHTTPServer): no new dependency, real HTTP/1.1
with keep-alive, a thread per connection, and the model runs on one batching thread anyway,
so an async stack would buy nothing on CPU. For GPU throughput serve the exported model with
vLLM instead, which exposes the same API: `vllm serve OUT_DIR --served-model-name policy`.

--faults (testing only) makes the server misbehave on purpose: each distinct request body
gets the listed faults on its 1st, 2nd, ... attempt (429, 500, hang, close, garbage, empty),
then a normal answer; --fail-always SUBSTR answers 500 forever to bodies containing SUBSTR.
"""

import argparse
import hashlib
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.models.generation import add_speed_args, speed_options  # noqa: E402
from harness.feedback.openai_client import api_key_from_env  # noqa: E402
from harness.feedback.serving import (Batcher, HttpError, ModelBackend, ScriptedJudge,  # noqa: E402
                             parse_messages, parse_params, parse_prompts)

MAX_BODY = 16 * 2**20
FAULTS = ("429", "500", "hang", "close", "garbage", "empty")


# ---------------------------------------------------------------- OpenAI answers

def _chat_logprobs(rows):
    return {"content": [{"token": r["token"], "logprob": r["logprob"],
                         "bytes": list(r["token"].encode("utf-8")),
                         "top_logprobs": [{**a, "bytes": list(a["token"].encode("utf-8"))}
                                          for a in r["top_logprobs"]]} for r in rows]}


def _completion_logprobs(rows):
    offsets, pos = [], 0
    for r in rows:
        offsets.append(pos)
        pos += len(r["token"])
    return {"tokens": [r["token"] for r in rows], "token_logprobs": [r["logprob"] for r in rows],
            "top_logprobs": [None if r["top_logprobs"] is None else
                             {a["token"]: a["logprob"] for a in r["top_logprobs"]} for r in rows],
            "text_offset": offsets}


def handle_completion(server, body: dict, chat: bool) -> dict:
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str):
        raise HttpError(400, "'model' is required (GET /v1/models lists them)", "model")
    backend = server.backends.get(name)
    if backend is None:
        raise HttpError(404, f"model {name!r} not found; available: {sorted(server.backends)}",
                        "model")
    params = parse_params(body, chat, server.max_new_tokens)
    prompts = [backend.chat_prompt(parse_messages(body))] if chat else parse_prompts(body)
    backend.check_length(prompts, params)
    expanded = [p for p in prompts for _ in range(params.n)]
    if backend.batched:
        outs = server.batcher.submit(backend, expanded, params).result()
    else:
        outs = backend.generate(expanded, params)
    choices = []
    for i, out in enumerate(outs):
        choice = {"index": i, "finish_reason": out["finish_reason"], "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": out["text"]}
            if params.top_logprobs is not None:
                choice["logprobs"] = _chat_logprobs(out["logprobs"])
        else:
            choice["text"] = out["text"]
            if params.top_logprobs is not None:
                choice["logprobs"] = _completion_logprobs(out["logprobs"])
        choices.append(choice)
    prompt_tokens = sum(o["prompt_tokens"] for o in outs[::params.n])
    completion_tokens = sum(o["completion_tokens"] for o in outs)
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


# ---------------------------------------------------------------- HTTP

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every answer carries Content-Length

    def log_message(self, fmt, *args):  # one line per request, never headers (API keys)
        if not self.server.quiet:
            sys.stderr.write(f"{self.address_string()} {fmt % args}\n")

    def _send(self, status: int, payload, headers=()):
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._send(200, {"object": "list", "data": [
                {"id": name, "object": "model", "created": self.server.started, "owned_by": "local"}
                for name in sorted(self.server.backends)]})
        elif self.path == "/health":
            self._send(200, {"status": "ok"})
        else:
            self._send(404, HttpError(404, f"no route GET {self.path}").body())

    def do_POST(self):
        try:
            self._post()
        except (BrokenPipeError, ConnectionResetError):  # the client left before its answer
            self.close_connection = True

    def _post(self):
        routes = {"/v1/completions": False, "/v1/chat/completions": True}
        try:
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self.close_connection = True
                raise HttpError(413, f"request body of {length} bytes exceeds {MAX_BODY}")
            raw = self.rfile.read(length)
            if self.server.api_key and self.headers.get("Authorization") != f"Bearer {self.server.api_key}":
                raise HttpError(401, "missing or wrong API key (Authorization: Bearer ...)")
            if self.path.rstrip("/") not in routes:
                raise HttpError(404, f"no route POST {self.path}; use {sorted(routes)}")
            if self.server.inject_fault(raw, self):
                return
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise HttpError(400, f"malformed JSON body: {e}") from None
            self._send(200, handle_completion(self.server, body, routes[self.path.rstrip("/")]))
        except HttpError as e:
            self._send(e.status, e.body())
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception as e:  # noqa: BLE001 - a bug or OOM answers 500, the server lives on
            self._send(500, HttpError(500, f"internal error: {type(e).__name__}: {e}").body())


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, backends: dict, batcher: Batcher, max_new_tokens: int = 512,
                 faults=(), fail_always=None, hang_s: float = 30.0, delay_s: float = 0.0,
                 quiet: bool = False, api_key: str | None = None):
        super().__init__(address, Handler)
        self.backends, self.batcher, self.max_new_tokens = backends, batcher, max_new_tokens
        self.faults, self.fail_always, self.hang_s, self.delay_s = list(faults), fail_always, hang_s, delay_s
        self.quiet, self.started, self.api_key = quiet, int(time.time()), api_key
        self.requests_per_body: dict[str, int] = {}
        self._lock = threading.Lock()
        self.faults_served: dict[str, int] = {}

    def inject_fault(self, raw: bytes, handler: Handler) -> bool:
        """Misbehave as configured; True when the request was answered (or dropped) here."""
        key = hashlib.sha256(raw).hexdigest()
        with self._lock:  # requests per distinct body: also lets tests count relabelling
            attempt = self.requests_per_body.get(key, 0)
            self.requests_per_body[key] = attempt + 1
        if self.delay_s:
            time.sleep(self.delay_s)
        fault = None
        if self.fail_always and self.fail_always.encode("utf-8") in raw:
            fault = "500"
        elif attempt < len(self.faults):
            fault = self.faults[attempt]
        if fault is None:
            return False
        with self._lock:
            self.faults_served[fault] = self.faults_served.get(fault, 0) + 1
        if fault in ("429", "500"):
            handler._send(int(fault), HttpError(int(fault), f"injected fault {fault}").body(),
                          [("Retry-After", "0")] if fault == "429" else [])
        elif fault == "garbage":
            handler._send(200, b"<html>upstream overloaded</html>")
        elif fault == "empty":
            handler._send(200, {"id": "x", "choices": []})
        else:  # hang, close: no answer at all
            if fault == "hang":
                time.sleep(self.hang_s)
            handler.close_connection = True
        return True


# ---------------------------------------------------------------- CLI

def _named(value: str, flag: str) -> tuple[str, str]:
    name, sep, target = value.partition("=")
    if not sep or not name or not target:
        raise SystemExit(f"{flag} {value!r}: expected NAME=VALUE")
    return name, target


def build_backends(args) -> dict:
    backends = {}
    for spec in args.model or []:
        from harness.models.modeling import load_checkpoint
        name, path = _named(spec, "--model")
        model, tok = load_checkpoint(path, base_model=args.base_model, dtype=args.dtype,
                                     device=args.device)
        backends[name] = ModelBackend(name, model, tok, args.max_new_tokens, speed_options(args))
    for spec in args.gold_judge or []:
        from harness.feedback.judges import load_template
        from harness.data.gold import get_gold_reward
        name, reward = _named(spec, "--gold-judge")
        backends[name] = ScriptedJudge(name, get_gold_reward(reward),
                                       load_template(args.judge_template), args.judge_temperature)
    if not backends:
        raise SystemExit("nothing to serve: pass --model NAME=CHECKPOINT and/or --gold-judge NAME=REWARD")
    return backends


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", metavar="NAME=CHECKPOINT", help="serve a checkpoint")
    p.add_argument("--base-model", help="base model for a policy.pt without a run config.yaml")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--gold-judge", action="append", metavar="NAME=REWARD",
                   help="serve a scripted judge answering from a registered gold reward")
    p.add_argument("--judge-template", default="default", help="template the scripted judge reads")
    p.add_argument("--judge-temperature", type=float, default=0.1)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000, help="0 = any free port (printed)")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-ms", type=float, default=10.0)
    p.add_argument("--max-new-tokens", type=int, default=512, help="upper bound for max_tokens")
    add_speed_args(p)  # how a batch of requests is generated (docs/performance.md)
    p.add_argument("--faults", default="", help=f"testing: comma list of {FAULTS}")
    p.add_argument("--fail-always", help="testing: 500 for request bodies containing this")
    p.add_argument("--hang-seconds", type=float, default=30.0)
    p.add_argument("--delay", type=float, default=0.0, help="testing: seconds before every answer")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--api-key-env", help="require the key in this environment variable (401 otherwise)")
    args = p.parse_args(argv)
    faults = [f for f in args.faults.split(",") if f]
    if any(f not in FAULTS for f in faults):
        p.error(f"--faults {args.faults!r}: each must be one of {FAULTS}")
    args.faults = faults
    return args


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def main(argv=None):
    args = parse_args(argv)
    backends = build_backends(args)
    server = Server((args.host, args.port), backends,
                    Batcher(args.max_batch_size, args.batch_wait_ms / 1000), args.max_new_tokens,
                    args.faults, args.fail_always, args.hang_seconds, args.delay, args.quiet,
                    api_key_from_env(args.api_key_env))
    host, port = server.server_address[:2]
    # the exact line tests and scripts wait for: the base URL, once the socket is listening
    print(f"serving {sorted(backends)} at http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.batcher.close()


if __name__ == "__main__":
    main()
