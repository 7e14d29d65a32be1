"""The dataset table and its source loaders: raw hub/local data -> canonical preference records
(see preference_datasets).

Each loader reads its hub dataset in real use and, given PATH (spec "name:PATH"), a local
file/folder in the same raw schema through the same code, so tests exercise the real path.
Loader signature: fn(split, path=None, *, cache_dir, num_turns, silent) -> records.
"""
import hashlib
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping
from itertools import combinations
from typing import Callable

import datasets
import tqdm

from harness import registry
from harness.data.dialogue import dialogue, extract_prompt, human_prompt
from harness.data.html_text import strip_html

logger = logging.getLogger(__name__)

Records = dict[str, dict]
DATASETS: dict[str, Callable[..., Records]] = {}
# decorator: @register("name") makes a loader available as get_dataset(name)
register = registry.decorator(DATASETS, "dataset")
TEST_FRACTION = 0.05  # share of prompts held out by hash for sources without a test split

# Strings that tokenizers turn into BOS/EOS; inside a response they would teach the model to
# stop mid-answer (the RLAIF fork drops such conversations for the same reason).
SPECIAL_MARKERS = ("<s>", "</s>", "<|endoftext|>")
SHAREGPT_HUB = ("anon8231489123/ShareGPT_Vicuna_unfiltered", "ShareGPT_V3_unfiltered_cleaned_split.json")


# ---------------------------------------------------------------- shared helpers

def in_test_split(key: str) -> bool:
    """Stable hash split: about TEST_FRACTION of keys are test, whatever the seed or row order."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < TEST_FRACTION * 2**64


def _in_split(key: str, split: str) -> bool:
    return in_test_split(key) == (split == "test")


def _check_split(name: str, split: str, allowed=("train", "test")):
    if split not in allowed:
        raise ValueError(f"dataset {name!r} has no split {split!r}; use one of {list(allowed)}")


def _check_exists(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"local dataset path {path!r} does not exist")


def _require(row, keys, where, source):
    """Raise naming the first of `keys` that `row` lacks (None counts as missing)."""
    if not isinstance(row, Mapping):  # datasets hands out dict-like rows, JSON gives dicts
        raise ValueError(f"{source}: record {where} is not a JSON object")
    for key in keys:
        if row.get(key) is None:
            raise ValueError(f"{source}: record {where} is missing key {key!r}")


def _nonempty(data: Records, name: str, split: str, why: str) -> Records:
    if not data:
        raise ValueError(f"dataset {name!r} split {split!r} is empty after {why}")
    return data


def _log_drops(name: str, split: str, total: int, dropped: Counter):
    if dropped:
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(dropped.items()))
        logger.warning("%s (%s): dropped %d of %d rows (%s)", name, split,
                       sum(dropped.values()), total, reasons)


def _progress(rows, desc: str, silent: bool):
    return tqdm.tqdm(rows, desc=f"Processing {desc}", disable=silent)


def _new_record(sft_target, truncation_mode="keep_start") -> dict:
    return {"responses": [], "pairs": [], "sft_target": sft_target, "truncation_mode": truncation_mode}


def _add_pair(data: Records, prompt: str, chosen: str, rejected: str, mode: str) -> dict:
    """Append one (chosen, rejected) pair to the prompt's record, creating it if needed."""
    record = data.setdefault(prompt, _new_record(chosen, mode))
    n = len(record["responses"])
    record["responses"] += [chosen, rejected]
    record["pairs"].append((n, n + 1))
    return record


def _load_rows(hub_id: str, path, split: str, cache_dir):
    """Rows of `split` from the hub, or from a local folder/file in the same raw schema."""
    if path is None:
        return datasets.load_dataset(hub_id, split=split, cache_dir=cache_dir)
    _check_exists(path)
    if os.path.isdir(path):  # split files are found by name (train.jsonl, test.json, ...) as on the hub
        return datasets.load_dataset(path, split=split, cache_dir=cache_dir)
    # a single file is taken to be the requested split
    return datasets.load_dataset("json", data_files={split: path}, split=split, cache_dir=cache_dir)


def read_json(path: str):
    """A JSON document or JSON Lines file; errors name the file and line."""
    _check_exists(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not path.endswith(".jsonl"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # a complete first value followed by more = JSON Lines
                raise ValueError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: invalid JSON on line {lineno}: {err.msg}") from None
    return rows


def _has_markers(texts) -> bool:
    return any(marker in text for text in texts for marker in SPECIAL_MARKERS)


# ---------------------------------------------------------------- loaders

@register("hh")
def load_hh(split, path=None, *, cache_dir=None, silent=False, **_):
    """Anthropic HH: each row is a full chosen and a full rejected dialogue with a shared prompt."""
    _check_split("hh", split)
    source = path or "Anthropic/hh-rlhf"
    data = {}
    for i, row in enumerate(_progress(_load_rows("Anthropic/hh-rlhf", path, split, cache_dir), "hh", silent)):
        _require(row, ("chosen", "rejected"), i, source)
        prompt = extract_prompt(row["chosen"], f"{source}: record {i}")
        chosen, rejected = row["chosen"][len(prompt):], row["rejected"][len(prompt):]
        # keep_end: multi-turn dialogues matter most at the end, next to the response
        record = _add_pair(data, prompt, chosen, rejected, "keep_end")
        record["sft_target"] = chosen  # the reference keeps the last row's chosen
    return _nonempty(data, "hh", split, "reading")


def _score_ratio(a, b) -> float:
    return math.inf if a == 0 or b == 0 else max(a / b, b / a)


@register("shp")
def load_shp(split, path=None, *, cache_dir=None, silent=False, **_):
    """Stanford Human Preferences: keep pairs whose score ratio is at least 2 (as the reference)."""
    _check_split("shp", split, ("train", "validation", "test"))
    source = path or "stanfordnlp/SHP"
    data, scores, dropped, total = {}, {}, Counter(), 0
    keys = ("history", "human_ref_A", "human_ref_B", "score_A", "score_B", "labels")
    for i, row in enumerate(_progress(_load_rows("stanfordnlp/SHP", path, split, cache_dir), "shp", silent)):
        _require(row, keys, i, source)
        total += 1
        if _score_ratio(row["score_A"], row["score_B"]) < 2:
            dropped["score ratio < 2"] += 1
            continue
        prompt = human_prompt(row["history"])
        record = data.setdefault(prompt, _new_record(None))
        n = len(record["responses"])
        # labels == 1 means A is preferred (dataset card)
        record["pairs"].append((n, n + 1) if row["labels"] == 1 else (n + 1, n))
        record["responses"] += [" " + row["human_ref_A"], " " + row["human_ref_B"]]
        scores.setdefault(prompt, []).extend([row["score_A"], row["score_B"]])
    for prompt, record in data.items():  # SFT on the best-scored comment
        s = scores[prompt]
        record["sft_target"] = record["responses"][s.index(max(s))]
        record["scores"] = [float(x) for x in s]  # upvotes: graded feedback (loss=coh)
    _log_drops("shp", split, total, dropped)
    return _nonempty(data, "shp", split, "dropping pairs with score ratio < 2")


def _strip_se_row(row, idx, source):
    _require(row, ("question", "answers"), idx, source)
    for j, answer in enumerate(row["answers"]):
        _require(answer, ("text", "pm_score"), f"{idx} answer {j}", source)
    row["question"] = strip_html(row["question"])
    row["answers"] = [{**a, "text": strip_html(a["text"])} for a in row["answers"]]
    return row


@register("se")
def load_se(split, path=None, *, cache_dir=None, silent=False, **_):
    """StackExchange: every pair of differently scored answers; the hub has only 'train',
    so our train/test are carved out of it by prompt hash (never overlapping)."""
    _check_split("se", split)
    hub_id = "HuggingFaceH4/stack-exchange-preferences"
    rows = _load_rows(hub_id, path, "train", cache_dir)
    # HTML stripping is the slow part at hub scale: run it in parallel and let datasets cache it
    rows = rows.map(_strip_se_row, with_indices=True, fn_kwargs={"source": path or hub_id},
                    num_proc=os.cpu_count() if len(rows) > 10_000 else None, desc="Stripping SE html")
    data = {}
    for row in _progress(rows, "se", silent):
        prompt = human_prompt(row["question"])
        if prompt in data or not row["answers"] or not _in_split(prompt, split):
            continue
        responses = [" " + a["text"] for a in row["answers"]]
        scores = [a["pm_score"] for a in row["answers"]]
        # equal scores say nothing about preference (the reference made the later answer win)
        pairs = [(i, j) if scores[i] > scores[j] else (j, i)
                 for i, j in combinations(range(len(scores)), 2) if scores[i] != scores[j]]
        record = _new_record(responses[scores.index(max(scores))])
        record["responses"], record["pairs"] = responses, pairs
        data[prompt] = record
    return _nonempty(data, "se", split, "the hash split")


HUMAN_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "chatgpt", "bing", "assistant"}


def _exchanges(turns, where, source) -> list[tuple[str, str]]:
    """(human, assistant) pairs from the start of a conversation, up to the first irregular turn."""
    exchanges, human = [], None
    for j, turn in enumerate(turns):
        _require(turn, ("from", "value"), f"{where} turn {j}", source)
        if turn["from"] in HUMAN_ROLES and human is None:
            human = turn["value"]
        elif turn["from"] in ASSISTANT_ROLES and human is not None:
            exchanges.append((human, turn["value"]))
            human = None
        else:  # starts with the assistant, a system turn, two humans in a row...
            break
    return exchanges


@register("sharegpt")
def load_sharegpt(split, path=None, *, cache_dir=None, num_turns=1, silent=False, **_):
    """ShareGPT conversations as SFT data: up to `num_turns` exchanges, the last assistant
    message is the target and earlier exchanges go into the prompt."""
    _check_split("sharegpt", split)
    if num_turns < 1:
        raise ValueError(f"num_turns must be >= 1, got {num_turns}")
    if path is None:
        from huggingface_hub import hf_hub_download  # the dump is one JSON file, not a datasets table
        repo_id, filename = SHAREGPT_HUB
        path = hf_hub_download(repo_id, filename, repo_type="dataset", cache_dir=cache_dir)
    data, dropped, rows = {}, Counter(), read_json(path)
    for i, row in enumerate(_progress(rows, "sharegpt", silent)):
        _require(row, ("conversations",), i, path)
        exchanges = _exchanges(row["conversations"], i, path)[:num_turns]
        # split by the first human message, so any num_turns and single-turn AI labels of the
        # same conversations (prefs) land in the same split
        if exchanges and not _in_split(human_prompt(exchanges[0][0]), split):
            continue
        if not exchanges:
            dropped["no human->assistant exchange"] += 1
        elif _has_markers(text for exchange in exchanges for text in exchange):
            dropped["special token strings"] += 1
        else:
            history = exchanges[:-1]
            prompt = dialogue(history, exchanges[-1][0])
            target = " " + exchanges[-1][1]
            record = _new_record(target, "keep_end" if history else "keep_start")
            record["responses"] = [target]
            data.setdefault(prompt, record)
    _log_drops("sharegpt", split, len(rows), dropped)
    return _nonempty(data, "sharegpt", split, "the hash split and dropping unusable conversations")


def _judge_winner(label):
    """1 or 2 for a decisive AlpacaEval label, else the reason the row is dropped. A null label
    is never read as a win (the RLAIF fork's `== 1 else` turned it into 'output 2 wins')."""
    if label is None:
        return "missing label"
    if isinstance(label, bool) or not isinstance(label, (int, float)):
        return "invalid label"
    if label in (0, 1.5):
        return "tie"
    if 1 <= label <= 2:  # weighted judges give a soft preference in [1, 2]
        return 1 if label < 1.5 else 2
    return "invalid label"


def _response_index(record: dict, text: str) -> int:
    if text not in record["responses"]:
        record["responses"].append(text)
    return record["responses"].index(text)


@register("prefs")
def load_prefs(split, path=None, *, silent=False, **_):
    """AlpacaEval-style annotations.json: [{instruction, output_1, output_2, preference}]."""
    _check_split("prefs", split)
    if path is None:
        raise ValueError("dataset 'prefs' needs a file: use 'prefs:PATH' or prefs_path=PATH")
    data, dropped, total = {}, Counter(), 0
    for i, row in enumerate(_progress(read_json(path), "prefs", silent)):
        _require(row, ("instruction", "output_1", "output_2"), i, path)
        prompt = human_prompt(row["instruction"])
        if not _in_split(prompt, split):
            continue
        total += 1
        winner = _judge_winner(row.get("preference"))
        outputs = [" " + row["output_1"], " " + row["output_2"]]
        if isinstance(winner, str):
            dropped[winner] += 1
        elif outputs[0] == outputs[1]:
            dropped["identical outputs"] += 1
        elif _has_markers([row["instruction"], *outputs]):
            dropped["special token strings"] += 1
        else:
            chosen, rejected = outputs if winner == 1 else outputs[::-1]
            record = data.setdefault(prompt, _new_record(chosen))
            record["pairs"].append((_response_index(record, chosen), _response_index(record, rejected)))
    _log_drops(f"prefs {path}", split, total, dropped)
    return _nonempty(data, f"prefs:{path}", split, "the hash split and dropping ties/missing labels")


def _space(text: str) -> str:
    return text if text[:1].isspace() else " " + text


def _add_canonical_row(data: Records, row: dict, where, source):
    _require(row, ("responses", "pairs"), where, source)
    pairs = [tuple(p) for p in row["pairs"]]
    if row.get("sft_target") is None and not pairs:
        raise ValueError(f"{source}: record {where} is missing key 'sft_target'")
    responses = [_space(r) for r in row["responses"]]
    if not all(len(p) == 2 and all(0 <= k < len(responses) for k in p) for p in pairs):
        raise ValueError(f"{source}: record {where} has a pair index outside its responses")
    target = _space(row["sft_target"]) if row.get("sft_target") is not None else responses[pairs[0][0]]
    record = data.setdefault(row["prompt"], _new_record(target, row.get("truncation_mode", "keep_start")))
    offset = len(record["responses"])
    record["responses"] += responses
    record["pairs"] += [(w + offset, l + offset) for w, l in pairs]


@register("json")
@register("jsonl")
def load_json(split, path=None, **_):
    """Local JSON/JSONL of {prompt, chosen, rejected} rows, canonical rows
    {prompt, responses, pairs, sft_target}, or a canonical object {prompt: record}."""
    _check_split("json", split)
    if path is None:
        raise ValueError("dataset 'json' needs a file: use 'json:PATH'")
    rows = read_json(path)
    if isinstance(rows, dict):
        rows = [{"prompt": p, **r} if isinstance(r, dict) else r for p, r in rows.items()]
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of records or an object keyed by prompt")
    data = {}
    for i, row in enumerate(rows):
        _require(row, ("prompt",), i, path)
        if not _in_split(row["prompt"], split):
            continue
        if "responses" in row:
            _add_canonical_row(data, row, i, path)
        else:
            _require(row, ("chosen", "rejected"), i, path)
            _add_pair(data, row["prompt"], _space(row["chosen"]), _space(row["rejected"]), "keep_start")
    return _nonempty(data, f"json:{path}", split, "the hash split")


@register("toy")
def load_toy(split, path=None, **_):
    """The bundled toy task (canonical records already)."""
    from harness.data.toy_task import toy_records  # lazy: only toy runs need it
    data = toy_records(split)
    for record in data.values():
        record.setdefault("truncation_mode", "keep_start")
    return data
