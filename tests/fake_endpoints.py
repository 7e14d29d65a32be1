"""Endpoints we cannot reach from a test, simulated on loopback: a hosted API with its own
habits (Azure's paths and api-key header, a model that refuses max_tokens, a server that echoes
request headers into its answers) and an HTTP forward proxy. Stdlib HTTP/1.1 with keep-alive;
every request is recorded (method, path with query, headers, JSON body, client port)."""

import contextlib
import http.client
import json
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def chat_answer(text: str) -> dict:
    return {"id": "chatcmpl-x", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop", "logprobs": None}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _handle(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        request = {"method": self.command, "path": self.path, "headers": dict(self.headers),
                   "body": json.loads(raw) if raw else None, "port": self.client_address[1]}
        with self.server.lock:
            self.server.requests.append(request)
        status, payload, headers = self.server.answer(request)
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _handle


@contextlib.contextmanager
def fake_endpoint(answer):
    """Yield (server, root URL) of a loopback server answering `answer(request) -> (status,
    JSON or bytes, headers)`; server.requests lists what it received."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads, server.answer = True, answer
    server.requests, server.lock = [], threading.Lock()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _Proxy(BaseHTTPRequestHandler):
    """A forward proxy: requests arrive with absolute URIs (http://any-host/path) and are
    relayed to the one upstream it was made for."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def _relay(self):
        url = urllib.parse.urlsplit(self.path)
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() not in ("host", "proxy-connection", "connection")}
        with self.server.lock:
            self.server.relayed.append(f"{self.command} {url.netloc}{url.path}")
        up = http.client.HTTPConnection(*self.server.upstream, timeout=60)
        try:
            up.request(self.command, url.path + (f"?{url.query}" if url.query else ""), raw,
                       headers)
            resp = up.getresponse()
            data = resp.read()
        finally:
            up.close()
        self.send_response(resp.status)
        for key, value in resp.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _relay


@contextlib.contextmanager
def forward_proxy(upstream_url: str):
    """Yield (proxy, proxy URL) relaying every request to `upstream_url`'s host and port;
    proxy.relayed lists 'METHOD host/path' of what went through."""
    target = urllib.parse.urlsplit(upstream_url)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    server.daemon_threads, server.upstream = True, (target.hostname, target.port)
    server.relayed, server.lock = [], threading.Lock()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
