"""Reading raw data rows and checking them strictly, shared by every loader (harness/data/
sources.py and any loader added beside it), so nothing malformed is trained on silently and a
failed read names the file (or the hub id and the offline route).

A row is either refused or dropped and counted:

    refused (DataError, one line naming the file, the record and the key, and the fix): a row
        that is not an object, a missing key, a wrong type (a number where text is expected,
        a string where a number or a list is expected), a value out of range (a label that is
        neither 0 nor 1, a negative score, a pair index outside the responses), a file that is
        not UTF-8 or not JSON, an empty file;
    dropped and counted by reason (one warning per source and split): an empty response or
        prompt, chosen identical to rejected, a pair seen before, chosen and rejected transcripts
        with different prompts, text holding the strings tokenizers read as BOS / EOS.

    check = RowCheck("shp:/data/shp.jsonl", "train")
    row = check.obj(raw, i, ("history", "labels"))       # an object holding these keys
    label = check.choice(row, i, "labels", (0, 1))       # refuse anything else
    if (reason := check.pair_problem(prompt, a, b)):     # or check.drop(reason) directly
        check.drop(reason); continue
    check.report()                                       # "dropped 3 of 120 rows (...)"
"""

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Mapping

logger = logging.getLogger("harness.data")

# Strings that tokenizers turn into BOS/EOS; inside a response they would teach the model to
# stop mid-answer (the RLAIF fork drops such conversations for the same reason).
SPECIAL_MARKERS = ("<s>", "</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")

EMPTY, IDENTICAL, DUPLICATE = "empty response", "chosen identical to rejected", "duplicate pair"
MISMATCHED = "chosen and rejected transcripts have different prompts"
MARKERS = "special token strings"  # e.g. </s> inside a response


class DataError(ValueError):
    """A data file or row that cannot be trained on: the message names file, record and key."""


def check_exists(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"local dataset path {path!r} does not exist")


def _type_name(value) -> str:
    return "null" if value is None else {str: "a string", bool: "a boolean", int: "a number",
                                         float: "a number", list: "a list",
                                         dict: "an object"}.get(type(value), type(value).__name__)


def read_json(path: str):
    """A JSON document or JSON Lines file; errors name the file and line."""
    check_exists(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        line = open(path, "rb").read()[:err.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line} is not UTF-8 text (byte {err.object[err.start]:#x} "
                        f"at offset {err.start}); re-save the file as UTF-8") from None
    except IsADirectoryError:
        raise DataError(f"{path} is a directory; this loader reads one JSON / JSON Lines "
                        "file") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty (no rows)")
    if not path.endswith(".jsonl"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":  # a complete first value followed by more = JSON Lines
                raise DataError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: invalid JSON on line {lineno}: {err.msg}") from None
    return rows


def judge_winner(label):
    """1 or 2 for a decisive AlpacaEval label, else the reason the row is dropped. A null label
    is never read as a win (the RLAIF fork's `== 1 else` turned it into 'output 2 wins')."""
    if label is None:
        return "missing label"
    if isinstance(label, bool) or not isinstance(label, (int, float)) or math.isnan(label):
        return "invalid label"
    if label in (0, 1.5):
        return "tie"
    if 1 <= label <= 2:  # weighted judges give a soft preference in [1, 2]
        return 1 if label < 1.5 else 2
    return "invalid label"


def has_markers(texts) -> bool:
    return any(marker in text for text in texts for marker in SPECIAL_MARKERS)


class RowCheck:
    """The checks of one source's rows and its counter of dropped rows (see the module doc)."""

    def __init__(self, source: str, split: str):
        self.source, self.split = source, split
        self.dropped, self.total = Counter(), 0
        self._seen = set()

    def refuse(self, i, key, problem: str, fix: str = ""):
        where = f"{self.source}: record {i}" + (f", key {key!r}" if key is not None else "")
        raise DataError(f"{where}: {problem}" + (f"; {fix}" if fix else ""))

    def obj(self, row, i, keys=()) -> Mapping:
        """`row` as an object holding every key of `keys` (None counts as missing)."""
        if not isinstance(row, Mapping):  # datasets hands out dict-like rows, JSON gives dicts
            self.refuse(i, None, f"is {_type_name(row)}, not an object with keys {list(keys)}")
        for key in keys:
            if row.get(key) is None:
                raise DataError(f"{self.source}: record {i} is missing key {key!r} (every "
                                f"record needs {list(keys)})")
        return row

    def text(self, row, i, key) -> str:
        value = row.get(key)
        if not isinstance(value, str):
            self.refuse(i, key, f"must be text, got {_type_name(value)} {value!r:.40}")
        return value

    def number(self, row, i, key, minimum=None) -> float:
        value = row.get(key)
        if isinstance(value, str):
            self.refuse(i, key, f"must be a number, got the string {value!r:.40}",
                        "write it without quotes (strings compare as text: '9' > '10')")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.refuse(i, key, f"must be a finite number, got {_type_name(value)} {value!r:.40}")
        if minimum is not None and value < minimum:
            self.refuse(i, key, f"is {value}, out of range (must be >= {minimum})")
        return value

    def choice(self, row, i, key, allowed: tuple):
        value = row.get(key)
        if isinstance(value, bool) or value not in allowed or type(value) is not type(allowed[0]):
            self.refuse(i, key, f"is {value!r:.40} ({_type_name(value)}), out of range: must be "
                        f"one of {list(allowed)}")
        return value

    def seq(self, row, i, key, of: type = str) -> list:
        value = row.get(key)
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            self.refuse(i, key, f"must be a list, got {_type_name(value)} {value!r:.40}")
        for j, item in enumerate(value):
            if not isinstance(item, of) or isinstance(item, bool):
                self.refuse(i, f"{key}[{j}]", f"must be {_type_name(of())}, got "
                            f"{_type_name(item)} {item!r:.40}")
        return list(value)

    def drop(self, reason: str):
        self.dropped[reason] += 1

    def pair_problem(self, prompt: str, chosen: str, rejected: str | None) -> str | None:
        """Why a (prompt, chosen, rejected) pair must not be trained on, else None (rejected
        None: an SFT target). Remembers pairs, so a repeated one is a duplicate."""
        texts = [t for t in (chosen, rejected) if t is not None]
        if not prompt.strip() or any(not t.strip() for t in texts):
            return EMPTY
        if rejected is not None and chosen == rejected:
            return IDENTICAL
        if has_markers([prompt, *texts]):
            return MARKERS
        if (prompt, chosen, rejected) in self._seen:
            return DUPLICATE
        self._seen.add((prompt, chosen, rejected))
        return None

    def report(self):
        """One warning line with the dropped rows by reason (nothing when none were dropped)."""
        if self.dropped:
            reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.dropped.items()))
            logger.warning("%s (%s): dropped %d of %d rows (%s)", self.source, self.split,
                           sum(self.dropped.values()), self.total, reasons)


def hub_error(err: Exception, name: str, hub_id: str) -> DataError:
    """A failed hub download, as one line that names what was tried and the offline routes."""
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
    return DataError(
        f"dataset {name!r}: could not load {hub_id!r} from the Hugging Face hub "
        f"({type(err).__name__}: {reason}). Offline, pass a local copy in the same raw schema: "
        f"datasets=[{name}:/path/to/copy] (a JSON/JSONL file or a folder of split files), or set "
        "HF_HUB_OFFLINE=1 to read the hub cache only")


_HUB = {}


def hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face hub (HF_ENDPOINT) answers a TCP connection, tried once per
    process; False under HF_HUB_OFFLINE=1."""
    if "ok" not in _HUB:
        import socket
        from urllib.parse import urlparse
        endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        try:
            if offline:
                raise OSError("HF_HUB_OFFLINE=1")
            socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout).close()
            _HUB["ok"] = True
        except OSError as err:
            _HUB["ok"], _HUB["why"] = False, str(err)
    return _HUB["ok"]


def offline_unless_reachable() -> bool:
    """When the hub cannot be reached, switch datasets / huggingface_hub / transformers to the
    local cache only (a clear failure in seconds instead of minutes of retries); True if so."""
    if hub_reachable():
        return False
    import huggingface_hub.constants
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        import datasets
        datasets.config.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    if not _HUB.get("said"):
        logger.warning("the Hugging Face hub is unreachable (%s): reading the local cache only",
                       _HUB.get("why"))
        _HUB["said"] = True
    return True


def load_rows(name: str, hub_id: str, path, split: str, cache_dir):
    """Rows of `split` from the hub, from a local folder in the same raw schema (datasets), or
    from one local JSON / JSON Lines file (taken to be the requested split)."""
    import datasets  # lazy: a config check needs none of it
    if path is None:
        offline_unless_reachable()
        try:
            return datasets.load_dataset(hub_id, split=split, cache_dir=cache_dir)
        except Exception as err:  # noqa: BLE001 (network, auth, missing split: say the route)
            raise hub_error(err, name, hub_id) from err
    check_exists(path)
    if not os.path.isdir(path):
        rows = read_json(path)
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected JSON Lines or a JSON list of records, got "
                            f"{type(rows).__name__}")
        return rows
    try:  # split files are found by name (train.jsonl, test.json, ...) as on the hub
        return datasets.load_dataset(path, split=split, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 (DatasetGenerationError chains, empty folders)
        cause = err
        while cause.__cause__ is not None or cause.__context__ is not None:
            cause = cause.__cause__ or cause.__context__
        raise DataError(f"{path}: could not read split {split!r} of this folder "
                        f"({type(cause).__name__}: {str(cause)[:200]}); it needs split files "
                        "such as train.jsonl / test.jsonl in the source's raw schema") from err
