"""The engine behind scripts/serve.py: OpenAI request validation, batched generation, answers.

    backend = ModelBackend("policy", *load_checkpoint(path))   # any checkpoint form
    backend = ScriptedJudge("judge", get_gold_reward("toy"), load_template("toy"))
    batcher = Batcher(max_batch=16, wait_s=0.01)                # one model thread, many clients
    answer = handle_completions(body, backends, batcher, chat=True)

Validation raises `HttpError(status, message)`; the HTTP layer turns it into a 4xx JSON error.
Concurrent requests are queued and the batcher runs them together: requests with equal
sampling settings share one generate() call. Log-probs are those of the model's own
distribution (temperature 1, no top_p), as vLLM reports them by default.
"""

import math
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from harness.data.chat import render_messages
from harness.data.dialogue import human_prompt

MAX_N, MAX_TOP_LOGPROBS, MAX_STOP = 16, 20, 4
UNSUPPORTED = {"stream": False, "best_of": 1, "presence_penalty": 0,
               "frequency_penalty": 0, "logit_bias": None, "suffix": None}


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


# ---------------------------------------------------------------- validation

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


def parse_params(body: dict, chat: bool, max_new_tokens: int) -> Params:
    for key, default in UNSUPPORTED.items():
        if body.get(key, default) not in (default, None):
            raise HttpError(400, f"'{key}'={body[key]!r} is not supported by this server", key)
    if chat:
        if not isinstance(body.get("logprobs", False), bool):
            raise HttpError(400, "'logprobs' must be true or false for chat completions", "logprobs")
        top = _number(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
        if "top_logprobs" in body and not body.get("logprobs"):
            raise HttpError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        top_logprobs = top if body.get("logprobs") else None
    else:
        top_logprobs = _number(body, "logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
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
        seed=_number(body, "seed", None, -2**63, 2**63 - 1, integer=True), echo=echo)


def parse_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise HttpError(400, "'messages' must be a non-empty list of {role, content}", "messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or \
                not isinstance(m.get("content"), str):
            raise HttpError(400, f"messages[{i}] must be {{'role': system|user|assistant, "
                                 f"'content': string}}", "messages")
    return messages


def parse_prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise HttpError(400, "'prompt' must be a string or a non-empty list of strings "
                             "(token-id prompts are not supported; lm-eval: tokenized_requests="
                             "False)", "prompt")
    return prompts


# ---------------------------------------------------------------- backends

def _cut_at_stop(text: str, stop) -> tuple[str, bool]:
    cuts = [text.index(s) for s in stop if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


class ModelBackend:
    """A causal LM checkpoint served for completions and chat."""
    batched = True

    def __init__(self, name: str, model, tokenizer, max_new_tokens: int = 512,
                 sampling: dict | None = None):
        self.name, self.model, self.tok, self.max_new_tokens = name, model, tokenizer, max_new_tokens
        # SamplingConfig fields fixed for every request: the speed levers (serve.py --static-cache)
        self.sampling = sampling or {}
        limits = [getattr(model.config, "max_position_embeddings", None),
                  tokenizer.model_max_length if tokenizer.model_max_length < 10**9 else None]
        self.context = min(x for x in limits if x) if any(limits) else 2048

    def chat_prompt(self, messages):
        """The text the model continues, rendered as in training (harness/data/chat.py): the
        chat template the checkpoint was trained with, else the dialogue format."""
        return render_messages(self.tok, messages)

    def check_length(self, prompts, params: Params):
        for i, p in enumerate(prompts):
            n = len(self.tok(p, add_special_tokens=False)["input_ids"])
            if n + params.max_tokens > self.context:
                raise HttpError(400, f"prompt {i} has {n} tokens; with max_tokens="
                                     f"{params.max_tokens} that exceeds the context length "
                                     f"{self.context} of model {self.name!r}", "max_tokens")

    def generate(self, prompts: list[str], params: Params) -> list[dict]:
        from harness.models.generation import SamplingConfig, encode_completions, sample
        if params.max_tokens == 0:  # echo only: the prompt's log-probs, nothing generated
            samples = encode_completions(self.tok, prompts, [""] * len(prompts), append_eos=False,
                                         render=False)
        else:
            cfg = SamplingConfig(max_new_tokens=params.max_tokens, temperature=params.temperature,
                                 top_p=params.top_p if params.top_p > 0 else 1e-6,
                                 batch_size=len(prompts), seed=params.seed if params.seed is not
                                 None else int.from_bytes(uuid.uuid4().bytes[:4], "big"),
                                 **self.sampling)
            # requests are final text: chat ones rendered by chat_prompt, completions raw
            samples = sample(self.model, self.tok, prompts, cfg, progress=False, render=False)
        outs = []
        for s in samples:
            text, stopped = _cut_at_stop(s.completion, params.stop)
            out = {"text": s.prompt + text if params.echo else text,
                   "finish_reason": "stop" if s.finished or stopped else "length",
                   "prompt_tokens": len(s.prompt_ids), "completion_tokens": len(s.completion_ids)}
            if params.top_logprobs is not None:
                out["logprobs"] = self._logprobs(s, params.top_logprobs, len(text), params.echo)
            outs.append(out)
        return outs

    @torch.no_grad()
    def _logprobs(self, s, k: int, text_len: int, echo: bool) -> list[dict]:
        """Per token: its text, log-prob and the k most likely alternatives. Completion tokens
        after a stop string are dropped; with echo the prompt's tokens come first (the very
        first has no log-prob: None, as in OpenAI's schema)."""
        ids = list(s.prompt_ids + s.completion_ids)
        logps = self.model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
        top = logps.topk(k, dim=-1) if k else None
        n_prompt = len(s.prompt_ids)

        def row(pos):  # the token at position pos, predicted from position pos - 1
            token = self.tok.decode([ids[pos]])
            if pos == 0:
                return {"token": token, "logprob": None, "top_logprobs": None}
            alts = [] if top is None else [
                {"token": self.tok.decode([int(t)]), "logprob": float(v)}
                for v, t in zip(top.values[pos - 1], top.indices[pos - 1])]
            return {"token": token, "logprob": float(logps[pos - 1, ids[pos]]), "top_logprobs": alts}

        rows = [row(pos) for pos in range(n_prompt)] if echo else []
        length = 0
        for pos in range(n_prompt, len(ids)):
            if length >= text_len and pos > n_prompt:
                break
            rows.append(row(pos))
            length += len(rows[-1]["token"])
        return rows


class ScriptedJudge:
    """A judge "model" that reads judge prompts made from `template` and answers from a gold
    reward: P(B) = sigmoid((r_B - r_A) / temperature), answering the likelier letter (A on an
    exact tie, a position bias the labeller's two orders turn into a tie). It gives the toy task
    a meaningful LLM-judge endpoint (the tiny model cannot judge); prompts it cannot parse get
    an unusable answer, as from a confused LLM. Token counts are whitespace words."""
    batched = False

    def __init__(self, name, reward, template, temperature: float = 0.1):
        self.name, self.reward, self.template, self.temperature = name, reward, template, temperature

    def chat_prompt(self, messages):
        return messages[-1]["content"]

    def check_length(self, prompts, params):
        pass

    def _answer(self, prompt: str, params: Params) -> dict:
        parts = self.template.parse_user(prompt)
        usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": 1}
        if parts is None:
            return {"text": "I cannot tell which is better.", "finish_reason": "stop", **usage,
                    "logprobs": [{"token": "I", "logprob": 0.0, "top_logprobs": []}]}
        request = human_prompt(parts["instruction"])
        r_a, r_b = (self.reward(request, " " + parts[k]) for k in ("output_a", "output_b"))
        z = max(-50.0, min(50.0, (r_b - r_a) / self.temperature))
        p_b = 1 / (1 + math.exp(-z))
        a, b = self.template.answers
        letter = b if p_b > 0.5 else a
        alts = [{"token": a, "logprob": math.log(max(1 - p_b, 1e-30))},
                {"token": b, "logprob": math.log(max(p_b, 1e-30))}]
        alts.sort(key=lambda x: -x["logprob"])
        chosen = alts[0]["logprob"] if alts[0]["token"] == letter else alts[1]["logprob"]
        return {"text": letter, "finish_reason": "stop", **usage,
                "logprobs": [{"token": letter, "logprob": chosen,
                              "top_logprobs": alts[:params.top_logprobs or 0]}]}

    def generate(self, prompts, params):
        return [self._answer(p, params) for p in prompts]


# ---------------------------------------------------------------- batching

class Batcher:
    """One thread runs the model; request threads enqueue work and wait on a Future. Work that
    arrives within `wait_s` of the first item is batched with it (up to `max_batch` prompts);
    prompts with the same settings run in one generate() call."""

    def __init__(self, max_batch: int = 16, wait_s: float = 0.01):
        self.max_batch, self.wait_s = max_batch, wait_s
        self.queue: queue.Queue = queue.Queue()
        self.batches_run, self.largest_batch = 0, 0
        threading.Thread(target=self._loop, daemon=True, name="batcher").start()

    def submit(self, backend, prompts, params) -> Future:
        future = Future()
        self.queue.put((backend, prompts, params, future))
        return future

    def close(self):
        self.queue.put(None)  # the model thread finishes the work before it, then exits

    def _collect(self) -> list | None:
        first = self.queue.get()
        if first is None:
            return None
        items = [first]
        deadline = time.monotonic() + self.wait_s
        while sum(len(i[1]) for i in items) < self.max_batch:
            try:
                item = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self.queue.put(None)  # stop after this batch
                break
            items.append(item)
        return items

    def _loop(self):
        while (items := self._collect()) is not None:
            groups = {}
            for item in items:
                groups.setdefault((id(item[0]), item[2]), []).append(item)
            for (_, params), group in groups.items():
                prompts = [p for item in group for p in item[1]]
                self.batches_run += 1
                self.largest_batch = max(self.largest_batch, len(prompts))
                try:
                    outs = group[0][0].generate(prompts, params)
                except Exception as e:  # noqa: BLE001 - report to every waiting request
                    for item in group:
                        item[3].set_exception(e)
                    continue
                for item in group:
                    item[3].set_result(outs[:len(item[1])])
                    outs = outs[len(item[1]):]
