"""Conversational preference data: the TRL standard formats and UltraFeedback (binarized).

    datasets=[trl:HUB_ID_OR_PATH]   TRL's standard formats, strings or message lists:
                                    {prompt, chosen, rejected} (preference), {chosen, rejected}
                                    (implicit prompt: their common beginning), {messages} (SFT),
                                    {prompt, completion} (SFT)
    datasets=[ultrafeedback]        HuggingFaceH4/ultrafeedback_binarized (train_prefs /
                                    test_prefs), or ultrafeedback:PATH in the same raw schema

Messages become canonical records like every other source: the prompt in the reference dialogue
format (system text, then "\\n\\nHuman: ..." / "\\n\\nAssistant: ..." turns), responses with the
format's leading space. harness/data/chat.py parses that text back into the same messages to
apply a chat template, so each prompt is checked to survive the round trip. Scores
(score_chosen / score_rejected) are kept in the record's "scores", aligned with "responses".

A local PATH is a file (JSON / JSONL; train and test carved out by prompt hash, as for sources
without a test split) or a folder with one file per split named as on the hub (train.jsonl,
test_prefs.json, ...). A hub id without a test split is hash-split the same way.

Bad records are dropped and counted by reason, never trained on: an empty message list, an
unknown role, a missing or empty assistant answer, a system message after the first turn,
chosen and rejected with different prompts, identical answers, special-token strings, text the
dialogue format cannot hold. The log names each reason's count and its first record (index and
key); a source left with nothing is an error naming them.
"""

import logging
import os
from collections import Counter
from collections.abc import Mapping

from harness.data.dialogue import ASSISTANT, HUMAN, extract_prompt, messages_prompt, to_messages
from harness.data.sources import SPECIAL_MARKERS, Records, in_test_split, read_json, register

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
UF_HUB, UF_SPLITS = "HuggingFaceH4/ultrafeedback_binarized", {"train": "train_prefs",
                                                              "test": "test_prefs"}
DATA_FILES = (".jsonl", ".json", ".parquet")


class Dropped(Exception):
    """A record that cannot be used: `reason` is counted, `key` names the field at fault."""

    def __init__(self, reason: str, key: str):
        super().__init__(reason)
        self.reason, self.key = reason, key


class DropCounter:
    """Counts dropped records by reason and remembers the first record of each."""

    def __init__(self, source: str, split: str):
        self.source, self.split, self.total = source, split, 0
        self.counts: Counter = Counter()
        self.first: dict[str, str] = {}

    def add(self, drop: Dropped, index):
        self.counts[drop.reason] += 1
        self.first.setdefault(drop.reason, f"record {index}, key {drop.key!r}")

    def summary(self) -> str:
        return "; ".join(f"{reason}: {n} (first: {self.first[reason]})"
                         for reason, n in sorted(self.counts.items()))

    def report(self, data: Records) -> Records:
        if self.counts:
            logger.warning("%s (%s): dropped %d of %d records: %s", self.source, self.split,
                           sum(self.counts.values()), self.total, self.summary())
        if not data:
            raise ValueError(f"{self.source} split {self.split!r} has no usable records"
                             + (f" (dropped: {self.summary()})" if self.counts else ""))
        return data


# ---------------------------------------------------------------- messages -> canonical text
def check_messages(messages, key: str) -> list[dict]:
    """A list of {role, content} with known roles, string contents, system only first."""
    if not isinstance(messages, list) or not messages:
        raise Dropped("empty message list", key)
    for j, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            raise Dropped("unknown role", f"{key}[{j}].role")
        if not isinstance(m.get("content"), str):
            raise Dropped("message content not a string", f"{key}[{j}].content")
        if m["role"] == "system" and j > 0:
            raise Dropped("system message after the first turn", f"{key}[{j}]")
        if any(marker in m["content"] for marker in SPECIAL_MARKERS):
            raise Dropped("special token strings", f"{key}[{j}].content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def prompt_text(messages: list[dict], key: str) -> str:
    """The canonical prompt of messages that end with the user's turn."""
    if not any(m["role"] == "user" for m in messages) or messages[-1]["role"] != "user":
        raise Dropped("prompt does not end with a user turn", key)
    text = messages_prompt(messages)
    if to_messages(text) != messages:  # e.g. a text holding "\n\nAssistant:" itself
        raise Dropped("text the dialogue format cannot hold", key)
    return text


def answer_text(messages: list[dict], key: str) -> str:
    """The canonical response of a one-message assistant completion."""
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise Dropped("missing assistant answer", key)
    text = messages[0]["content"]
    if not text.strip():
        raise Dropped("empty assistant answer", key)
    if HUMAN.strip() in text or ASSISTANT.strip() in text:
        raise Dropped("text the dialogue format cannot hold", key)
    return " " + text


def split_conversation(chosen: list[dict], rejected: list[dict]):
    """(prompt messages, chosen answer, rejected answer) of two full conversations: the prompt
    is their common beginning (TRL's implicit prompt)."""
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise Dropped("missing assistant answer", key)
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    if not n:
        raise Dropped("chosen and rejected have different prompts", "rejected")
    return chosen[:n], chosen[n:], rejected[n:]


# ---------------------------------------------------------------- TRL standard formats
def _string(row, key):
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise Dropped(f"empty or non-string {key}", key)
    if any(marker in value for marker in SPECIAL_MARKERS):
        raise Dropped("special token strings", key)
    return value


def _implicit_string_prompt(chosen: str, rejected: str) -> str:
    """The shared prompt of two full string conversations: up to the last "\\n\\nAssistant:" in
    the dialogue format, else their common beginning (TRL's extract_prompt, a space before the
    answers going to the answers)."""
    if ASSISTANT in chosen:
        prompt = extract_prompt(chosen, "chosen")
        if rejected.startswith(prompt):
            return prompt
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    if n and chosen[n - 1] == " ":
        n -= 1
    if not n:
        raise Dropped("chosen and rejected have different prompts", "rejected")
    return chosen[:n]


def _space(text: str) -> str:
    return text if text[:1].isspace() else " " + text


def preference_row(row) -> tuple[str, str, str]:
    """(prompt, chosen, rejected) of a TRL preference row, explicit or implicit prompt."""
    chosen, rejected = row.get("chosen"), row.get("rejected")
    if isinstance(chosen, list) or isinstance(rejected, list):
        chosen, rejected = check_messages(chosen, "chosen"), check_messages(rejected, "rejected")
        if isinstance(row.get("prompt"), list):
            prompt = check_messages(row["prompt"], "prompt")
        else:  # implicit; UltraFeedback's string prompt repeats the conversations' user turn
            prompt, chosen, rejected = split_conversation(chosen, rejected)
        return prompt_text(prompt, "prompt"), answer_text(chosen, "chosen"), \
            answer_text(rejected, "rejected")
    chosen, rejected = _string(row, "chosen"), _string(row, "rejected")
    prompt = row.get("prompt")
    if prompt is None:
        prompt = _implicit_string_prompt(chosen, rejected)
        chosen, rejected = chosen[len(prompt):], rejected[len(prompt):]
    elif not isinstance(prompt, str):
        raise Dropped("prompt is neither a string nor a message list", "prompt")
    return prompt, _space(chosen), _space(rejected)


def sft_row(row) -> tuple[str, str]:
    """(prompt, target) of a TRL SFT row: {messages} or {prompt, completion}."""
    if "messages" in row and row.get("messages") is not None:
        messages = check_messages(row["messages"], "messages")
        return prompt_text(messages[:-1], "messages"), answer_text(messages[-1:], "messages")
    prompt, completion = row.get("prompt"), row.get("completion")
    if isinstance(prompt, list) or isinstance(completion, list):
        return prompt_text(check_messages(prompt, "prompt"), "prompt"), \
            answer_text(check_messages(completion, "completion"), "completion")
    return _string(row, "prompt"), _space(_string(row, "completion"))


def _score(row, key):
    value = row.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        else None


def add_row(data: Records, row, index, split: str, hash_split: bool, drops: DropCounter):
    """One raw row into the records (or into the drop counter)."""
    drops.total += 1
    try:
        if not isinstance(row, Mapping):
            raise Dropped("record is not an object", "")
        if row.get("chosen") is not None or row.get("rejected") is not None:
            prompt, chosen, rejected = preference_row(row)
            if chosen == rejected:
                raise Dropped("identical chosen and rejected", "rejected")
            scores = [_score(row, "score_chosen"), _score(row, "score_rejected")]
        elif row.get("messages") is not None or row.get("completion") is not None:
            (prompt, chosen), rejected, scores = sft_row(row), None, [None]
        else:
            raise Dropped("not a TRL preference or SFT row (needs chosen/rejected, messages "
                          "or prompt/completion)", "chosen")
    except Dropped as drop:
        drops.add(drop, index)
        return
    if hash_split and in_test_split(prompt) != (split == "test"):
        drops.total -= 1  # the other split's record
        return
    add_to_record(data, prompt, chosen, rejected, scores)


def add_to_record(data: Records, prompt: str, chosen: str, rejected: str | None, scores: list):
    multi_turn = prompt.count(HUMAN) > 1
    record = data.setdefault(prompt, {"responses": [], "pairs": [], "sft_target": chosen,
                                      "truncation_mode": "keep_end" if multi_turn else
                                      "keep_start", "scores": []})
    n = len(record["responses"])
    record["responses"].append(chosen)
    if rejected is not None:
        record["responses"].append(rejected)
        record["pairs"].append((n, n + 1))
    record["scores"] += scores
    known = [(s, r) for s, r in zip(record["scores"], record["responses"]) if s is not None]
    if known:  # SFT on the best-scored answer
        record["sft_target"] = max(known, key=lambda x: x[0])[1]


def finish(data: Records) -> Records:
    """Records without any score carry none."""
    for record in data.values():
        if all(s is None for s in record["scores"]):
            del record["scores"]
    return data


# ---------------------------------------------------------------- reading rows
def _local_rows(path: str, file_split: str):
    """(rows, hash_split) of a local file, or of the split's file in a local folder."""
    if os.path.isdir(path):
        for ext in DATA_FILES:
            candidate = os.path.join(path, file_split + ext)
            if os.path.isfile(candidate):
                if ext == ".parquet":
                    import datasets  # lazy: a run without parquet or hub data needs none of it
                    rows = datasets.load_dataset("parquet", data_files=candidate, split="train")
                    return rows, False
                rows = read_json(candidate)
                return (rows if isinstance(rows, list) else [rows]), False
        raise FileNotFoundError(f"{path}: no file for split {file_split!r} (looked for "
                                f"{', '.join(file_split + e for e in DATA_FILES)})")
    rows = read_json(path)
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a list of records (JSON) or one per line (JSONL)")
    return rows, True


def read_rows(hub_or_path: str, split: str, file_split: str, cache_dir=None):
    """(rows, hash_split): a local path, else the hub dataset's split (its train split,
    hash-split, when the hub has no such split)."""
    if os.path.exists(hub_or_path):
        return _local_rows(hub_or_path, file_split)
    if hub_or_path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"local dataset path {hub_or_path!r} does not exist")
    import datasets  # lazy: importing it (and pandas) costs ~2 s a process
    try:
        return datasets.load_dataset(hub_or_path, split=file_split, cache_dir=cache_dir), False
    except ValueError as e:  # the hub dataset has no such split
        if "split" not in str(e).lower() or split != "test":
            raise
        return datasets.load_dataset(hub_or_path, split="train", cache_dir=cache_dir), True


def load_rows(source: str, rows, split: str, hash_split: bool) -> Records:
    data, drops = {}, DropCounter(source, split)
    for i, row in enumerate(rows):
        add_row(data, row, i, split, hash_split, drops)
    return drops.report(finish(data))


@register("trl")
def load_trl(split, path=None, *, cache_dir=None, **_):
    """A dataset in one of TRL's standard formats: trl:HUB_ID or trl:PATH."""
    if split not in ("train", "test"):
        raise ValueError(f"dataset 'trl' has no split {split!r}; use train or test")
    if not path:
        raise ValueError("dataset 'trl' needs a hub id or a file: use trl:HUB_ID or trl:PATH "
                         "(e.g. trl:trl-lib/ultrafeedback_binarized)")
    rows, hash_split = read_rows(path, split, split, cache_dir)
    return load_rows(f"trl:{path}", rows, split, hash_split)


@register("ultrafeedback")
def load_ultrafeedback(split, path=None, *, cache_dir=None, **_):
    """UltraFeedback binarized: chosen / rejected conversations with their GPT-4 scores."""
    if split not in UF_SPLITS:
        raise ValueError(f"dataset 'ultrafeedback' has no split {split!r}; use train or test")
    rows, hash_split = read_rows(path or UF_HUB, split, UF_SPLITS[split], cache_dir)
    return load_rows(f"ultrafeedback:{path or UF_HUB}", rows, split, hash_split)
