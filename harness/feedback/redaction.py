"""Keep secrets out of everything the harness writes: errors, stored answers, logs, run dirs.

A key is read from the environment (openai_client.api_key_from_env), which registers it here;
`redact(text)` then replaces every registered secret, and any value of an Authorization,
Proxy-Authorization, api-key or x-api-key header or a `Bearer ...` token (known or not: a proxy
may add its own), with [REDACTED]. The client redacts each response body and error text before
anything else sees it, and before any truncation (a cut key would leak its prefix).
"""

import re
import threading

REDACTED = "[REDACTED]"
_SECRETS: set[str] = set()
_LOCK = threading.Lock()
# a header name, then its value as it shows in an echoed header dump, JSON or a Python repr
_HEADER = re.compile(r"(?i)\b((?:proxy-)?authorization|x-api-key|api-key|api_key)(['\"]?\s*[:=]\s*['\"]?)"
                     r"((?:bearer|basic|token)\s+)?+(?!\[REDACTED\])[^\s'\",;}\]]+")
_BEARER = re.compile(r"(?i)\b(bearer)\s+(?!\[REDACTED\])[A-Za-z0-9._~+/=-]+")


def register_secret(value: str | None):
    """Redact `value` from every text that passes through `redact` from now on."""
    if value and len(value) >= 4:  # a 1-3 character "secret" would redact ordinary text
        with _LOCK:
            _SECRETS.add(value)


def redact(text: str, extra: tuple[str, ...] = ()) -> str:
    """`text` with every registered secret (and `extra`), header credential and bearer token
    replaced by [REDACTED]."""
    if not isinstance(text, str) or not text:
        return text
    with _LOCK:
        secrets = sorted(_SECRETS | {s for s in extra if s and len(s) >= 4}, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    text = _BEARER.sub(lambda m: f"{m.group(1)} {REDACTED}", text)
    return _HEADER.sub(lambda m: m.group(1) + m.group(2) + (m.group(3) or "") + REDACTED, text)


def redact_tree(value):
    """`redact` applied to every string in a JSON-like value (dicts, lists, strings)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_tree(v) for v in value]
    return value
