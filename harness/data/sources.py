"""The dataset table and its source loaders: raw hub/local data -> canonical preference records
(see preference_datasets).

Each loader reads its hub dataset in real use and, given PATH (spec "name:PATH"), a local
file/folder in the same raw schema through the same code, so tests exercise the real path.
Loader signature: fn(split, path=None, *, cache_dir, num_turns, silent) -> records.
"""
import hashlib
import math
import os
from itertools import combinations
from typing import Callable

import tqdm

from harness import registry
from harness.data.dialogue import dialogue, extract_prompt, human_prompt
from harness.data.html_text import strip_html
from harness.data.validate import (DUPLICATE, EMPTY, IDENTICAL, MARKERS, MISMATCHED,  # noqa: F401
                                   SPECIAL_MARKERS, DataError, RowCheck, has_markers, hub_error,
                                   judge_winner, load_rows, offline_unless_reachable,
                                   read_json)

Records = dict[str, dict]
DATASETS: dict[str, Callable[..., Records]] = {}
# decorator: @register("name") makes a loader available as get_dataset(name)
register = registry.decorator(DATASETS, "dataset")
TEST_FRACTION = 0.05  # share of prompts held out by hash for sources without a test split
SHAREGPT_HUB = ("anon8231489123/ShareGPT_Vicuna_unfiltered", "ShareGPT_V3_unfiltered_cleaned_split.json")


class EmptySplit(DataError):
    """A source with no usable records in the requested split (e.g. a small file's test split)."""


# ---------------------------------------------------------------- shared helpers

def in_test_split(key: str) -> bool:
    """Stable hash split: about TEST_FRACTION of keys are test, whatever the seed or row order."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < TEST_FRACTION * 2**64


def _in_split(key: str, split: str) -> bool:
    return in_test_split(key) == (split == "test")


# loaders that read nothing from disk: a PATH given to them is a mistake
TAKES_NO_PATH = {"toy"}
# loaders other modules register, imported by name when a name is not found (the table stays a
# leaf; train.py's early check knows `datasets=[ultrafeedback]` before anything imported them)
MORE_LOADERS = ("harness.data.conversational",)


def known_dataset(name: str) -> bool:
    for module in MORE_LOADERS if name not in DATASETS else ():
        __import__(module)
    return name in DATASETS


def check_spec(spec: str):
    """A datasets= entry NAME or NAME:PATH, checked without reading it: a registered name (with
    a near match when not), a path only for loaders that read one, and one that exists."""
    import difflib
    name, _, path = spec.partition(":")
    if not known_dataset(name):
        close = difflib.get_close_matches(name, DATASETS, n=1)
        raise ValueError(f"unknown dataset {spec!r} in datasets=; "
                         f"{f'did you mean {close[0]!r}? ' if close else ''}registered: "
                         f"{sorted(DATASETS)}")
    if path and name in TAKES_NO_PATH:
        raise ValueError(f"dataset {name!r} is generated, not read from a file: got {spec!r}; "
                         f"use datasets=[{name}], or json:PATH for your own file")
    if path and not os.path.exists(path):
        raise FileNotFoundError(f"datasets=[{spec}]: local dataset path {path!r} does not exist")


def _check_split(name: str, split: str, allowed=("train", "test")):
    if split not in allowed:
        raise ValueError(f"dataset {name!r} has no split {split!r}; use one of {list(allowed)}")


def _nonempty(data: Records, name: str, split: str, why: str, check: RowCheck) -> Records:
    check.report()
    if not data:
        raise EmptySplit(f"dataset {name!r} split {split!r} is empty after {why}")
    return data


def _progress(rows, desc: str, silent: bool):
    return tqdm.tqdm(rows, desc=f"Processing {desc}", disable=silent)


def _new_record(sft_target, truncation_mode="keep_start") -> dict:
    return {"responses": [], "pairs": [], "sft_target": sft_target, "truncation_mode": truncation_mode}


def _add_pair(data: Records, check: RowCheck, prompt: str, chosen: str, rejected: str,
              mode: str) -> dict | None:
    """Append one (chosen, rejected) pair to the prompt's record (created if needed), or count
    why it is dropped (empty, identical, a duplicate, special-token strings) and return None."""
    problem = check.pair_problem(prompt, chosen, rejected)
    if problem:
        check.drop(problem)
        return None
    record = data.setdefault(prompt, _new_record(chosen, mode))
    n = len(record["responses"])
    record["responses"] += [chosen, rejected]
    record["pairs"].append((n, n + 1))
    return record


# ---------------------------------------------------------------- loaders

@register("hh")
def load_hh(split, path=None, *, cache_dir=None, silent=False, **_):
    """Anthropic HH: each row is a full chosen and a full rejected dialogue with a shared prompt."""
    _check_split("hh", split)
    check, data = RowCheck(f"hh:{path}" if path else "hh (Anthropic/hh-rlhf)", split), {}
    for i, row in enumerate(_progress(load_rows("hh", "Anthropic/hh-rlhf", path, split, cache_dir),
                                      "hh", silent)):
        check.total += 1
        row = check.obj(row, i, ("chosen", "rejected"))
        full_chosen, full_rejected = check.text(row, i, "chosen"), check.text(row, i, "rejected")
        prompt = extract_prompt(full_chosen, f"{check.source}: record {i}, key 'chosen'")
        if not full_rejected.startswith(prompt) or \
                extract_prompt(full_rejected, f"{check.source}: record {i}, key 'rejected'") != prompt:
            check.drop(MISMATCHED)
            continue
        chosen, rejected = full_chosen[len(prompt):], full_rejected[len(prompt):]
        # keep_end: multi-turn dialogues matter most at the end, next to the response
        record = _add_pair(data, check, prompt, chosen, rejected, "keep_end")
        if record is not None:
            record["sft_target"] = chosen  # the reference keeps the last row's chosen
    return _nonempty(data, "hh", split, "reading", check)


def _score_ratio(a, b) -> float:
    return math.inf if a == 0 or b == 0 else max(a / b, b / a)


@register("shp")
def load_shp(split, path=None, *, cache_dir=None, silent=False, **_):
    """Stanford Human Preferences: keep pairs whose score ratio is at least 2 (as the reference)."""
    _check_split("shp", split, ("train", "validation", "test"))
    check, data, scores = RowCheck(f"shp:{path}" if path else "shp (stanfordnlp/SHP)", split), {}, {}
    keys = ("history", "human_ref_A", "human_ref_B", "score_A", "score_B", "labels")
    for i, row in enumerate(_progress(load_rows("shp", "stanfordnlp/SHP", path, split, cache_dir),
                                      "shp", silent)):
        check.total += 1
        row = check.obj(row, i, keys)
        history, ref_a, ref_b = (check.text(row, i, k) for k in keys[:3])
        score_a, score_b = (check.number(row, i, k, minimum=0) for k in keys[3:5])
        label = check.choice(row, i, "labels", (0, 1))  # 1: A is preferred (dataset card)
        if score_a != score_b and (score_a > score_b) != (label == 1):
            check.drop("labels disagree with the scores")
            continue
        if _score_ratio(score_a, score_b) < 2:
            check.drop("score ratio < 2")
            continue
        prompt, a, b = human_prompt(history), " " + ref_a, " " + ref_b
        problem = check.pair_problem(prompt, *((a, b) if label == 1 else (b, a)))
        if problem:
            check.drop(problem)
            continue
        record = data.setdefault(prompt, _new_record(None))
        n = len(record["responses"])
        record["pairs"].append((n, n + 1) if label == 1 else (n + 1, n))
        record["responses"] += [a, b]
        scores.setdefault(prompt, []).extend([score_a, score_b])
    for prompt, record in data.items():  # SFT on the best-scored comment
        s = scores[prompt]
        record["sft_target"] = record["responses"][s.index(max(s))]
        record["scores"] = [float(x) for x in s]  # upvotes: graded feedback (loss=coh)
    return _nonempty(data, "shp", split, "dropping pairs with score ratio < 2", check)


def _checked_se_row(row, idx, source):
    check = RowCheck(source, "train")
    row = check.obj(row, idx, ("question", "answers"))
    question = check.text(row, idx, "question")
    answers = row["answers"]
    if isinstance(answers, (str, bytes)) or not isinstance(answers, (list, tuple)):
        check.refuse(idx, "answers", f"must be a list of answers, got {answers!r:.40}")
    for j, answer in enumerate(answers):
        check.obj(answer, f"{idx} answer {j}", ("text", "pm_score"))
        check.text(answer, f"{idx} answer {j}", "text")
        check.number(answer, f"{idx} answer {j}", "pm_score")
    return {"question": strip_html(question),
            "answers": [{**a, "text": strip_html(a["text"])} for a in answers]}


@register("se")
def load_se(split, path=None, *, cache_dir=None, silent=False, **_):
    """StackExchange: every pair of differently scored answers; the hub has only 'train',
    so our train/test are carved out of it by prompt hash (never overlapping)."""
    _check_split("se", split)
    hub_id = "HuggingFaceH4/stack-exchange-preferences"
    check, data = RowCheck(f"se:{path}" if path else f"se ({hub_id})", split), {}
    rows = load_rows("se", hub_id, path, "train", cache_dir)
    if isinstance(rows, list):
        rows = [_checked_se_row(row, i, check.source) for i, row in enumerate(rows)]
    else:  # HTML stripping is the slow part at hub scale: in parallel, cached by datasets
        rows = rows.map(_checked_se_row, with_indices=True, fn_kwargs={"source": check.source},
                        num_proc=os.cpu_count() if len(rows) > 10_000 else None,
                        desc="Stripping SE html")
    for row in _progress(rows, "se", silent):
        prompt = human_prompt(row["question"])
        if not _in_split(prompt, split):
            continue
        check.total += 1
        if prompt in data:
            check.drop(DUPLICATE)  # the same question twice: its first row is kept
            continue
        answers, texts = [], set()
        for a in row["answers"]:
            text = " " + a["text"]
            problem = "duplicate answer" if text in texts else check.pair_problem(prompt, text, None)
            if problem:  # one answer dropped (counted), the question's others kept
                check.drop(problem if text in texts else f"{problem} (an answer)")
            else:
                answers.append((text, a["pm_score"]))
                texts.add(text)
        if not answers:
            continue
        responses, scores = [a for a, _ in answers], [s for _, s in answers]
        # equal scores say nothing about preference (the reference made the later answer win)
        pairs = [(i, j) if scores[i] > scores[j] else (j, i)
                 for i, j in combinations(range(len(scores)), 2) if scores[i] != scores[j]]
        record = _new_record(responses[scores.index(max(scores))])
        record["responses"], record["pairs"] = responses, pairs
        data[prompt] = record
    return _nonempty(data, "se", split, "the hash split", check)


HUMAN_ROLES = {"human", "user"}
ASSISTANT_ROLES = {"gpt", "chatgpt", "bing", "assistant"}


def _exchanges(turns, where, check: RowCheck) -> list[tuple[str, str]]:
    """(human, assistant) pairs from the start of a conversation, up to the first irregular turn."""
    exchanges, human = [], None
    for j, turn in enumerate(turns):
        turn = check.obj(turn, f"{where} turn {j}", ("from", "value"))
        value = check.text(turn, f"{where} turn {j}", "value")
        if turn["from"] in HUMAN_ROLES and human is None:
            human = value
        elif turn["from"] in ASSISTANT_ROLES and human is not None:
            exchanges.append((human, value))
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
        offline_unless_reachable()
        try:
            path = hf_hub_download(repo_id, filename, repo_type="dataset", cache_dir=cache_dir)
        except Exception as err:  # noqa: BLE001 (network, auth: say the offline route)
            raise hub_error(err, "sharegpt", f"{repo_id}/{filename}") from err
    check, data, rows = RowCheck(f"sharegpt:{path}", split), {}, read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of conversations")
    for i, row in enumerate(_progress(rows, "sharegpt", silent)):
        row = check.obj(row, i, ("conversations",))
        exchanges = _exchanges(check.seq(row, i, "conversations", dict), i, check)[:num_turns]
        # split by the first human message, so any num_turns and single-turn AI labels of the
        # same conversations (prefs) land in the same split
        if exchanges and not _in_split(human_prompt(exchanges[0][0]), split):
            continue
        check.total += 1
        if not exchanges:
            check.drop("no human->assistant exchange")
            continue
        history = exchanges[:-1]
        prompt, target = dialogue(history, exchanges[-1][0]), " " + exchanges[-1][1]
        texts = [text for exchange in history for text in exchange]
        problem = check.pair_problem(prompt, target, None) or (MARKERS if has_markers(texts) else None)
        if problem:
            check.drop(problem)
            continue
        if prompt in data:
            check.drop(DUPLICATE)
            continue
        record = _new_record(target, "keep_end" if history else "keep_start")
        record["responses"] = [target]
        data[prompt] = record
    return _nonempty(data, "sharegpt", split,
                     "the hash split and dropping unusable conversations", check)


def _response_index(record: dict, text: str) -> int:
    if text not in record["responses"]:
        record["responses"].append(text)
    return record["responses"].index(text)


@register("prefs")
def load_prefs(split, path=None, *, silent=False, **_):
    """AlpacaEval-style annotations.json: [{instruction, output_1, output_2, preference}]; rows
    without a decisive label (ties, null labels of failed judgements) are dropped and counted."""
    _check_split("prefs", split)
    if path is None:
        raise ValueError("dataset 'prefs' needs a file: use 'prefs:PATH' or prefs_path=PATH")
    check, data, rows = RowCheck(f"prefs:{path}", split), {}, read_json(path)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of annotations")
    for i, row in enumerate(_progress(rows, "prefs", silent)):
        row = check.obj(row, i, ("instruction", "output_1", "output_2"))
        instruction = check.text(row, i, "instruction")
        outputs = [" " + check.text(row, i, "output_1"), " " + check.text(row, i, "output_2")]
        prompt = human_prompt(instruction)
        if not _in_split(prompt, split):
            continue
        check.total += 1
        winner = judge_winner(row.get("preference"))
        if isinstance(winner, str):
            check.drop(winner)
            continue
        chosen, rejected = outputs if winner == 1 else outputs[::-1]
        problem = check.pair_problem(prompt, chosen, rejected)
        if problem:
            check.drop(problem)
            continue
        record = data.setdefault(prompt, _new_record(chosen))
        record["pairs"].append((_response_index(record, chosen), _response_index(record, rejected)))
    return _nonempty(data, f"prefs:{path}", split,
                     "the hash split and dropping ties/missing labels", check)


def _space(text: str) -> str:
    return text if text[:1].isspace() else " " + text


def _add_canonical_row(data: Records, row: dict, i, check: RowCheck):
    """A canonical row {prompt, responses, pairs[, sft_target, truncation_mode]}: types and pair
    indices refused when wrong; empty, identical or repeated pairs dropped and counted."""
    row = check.obj(row, i, ("responses", "pairs"))
    responses = [_space(r) for r in check.seq(row, i, "responses", str)]
    pairs = []
    for j, pair in enumerate(check.seq(row, i, "pairs", list)):
        if len(pair) != 2 or not all(isinstance(k, int) and not isinstance(k, bool)
                                     and 0 <= k < len(responses) for k in pair):
            check.refuse(i, f"pairs[{j}]", f"{pair} is not two indices into the "
                         f"{len(responses)} responses", "a pair is [winner_index, loser_index]")
        problem = check.pair_problem(row["prompt"], responses[pair[0]], responses[pair[1]])
        if problem:
            check.drop(problem)
        else:
            pairs.append(tuple(pair))
    mode = row.get("truncation_mode", "keep_start")
    if mode not in ("keep_start", "keep_end"):
        check.refuse(i, "truncation_mode", f"is {mode!r}", "use keep_start or keep_end")
    if row["pairs"] and not pairs:  # every pair was dropped (and counted)
        return
    if row.get("sft_target") is not None:
        target = _space(check.text(row, i, "sft_target"))
    elif pairs:
        target = responses[pairs[0][0]]
    else:
        check.refuse(i, "sft_target", "is missing", "a row without pairs needs an sft_target")
    if not target.strip():
        check.drop(EMPTY)
        return
    record = data.setdefault(row["prompt"], _new_record(target, mode))
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
        raise DataError(f"{path}: expected a list of records or an object keyed by prompt")
    check, data = RowCheck(f"json:{path}", split), {}
    for i, row in enumerate(rows):
        row = check.obj(row, i, ("prompt",))
        if not _in_split(check.text(row, i, "prompt"), split):
            continue
        check.total += 1
        if "responses" in row:
            _add_canonical_row(data, row, i, check)
        else:
            row = check.obj(row, i, ("chosen", "rejected"))
            _add_pair(data, check, row["prompt"], _space(check.text(row, i, "chosen")),
                      _space(check.text(row, i, "rejected")), "keep_start")
    return _nonempty(data, f"json:{path}", split, "the hash split", check)


@register("toy")
def load_toy(split, path=None, **_):
    """The bundled toy task (canonical records already); it takes no path."""
    if path is not None:
        raise ValueError(f"dataset 'toy' is generated, not read from a file: got 'toy:{path}'; "
                         "use datasets=[toy], or json:PATH for your own file")
    from harness.data.toy_task import toy_records  # lazy: only toy runs need it
    data = toy_records(split)
    for record in data.values():
        record.setdefault("truncation_mode", "keep_start")
    return data
