"""A small client for OpenAI-compatible endpoints (a hosted API, vLLM, scripts/serve.py).

Stdlib only (http.client): the labeller needs exact control over what counts as a retryable
failure, and the tests drive it against a local fault-injecting server. Retries with
exponential backoff and full jitter on 429, 5xx, timeouts, dropped connections and unusable
("garbage") answers; other 4xx are the caller's mistake and fail at once. After
`max_attempts` the call raises `GaveUp` with every attempt's error: the item is marked failed,
never guessed. The API key is read from an environment variable by name and only ever placed
in the Authorization header; it never appears in errors, logs or files.
"""

import http.client
import json
import os
import random
import socket
import time
import urllib.parse
from dataclasses import dataclass


class RetryableError(Exception):
    """A failure worth another attempt (rate limit, server error, timeout, garbage)."""


class PermanentError(Exception):
    """A failure another attempt cannot fix (bad request, unknown model, auth)."""


class GaveUp(Exception):
    def __init__(self, errors: list[str]):
        super().__init__(f"gave up after {len(errors)} attempts: {errors[-1]}")
        self.errors = errors


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    timeout: float = 60.0        # seconds per request (connect + read)
    backoff_base: float = 1.0    # first retry waits up to this long, then doubling
    backoff_max: float = 60.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Full-jitter exponential backoff; a server's Retry-After is honoured (capped)."""
        cap = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        wait = rng.uniform(0, cap)
        return min(self.backoff_max, max(wait, retry_after or 0.0))


def api_key_from_env(name: str | None) -> str | None:
    """The key in environment variable `name` (None: no key, e.g. a local server)."""
    if not name:
        return None
    key = os.environ.get(name)
    if key is None:
        raise ValueError(f"environment variable {name} is not set: export it, or pass "
                         "--api-key-env '' for a server that needs no key")
    return key


class OpenAIClient:
    def __init__(self, base_url: str, api_key: str | None = None,
                 policy: RetryPolicy = RetryPolicy(), seed: int = 0):
        url = urllib.parse.urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base URL {base_url!r} must look like http://127.0.0.1:8000/v1")
        self.base_url, self._url, self.policy = base_url.rstrip("/"), url, policy
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._rng = random.Random(seed)

    def __repr__(self):  # never show the key
        return f"OpenAIClient({self.base_url!r})"

    def _connection(self):
        cls = http.client.HTTPSConnection if self._url.scheme == "https" else http.client.HTTPConnection
        return cls(self._url.hostname, self._url.port, timeout=self.policy.timeout)

    def request_once(self, method: str, path: str, body: dict | None = None) -> dict:
        """One HTTP exchange; raises RetryableError / PermanentError with a readable reason."""
        conn = self._connection()
        try:
            data = None if body is None else json.dumps(body).encode("utf-8")
            conn.request(method, self._url.path + path, body=data, headers=self._headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (socket.timeout, TimeoutError) as e:
            raise RetryableError(f"timed out after {self.policy.timeout}s ({e})") from None
        except (ConnectionError, http.client.HTTPException, OSError) as e:
            raise RetryableError(f"connection failed: {type(e).__name__}: {e}") from None
        finally:
            conn.close()
        text = raw[:300].decode("utf-8", "replace")
        if resp.status == 429 or resp.status >= 500 or resp.status == 408:
            err = RetryableError(f"HTTP {resp.status}: {text}")
            err.retry_after = _retry_after(resp.getheader("Retry-After"))
            raise err
        if resp.status >= 400:
            raise PermanentError(f"HTTP {resp.status}: {text}")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RetryableError(f"garbage answer (not JSON): {text[:100]!r}") from None

    def call(self, fn, on_retry=None):
        """Run `fn(self)` (a request plus parsing of its answer) with retries; returns
        (its result, the number of attempts it took).

        `fn` raises RetryableError for an unusable answer (e.g. no verdict in the text)."""
        errors = []
        for attempt in range(1, self.policy.max_attempts + 1):
            try:
                return fn(self), attempt
            except PermanentError as e:
                raise GaveUp(errors + [str(e)]) from None
            except RetryableError as e:
                errors.append(str(e))
                if attempt == self.policy.max_attempts:
                    break
                wait = self.policy.delay(attempt, getattr(e, "retry_after", None), self._rng)
                if on_retry:
                    on_retry(attempt, str(e), wait)
                time.sleep(wait)
        raise GaveUp(errors)

    def chat(self, model: str, messages: list[dict], **params) -> dict:
        return self.request_once("POST", "/chat/completions",
                                 {"model": model, "messages": messages, **params})

    def completion(self, model: str, prompt: str, **params) -> dict:
        return self.request_once("POST", "/completions", {"model": model, "prompt": prompt, **params})

    def models(self) -> dict:
        return self.request_once("GET", "/models")


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def choice_of(answer: dict) -> dict:
    """The first choice of a completion answer, or RetryableError when the answer is malformed."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise RetryableError(f"garbage answer (no choices): {str(answer)[:100]!r}")
    return choices[0]


def usage_of(answer: dict) -> tuple[int, int]:
    usage = answer.get("usage") or {}
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
