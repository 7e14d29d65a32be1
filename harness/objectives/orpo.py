"""ORPO (Hong, Lee, Thorne 2024) as `loss=orpo`: SFT on the chosen answer plus an odds-ratio
term that pushes the chosen answer's odds above the rejected one's, no reference model
(losses.orpo_loss). Trains from the base model directly (no SFT stage needed).

    python train.py loss=orpo loss.beta=0.1
"""

from dataclasses import dataclass

import losses
from harness.objectives import LossSpec, StepContext, preference_metrics, register_loss
from harness.objectives.core import positive_beta


@dataclass(frozen=True)
class ORPOOptions:
    """config/loss/orpo.yaml documents the option and its source."""
    beta: float = 0.1  # the paper's lambda: weight of the odds-ratio term

    def __post_init__(self):
        positive_beta("orpo", self.beta)


def orpo_step(ctx: StepContext, batch, split: str):
    chosen, rejected, n_chosen, n_rejected = ctx.forward(ctx.policy, batch)
    losses_, r_chosen, r_rejected = losses.orpo_loss(chosen, rejected, n_chosen, n_rejected,
                                                     ctx.options.beta)
    metrics = preference_metrics(split, losses_, r_chosen, r_rejected, chosen, rejected)
    mean_chosen = chosen.detach() / n_chosen.clamp(min=1)
    metrics[f"loss/nll_{split}"] = -mean_chosen
    metrics[f"orpo_{split}/log_odds_ratio"] = losses.orpo_log_odds_ratio(
        mean_chosen, rejected.detach() / n_rejected.clamp(min=1))
    return losses_.mean(), metrics


register_loss("orpo", LossSpec(paired=True, step=orpo_step, options=ORPOOptions))
