"""Judges and teachers talk to OpenAI-compatible endpoints (a hosted API, Azure OpenAI, vLLM,
scripts/serve.py) through the official `openai` package.

The SDK does the HTTP: connection reuse, proxies (HTTPS_PROXY / HTTP_PROXY / NO_PROXY), TLS
(SSL_CERT_FILE), timeouts, the organisation / project / custom headers, Azure's api-key header
and ?api-version=. The retries stay ours (the SDK runs with max_retries=0) because the labeller
promises more than the SDK's retries give: it retries 429 / 408 / 5xx, timeouts, dropped
connections and unusable ("garbage") answers, honours Retry-After in every form (seconds, an
HTTP date, retry-after-ms) however long it is (the SDK gives up on a Retry-After over two
minutes and never retries a garbage answer), and after `max_attempts` raises `GaveUp` with every
attempt's error: the item is then listed as failed, never guessed. Other 4xx are the caller's
mistake and fail at once.

Secrets: the key comes from an environment variable (`api_key_from_env`), goes only into the
SDK's Authorization / api-key header, and is registered with harness.feedback.redaction: every
response body and error text is redacted before it is parsed, stored, printed or truncated.
"""

import email.utils
import json
import os
import random
import threading
import time
import urllib.parse
from dataclasses import dataclass

from harness.feedback.redaction import redact, register_secret

TOKEN_LIMIT_PARAMS = ("auto", "max_tokens", "max_completion_tokens")


class RetryableError(Exception):
    """A failure worth another attempt (rate limit, server error, timeout, garbage)."""
    retry_after: float | None = None


class PermanentError(Exception):
    """A failure another attempt cannot fix (bad request, unknown model, auth)."""
    status: int | None = None


class GaveUp(Exception):
    def __init__(self, errors: list[str]):
        errors = [redact(e) for e in errors]
        super().__init__(f"gave up after {len(errors)} attempts: {errors[-1]}")
        self.errors = errors


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    timeout: float = 60.0        # seconds per request (connect + read)
    backoff_base: float = 1.0    # first retry waits up to this long, then doubling
    backoff_max: float = 60.0    # cap of our own backoff (a server's Retry-After is not capped)

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        """Full-jitter exponential backoff, or the server's Retry-After when that is longer."""
        cap = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        return max(rng.uniform(0, cap), retry_after or 0.0)


def parse_retry_after(headers, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` as seconds or an HTTP date
    (RFC 9110); None when absent or unreadable. A date in the past means 0."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            if name == "retry-after-ms":
                continue
            try:
                date = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError, IndexError):
                return None
            seconds = date.timestamp() - (time.time() if now is None else now)
        if seconds != seconds or seconds == float("inf"):  # NaN or inf: unreadable
            return None
        return max(0.0, seconds)
    return None


def api_key_from_env(name: str | None) -> str | None:
    """The key in environment variable `name` (None: no key, e.g. a local server). The value
    is registered for redaction."""
    if not name:
        return None
    key = os.environ.get(name)
    if key is None:
        raise ValueError(f"environment variable {name} is not set: export it, or pass "
                         "--api-key-env '' for a server that needs no key")
    register_secret(key)
    return key


def parse_headers(specs) -> dict[str, str]:
    """Extra headers from NAME=VALUE strings; VALUE `env:VAR` reads the value from the
    environment (and redacts it like a key): secrets never go on a command line or in a config."""
    headers = {}
    for spec in specs or ():
        name, sep, value = str(spec).partition("=")
        if not sep or not name.strip():
            raise ValueError(f"header {spec!r}: expected NAME=VALUE or NAME=env:VARIABLE")
        if value.startswith("env:"):
            value = api_key_from_env(value[4:])
        headers[name.strip()] = value
    return headers


class OpenAIClient:
    """One endpoint, one SDK client (its connection pool shared by the labeller's threads)."""

    def __init__(self, base_url: str, api_key: str | None = None,
                 policy: RetryPolicy = RetryPolicy(), seed: int = 0, *,
                 organization: str | None = None, project: str | None = None,
                 headers: dict | None = None, api_version: str | None = None,
                 token_limit: str = "auto"):
        import openai
        url = urllib.parse.urlsplit(base_url.rstrip("/"))
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"base URL {base_url!r} must look like http://127.0.0.1:8000/v1")
        if token_limit not in TOKEN_LIMIT_PARAMS:
            raise ValueError(f"token limit parameter {token_limit!r}: one of {TOKEN_LIMIT_PARAMS}")
        register_secret(api_key)
        self.base_url, self.policy, self.azure = base_url.rstrip("/"), policy, bool(api_version)
        self._rng, self._lock = random.Random(seed), threading.Lock()
        # auto: max_tokens until the endpoint refuses it, then max_completion_tokens (chat)
        self.token_limit = token_limit
        common = dict(api_key=api_key or "EMPTY", organization=organization, project=project,
                      default_headers=headers or None, timeout=policy.timeout, max_retries=0)
        if self.azure:  # api-key header, /openai/deployments/{model}/..., ?api-version=
            self._sdk = openai.AzureOpenAI(azure_endpoint=self.base_url, api_version=api_version,
                                           **common)
        else:
            self._sdk = openai.OpenAI(base_url=self.base_url, **common)

    def __repr__(self):  # never show the key
        return f"OpenAIClient({self.base_url!r}{', azure' if self.azure else ''})"

    def _request(self, call) -> dict:
        """One HTTP exchange through the SDK: the answer as a dict (its text redacted), or
        RetryableError / PermanentError with a readable, redacted reason."""
        import openai
        try:
            raw = call().http_response
        except openai.APIStatusError as e:
            text = redact(e.response.text or "")[:300]
            status = e.status_code
            if status in (408, 429) or status >= 500:
                err = RetryableError(f"HTTP {status}: {text}")
                err.retry_after = parse_retry_after(e.response.headers)
                raise err from None
            err = PermanentError(f"HTTP {status}: {text}")
            err.status = status
            raise err from None
        except openai.APITimeoutError:
            raise RetryableError(f"timed out after {self.policy.timeout}s") from None
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            raise RetryableError(redact(f"connection failed: {type(cause).__name__}: {cause}")) \
                from None
        except openai.OpenAIError as e:
            raise PermanentError(redact(f"{type(e).__name__}: {e}")) from None
        text = redact(raw.text)
        try:
            return json.loads(text)
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
                errors.append(redact(str(e)))
                if attempt == self.policy.max_attempts:
                    break
                with self._lock:
                    wait = self.policy.delay(attempt, e.retry_after, self._rng)
                if on_retry:
                    on_retry(attempt, errors[-1], wait)
                time.sleep(wait)
        raise GaveUp(errors)

    def chat(self, model: str, messages: list[dict], **params) -> dict:
        if "max_tokens" in params and self.token_limit == "max_completion_tokens":
            params["max_completion_tokens"] = params.pop("max_tokens")
        create = self._sdk.chat.completions.with_raw_response.create
        try:
            return self._request(lambda: create(model=model, messages=messages, **params))
        except PermanentError as e:
            # newer hosted models refuse max_tokens: "Use 'max_completion_tokens' instead"
            if not (self.token_limit == "auto" and e.status == 400 and "max_tokens" in params
                    and "max_completion_tokens" in str(e)):
                raise
        with self._lock:
            self.token_limit = "max_completion_tokens"
        return self.chat(model, messages, **params)

    def completion(self, model: str, prompt: str, **params) -> dict:
        create = self._sdk.completions.with_raw_response.create
        return self._request(lambda: create(model=model, prompt=prompt, **params))

    def models(self) -> dict:
        return self._request(self._sdk.models.with_raw_response.list)


def choice_of(answer: dict) -> dict:
    """The first choice of a completion answer, or RetryableError when the answer is malformed."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise RetryableError(f"garbage answer (no choices): {str(answer)[:100]!r}")
    return choices[0]


def usage_of(answer: dict) -> tuple[int, int]:
    usage = answer.get("usage") or {}
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


# ---------------------------------------------------------------- command line

def add_client_args(parser, timeout: float = 60.0):
    """The endpoint flags every OpenAI-client script shares (the URL and model flags are the
    script's own)."""
    parser.add_argument("--api-key-env", default=None,
                        help="environment variable holding the API key (default: OPENAI_API_KEY "
                             "when set, else no key); a variable named here must be set")
    parser.add_argument("--organization", help="OpenAI organization id (default $OPENAI_ORG_ID)")
    parser.add_argument("--project", help="OpenAI project id (default $OPENAI_PROJECT_ID)")
    parser.add_argument("--header", action="append", metavar="NAME=VALUE",
                        help="extra HTTP header (repeatable); VALUE env:VAR reads it from the "
                             "environment")
    parser.add_argument("--api-version", help="Azure OpenAI: its api-version (the base URL is "
                        "the resource endpoint, the model the deployment name, the key goes in "
                        "the api-key header)")
    parser.add_argument("--token-limit-param", choices=TOKEN_LIMIT_PARAMS, default="auto",
                        help="chat: send the length limit as max_tokens or max_completion_tokens "
                             "(auto: max_tokens, switching when the endpoint refuses it)")
    parser.add_argument("--max-attempts", type=int, default=5, help="then the item is marked failed")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds per request")
    parser.add_argument("--backoff", type=float, default=1.0, help="first retry waits up to this (s)")
    parser.add_argument("--backoff-max", type=float, default=60.0,
                        help="cap of the backoff between retries (a server's Retry-After is "
                             "honoured in full)")


def default_key_env(args):
    if args.api_key_env is None and "OPENAI_API_KEY" in os.environ:
        args.api_key_env = "OPENAI_API_KEY"


def client_from_args(args, base_url: str) -> OpenAIClient:
    return OpenAIClient(base_url, api_key_from_env(args.api_key_env),
                        RetryPolicy(args.max_attempts, args.timeout, args.backoff, args.backoff_max),
                        organization=args.organization, project=args.project,
                        headers=parse_headers(args.header), api_version=args.api_version,
                        token_limit=args.token_limit_param)
