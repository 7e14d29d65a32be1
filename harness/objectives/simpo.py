"""SimPO (Meng, Xia, Chen 2024) as `loss=simpo`: pairwise, reference-free, the length-normalised
log-prob as the implicit reward and a target reward margin gamma (losses.simpo_loss).

    python train.py loss=simpo loss.beta=2.0 loss.gamma=1.0 model.archive=SFT/LATEST/policy.pt
"""

import math
from dataclasses import dataclass

import losses
from harness.objectives import LossSpec, StepContext, preference_metrics, register_loss
from harness.objectives.core import positive_beta


@dataclass(frozen=True)
class SimPOOptions:
    """config/loss/simpo.yaml documents each option and its source."""
    beta: float = 2.0
    gamma: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        positive_beta("simpo", self.beta)
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)) or \
                not 0 <= self.gamma < math.inf:
            raise ValueError(f"loss.gamma={self.gamma!r} must be a finite number >= 0 for "
                             "loss=simpo: it is the reward margin the chosen answer must win by "
                             "(the paper uses gamma / beta between 0.3 and 0.8; e.g. "
                             "loss.gamma=1.0 at loss.beta=2.0)")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"loss.label_smoothing={self.label_smoothing} must be in [0, 0.5)")


def simpo_step(ctx: StepContext, batch, split: str):
    chosen, rejected, n_chosen, n_rejected = ctx.forward(ctx.policy, batch)
    o = ctx.options
    losses_, r_chosen, r_rejected = losses.simpo_loss(chosen, rejected, n_chosen, n_rejected,
                                                      o.beta, o.gamma, o.label_smoothing)
    return losses_.mean(), preference_metrics(split, losses_, r_chosen, r_rejected, chosen,
                                              rejected)


register_loss("simpo", LossSpec(paired=True, step=simpo_step, options=SimPOOptions,
                                from_sft=True))  # SimPO starts from an SFT model; ORPO needs none
