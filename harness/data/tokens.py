"""Token ids: truncation of prompts, text -> ids without special tokens, padding, the pad id.

The one home of these rules for every path that builds token tensors (training batches,
sampling, scoring, PPO rollouts, the reward model, the CoH chains, the pretraining stream).
"""

import torch

# how a prompt is cut to max_prompt_length: keep its first tokens, or its last (dialogues)
TRUNCATE = {
    "keep_start": lambda ids, n: ids[:n],
    "keep_end": lambda ids, n: ids[-n:],
}
TRUNCATION_MODES = tuple(TRUNCATE)


def check_truncation_mode(mode: str, where: str = "example"):
    if mode not in TRUNCATE:
        raise ValueError(f"{where}: unknown truncation mode {mode!r}; use one of "
                         f"{list(TRUNCATION_MODES)}")


def truncate(ids: list[int], mode: str, max_tokens: int) -> list[int]:
    """`ids` cut to `max_tokens` as the dataset's truncation mode says (unchanged if shorter)."""
    return list(ids) if len(ids) <= max_tokens else list(TRUNCATE[mode](ids, max_tokens))


def token_ids(tokenizer, text: str, what: str, uid: str) -> list[int]:
    """Ids of `text` without special tokens; an EOS inside the text is a data bug (EOS marks the
    end of a response), reported with the example's uid and what the text was."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id in ids:
        raise ValueError(f"example {uid}: {what} contains the EOS token: {text[:80]!r}")
    return list(ids)


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token, or its EOS where it has none (the reference behaviour, which
    harness.models.modeling.load_tokenizer also sets)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return pad


def pad(seqs: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    """[len(seqs), longest] long tensor of the sequences, padded with `value` on the right (or
    the left: prompts that generation continues from their last column)."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for row, seq in enumerate(seqs):
        if len(seq):
            cols = slice(width - len(seq), width) if left else slice(0, len(seq))
            out[row, cols] = torch.as_tensor(seq, dtype=torch.long)
    return out


def pad_with_mask(seqs: list[list[int]], value: int, left: bool = False):
    """(padded ids, attention mask) of `pad`: 1 on the tokens, 0 on the padding."""
    return pad(seqs, value, left), pad([[1] * len(s) for s in seqs], 0, left)


def pad_to(t: torch.Tensor, length: int, value: int) -> torch.Tensor:
    """A right-padded [B, L] tensor widened to [B, length] with `value`."""
    return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)
