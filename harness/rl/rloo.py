"""`loss=rloo`: REINFORCE with a leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024,
"Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human Feedback"), on
GRPO's method of the shared rollout loop (harness/rl/grpo.py): K samples per prompt, each
sample's baseline the mean score of the prompt's other K - 1, the KL penalty in the reward and
the loss summed over the response's tokens (the gradient of REINFORCE on log pi(y|x)).

    python train.py loss=rloo loss.scorer=reward_model:RM_RUN model.archive=SFT/LATEST/policy.pt
"""

from dataclasses import dataclass

import losses
from harness.objectives import LossSpec, register_loss
from harness.rl.grpo import GroupOptions, GroupRL, check, uses_reference
from harness.rl.loop import RolloutLoop


@dataclass
class RLOOOptions(GroupOptions):
    """config/loss/rloo.yaml documents each option and its source."""
    num_generations: int = 4
    beta: float = 0.05
    kl_estimator: str = "k1"
    kl_in: str = "reward"
    aggregation: str = "sum"
    whiten_advantages: bool = False

    def advantages(self, rewards):
        advantages = losses.rloo_advantages(rewards)
        if self.whiten_advantages:  # TRL's normalize_advantages: over the rollout batch
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-4)
        return advantages


register_loss("rloo", LossSpec(paired=False, step=None, options=RLOOOptions, loop=RolloutLoop,
                               rollout=GroupRL, check=check, uses_reference=uses_reference))
