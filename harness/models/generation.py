"""Inference on any causal LM: sample completions, score completions.

    model, tok = load_checkpoint("RUN/LATEST/policy.pt")       # harness.models.modeling
    samples = sample(model, tok, prompts, SamplingConfig(seed=0, max_new_tokens=64))
    logps, n_tokens = completion_logps(model, tok, samples)     # summed log-probs, [n] each
    per_token = completion_token_logps(model, tok, samples)     # list of [n_tokens_i] tensors
    samples = encode_completions(tok, prompts, completions)     # score given text instead

Prompts are encoded as in training (harness/data/chat.py: the chat template when the tokenizer
has one, no added BOS, no truncation); a completion is the generated tokens up to and including
the first EOS / end-of-turn token, which is exactly what training scores (responses end with
it), so log-probs of samples and of training responses mean the same thing.

Sampling is seeded per batch (seed + batch index) inside a forked RNG, so it never disturbs the
caller's random state and repeats exactly for the same (seed, batch settings, prompts). Sampling
uses the model's raw distribution (no top-k, no repetition penalty from a generation_config):
with temperature=1 and top_p=1 the samples are draws from the policy itself. With `keys` (one
integer per prompt) each sample depends only on (seed, its key, its prompt): the same on any
batch size and on whichever rank draws it (KeyedSampling; PPO's rollouts).
"""

from dataclasses import dataclass

import torch
from tqdm import tqdm
from transformers import LogitsProcessor

from harness.data.chat import encode_prompt, encode_response, end_of_turn_id
from harness.data.tokens import pad, pad_id, pad_with_mask
from harness.models.modeling import labelled_token_logps, sequence_logps


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0   # 0 = greedy decoding
    top_p: float = 1.0
    batch_size: int = 16       # prompts per generate() call; samples depend on it (shared RNG)
    seed: int = 0
    min_new_tokens: int = 0    # no EOS before this many tokens (benchmarks: = max_new_tokens)
    # speed levers (docs/performance.md), off by default; the samples of one setting repeat
    # exactly, and greedy output does not depend on them. sort_by_length: batch prompts of
    # similar length (longest first) so batches carry less left padding. batch_tokens: also end
    # a batch before rows x (longest prompt + max_new_tokens), its KV-cache positions, exceed
    # this. static_cache: a preallocated KV cache; on a GPU transformers then compiles the
    # decode step (the first batch of each shape pays the compile)
    sort_by_length: bool = False
    batch_tokens: int | None = None
    static_cache: bool = False


@dataclass(frozen=True)
class Sample:
    prompt: str
    completion: str                  # decoded completion, EOS and special tokens removed
    prompt_ids: tuple[int, ...]
    completion_ids: tuple[int, ...]  # the scored tokens: through the first EOS when finished
    finished: bool                   # ended with EOS (False: cut at max_new_tokens)


def eos_ids(model, tokenizer) -> set[int]:
    """Every token id that ends a completion (the tokenizer's EOS, the chat template's
    end-of-turn token and the model's own)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    if end_of_turn_id(tokenizer) is not None:
        ids.add(end_of_turn_id(tokenizer))
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(extra if isinstance(extra, (list, tuple)) else [extra] if extra is not None else [])
    if not ids:
        raise ValueError("neither the tokenizer nor the model defines an EOS token")
    return ids


def _check_sampling(prompts, cfg: SamplingConfig):
    if not prompts:
        raise ValueError("no prompts to sample from: the prompt set is empty")
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got temperature="
                         f"{cfg.temperature}, top_p={cfg.top_p}")
    if cfg.max_new_tokens < 1 or cfg.batch_size < 1:
        raise ValueError(f"need max_new_tokens >= 1 and batch_size >= 1, got "
                         f"{cfg.max_new_tokens} and {cfg.batch_size}")
    if not 0 <= cfg.min_new_tokens <= cfg.max_new_tokens:
        raise ValueError(f"need 0 <= min_new_tokens <= max_new_tokens, got {cfg.min_new_tokens} "
                         f"and {cfg.max_new_tokens}")
    if cfg.batch_tokens is not None and cfg.batch_tokens < 1:
        raise ValueError(f"batch_tokens={cfg.batch_tokens} must be >= 1 (None = no token cap)")


def plan_batches(lengths: list[int], cfg: SamplingConfig) -> list[list[int]]:
    """Prompt indices of each generate() call: batch_size prompts in order, or longest first
    with sort_by_length; with batch_tokens a batch also ends before rows x (longest prompt +
    max_new_tokens) exceeds it (a prompt too long for the budget gets a batch of its own)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if cfg.sort_by_length \
        else list(range(len(lengths)))
    batches, width = [[order[0]]], lengths[order[0]]
    for i in order[1:]:
        rows, width = len(batches[-1]) + 1, max(width, lengths[i])
        if rows > cfg.batch_size or cfg.batch_tokens is not None and \
                rows * (width + cfg.max_new_tokens) > cfg.batch_tokens:
            batches.append([i])
            width = lengths[i]
        else:
            batches[-1].append(i)
    return batches


def _trim(generated: list[int], stop: set[int]) -> tuple[list[int], bool]:
    for i, t in enumerate(generated):
        if t in stop:
            return generated[:i + 1], True
    return generated, False


_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x, c in [0, 2**32), in 16-bit halves (no int64 overflow)."""
    return (((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A bijective hash of 32-bit integers (in int64 tensors), elementwise: C. Wellons'
    "lowbias32", whose output bits each flip with probability ~1/2 when any input bit does."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


class KeyedSampling(LogitsProcessor):
    """Temperature sampling whose draws depend on a per-row key instead of a shared RNG stream.

    Used with greedy decoding: the scores become logits / T + G with G standard Gumbel noise, and
    the argmax of that is a draw from softmax(logits / T) (the Gumbel-max trick). G comes from a
    counter-based hash of (seed, row key, step, token id), so a row's sample does not depend on the
    other rows of its batch, the batch size or the rank that samples it. With top_p < 1 the tokens
    outside the nucleus get -inf first, so the argmax draws from the renormalised nucleus (the
    distribution of HF's top-p sampling)."""

    def __init__(self, seed: int, keys: list[int], temperature: float, prompt_width: int,
                 top_p: float = 1.0):
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"keyed sampling needs temperature > 0 and 0 < top_p <= 1, got "
                             f"{temperature} and {top_p}")
        seed_hash = hash32(hash32(torch.tensor(seed >> 32 & _M32)) ^ (seed & _M32))
        self.rows = hash32(seed_hash ^ (torch.tensor(keys, dtype=torch.long) & _M32))
        self.temperature, self.prompt_width, self.top_p = temperature, prompt_width, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.prompt_width
        rows = hash32(self.rows.to(scores.device) ^ step)[:, None]
        tokens = torch.arange(scores.shape[-1], device=scores.device)
        u = (hash32(hash32(rows ^ tokens)).double() + 0.5) / 2 ** 32  # uniform in (0, 1)
        scores = scores / self.temperature
        if self.top_p < 1:  # HF's TopPLogitsWarper: drop the tail holding 1 - top_p of the mass
            ascending, order = scores.sort(dim=-1)
            tail = ascending.softmax(-1).cumsum(-1) <= 1 - self.top_p
            tail[..., -1] = False  # keep at least the most likely token
            scores = scores.masked_fill(tail.scatter(-1, order, tail), -float("inf"))
        return scores - torch.log(-torch.log(u)).to(scores.dtype)


@torch.no_grad()
def sample(model, tokenizer, prompts: list[str], cfg: SamplingConfig = SamplingConfig(),
           progress: bool = True, desc: str = "sampling", keys: list[int] | None = None,
           synced: bool = False, stopping=None, render: bool = True,
           prompt_ids: list[list[int]] | None = None) -> list[Sample]:
    """One completion per prompt, in prompt order, batched with left padding.

    Prompts are canonical prompts rendered as in training (harness/data/chat.py: the chat
    template when the tokenizer has one); render=False: text the model continues as it is (the
    server's requests). prompt_ids: the prompts' ids, already encoded (PPO's truncated ones).

    keys: one integer per prompt for KeyedSampling (sample i depends on cfg.seed, keys[i] and
    its prompt only; temperature > 0). synced: every rank keeps stepping until all ranks are
    done, as a model sharded over the ranks needs (the same forward calls everywhere).
    stopping: `stopping(rows, prompt_width)` -> a StoppingCriteria for the generate() call of
    the prompts `rows` (the server's stop strings and streaming, harness/feedback/serving.py)."""
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList
    _check_sampling(prompts, cfg)
    if keys is not None and (len(keys) != len(prompts) or cfg.temperature <= 0):
        raise ValueError(f"keyed sampling needs one key per prompt ({len(keys)} keys, "
                         f"{len(prompts)} prompts) and temperature > 0")
    device = next(model.parameters()).device
    pad_token = pad_id(tokenizer)
    stop = eos_ids(model, tokenizer)
    greedy = cfg.temperature == 0 or keys is not None  # keyed: greedy on Gumbel-perturbed scores
    gen_cfg = GenerationConfig(
        max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.min_new_tokens or None,
        do_sample=not greedy, pad_token_id=pad_token, eos_token_id=sorted(stop),
        cache_implementation="static" if cfg.static_cache else None, **({} if greedy else dict(
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)))
    encoded = prompt_ids or [encode_text(tokenizer, p, render) for p in prompts]
    out = [None] * len(prompts)
    was_training = model.training
    model.eval()
    batches = plan_batches([len(e) for e in encoded], cfg)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        for index, rows in enumerate(tqdm(batches, desc=desc, disable=not progress, leave=False)):
            ids, mask = (t.to(device) for t in pad_with_mask(
                [encoded[i] for i in rows], pad_token, left=True))
            torch.manual_seed(cfg.seed + index)
            keyed = LogitsProcessorList([KeyedSampling(
                cfg.seed, [keys[i] for i in rows], cfg.temperature, ids.shape[1], cfg.top_p)]
                if keys is not None else [])
            extra = {} if stopping is None else \
                {"stopping_criteria": StoppingCriteriaList([stopping(rows, ids.shape[1])])}
            gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg,
                                 logits_processor=keyed, synced_gpus=synced, **extra)
            for row, i in enumerate(rows):
                completion, finished = _trim(gen[row, ids.shape[1]:].tolist(), stop)
                text = tokenizer.decode([t for t in completion if t not in stop],
                                        skip_special_tokens=True)
                out[i] = Sample(prompts[i], text, tuple(encoded[i]), tuple(completion), finished)
    model.train(was_training)
    return out


def add_speed_args(parser):
    """The command-line flags of SamplingConfig's speed levers (generate_samples.py,
    evaluate.py, serve.py); `speed_options(args)` turns them into SamplingConfig fields."""
    parser.add_argument("--sort-by-length", action="store_true",
                        help="batch prompts of similar length (less padding; other samples)")
    parser.add_argument("--batch-tokens", type=int, metavar="N", help="also cap each batch at "
                        "N KV-cache positions: rows x (longest prompt + max new tokens)")
    parser.add_argument("--static-cache", action="store_true", help="preallocated KV cache "
                        "(on a GPU transformers compiles the decode step)")


def speed_options(args) -> dict:
    return dict(sort_by_length=args.sort_by_length, batch_tokens=args.batch_tokens,
                static_cache=args.static_cache)


def encode_text(tokenizer, prompt: str, render: bool = True) -> list[int]:
    """A prompt's ids: rendered as training renders it, or (render=False) the text as it is."""
    return encode_prompt(tokenizer, prompt) if render else \
        tokenizer(prompt, add_special_tokens=False)["input_ids"]


def encode_completions(tokenizer, prompts: list[str], completions: list[str],
                       append_eos: bool = True, render: bool = True) -> list[Sample]:
    """Samples for given (prompt, completion) text, encoded as training does (rendered, the
    completion ending with EOS / end-of-turn). append_eos=False: the completion's ids alone;
    render=False: the prompt text as it is (the server)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [Sample(p, c, tuple(encode_text(tokenizer, p, render)),
                   tuple(encode_response(tokenizer, c) if append_eos else
                         tokenizer(c, add_special_tokens=False)["input_ids"]), append_eos)
            for p, c in zip(prompts, completions)]


def _scoring_batches(samples: list[Sample], pad_token: int, batch_size: int, device):
    """Right-padded (input_ids, attention_mask, labels) with labels only on completion tokens."""
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        ids, mask = pad_with_mask([s.prompt_ids + s.completion_ids for s in chunk], pad_token)
        labels = pad([[-100] * len(s.prompt_ids) + list(s.completion_ids) for s in chunk], -100)
        yield ids.to(device), mask.to(device), labels.to(device)


@torch.no_grad()
def completion_logps(model, tokenizer, samples: list[Sample], batch_size: int = 16,
                     chunk_size: int = 4096, progress: bool = False, desc: str = "scoring"):
    """Summed log-probs of each sample's completion tokens given its prompt, and their counts.

    Returns (logps [n] float32, n_tokens [n]) on the CPU, via harness.models.modeling.sequence_logps."""
    if not samples:
        raise ValueError("no samples to score")
    device = next(model.parameters()).device
    logps, counts = [], []
    batches = _scoring_batches(samples, pad_id(tokenizer), batch_size, device)
    for ids, mask, labels in tqdm(batches, total=-(-len(samples) // batch_size), desc=desc,
                                  disable=not progress, leave=False):
        lp, n = sequence_logps(model, ids, mask, labels, chunk_size)
        logps.append(lp.cpu())
        counts.append(n.cpu())
    return torch.cat(logps), torch.cat(counts)


@torch.no_grad()
def completion_token_logps(model, tokenizer, samples: list[Sample], batch_size: int = 16,
                           chunk_size: int = 4096) -> list[torch.Tensor]:
    """Per-token log-probs of each completion: a list of [len(completion_ids)] float32 tensors
    (their sums equal `completion_logps`). The output head runs on completion rows only, in
    chunks, as in sequence_logps."""
    if not samples:
        raise ValueError("no samples to score")
    device = next(model.parameters()).device
    out = []
    for ids, mask, labels in _scoring_batches(samples, pad_id(tokenizer), batch_size, device):
        row_logps, _ = labelled_token_logps(model, ids, mask, labels, chunk_size)
        out.extend(row_logps.cpu().split((labels[:, 1:] != -100).sum(-1).tolist()))
    return list(out)
