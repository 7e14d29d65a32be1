"""The malformed-input matrix: every loader x wrong type / empty / out of range / duplicate /
mismatched (and the file-level cases) ends in one of two ways, never in training on it silently:

    refused   a DataError (ValueError) naming the file, the record and the key
    dropped   the row is not in the records and a warning counts it by reason

A case that does not apply to a loader (no numeric field, no separate prompts) is listed as such.
MATRIX below is the table; test_matrix_figures prints its totals for the closing note.
"""

import json
import logging
from collections import Counter

import pytest

from harness.data.sources import in_test_split
from harness.data.validate import DataError
from preference_datasets import get_dataset

P = "\n\nHuman: {}\n\nAssistant:"


def train_prompts(n: int, fmt=lambda i: f"Question number {i}?") -> list[str]:
    """Texts whose prompt falls in the train split (so a dropped row is really dropped)."""
    out, i = [], 0
    while len(out) < n:
        if not in_test_split(P.format(fmt(i))) and not in_test_split(fmt(i)):
            out.append(fmt(i))
        i += 1
    return out


Q = train_prompts(3)


def hh_row(q, chosen=" A fine answer.", rejected=" A worse answer.", rejected_q=None):
    return {"chosen": P.format(q) + chosen if isinstance(chosen, str) else chosen,
            "rejected": P.format(rejected_q or q) + rejected}


def shp_row(q, a="A fine answer.", b="A worse answer.", sa=10, sb=2, label=1):
    return {"history": q, "human_ref_A": a, "human_ref_B": b, "score_A": sa, "score_B": sb,
            "labels": label}


def se_row(q, answers=(("A fine answer.", 3), ("A worse answer.", 1))):
    return {"question": q, "answers": [{"text": t, "pm_score": s} for t, s in answers]}


def sg_row(q, answer="A fine answer.", first="human"):
    return {"conversations": [{"from": first, "value": q}, {"from": "gpt", "value": answer}]}


def prefs_row(q, o1="A fine answer.", o2="A worse answer.", pref=1):
    return {"instruction": q, "output_1": o1, "output_2": o2, "preference": pref}


def pair_row(q, chosen="A fine answer.", rejected="A worse answer."):
    return {"prompt": P.format(q), "chosen": chosen, "rejected": rejected}


def canon_row(q, responses=("A fine answer.", "A worse answer."), pairs=((0, 1),), **extra):
    return {"prompt": P.format(q), "responses": list(responses) if not isinstance(responses, str)
            else responses, "pairs": [list(p) for p in pairs], "sft_target": "A fine answer.", **extra}


# loader -> (file name, row maker, {case: (bad rows, "refuse" KEY | "drop" REASON | "n/a" WHY)})
NA = "n/a"
MATRIX = {
    "hh": ("hh.jsonl", hh_row, {
        "wrong type": ([hh_row(Q[1], chosen=5)], "refuse chosen"),
        "empty": ([hh_row(Q[1], chosen="")], "drop empty response"),
        "out of range": (None, f"{NA}: no numeric or enumerated field"),
        "duplicate": ([hh_row(Q[1], chosen=" Same.", rejected=" Same.")],
                      "drop chosen identical to rejected"),
        "repeated": ([hh_row(Q[0])], "drop duplicate pair"),
        "mismatched": ([hh_row(Q[1], rejected_q="Another question?")],
                       "drop chosen and rejected transcripts have different prompts")}),
    "shp": ("shp.jsonl", shp_row, {
        "wrong type": ([shp_row(Q[1], sa="50")], "refuse score_A"),
        "wrong type (label)": ([shp_row(Q[1], label="1")], "refuse labels"),
        "empty": ([shp_row(Q[1], a="")], "drop empty response"),
        "out of range": ([shp_row(Q[1], label=2)], "refuse labels"),
        "out of range (score)": ([shp_row(Q[1], sa=-3)], "refuse score_A"),
        "duplicate": ([shp_row(Q[1], a="Same.", b="Same.")], "drop chosen identical to rejected"),
        "repeated": ([shp_row(Q[0])], "drop duplicate pair"),
        "mismatched": ([shp_row(Q[1], sa=2, sb=10, label=1)],
                       "drop labels disagree with the scores")}),
    "se": ("se.jsonl", se_row, {
        "wrong type": ([se_row(Q[1], (("A.", "9"), ("B.", 1)))], "refuse pm_score"),
        "wrong type (list)": ([{"question": Q[1], "answers": "A."}], "refuse answers"),
        "empty": ([se_row(Q[1], (("", 3), ("B.", 1)))], "drop empty response (an answer)"),
        "out of range": ([se_row(Q[1], (("A.", float("nan")), ("B.", 1)))], "refuse pm_score"),
        "duplicate": ([se_row(Q[1], (("Same.", 3), ("Same.", 1)))], "drop duplicate answer"),
        "repeated": ([se_row(Q[0])], "drop duplicate pair"),
        "mismatched": (None, f"{NA}: answers belong to their question's row")}),
    "sharegpt": ("sharegpt.json", sg_row, {
        "wrong type": ([{"conversations": [{"from": "human", "value": 5}]}], "refuse value"),
        "wrong type (list)": ([{"conversations": "hello"}], "refuse conversations"),
        "empty": ([sg_row(Q[1], answer="")], "drop empty response"),
        "out of range": ([sg_row(Q[1], first="robot")], "drop no human->assistant exchange"),
        "duplicate": (None, f"{NA}: SFT data, no pairs"),
        "repeated": ([sg_row(Q[0])], "drop duplicate pair"),
        "mismatched": ([sg_row(Q[1], first="gpt")], "drop no human->assistant exchange")}),
    "prefs": ("annotations.json", prefs_row, {
        "wrong type": ([prefs_row(Q[1], o1=5)], "refuse output_1"),
        "wrong type (label)": ([prefs_row(Q[1], pref="1")], "drop invalid label"),
        "empty": ([prefs_row(Q[1], o1="")], "drop empty response"),
        "out of range": ([prefs_row(Q[1], pref=3)], "drop invalid label"),
        "duplicate": ([prefs_row(Q[1], o1="Same.", o2="Same.")],
                      "drop chosen identical to rejected"),
        "repeated": ([prefs_row(Q[0])], "drop duplicate pair"),
        "mismatched": (None, f"{NA}: one instruction per row")}),
    "json": ("pairs.jsonl", pair_row, {
        "wrong type": ([pair_row(Q[1], chosen=5)], "refuse chosen"),
        "empty": ([pair_row(Q[1], chosen="")], "drop empty response"),
        "out of range": (None, f"{NA}: pair rows have no index (canonical rows do)"),
        "duplicate": ([pair_row(Q[1], chosen="Same.", rejected="Same.")],
                      "drop chosen identical to rejected"),
        "repeated": ([pair_row(Q[0])], "drop duplicate pair"),
        "mismatched": (None, f"{NA}: one prompt per row")}),
    "json canonical": ("canonical.jsonl", canon_row, {
        "wrong type": ([canon_row(Q[1], responses="A fine answer.")], "refuse responses"),
        "empty": ([canon_row(Q[1], responses=("", "B."))], "drop empty response"),
        "out of range": ([canon_row(Q[1], pairs=((0, 5),))], "refuse pairs[0]"),
        "duplicate": ([canon_row(Q[1], responses=("Same.", "Same."))],
                      "drop chosen identical to rejected"),
        "repeated": ([canon_row(Q[0])], "drop duplicate pair"),
        "mismatched": ([canon_row(Q[1], pairs=((0, 1, 1),))], "refuse pairs[0]")}),
}
SPEC = {"json canonical": "json"}
CASES = [(loader, case) for loader, (_, _, cases) in MATRIX.items() for case in cases]


def load(tmp_path, loader, rows):
    name, _, _ = MATRIX[loader]
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text(json.dumps(rows))
    return path, get_dataset(f"{SPEC.get(loader, loader)}:{path}", "train", silent=True)


@pytest.mark.parametrize("loader, case", CASES, ids=[f"{a}-{b}" for a, b in CASES])
def test_bad_row_is_refused_or_dropped_and_counted(tmp_path, caplog, loader, case):
    _, row, cases = MATRIX[loader]
    bad, outcome = cases[case]
    if outcome.startswith(NA):
        pytest.skip(outcome)
    good = [row(Q[0]), row(Q[2])]
    kind, _, what = outcome.partition(" ")
    if kind == "refuse":
        with pytest.raises(DataError) as err:
            load(tmp_path, loader, [good[0], *bad, good[1]])
        message = str(err.value)
        assert MATRIX[loader][0] in message and "record 1" in message, message
        assert f"'{what}'" in message, message
        return
    with caplog.at_level(logging.WARNING):
        _, data = load(tmp_path, loader, [good[0], *bad, good[1]])
    assert f"{what}: 1" in caplog.text and "dropped 1 of" in caplog.text, caplog.text
    if loader == "se" and case in ("empty", "duplicate"):  # the question keeps its other answer
        assert len(data[P.format(Q[1])]["responses"]) == 1
    else:
        assert P.format(Q[1]) not in data or case == "repeated"
    # the good rows stay
    assert P.format(Q[0]) in data and P.format(Q[2]) in data
    record = data[P.format(Q[0])]
    assert len(record["pairs"]) <= 1 and len(set(record["responses"])) == len(record["responses"])


@pytest.mark.parametrize("loader", list(MATRIX))
@pytest.mark.parametrize("content, message", [
    (b"", "the file is empty"), (b'{"chosen": "\xff\xfe"}\n', "is not UTF-8"),
    (b'[{"chosen": "a"', "invalid JSON")], ids=["empty file", "not utf-8", "truncated"])
def test_broken_files_are_refused_naming_the_file(tmp_path, loader, content, message):
    path = tmp_path / MATRIX[loader][0]
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        get_dataset(f"{SPEC.get(loader, loader)}:{path}", "train", silent=True)
    assert str(path) in str(err.value)


def test_a_path_given_to_the_toy_task_is_refused():
    with pytest.raises(ValueError, match="generated, not read from a file"):
        get_dataset("toy:/nonexistent", "train")


def test_matrix_figures():
    """The totals for the closing note: cases, refused, dropped and counted, not applicable.
    (Trained silently: 0 by construction; every case above asserts refuse or drop.)"""
    outcomes = Counter(outcome.split(" ")[0].rstrip(":") for _, _, cases in MATRIX.values()
                       for _, outcome in cases.values())
    print(f"\nmalformed-input matrix: {sum(outcomes.values())} cases ({len(MATRIX)} loaders), "
          f"refused {outcomes['refuse']}, dropped and counted {outcomes['drop']}, "
          f"not applicable {outcomes[NA]}; plus {3 * len(MATRIX)} broken files, all refused")
    assert set(outcomes) <= {"refuse", "drop", NA}
