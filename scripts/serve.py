"""An OpenAI-compatible HTTP server over local checkpoints (and scripted judges for tests/demos).

    python scripts/serve.py --model policy=RUN/LATEST/policy.pt --port 8000
    python scripts/serve.py --model sft=RUN_A --model dpo=/models/exported-hf-dir --port 8000
    python scripts/serve.py --gold-judge judge=toy --judge-template toy --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -d '{"model": "policy", "messages": [...]}'

Endpoints: GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST /v1/chat/completions
(n, logprobs / top_logprobs, echo, stop strings, seeds, streaming as server-sent events with
the usage in a last chunk when stream_options asks), GET /health. A checkpoint is anything
harness.models.modeling.load_checkpoint takes: a policy.pt (base model from its run's
config.yaml or --base-model), a checkpoint or run dir, or a Hugging Face model dir. Chat
prompts use the tokenizer's chat template when it has one, else the harness dialogue format
("\\n\\nHuman: ...\\n\\nAssistant:"). Concurrent requests are batched on one model thread
(harness/feedback/serving.py, the engine); what the server cannot do (tools, response_format,
penalties, ...) gets a 400 naming the key, other bad input a 4xx JSON error, never a crash.

Why Starlette on uvicorn: it is the ASGI stack vLLM's OpenAI server runs on (FastAPI is
Starlette plus pydantic request models, which our own validation makes unnecessary). One event
loop holds every connection (a listen backlog of 2048: 64 and more clients connect at once
without resets), streams server-sent events, notices clients that leave (their rows stop
generating) and shuts down gracefully; the model still runs on one batching thread.
scripts/bench/bench_serve.py measures it against the stdlib server it replaced. For GPU
throughput serve the exported model with vLLM instead, which exposes the same API:
`vllm serve OUT_DIR --served-model-name policy`.

--faults (testing only) makes the server misbehave on purpose: each distinct request body
gets the listed faults on its 1st, 2nd, ... attempt (429 with Retry-After 0, 429date with an
HTTP-date Retry-After 2 s ahead, 429ms with retry-after-ms 300, 500, hang, close, garbage,
empty), then a normal answer; --fail-always SUBSTR answers 500 forever to bodies containing it.
"""

import argparse
import asyncio
import email.utils
import hashlib
import json
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.feedback.openai_api import HttpError, answer, chunk, usage  # noqa: E402
from harness.feedback.openai_client import api_key_from_env  # noqa: E402
from harness.feedback.serving import Batcher, ModelBackend, ScriptedJudge, Sink, prepare  # noqa: E402
from harness.models.generation import add_speed_args, speed_options  # noqa: E402

MAX_BODY = 16 * 2**20
BACKLOG = 2048
FAULTS = ("429", "429date", "429ms", "500", "hang", "close", "garbage", "empty")


class ServerState:
    """What the routes share: the backends, the batcher, the key, and the fault injector with
    its counters (tests read requests_per_body, request_times, faults_served)."""

    def __init__(self, backends: dict, batcher: Batcher, max_new_tokens: int = 512, faults=(),
                 fail_always=None, hang_s: float = 30.0, delay_s: float = 0.0,
                 api_key: str | None = None):
        self.backends, self.batcher, self.max_new_tokens = backends, batcher, max_new_tokens
        self.faults, self.fail_always, self.hang_s, self.delay_s = list(faults), fail_always, hang_s, delay_s
        self.api_key, self.started = api_key, int(time.time())
        self.requests_per_body: dict[str, int] = {}
        self.request_times: dict[str, list[float]] = {}
        self.faults_served: dict[str, int] = {}
        self._lock = threading.Lock()

    def authorized(self, headers) -> bool:
        if not self.api_key:
            return True
        return headers.get("authorization") == f"Bearer {self.api_key}" or \
            headers.get("api-key") == self.api_key

    async def inject_fault(self, raw: bytes):
        """A Response that misbehaves as configured, or None to answer normally."""
        key = hashlib.sha256(raw).hexdigest()
        with self._lock:  # requests per distinct body: also lets tests count relabelling
            attempt = self.requests_per_body.get(key, 0)
            self.requests_per_body[key] = attempt + 1
            self.request_times.setdefault(key, []).append(time.monotonic())
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        fault = None
        if self.fail_always and self.fail_always.encode("utf-8") in raw:
            fault = "500"
        elif attempt < len(self.faults):
            fault = self.faults[attempt]
        if fault is None:
            return None
        with self._lock:
            self.faults_served[fault] = self.faults_served.get(fault, 0) + 1
        return await fault_response(fault, self.hang_s)


async def fault_response(fault: str, hang_s: float):
    from starlette.responses import JSONResponse, Response
    if fault.startswith("429") or fault == "500":
        status = int(fault[:3])
        headers = {"429": {"Retry-After": "0"}, "429ms": {"retry-after-ms": "300"},
                   "429date": {"Retry-After": email.utils.formatdate(time.time() + 2, usegmt=True)},
                   }.get(fault, {})
        return JSONResponse(HttpError(status, f"injected fault {fault}").body(), status, headers)
    if fault == "garbage":
        return Response(b"<html>upstream overloaded</html>", 200, media_type="application/json")
    if fault == "empty":
        return JSONResponse({"id": "x", "choices": []})
    if fault == "hang":
        await asyncio.sleep(hang_s)
    return DropConnection()


class DropConnection:
    """Promise a body, send none and return: uvicorn closes the connection mid-answer, which
    the client sees as a dropped connection."""

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", b"64")]})


# ---------------------------------------------------------------- routes

def error(e: HttpError):
    from starlette.responses import JSONResponse
    return JSONResponse(e.body(), e.status)


async def generate(state: ServerState, prep, sinks=None) -> list[dict]:
    if prep.backend.batched:
        future = state.batcher.submit(prep.backend, prep.prompts, prep.params, prep.keys, sinks)
        return await asyncio.wrap_future(future)
    # a scripted judge is a few microseconds of Python: it answers on the event loop
    return prep.backend.generate(prep.prompts, prep.params, prep.keys, sinks)


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def stream(state: ServerState, prep):
    """Server-sent events: each choice's text as it is made, then its finish reason, the usage
    (stream_options.include_usage) and [DONE]. A client that leaves stops its rows."""
    loop, queue, p = asyncio.get_running_loop(), asyncio.Queue(), prep.params
    sinks = [Sink(lambda text, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, text)))
             for i in range(len(prep.prompts))]
    head, sent = prep.head(chunk=True), [prompt if p.echo else "" for prompt in prep.prompts]
    task = asyncio.ensure_future(generate(state, prep, sinks))
    task.add_done_callback(lambda _: queue.put_nowait(None))  # after every queued piece
    try:
        for i, text in enumerate(sent):
            if prep.chat or text:
                yield sse(chunk(head, i, prep.chat, text or None, first=prep.chat,
                                with_usage=p.include_usage))
        while (item := await queue.get()) is not None:
            sent[item[0]] += item[1]
            yield sse(chunk(head, item[0], prep.chat, item[1], with_usage=p.include_usage))
        try:
            outs = task.result()
        except Exception as e:  # noqa: BLE001 - the stream has started: report in it
            yield sse(HttpError(500, f"internal error: {type(e).__name__}: {e}").body())
            return
        for i, out in enumerate(outs):
            rest = out["text"][len(sent[i]):] if out["text"].startswith(sent[i]) else ""
            yield sse(chunk(head, i, prep.chat, rest or None, out["finish_reason"],
                            with_usage=p.include_usage))
        if p.include_usage:
            yield sse({**head, "choices": [], "usage": usage(outs, p.n)})
        yield "data: [DONE]\n\n"
    finally:
        if not task.done():  # the client left mid-stream: stop generating for it
            for sink in sinks:
                sink.cancelled = True


async def complete(request, chat: bool):
    from starlette.responses import JSONResponse, StreamingResponse
    state: ServerState = request.app.state.server
    try:
        length = int(request.headers.get("content-length") or 0)
        if length > MAX_BODY:
            raise HttpError(413, f"request body of {length} bytes exceeds {MAX_BODY}")
        raw = await request.body()
        if not state.authorized(request.headers):
            raise HttpError(401, "missing or wrong API key (Authorization: Bearer ... or api-key)")
        fault = await state.inject_fault(raw)
        if fault is not None:
            return fault
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise HttpError(400, f"malformed JSON body: {e}") from None
        prep = prepare(body, chat, state.backends, state.max_new_tokens)
        if prep.params.stream:
            return StreamingResponse(stream(state, prep), media_type="text/event-stream")
        return JSONResponse(answer(prep.head(), await generate(state, prep), prep.params, chat))
    except HttpError as e:
        return error(e)
    except Exception as e:  # noqa: BLE001 - a bug or OOM answers 500, the server lives on
        return error(HttpError(500, f"internal error: {type(e).__name__}: {e}"))


def model_card(state: ServerState, name: str) -> dict:
    return {"id": name, "object": "model", "created": state.started, "owned_by": "local"}


def make_app(state: ServerState):
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def models(request):
        return JSONResponse({"object": "list", "data": [model_card(state, name)
                                                         for name in sorted(state.backends)]})

    async def model(request):
        name = request.path_params["name"]
        if name not in state.backends:
            return error(HttpError(404, f"model {name!r} not found; available: "
                                        f"{sorted(state.backends)}", "model"))
        return JSONResponse(model_card(state, name))

    async def health(request):
        return JSONResponse({"status": "ok"})

    async def no_route(request, exc):
        routes = "GET /v1/models[/{id}], POST /v1/completions, POST /v1/chat/completions"
        return error(HttpError(exc.status_code, f"no route {request.method} {request.url.path}; "
                                                f"use {routes}"))

    async def chat(request):
        return await complete(request, True)

    async def completions(request):
        return await complete(request, False)

    app = Starlette(routes=[
        Route("/v1/models", models), Route("/v1/models/{name:path}", model),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]), Route("/health", health)],
        exception_handlers={404: no_route, 405: no_route})
    app.state.server = state
    return app


class Server:
    """uvicorn serving `state` on a socket bound (and listening) before it starts, so the
    printed URL is connectable at once; `serve_forever` blocks, `shutdown` ends it."""

    def __init__(self, host: str, port: int, state: ServerState, quiet: bool = False):
        import uvicorn
        self.state = state
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(BACKLOG)
        self.address = self.sock.getsockname()[:2]
        self.uvicorn = uvicorn.Server(uvicorn.Config(
            make_app(state), log_level="critical" if quiet else "info", access_log=not quiet,
            backlog=BACKLOG, lifespan="off", timeout_graceful_shutdown=2))

    def serve_forever(self):
        self.uvicorn.run(sockets=[self.sock])

    def shutdown(self):
        self.uvicorn.should_exit = True


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
    state = ServerState(build_backends(args), Batcher(args.max_batch_size, args.batch_wait_ms / 1000),
                        args.max_new_tokens, args.faults, args.fail_always, args.hang_seconds,
                        args.delay, api_key_from_env(args.api_key_env))
    server = Server(args.host, args.port, state, args.quiet)
    host, port = server.address
    # the exact line tests and scripts wait for: the base URL, once the socket is listening
    print(f"serving {sorted(state.backends)} at http://{host}:{port}/v1", flush=True)
    try:
        server.serve_forever()
    finally:
        state.batcher.close()


if __name__ == "__main__":
    main()
