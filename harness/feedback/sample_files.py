"""Sample files: what generate_samples.py writes and the labeller and evaluators read.

One JSON object per line and per prompt:
    {"prompt": "\\n\\nHuman: ...\\n\\nAssistant:", "instruction": "...", "samples": [" ...", ...],
     "generator": NAME, "provenance": {checkpoint, sampling settings, ...}}
`instruction` is the prompt without its outer "\\n\\nHuman: " and "\\n\\nAssistant:", so that
the prefs loader, which wraps an instruction in exactly those, rebuilds the same prompt (multi-
turn prompts included). AlpacaEval outputs files ([{instruction, output, generator}]) are read
too, as one sample per instruction.
"""

import json
import os

from harness.data.dialogue import human_prompt, instruction_of
from harness.data.sources import read_json
from harness.feedback.results_log import fingerprint


def pair_id(instruction: str, output_1: str, output_2: str) -> str:
    return fingerprint({"i": instruction, "1": output_1, "2": output_2})


def strip_output(text: str) -> str:
    """AlpacaEval outputs carry no leading space; our responses start with one."""
    return text[1:] if text.startswith(" ") else text


def sample_row(prompt: str, samples: list[str], generator: str, provenance: dict) -> dict:
    return {"prompt": prompt, "instruction": instruction_of(prompt), "samples": samples,
            "generator": generator, "provenance": provenance}


def read_samples(path: str) -> dict[str, dict]:
    """{instruction: {"samples": [output, ...], "generator": str}} from either format."""
    rows = read_json(path)
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected sample rows (JSONL) or a list of AlpacaEval outputs")
    out = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or ("samples" not in row and "output" not in row):
            raise ValueError(f"{path}: row {i} has neither 'samples' (generate_samples.py) nor "
                             "'output' (AlpacaEval outputs)")
        instruction = row.get("instruction")
        if instruction is None:
            if "prompt" not in row:
                raise ValueError(f"{path}: row {i} has neither 'instruction' nor 'prompt'")
            instruction = instruction_of(row["prompt"])
        samples = row["samples"] if "samples" in row else [row["output"]]
        if not isinstance(samples, list) or not all(isinstance(s, str) for s in samples):
            raise ValueError(f"{path}: row {i}: samples must be a list of strings")
        if instruction in out:
            raise ValueError(f"{path}: row {i} repeats the prompt of an earlier row "
                             f"({instruction[:60]!r}); merge its samples into one row")
        out[instruction] = {"samples": [strip_output(s) for s in samples],
                            "generator": row.get("generator") or path}
    if not out:
        raise ValueError(f"{path}: no samples")
    return out


def _pair(instruction, out_1, out_2, gen_1, gen_2) -> dict:
    return {"id": pair_id(instruction, out_1, out_2), "instruction": instruction,
            "output_1": out_1, "output_2": out_2, "generator_1": gen_1, "generator_2": gen_2}


def make_pairs(sample_sets: list[dict], allow_unmatched: bool = False) -> tuple[list[dict], dict]:
    """Pairs to judge, and the unmatched-prompt report.

    One set: samples (0, 1), (2, 3), ... of each prompt (a prompt with fewer than two samples
    is an error). Two sets: sample 0 of A (output_1) against sample 0 of B (output_2), matched
    by instruction; prompts present on one side only are reported and, unless
    `allow_unmatched`, stop the run: silently pairing the rest would bias a win rate."""
    if len(sample_sets) == 1:
        pairs = []
        for instruction, s in sample_sets[0].items():
            if len(s["samples"]) < 2:
                raise ValueError(f"prompt {instruction[:60]!r} has {len(s['samples'])} sample(s); "
                                 "pairs from one file need >= 2 per prompt (--n-samples 2)")
            for k in range(0, len(s["samples"]) - 1, 2):
                pairs.append(_pair(instruction, s["samples"][k], s["samples"][k + 1],
                                   s["generator"], s["generator"]))
        return pairs, {}
    a, b = sample_sets
    only_a, only_b = [i for i in a if i not in b], [i for i in b if i not in a]
    report = {"only_in_first": len(only_a), "only_in_second": len(only_b),
              "examples": [x[:80] for x in (only_a + only_b)[:5]]}
    if (only_a or only_b) and not allow_unmatched:
        raise ValueError(f"the sample files do not hold the same prompts: {len(only_a)} only in "
                         f"the first, {len(only_b)} only in the second (e.g. "
                         f"{report['examples'][:2]}); regenerate them on one prompt set, or pass "
                         "--allow-unmatched to label the common prompts only")
    pairs = [_pair(i, a[i]["samples"][0], b[i]["samples"][0], a[i]["generator"], b[i]["generator"])
             for i in a if i in b]
    if only_a or only_b:
        print(f"WARNING: unmatched prompts: {json.dumps(report)}")
    return pairs, report if (only_a or only_b) else {}


def load_prompt_set(spec: str, split: str = "test") -> list[str]:
    """Prompts, in a fixed order, from a file or a registry dataset.

    A file (JSON/JSONL) holds rows with 'prompt' (used as is) or 'instruction' (wrapped in the
    dialogue format), or plain strings (instructions). Anything else is a dataset spec of the
    registry (NAME or NAME:PATH, e.g. toy, hh:/data/hh) read at `split`."""
    if os.path.isfile(spec):
        rows = read_json(spec)
        rows = rows if isinstance(rows, list) else [rows]
        prompts = []
        for i, row in enumerate(rows):
            if isinstance(row, str):
                prompts.append(human_prompt(row))
            elif isinstance(row, dict) and isinstance(row.get("prompt"), str):
                prompts.append(row["prompt"])
            elif isinstance(row, dict) and isinstance(row.get("instruction"), str):
                prompts.append(human_prompt(row["instruction"]))
            else:
                raise ValueError(f"{spec}: row {i} has neither a 'prompt' nor an 'instruction' "
                                 "string")
    else:
        from preference_datasets import get_dataset
        prompts = list(get_dataset(spec, split, silent=True))
    if len(set(prompts)) != len(prompts):
        raise ValueError(f"prompt set {spec!r} repeats prompts; each prompt must appear once")
    return prompts
