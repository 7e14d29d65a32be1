"""The engine behind scripts/serve.py: prepared requests, batched generation, stop strings,
streaming and per-request seeds.

    backend = ModelBackend("policy", *load_checkpoint(path))   # any checkpoint form
    backend = ScriptedJudge("judge", get_gold_reward("toy"), load_template("toy"))
    batcher = Batcher(max_batch=16, wait_s=0.01)                # one model thread, many clients
    request = prepare(body, chat=True, backends=backends, max_new_tokens=512)
    outs = batcher.submit(request.backend, request.prompts, request.params, request.keys).result()

Validation (harness/feedback/openai_api.py) raises `HttpError`; the HTTP layer turns it into a
4xx JSON error. Concurrent requests are queued and the batcher runs them together: requests with
equal generation settings share one generate() call whatever their seeds, because sampling is
keyed per row (harness.models.generation.KeyedSampling): a choice depends on its request's seed,
its index and its prompt only, never on its batch-mates. Stop strings end a row's generation as
soon as they appear (usage counts the tokens kept); a streamed row gets its text as it is made,
holding back what could still become a stop string. Log-probs are those of the model's own
distribution (temperature 1, no top_p), as vLLM reports them by default.
"""

import hashlib
import math
import queue
import secrets
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria

from harness.data.chat import render_messages
from harness.data.dialogue import human_prompt
from harness.feedback.openai_api import (HttpError, Params, parse_messages, parse_params,
                                         parse_prompts)


def row_key(seed: int, index: int) -> int:
    """The sampling key of choice `index` of a request seeded with `seed`."""
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1  # a non-negative int64


@dataclass
class Prepared:
    """A validated request: the backend, its expanded prompts (n per prompt) and their keys."""
    name: str
    backend: object
    params: Params
    prompts: list[str]
    keys: list[int]
    chat: bool

    def head(self, chunk: bool = False) -> dict:
        kind = ("chat.completion" if self.chat else "text_completion") + \
            (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": kind, "created": self.created, "model": self.name}

    def __post_init__(self):
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())


def prepare(body, chat: bool, backends: dict, max_new_tokens: int) -> Prepared:
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str):
        raise HttpError(400, "'model' is required (GET /v1/models lists them)", "model")
    backend = backends.get(name)
    if backend is None:
        raise HttpError(404, f"model {name!r} not found; available: {sorted(backends)}", "model")
    params = parse_params(body, chat, max_new_tokens)
    # one call renders chat messages into a prompt: the backend's (the chat template's) choice
    prompts = [backend.chat_prompt(parse_messages(body))] if chat else parse_prompts(body)
    backend.check_length(prompts, params)
    seed = params.seed if params.seed is not None else secrets.randbits(63)
    expanded = [p for p in prompts for _ in range(params.n)]
    keys = [row_key(seed, i) for i in range(len(expanded))]
    return Prepared(name, backend, params, expanded, keys, chat)


# ---------------------------------------------------------------- stop strings and streaming

class Sink:
    """Where a streamed row's events go: `emit(text)` for each new piece of text; the HTTP
    layer sets `cancelled` when the client has gone (its row then stops generating)."""

    def __init__(self, emit):
        self.emit, self.cancelled = emit, False


class RowTracker:
    """Follows every row of a generate() call: stops a row at its first stop string (or when
    its client has gone) and streams the text each row may already show."""

    def __init__(self, tokenizer, stop: tuple[str, ...], sinks: list, eos: set[int]):
        self.tok, self.stop, self.sinks, self.eos = tokenizer, stop, sinks, eos
        self.kept: dict[int, int] = {}   # row -> tokens kept, for rows a stop string ended
        self.ended: set[int] = set()     # rows that generated EOS
        self.sent = [""] * len(sinks)    # text streamed so far, per row

    def text(self, ids: list[int]) -> tuple[str, int | None]:
        """The row's text, cut before its first stop string, and the stop position (or None)."""
        text = self.tok.decode([t for t in ids if t not in self.eos], skip_special_tokens=True)
        cuts = [text.index(s) for s in self.stop if s in text]
        return (text[:min(cuts)], min(cuts)) if cuts else (text, None)

    def criteria(self, rows: list[int], prompt_width: int) -> StoppingCriteria:
        tracker = self

        class Criteria(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                done = torch.zeros(len(rows), dtype=torch.bool, device=input_ids.device)
                for b, row in enumerate(rows):
                    done[b] = tracker.step(row, input_ids[b, prompt_width:].tolist())
                return done
        return Criteria()

    def step(self, row: int, ids: list[int]) -> bool:
        """After each new token: True when the row must stop."""
        if row in self.kept or row in self.ended:
            return True
        sink = self.sinks[row]
        if sink is not None and sink.cancelled:
            return True
        eos = next((i for i, t in enumerate(ids) if t in self.eos), None)
        if eos is not None:  # generate() stops it; what follows is padding
            ids = ids[:eos]
            self.ended.add(row)
        text, cut = self.text(ids)
        if cut is not None:
            self.kept[row] = len(ids)
        if sink is not None:
            self.stream(row, text if cut is not None or eos is not None else self.safe(text))
        return cut is not None

    def safe(self, text: str) -> str:
        """`text` less a tail that may still grow into a stop string or a whole character."""
        hold = max((k for s in self.stop for k in range(1, len(s))
                    if text.endswith(s[:k])), default=0)
        text = text[:len(text) - hold]
        return text.rstrip("\ufffd")  # an incomplete UTF-8 sequence, decoded so far

    def stream(self, row: int, text: str):
        if text.startswith(self.sent[row]) and len(text) > len(self.sent[row]):
            self.sinks[row].emit(text[len(self.sent[row]):])
            self.sent[row] = text


# ---------------------------------------------------------------- backends

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
            if n == 0:
                raise HttpError(400, f"prompt {i} is empty (no tokens)", "prompt")
            if n + params.max_tokens > self.context:
                raise HttpError(400, f"prompt {i} has {n} tokens; with max_tokens="
                                     f"{params.max_tokens} that exceeds the context length "
                                     f"{self.context} of model {self.name!r}", "max_tokens")

    def generate(self, prompts: list[str], params: Params, keys: list[int] | None = None,
                 sinks: list | None = None) -> list[dict]:
        from harness.models.generation import (SamplingConfig, eos_ids, encode_completions,
                                               sample)
        sinks = sinks or [None] * len(prompts)
        tracker = None
        if params.max_tokens == 0:  # echo only: the prompt's log-probs, nothing generated
            samples = encode_completions(self.tok, prompts, [""] * len(prompts), append_eos=False,
                                         render=False)
        else:
            cfg = SamplingConfig(max_new_tokens=params.max_tokens, temperature=params.temperature,
                                 top_p=params.top_p if params.top_p > 0 else 1e-6,
                                 batch_size=len(prompts), seed=0, **self.sampling)
            keyed = params.temperature > 0 and keys is not None
            if params.stop or any(s is not None for s in sinks):
                tracker = RowTracker(self.tok, params.stop, sinks, eos_ids(self.model, self.tok))
            # requests are final text: chat ones rendered by chat_prompt, completions raw
            samples = sample(self.model, self.tok, prompts, cfg, progress=False, render=False,
                             keys=keys if keyed else None,
                             stopping=tracker.criteria if tracker else None)
        return [self._out(i, s, params, tracker) for i, s in enumerate(samples)]

    def _out(self, row: int, s, params: Params, tracker) -> dict:
        ids, text, stopped = list(s.completion_ids), s.completion, False
        if tracker is not None and row in tracker.kept:  # a stop string ended it: cut there
            ids = ids[:tracker.kept[row]]
            text, stopped = tracker.text(ids)[0], True
        elif params.stop:  # (a stop string made of the last tokens before EOS / the limit)
            cuts = [text.index(x) for x in params.stop if x in text]
            text, stopped = (text[:min(cuts)], True) if cuts else (text, False)
        out = {"text": s.prompt + text if params.echo else text,
               "finish_reason": "stop" if s.finished or stopped else "length",
               "prompt_tokens": len(s.prompt_ids), "completion_tokens": len(ids)}
        if params.top_logprobs is not None:
            out["logprobs"] = self._logprobs(s.prompt_ids, ids, params.top_logprobs, len(text),
                                             params.echo)
        return out

    @torch.no_grad()
    def _logprobs(self, prompt_ids, completion_ids, k: int, text_len: int, echo: bool) -> list:
        """Per token: its text, log-prob and the k most likely alternatives. Completion tokens
        after a stop string are dropped; with echo the prompt's tokens come first (the very
        first has no log-prob: None, as in OpenAI's schema)."""
        ids = list(prompt_ids) + list(completion_ids)
        logps = self.model(input_ids=torch.tensor([ids])).logits[0, :-1].float().log_softmax(-1)
        top = logps.topk(k, dim=-1) if k else None
        n_prompt = len(prompt_ids)

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

    def generate(self, prompts, params, keys=None, sinks=None):
        return [self._answer(p, params) for p in prompts]


# ---------------------------------------------------------------- batching

class Batcher:
    """One thread runs the model; request threads enqueue work and wait on a Future. Work that
    arrives within `wait_s` of the first item is batched with it (up to `max_batch` prompts);
    prompts with the same generation settings run in one generate() call."""

    def __init__(self, max_batch: int = 16, wait_s: float = 0.01):
        self.max_batch, self.wait_s = max_batch, wait_s
        self.queue: queue.Queue = queue.Queue()
        self.batches_run, self.largest_batch = 0, 0
        threading.Thread(target=self._loop, daemon=True, name="batcher").start()

    def submit(self, backend, prompts, params, keys=None, sinks=None) -> Future:
        future = Future()
        self.queue.put((backend, prompts, params, future, keys or [None] * len(prompts),
                        sinks or [None] * len(prompts)))
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
                groups.setdefault((id(item[0]), item[2].batch_key()), []).append(item)
            for group in groups.values():
                self._run(group)

    def _run(self, group):
        prompts = [p for item in group for p in item[1]]
        keys = [k for item in group for k in item[4]]
        keys = None if None in keys else keys
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, len(prompts))
        try:
            outs = group[0][0].generate(prompts, group[0][2], keys,
                                        [s for item in group for s in item[5]])
        except Exception as e:  # noqa: BLE001 - report to every waiting request
            for item in group:
                item[3].set_exception(e)
            return
        for item in group:
            item[3].set_result(outs[:len(item[1])])
            outs = outs[len(item[1]):]
