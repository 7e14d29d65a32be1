"""Padding-free batches: sequences packed into rows, and one prompt pass shared by a pair.

A padded batch of B sequences of length <= L costs B * L token-positions however short most
sequences are. Here every example becomes a *unit* of segments laid end to end,

    SFT:                     [prompt][target]
    pair, plain packing:     [prompt][chosen]  [prompt][rejected]        (two units)
    pair, prefix sharing:    [prompt][chosen][rejected]                  (one unit)

units are packed greedily into rows of `row_tokens`, and one attention mask keeps them apart:

    q may attend to kv  iff  same unit, kv <= q, and kv is in the prompt or in q's own segment

so a rejected token sees the prompt but never the chosen response. Positions restart per unit,
and rejected positions continue from the prompt, as if the rejected response followed it
directly; every scored token is predicted from an explicit source position (the first rejected
token from the last prompt token), so log-probs equal the padded path's (tests check that).

The mask goes to the model as a 4-D tensor (bool for sdpa, additive float for eager) or a
flex_attention BlockMask; `harness.models.modeling.sequence_logps` does the rest.
"""

from dataclasses import dataclass

import torch

PROMPT, CHOSEN, REJECTED = 0, 1, 2


@dataclass
class PackedBatch:
    input_ids: torch.Tensor      # [rows, T]
    position_ids: torch.Tensor   # [rows, T]
    unit: torch.Tensor           # [rows, T] unit index within the row, -1 on padding
    segment: torch.Tensor        # [rows, T] PROMPT / CHOSEN / REJECTED
    source: torch.Tensor         # [n_scored] flat index (row * T + t) of the predicting position
    target: torch.Tensor         # [n_scored] the token id it must predict
    sequence: torch.Tensor       # [n_scored] which output sequence the token belongs to
    n_sequences: int

    @property
    def real_tokens(self) -> int:
        return int((self.unit >= 0).sum())

    def to(self, device):
        fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                  for k, v in self.__dict__.items()}
        return PackedBatch(**fields)


def _split(ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor):
    """(prompt ids, response ids) of one padded pair sequence: labels are -100 on the prompt and
    padding, and the response is one labelled run at the end."""
    real = mask.bool()
    scored = labels != -100
    return ids[real & ~scored].tolist(), ids[scored].tolist()


def example_units(batch: dict, paired: bool, prefix_sharing: bool) -> list[list[tuple]]:
    """Each unit is a list of segments (kind, token ids, scored flags, output sequence index).

    A single sequence (SFT, CoH chains) is one segment scored where its labels are set, so
    labelled spans may alternate with unlabelled ones (CoH's feedback phrases). A pair is
    [prompt][chosen] + [prompt][rejected], or [prompt][chosen][rejected] when sharing the prompt.
    Output sequences are numbered as the padded path returns them: SFT i -> i; pairs i ->
    (chosen i, rejected B + i)."""
    if batch["chosen_attention_mask"].dim() != 2:
        raise ValueError("packing cannot be combined with a custom 4-D attention mask (CoH's "
                         "forgetful causal masking): set packing=false or loss.fcm_max=0")
    n = batch["chosen_input_ids"].shape[0]
    units = []
    for i in range(n):
        ids, mask, labels = (batch[f"chosen_{k}"][i] for k in ("input_ids", "attention_mask",
                                                               "labels"))
        if not paired:
            real = mask.bool()
            units.append([(PROMPT, ids[real].tolist(), (labels[real] != -100).tolist(), i)])
            continue
        prompt, chosen = _split(ids, mask, labels)
        _, rejected = _split(*(batch[f"rejected_{k}"][i] for k in
                               ("input_ids", "attention_mask", "labels")))
        seg = lambda kind, toks, out: (kind, toks, [kind != PROMPT] * len(toks), out)  # noqa: E731
        if prefix_sharing:
            units.append([seg(PROMPT, prompt, None), seg(CHOSEN, chosen, i),
                          seg(REJECTED, rejected, n + i)])
        else:
            units.append([seg(PROMPT, prompt, None), seg(CHOSEN, chosen, i)])
            units.append([seg(PROMPT, prompt, None), seg(CHOSEN, rejected, n + i)])
    return units


def _unit_len(unit) -> int:
    return sum(len(ids) for _, ids, _, _ in unit)


def pack(batch: dict, paired: bool, prefix_sharing: bool = False, row_tokens: int = 0,
         pad_token_id: int = 0) -> PackedBatch:
    """Pack a collated (padded) batch. row_tokens=0 puts one unit per row; a unit longer than
    row_tokens gets a row of its own. Units keep their order (first fit, no sorting), so the
    layout is deterministic."""
    units = example_units(batch, paired, prefix_sharing)
    rows, used = [], []
    for unit in units:
        size = _unit_len(unit)
        for r, fill in enumerate(used):
            if row_tokens and fill + size <= row_tokens:
                rows[r].append(unit)
                used[r] += size
                break
        else:
            rows.append([unit])
            used.append(size)
    width = max(used)
    shape = (len(rows), width)
    ids = torch.full(shape, pad_token_id, dtype=torch.long)
    pos = torch.zeros(shape, dtype=torch.long)
    unit_ix = torch.full(shape, -1, dtype=torch.long)
    seg = torch.zeros(shape, dtype=torch.long)
    source, target, sequence = [], [], []
    for r, row in enumerate(rows):
        t = 0
        for u, unit in enumerate(row):
            prompt_end, prompt_len = -1, 0  # flat index of the unit's last prompt token; length
            for kind, seq_ids, scored, out in unit:
                k = len(seq_ids)
                ids[r, t:t + k] = torch.tensor(seq_ids, dtype=torch.long)
                start_pos = 0 if kind == PROMPT else prompt_len
                pos[r, t:t + k] = torch.arange(start_pos, start_pos + k)
                unit_ix[r, t:t + k], seg[r, t:t + k] = u, kind
                for j in range(k):
                    # a response's first token is predicted by the last prompt token (rejected:
                    # not by the chosen response just before it); the rest by the token before
                    prev = (prompt_end if kind != PROMPT else -1) if j == 0 else r * width + t + j - 1
                    if scored[j] and prev >= 0:  # a first token with nothing before is unscored
                        source.append(prev)
                        target.append(seq_ids[j])
                        sequence.append(out)
                if kind == PROMPT:
                    prompt_len, prompt_end = k, r * width + t + k - 1
                t += k
    n_out = batch["chosen_input_ids"].shape[0] * (2 if paired else 1)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PackedBatch(ids, pos, unit_ix, seg, as_long(source), as_long(target),
                       as_long(sequence), n_out)


def allowed(unit: torch.Tensor, segment: torch.Tensor) -> torch.Tensor:
    """[rows, T, T] bool: may query q attend to key k. Padding attends to itself only, so no
    attention row is empty (an all-masked row gives NaN in sdpa, and NaN gradients)."""
    T = unit.shape[1]
    q_unit, k_unit = unit[:, :, None], unit[:, None, :]
    q_seg, k_seg = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(T, T, dtype=torch.bool, device=unit.device).tril()
    same = (q_unit == k_unit) & (q_unit >= 0) & ((k_seg == PROMPT) | (k_seg == q_seg))
    return (same & causal) | torch.eye(T, dtype=torch.bool, device=unit.device)


def attention_mask(packed: PackedBatch, attn_implementation: str, dtype: torch.dtype):
    """The mask in the form the model's attention implementation takes."""
    if attn_implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask
        unit, seg = packed.unit, packed.segment

        def mask_mod(b, h, q, k):
            same = (unit[b, q] == unit[b, k]) & (unit[b, q] >= 0)
            shared = (seg[b, k] == PROMPT) | (seg[b, k] == seg[b, q])
            return ((k <= q) & same & shared) | (q == k)
        rows, T = unit.shape
        return create_block_mask(mask_mod, rows, None, T, T, device=unit.device)
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"packing / prefix_sharing needs attn_implementation sdpa, eager or "
                         f"flex_attention; this model uses {attn_implementation!r}")
    mask = allowed(packed.unit, packed.segment)[:, None]
    if attn_implementation == "sdpa":
        return mask
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)
