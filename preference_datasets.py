"""Preference data for the trainer: registry, canonical records, examples, tokenize, batch.

    get_dataset(spec, split)  -> canonical records (the DPO reference format + truncation mode):
        {prompt: {"responses": [str], "pairs": [(winner_idx, loser_idx)],
                  "sft_target": str, "truncation_mode": "keep_start" | "keep_end",
                  "scores": [float | None] (optional, one per response: SHP, UltraFeedback)}}
    load_examples(specs, ...) -> [Example]   one per prompt (SFT) or one per preference pair
    BatchIterator             -> padded torch batches, seeded per-epoch order, exact resume

Prompts look like "\\n\\nHuman: ...\\n\\nAssistant:" and responses start with a space. A spec
is NAME or NAME:PATH, PATH being local data in the source's raw schema. The source loaders and
their table live in harness/data/sources.py (and conversational.py: trl, ultrafeedback). Tokenisation and truncation follow the DPO
reference `tokenize_batch_element` (the token rules: harness/data/tokens.py).
"""
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field, replace
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from harness.data import conversational  # noqa: F401  registers the trl and ultrafeedback loaders
from harness.data.chat import encode_prompt, encode_response
from harness.data.sources import DATASETS, EmptySplit, Records
from harness.data.tokens import check_truncation_mode, pad, pad_id, pad_with_mask

logger = logging.getLogger(__name__)

def get_dataset(spec: str, split: str, *, cache_dir=None, prefs_path=None, num_turns=1,
                silent=False) -> Records:
    """Canonical records of one source. spec = NAME or NAME:PATH (local raw-schema data)."""
    name, _, path = spec.partition(":")
    path = path or None
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; registered datasets: {sorted(DATASETS)}")
    if name == "prefs":
        path = path or prefs_path
    elif prefs_path is not None:
        # AI feedback relabels a source's prompts: the annotations replace its own pairs.
        logger.info("dataset %r: using AI preference labels from %s", spec, prefs_path)
        name, path = "prefs", prefs_path
    if silent:
        import datasets
        datasets.disable_progress_bars()
    data = DATASETS[name](split, path, cache_dir=cache_dir, num_turns=num_turns, silent=silent)
    if not data:
        raise ValueError(f"dataset {spec!r} split {split!r} has no records")
    for prompt, record in data.items():
        _check_record(prompt, record, spec)
    return data


def _check_record(prompt: str, record: dict, source: str):
    """Catch malformed records from any loader (toy, canonical JSON) before training does."""
    where = f"{source}: record for prompt {prompt[:60]!r}"
    if set(record) - {"scores"} != {"responses", "pairs", "sft_target", "truncation_mode"}:
        raise ValueError(f"{where} has keys {sorted(record)}")
    check_truncation_mode(record["truncation_mode"], where)
    n = len(record["responses"])
    scores = record.get("scores", [None] * n)  # optional: one score (or None) per response
    if len(scores) != n or not all(s is None or isinstance(s, (int, float)) for s in scores):
        raise ValueError(f"{where} has scores {scores!r} for {n} responses")
    for pair in record["pairs"]:
        if len(pair) != 2 or not all(0 <= i < n for i in pair) or pair[0] == pair[1]:
            raise ValueError(f"{where} has bad pair {pair} ({n} responses)")


@dataclass(frozen=True)
class Example:
    """One training item: a prompt with its SFT target (rejected None) or a preference pair."""
    prompt: str
    chosen: str
    rejected: str | None
    truncation_mode: str
    uid: str  # stable hash of (prompt, chosen, rejected): names the example across runs
    source: str = field(default="", compare=False)  # "SPEC record I", for error messages


def make_example(prompt: str, chosen: str, rejected: str | None, truncation_mode: str) -> Example:
    key = json.dumps([prompt, chosen, rejected]).encode("utf-8")
    return Example(prompt, chosen, rejected, truncation_mode, hashlib.sha256(key).hexdigest()[:16])


def _record_examples(prompt: str, record: dict, sft_mode: bool) -> list[Example]:
    mode = record["truncation_mode"]
    if sft_mode:
        return [make_example(prompt, record["sft_target"], None, mode)]
    responses = record["responses"]
    return [make_example(prompt, responses[w], responses[l], mode) for w, l in record["pairs"]]


@dataclass(frozen=True)
class ExampleFormat:
    """How a loss turns canonical records into examples and examples into token ids.

    The default is the reference behaviour (SFT targets or preference pairs, tokenize_example);
    a loss with its own format (CoH chains) supplies `record_examples(prompt, record) -> [ex]`
    and `tokenize(ex, tokenizer, max_length, max_prompt_length) -> dict` with the same keys."""
    record_examples: Callable | None = None
    tokenize: Callable | None = None

    def finish(self, examples: list) -> list:
        """A last pass over all examples of a split, once loaded (KTO pairs each example with
        another prompt's completion); the default keeps them as they are."""
        return examples

    def describe(self, examples: list) -> str:
        """A line about the examples for the run log ('' when there is nothing to add)."""
        return ""


def _subsample(prompts: list[str], fraction: float, seed: int, spec: str) -> list[str]:
    """A seeded subset of prompts, in their original order. Seeded per spec so that adding a
    dataset to the mix does not change which prompts another one keeps."""
    spec_key = int.from_bytes(hashlib.sha256(spec.encode("utf-8")).digest()[:4], "big")
    rng = np.random.default_rng([seed, spec_key])
    k = max(1, round(len(prompts) * fraction))
    keep = np.sort(rng.choice(len(prompts), size=k, replace=False))
    return [prompts[i] for i in keep]


def load_examples(specs: list[str], split: str, *, sft_mode: bool, data_fraction: float = 1.0,
                  seed: int = 0, cache_dir=None, prefs_path=None, num_turns: int = 1,
                  silent: bool = False, record_examples: Callable | None = None,
                  allow_empty: bool = False, fingerprints: dict | None = None) -> list:
    """Flatten the records of every spec, in dataset order then record order.

    data_fraction keeps a seeded random subset of each dataset's prompts (train split only;
    evaluation always sees the whole test split). record_examples(prompt, record) replaces the
    SFT / pair examples (sft_mode is then ignored), e.g. with CoH chains. allow_empty: a source
    whose split is empty is skipped with a warning (the caller decides what no examples means).
    fingerprints, if given, gets {spec: a hash of the spec's examples in order}: the identity
    of the data a run trains on (harness/training/setup.py checks it on resume)."""
    if isinstance(specs, str):
        specs = [specs]
    if not 0 < data_fraction <= 1:
        raise ValueError(f"data_fraction must be in (0, 1], got {data_fraction}")
    if prefs_path is not None and len(specs) > 1:
        # every spec would read the same annotations file and duplicate its pairs
        raise ValueError(f"prefs_path replaces each dataset's pairs; give one dataset, not {list(specs)}")
    examples = []
    for spec in specs:
        try:
            data = get_dataset(spec, split, cache_dir=cache_dir, prefs_path=prefs_path,
                               num_turns=num_turns, silent=silent)
        except EmptySplit as err:
            if not allow_empty:
                raise
            logger.warning("%s: no %s examples from it", err, split)
            continue
        prompts = list(data)
        if split == "train" and data_fraction < 1:
            prompts = _subsample(prompts, data_fraction, seed, spec)
        start = len(examples)
        for i, prompt in enumerate(prompts):
            made = record_examples(prompt, data[prompt]) if record_examples else \
                _record_examples(prompt, data[prompt], sft_mode)
            examples.extend(replace(ex, source=f"{spec}: record {i}") if isinstance(ex, Example)
                            else ex for ex in made)
        if fingerprints is not None:
            fingerprints[spec] = hashlib.sha256("".join(
                ex.uid for ex in examples[start:]).encode()).hexdigest()[:16]
    if not examples and not allow_empty:
        mode = "examples" if record_examples else "SFT targets" if sft_mode else \
            "preference pairs (SFT-only data in a pairwise loss?)"
        raise ValueError(f"datasets {list(specs)} split {split!r} gave no {mode}")
    return examples


def tokenize_example(ex: Example, tokenizer, max_length: int, max_prompt_length: int) -> dict:
    """Token ids and labels for one example (the reference `tokenize_batch_element`).

    Prompt and responses are rendered by harness/data/chat.py (the tokenizer's chat template,
    else the reference text as it is); each response ends with one EOS / end-of-turn token. If prompt + longer response exceeds max_length the prompt
    is cut to max_prompt_length (first tokens for keep_start, last for keep_end); if still too
    long, responses are cut to max_length - max_prompt_length. Labels are -100 on the prompt."""
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
    check_truncation_mode(ex.truncation_mode, f"example {ex.uid}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id")
    prompt = encode_prompt(tokenizer, ex.prompt, ex.uid)
    responses = {"chosen": encode_response(tokenizer, ex.chosen, ex.uid, "chosen")}
    if ex.rejected is not None:
        responses["rejected"] = encode_response(tokenizer, ex.rejected, ex.uid, "rejected")
    longest = max(len(ids) for ids in responses.values())
    if len(prompt) + longest > max_length:
        prompt = encode_prompt(tokenizer, ex.prompt, ex.uid, ex.truncation_mode, max_prompt_length)
    if len(prompt) + longest > max_length:
        responses = {k: ids[: max_length - max_prompt_length] for k, ids in responses.items()}
    out = {"prompt_input_ids": prompt, "prompt_length": len(prompt)}
    for key, ids in responses.items():
        out[f"{key}_input_ids"] = prompt + ids
        out[f"{key}_labels"] = [-100] * len(prompt) + ids
    return out


def collate(items: list[dict], pad_token_id: int, examples: list[Example]) -> dict:
    """Pad a batch. Sequences are right-padded (labels with -100); prompts are left-padded so
    generation can continue from the last column. Strings and uids ride along as lists."""
    with_rejected = {"rejected_input_ids" in item for item in items}
    if len(with_rejected) != 1:
        raise ValueError("a batch mixes examples with and without a rejected response")
    keys = ("chosen", "rejected") if with_rejected.pop() else ("chosen",)
    batch = {}
    for key in keys:
        ids = [item[f"{key}_input_ids"] for item in items]
        batch[f"{key}_input_ids"], batch[f"{key}_attention_mask"] = pad_with_mask(ids, pad_token_id)
        batch[f"{key}_labels"] = pad([item[f"{key}_labels"] for item in items], -100)
    prompts = [item["prompt_input_ids"] for item in items]
    batch["prompt_input_ids"], batch["prompt_attention_mask"] = pad_with_mask(
        prompts, pad_token_id, left=True)
    batch["prompt"] = [ex.prompt for ex in examples]
    batch["chosen_response_only"] = [ex.chosen for ex in examples]
    if "rejected" in keys:
        batch["rejected_response_only"] = [ex.rejected for ex in examples]
    batch["uid"] = [ex.uid for ex in examples]
    return batch


def select_rows(batch: dict, rows: list[int]) -> dict:
    """The collated batch of just `rows`, in that order, with the padding columns no selected
    row needs cut away (right of the sequences, left of the prompts)."""
    index = torch.tensor(rows, dtype=torch.long)
    out = {}
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            out[key] = [value[i] for i in rows]
            continue
        value = value[index]
        side = key.split("_", 1)[0]
        mask = batch.get(f"{side}_attention_mask")
        if mask is not None and mask.dim() == 2 and value.dim() == 2:
            width = int(mask[index].sum(-1).max())
            value = value[:, value.shape[1] - width:] if side == "prompt" else value[:, :width]
        out[key] = value
    return out


def split_by_tokens(batch: dict, budget: int, ranks: int = 1) -> list[dict]:
    """Micro-batches of at most `budget` padded token positions per data-parallel rank.

    Examples are sorted longest first and taken greedily while a micro-batch's padded forward
    (sequences per example x its longest sequence x ceil(examples / ranks)) fits the budget, so
    a batch of short pairs runs in one pass and a batch of long ones in several, with little
    padding in each. An example longer than the budget on its own gets a micro-batch of its
    own. Every example lands in exactly one micro-batch."""
    sides = [k[:-len("_attention_mask")] for k in ("chosen_attention_mask",
                                                   "rejected_attention_mask") if k in batch]
    length = torch.stack([batch[f"{s}_attention_mask"].sum(-1) for s in sides]).amax(0).tolist()
    order = sorted(range(len(length)), key=lambda i: -length[i])  # stable: ties keep batch order
    groups = [[order[0]]]
    for i in order[1:]:
        group = groups[-1]  # its first example is its longest
        if len(sides) * math.ceil((len(group) + 1) / ranks) * length[group[0]] > budget:
            groups.append([i])
        else:
            group.append(i)
    return [select_rows(batch, group) for group in groups]


def tokenize_all(examples: list, tokenizer, tokenize: Callable, max_length: int,
                 max_prompt_length: int, desc: str | None = None) -> list[dict]:
    """Every example's token ids, before the first step: text a tokenizer cannot take (the EOS
    token inside a response, ...) fails here, naming the source and record, never mid-run. Ids
    are kept as int32 arrays (a quarter of a list of Python ints)."""
    items = []
    for ex in tqdm(examples, desc=desc or "tokenizing", disable=desc is None, unit="ex",
                   mininterval=1.0):
        try:
            item = tokenize(ex, tokenizer, max_length, max_prompt_length)
        except (ValueError, TypeError) as err:
            where = getattr(ex, "source", "") or "example"
            raise ValueError(f"{where} (uid {ex.uid}, prompt {ex.prompt[:60]!r}): {err}; fix or "
                             "remove the record (every example is checked before training "
                             "starts)") from None
        items.append({k: np.asarray(v, dtype=np.int32) if isinstance(v, list) else v
                      for k, v in item.items()})
    return items


class BatchIterator:
    """Batches of examples, all tokenized up front (tokenize_all), padded per batch.

    The order of epoch e is a permutation drawn from default_rng([seed, e]) (identity when not
    shuffling): it depends on the seed, differs per epoch, and can be recomputed at any time,
    so resuming mid-epoch skips straight to the next unseen example. The final partial batch is
    kept unless drop_last. `items` reuses another iterator's tokenized examples (same order);
    `progress` names the tokenizing progress bar (None: no bar)."""

    def __init__(self, examples: list[Example], tokenizer, *, batch_size: int, shuffle: bool, seed: int,
                 max_length: int, max_prompt_length: int, drop_last: bool = False,
                 tokenize: Callable | None = None, items: list[dict] | None = None,
                 progress: str | None = None):
        if not examples:
            raise ValueError("BatchIterator needs at least one example")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 < max_prompt_length < max_length:
            raise ValueError(f"need 0 < max_prompt_length ({max_prompt_length}) < max_length ({max_length})")
        self.examples, self.tokenizer = examples, tokenizer
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, shuffle, seed, drop_last
        self.max_length, self.max_prompt_length = max_length, max_prompt_length
        self.tokenize = tokenize or tokenize_example
        self.pad_token_id = pad_id(tokenizer)
        self.items = items if items is not None else tokenize_all(
            examples, tokenizer, self.tokenize, max_length, max_prompt_length, progress)
        if len(self.items) != len(examples):
            raise ValueError(f"{len(self.items)} tokenized items for {len(examples)} examples")

    def __len__(self) -> int:
        n = len(self.examples)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def examples_per_epoch(self) -> int:
        return len(self) * self.batch_size if self.drop_last else len(self.examples)

    def epoch_order(self, epoch: int) -> np.ndarray:
        n = len(self.examples)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def epoch_batches(self, epoch: int, start: int = 0) -> Iterator[dict]:
        """Batches of one epoch, skipping the first `start` examples (already consumed)."""
        if start % self.batch_size or not 0 <= start <= len(self.examples):
            raise ValueError(f"start={start} must be a multiple of batch_size={self.batch_size} "
                             f"within the epoch's {len(self.examples)} examples")
        order = self.epoch_order(epoch)
        for begin in range(start, self.examples_per_epoch, self.batch_size):
            rows = order[begin: begin + self.batch_size]
            yield collate([self.items[i] for i in rows], self.pad_token_id,
                          [self.examples[i] for i in rows])
