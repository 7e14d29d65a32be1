"""Forgetful causal masking (FCM; Liu et al. 2022, used by Chain of Hindsight): during training,
each query attends to a random subset of its past, so the model cannot lean on copying the
tokens right before it. Applied through a 4-D attention mask, which Hugging Face models take
as-is (transformers' masking_utils returns a 4-D mask unchanged), so it works with sdpa and
eager attention alike; no model code changes.
"""

import torch


def fcm_attention_mask(attention_mask: torch.Tensor, fcm_min: float, fcm_max: float,
                       dtype: torch.dtype = torch.float32,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """A 4-D additive attention mask with forgetful causal masking.

    Args: attention_mask [batch, seq] 1 on real tokens, 0 on (right) padding; fcm_min, fcm_max:
        each example draws its drop rate r ~ U[fcm_min, fcm_max]; every past key j < i of every
        query i is then dropped independently with probability r. Token 0 and the query's own
        position always stay visible, so no row is ever empty.
    Returns: [batch, 1, seq, seq] in `dtype`: 0 where query i may attend to key j, the dtype's
        most negative value where not (additive, so eager attention reads it too; a boolean
        mask would be added as 0/1 there). fcm_max = 0 gives the plain causal + padding mask.
    """
    if not 0.0 <= fcm_min <= fcm_max < 1.0:
        raise ValueError(f"need 0 <= fcm_min ({fcm_min}) <= fcm_max ({fcm_max}) < 1")
    batch, seq = attention_mask.shape
    device = attention_mask.device
    allowed = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()[None].expand(batch, -1, -1)
    if fcm_max > 0:
        rate = fcm_min + (fcm_max - fcm_min) * torch.rand(batch, 1, 1, device=device,
                                                         generator=generator)
        keep = torch.rand(batch, seq, seq, device=device, generator=generator) >= rate
        keep |= torch.eye(seq, dtype=torch.bool, device=device)  # a query always sees itself
        keep[:, :, 0] = True                                     # and the first token
        allowed = allowed & keep
    allowed = allowed & attention_mask.bool()[:, None, :]        # never attend to padding
    mask = torch.zeros(batch, 1, seq, seq, dtype=dtype, device=device)
    return mask.masked_fill(~allowed[:, None], torch.finfo(dtype).min)


def past_drop_fraction(mask4d: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Per example: the fraction of droppable past keys (0 < j < i, both real tokens) that the
    mask hides. The quantity FCM's r controls; used by tests and logged as fcm/drop_rate."""
    hidden = mask4d[:, 0] != 0
    seq = attention_mask.shape[1]
    real = attention_mask.bool()
    past = torch.ones(seq, seq, dtype=torch.bool, device=mask4d.device).tril(-1)
    past[:, 0] = False
    droppable = past[None] & real[:, :, None] & real[:, None, :]
    return (hidden & droppable).sum((1, 2)) / droppable.sum((1, 2)).clamp(min=1)
