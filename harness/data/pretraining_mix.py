"""A plain-text pretraining stream mixed into CoH training (`loss.pt_data`, `loss.pt_loss_weight`).

The source is the bundled toy corpus (`toy`), a local file (.txt: one document per non-empty
line; .json/.jsonl: rows with a text field) or a hub dataset id read with
`datasets.load_dataset` (streamed, so only the first `pt_max_documents` documents are fetched).
Every document is its own sequence(s): long ones are cut into windows of max_length tokens and
nothing is packed, so no document attends to another (packing leaked attention in the CoH port).

Batches are a pure function of (optimizer step, micro-batch index): the stream needs no state of
its own in checkpoints, and a resumed run sees exactly the batches the killed one would have.
"""

import os

import numpy as np
from tqdm import tqdm

from harness.data.sources import read_json
from harness.data.tokens import pad, pad_id, pad_with_mask

TOY_DOCUMENTS = 2000  # bundled toy corpus size when pt_data=toy


def looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith((".txt", ".json", ".jsonl"))


def read_documents(source: str, *, seed: int = 0, text_field: str = "text", split: str = "train",
                   hub_config: str | None = None, max_documents: int = 20_000,
                   cache_dir=None) -> list[str]:
    """The documents of a pretraining source (see the module docstring)."""
    if source == "toy":
        from harness.data.toy_task import pretraining_corpus
        return pretraining_corpus(min(TOY_DOCUMENTS, max_documents), seed)
    if os.path.exists(os.path.expanduser(source)):
        source = os.path.expanduser(source)
        if source.endswith((".json", ".jsonl")):
            rows = read_json(source)
            for i, row in enumerate(rows):
                if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                    raise ValueError(f"loss.pt_data={source!r}: row {i} has no string field "
                                     f"{text_field!r} (set loss.pt_text_field)")
            docs = [row[text_field] for row in rows]
        else:
            with open(source, encoding="utf-8") as f:
                docs = [line.rstrip("\n") for line in f if line.strip()]
        docs = docs[:max_documents]
    elif looks_like_path(source):
        raise FileNotFoundError(f"loss.pt_data={source!r}: no such file (give a local text file, "
                                "a hub dataset id such as allenai/c4, or 'toy')")
    else:
        import datasets
        rows = datasets.load_dataset(source, hub_config, split=split, streaming=True,
                                     cache_dir=cache_dir)
        docs = []
        for row in tqdm(rows, total=max_documents, desc=f"reading {source}", leave=False):
            if text_field not in row:
                raise ValueError(f"loss.pt_data={source!r} has no column {text_field!r} "
                                 f"(columns: {sorted(row)}; set loss.pt_text_field)")
            docs.append(row[text_field])
            if len(docs) >= max_documents:
                break
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"loss.pt_data={source!r} holds no text")
    return docs


class PretrainStream:
    """Fixed-length windows of the documents, visited in a seeded order per pass."""

    def __init__(self, documents: list[str], tokenizer, max_length: int, seed: int):
        eos = tokenizer.eos_token_id
        self.pad = pad_id(tokenizer)
        self.rows = []
        for ids in tokenizer(documents, add_special_tokens=False)["input_ids"]:
            ids = list(ids) + [eos]  # the model learns where a document ends
            # windows of max_length; a last window of a single token trains nothing, skip it
            self.rows += [ids[i:i + max_length] for i in range(0, len(ids), max_length)
                          if len(ids[i:i + max_length]) > 1]
        if not self.rows:
            raise ValueError("the pretraining corpus tokenizes to nothing")
        self.seed = seed
        self._step, self._micro = None, 0
        self._order = (None, None)  # (pass, permutation) of the last pass read

    def _row(self, position: int) -> list[int]:
        n = len(self.rows)
        pass_ = position // n
        if self._order[0] != pass_:
            self._order = (pass_, np.random.default_rng([self.seed, pass_]).permutation(n))
        return self.rows[self._order[1][position % n]]

    def batch(self, index: int, size: int) -> dict:
        """The `index`-th batch of `size` windows: input_ids, attention_mask, labels [size, len]."""
        rows = [self._row(p) for p in range(index * size, (index + 1) * size)]
        ids, mask = pad_with_mask(rows, self.pad)
        labels = pad(rows, -100)
        return {"chosen_input_ids": ids, "chosen_attention_mask": mask, "chosen_labels": labels}

    def next_batch(self, step: int, micro_batches: int, size: int) -> dict:
        """The batch for the next micro-batch of optimizer step `step` (counted from 0 per step)."""
        if step != self._step:
            self._step, self._micro = step, 0
        index = step * micro_batches + self._micro
        self._micro += 1
        return self.batch(index, size)
