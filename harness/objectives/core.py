"""The reference code's objectives: `loss=sft`, `loss=dpo` (with conservative and
reference-free DPO as its options) and `loss=ipo`, each a pure function of losses.py behind a
step that gets a StepContext."""

import math
from dataclasses import asdict, dataclass

import torch

import losses
from harness.objectives import LossSpec, StepContext, preference_metrics, register_loss


def positive_beta(loss: str, beta) -> None:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 < beta < math.inf:
        raise ValueError(f"loss.beta={beta!r} must be a positive finite number for loss={loss} "
                         "(it scales the log-ratios; e.g. loss.beta=0.1)")


def check_bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"loss.{key}={value!r} must be true or false")


@dataclass(frozen=True)
class SFTOptions:
    token_mean: bool = False  # weight every target token equally (else every sequence)

    def __post_init__(self):
        check_bool("token_mean", self.token_mean)


@dataclass(frozen=True)
class DPOOptions:
    beta: float
    label_smoothing: float = 0.0  # conservative DPO: the assumed label-flip probability
    reference_free: bool = False

    def __post_init__(self):
        positive_beta("dpo", self.beta)
        check_bool("reference_free", self.reference_free)
        if isinstance(self.label_smoothing, bool) or \
                not isinstance(self.label_smoothing, (int, float)) or \
                not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing={self.label_smoothing} must be in [0, 0.5): "
                             "it is the probability that a label is flipped, and from 0.5 on "
                             "the loss trains toward the rejected answers")


@dataclass(frozen=True)
class IPOOptions:
    beta: float
    reference_free: bool = False

    def __post_init__(self):
        positive_beta("ipo", self.beta)
        check_bool("reference_free", self.reference_free)


def trained_tokens(part, n: int, side: str = "chosen") -> dict:
    """batch_stats of a token-level loss: the trained tokens of the n real examples of `part`
    (labels other than -100 after the first position) and the examples, for the whole batch's
    token mean (trainers.BasicTrainer.batch_statistics)."""
    labels = part[f"{side}_labels"][:n, 1:]
    return {"tokens": (labels != -100).sum().float(), "count": torch.tensor(float(n))}


def sft_step(ctx: StepContext, batch, split: str):
    """Negative log-likelihood of the SFT targets (token_mean: over the whole batch's tokens,
    whatever its micro-batches and ranks)."""
    logps, n = ctx.forward(ctx.policy, batch)
    stats = ctx.batch_stats
    per_example = stats["tokens"] / stats["count"] if stats else None
    losses_ = losses.sft_loss(logps, n, ctx.options.token_mean, per_example)
    return losses_.mean(), {f"loss/{split}": losses_, f"logps_{split}/chosen": logps}


def sft_batch_stats(ctx: StepContext, part, n: int) -> dict:
    return trained_tokens(part, n) if ctx.options.token_mean else {}


def preference_step(loss_fn):
    """The step of a DPO-family loss_fn(policy chosen, policy rejected, reference chosen,
    reference rejected, **options) -> (losses, chosen rewards, rejected rewards)."""
    def step(ctx: StepContext, batch, split: str):
        chosen, rejected, _, _ = ctx.forward(ctx.policy, batch)
        if ctx.reference_logps is not None:
            ref_chosen, ref_rejected = ctx.reference_logps(batch)
        else:
            ref_chosen, ref_rejected = torch.zeros_like(chosen), torch.zeros_like(rejected)
        losses_, r_chosen, r_rejected = loss_fn(chosen, rejected, ref_chosen, ref_rejected,
                                                **asdict(ctx.options))
        return losses_.mean(), preference_metrics(split, losses_, r_chosen, r_rejected,
                                                  chosen, rejected)
    return step


register_loss("sft", LossSpec(paired=False, step=sft_step, options=SFTOptions,
                              batch_stats=sft_batch_stats))
register_loss("dpo", LossSpec(paired=True, step=preference_step(losses.dpo_loss),
                              options=DPOOptions, uses_reference=True, from_sft=True))
register_loss("ipo", LossSpec(paired=True, step=preference_step(losses.ipo_loss),
                              options=IPOOptions, uses_reference=True, from_sft=True))
