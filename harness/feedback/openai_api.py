"""The OpenAI API as scripts/serve.py speaks it: request validation and the answer shapes.

    params = parse_params(body, chat=True, max_new_tokens=512)   # HttpError(400) when invalid
    messages = parse_messages(body)     # developer -> system, text content parts joined
    prompts = parse_prompts(body)       # /v1/completions: a string or a list of strings

What the server cannot do is refused with a 400 naming the key (tools, response_format other
than text, logit_bias, penalties, best_of, suffix, logprobs while streaming), never ignored.
"""

from dataclasses import dataclass, replace

MAX_N, MAX_TOP_LOGPROBS, MAX_STOP = 16, 20, 4
# keys the server refuses unless they hold the value that means "not used"
UNSUPPORTED = {"best_of": 1, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": None,
               "suffix": None, "tools": None, "tool_choice": None, "functions": None,
               "function_call": None, "parallel_tool_calls": None, "audio": None,
               "prediction": None}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class HttpError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.status}}


@dataclass(frozen=True)
class Params:
    max_tokens: int
    temperature: float
    top_p: float
    n: int
    top_logprobs: int | None  # None: no logprobs
    stop: tuple[str, ...]
    seed: int | None
    echo: bool = False  # completions: return the prompt too (with its log-probs): lm-eval
    stream: bool = False
    include_usage: bool = False  # stream: a last chunk with the usage (stream_options)

    def batch_key(self) -> "Params":
        """What a batch of requests must share to run in one generate() call: seeds (keyed
        per row) and the streaming flags may differ."""
        return replace(self, seed=None, n=1, stream=False, include_usage=False)


def _number(body, key, default, lo, hi, integer=False):
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and not float(value).is_integer()):
        raise HttpError(400, f"'{key}' must be {'an integer' if integer else 'a number'}, "
                             f"got {value!r}", key)
    if not lo <= value <= hi:
        raise HttpError(400, f"'{key}' must be in [{lo}, {hi}], got {value}", key)
    return int(value) if integer else float(value)


def _refuse_unsupported(body: dict):
    for key, default in UNSUPPORTED.items():
        if body.get(key, default) not in (default, None, [], {}):
            raise HttpError(400, f"'{key}' is not supported by this server (got "
                                 f"{str(body[key])[:80]})", key)
    fmt = body.get("response_format")
    if fmt not in (None, {"type": "text"}):
        raise HttpError(400, "'response_format' other than {'type': 'text'} is not supported by "
                             "this server (no JSON mode or structured outputs)", "response_format")


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise HttpError(400, "'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or
                                not isinstance(options.get("include_usage", False), bool)):
        raise HttpError(400, "'stream_options' must be {'include_usage': bool} and needs "
                             "'stream': true", "stream_options")
    return bool(stream), bool((options or {}).get("include_usage"))


def _logprobs(body: dict, chat: bool) -> int | None:
    if chat:
        if not isinstance(body.get("logprobs", False), bool) and body.get("logprobs") is not None:
            raise HttpError(400, "'logprobs' must be true or false for chat completions", "logprobs")
        top = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
        if body.get("top_logprobs") is not None and not body.get("logprobs"):
            raise HttpError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        return top if body.get("logprobs") else None
    return _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)


def parse_params(body: dict, chat: bool, max_new_tokens: int) -> Params:
    _refuse_unsupported(body)
    stream, include_usage = _stream_flags(body)
    top_logprobs = _logprobs(body, chat)
    if stream and top_logprobs is not None:
        raise HttpError(400, "'logprobs' with 'stream': true is not supported by this server; "
                             "ask without streaming", "logprobs")
    echo = body.get("echo", False)
    if chat and "echo" in body or not isinstance(echo, bool):
        raise HttpError(400, "'echo' must be true or false, and only for /v1/completions", "echo")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP or \
            not all(isinstance(s, str) and s for s in stop):
        raise HttpError(400, f"'stop' must be a string or a list of up to {MAX_STOP} non-empty "
                             "strings", "stop")
    max_key = "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens"
    return Params(  # max_tokens=0 only with echo: score the prompt, generate nothing
        max_tokens=_number(body, max_key, min(256, max_new_tokens), 0 if echo else 1,
                           max_new_tokens, True),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0), n=_number(body, "n", 1, 1, MAX_N, True),
        top_logprobs=top_logprobs, stop=tuple(stop),
        seed=_number(body, "seed", None, -2**63, 2**63 - 1, integer=True), echo=echo,
        stream=stream, include_usage=include_usage)


def _content_text(content, i: int) -> str:
    """A message's text: a string, or a list of text parts (joined by newlines, as vLLM does)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or \
                    not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise HttpError(400, f"messages[{i}].content: only text parts "
                                     f"({{'type': 'text', 'text': ...}}) are supported, got "
                                     f"{kind!r}", "messages")
            texts.append(part["text"])
        return "\n".join(texts)
    raise HttpError(400, f"messages[{i}].content must be a string or a non-empty list of text "
                         "parts", "messages")


def parse_messages(body: dict) -> list[dict]:
    """[{role, content}] with the developer role as system and content parts as text."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise HttpError(400, f"messages[{i}] must be {{'role': system|developer|user|"
                                 f"assistant, 'content': ...}} (tool messages are not "
                                 f"supported)", "messages")
        out.append({"role": ROLES[m["role"]], "content": _content_text(m.get("content"), i)})
    return out


def parse_prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise HttpError(400, "'prompt' must be a string or a non-empty list of strings "
                             "(token-id prompts are not supported; lm-eval: tokenized_requests="
                             "False)", "prompt")
    empty = [i for i, p in enumerate(prompts) if not p]
    if empty:
        raise HttpError(400, f"prompt {empty[0]} is empty: a completion needs a prompt", "prompt")
    return prompts


# ---------------------------------------------------------------- answers

def chat_logprobs(rows):
    return {"content": [{"token": r["token"], "logprob": r["logprob"],
                         "bytes": list(r["token"].encode("utf-8")),
                         "top_logprobs": [{**a, "bytes": list(a["token"].encode("utf-8"))}
                                          for a in r["top_logprobs"]]} for r in rows]}


def completion_logprobs(rows):
    offsets, pos = [], 0
    for r in rows:
        offsets.append(pos)
        pos += len(r["token"])
    return {"tokens": [r["token"] for r in rows], "token_logprobs": [r["logprob"] for r in rows],
            "top_logprobs": [None if r["top_logprobs"] is None else
                             {a["token"]: a["logprob"] for a in r["top_logprobs"]} for r in rows],
            "text_offset": offsets}


def usage(outs: list[dict], n: int) -> dict:
    prompt_tokens = sum(o["prompt_tokens"] for o in outs[::n])
    completion_tokens = sum(o["completion_tokens"] for o in outs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def answer(head: dict, outs: list[dict], params: Params, chat: bool) -> dict:
    """The whole (non-streamed) answer: `head` holds id, object, created and model."""
    choices = []
    for i, out in enumerate(outs):
        choice = {"index": i, "finish_reason": out["finish_reason"], "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": out["text"]}
            if params.top_logprobs is not None:
                choice["logprobs"] = chat_logprobs(out["logprobs"])
        else:
            choice["text"] = out["text"]
            if params.top_logprobs is not None:
                choice["logprobs"] = completion_logprobs(out["logprobs"])
        choices.append(choice)
    return {**head, "choices": choices, "usage": usage(outs, params.n)}


def chunk(head: dict, index: int, chat: bool, text: str | None = None,
          finish_reason: str | None = None, first: bool = False, with_usage: bool = False) -> dict:
    """One server-sent event of a streamed answer (`head` with the chunk object name)."""
    if chat:
        delta = {"role": "assistant", "content": ""} if first else \
            ({} if text is None else {"content": text})
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None,
                  "finish_reason": finish_reason}
    return {**head, "choices": [choice], **({"usage": None} if with_usage else {})}
