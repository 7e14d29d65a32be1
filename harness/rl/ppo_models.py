"""PPO's four models: how they are built and wrapped (LoRA, the trainer's strategy) and what of
them a checkpoint holds beyond the shared writer's files (critic.pt).

    actor       model.* (the SFT policy); with model.lora.r, LoRA adapters on it
    reference   a frozen copy of the actor; with LoRA, the actor with adapters disabled
    critic      a copy of the reward model, its head the value head; with LoRA, adapters on the
                reward model's backbone and a trained copy of its head (peft modules_to_save)
    reward      loss.reward_model, frozen; with LoRA, the critic with adapters disabled

With LoRA two models are in memory instead of four. Under FSDP / tensor parallelism all of them
are wrapped alike (the frozen ones sharded too: a replicated copy would cost each rank a whole
model, which is what sharding avoids; they run once per rollout, the actor and critic
2 x ppo_epochs times).

A checkpoint holds policy.pt (the actor, adapters merged: model.archive anywhere, evaluate.py),
critic.pt (the critic; with LoRA only its adapters and head, the rest is loss.reward_model),
optimizer.pt, scheduler.pt, trainer_state.pt, and as the offline loop writes them adapter/
(LoRA, peft format), sharded/ (distributed trainers: exact resume on any number of ranks) and
hf/ (export_hf=true).
"""

import copy
from dataclasses import dataclass

import torch

from harness.models import lora
from harness.models.reward_model import check_same_tokenizer, load_reward_model


@dataclass
class PPOModels:
    policy: torch.nn.Module        # the actor
    reference: torch.nn.Module     # frozen; with LoRA the actor itself (adapters disabled)
    critic: torch.nn.Module
    reward_model: torch.nn.Module  # frozen; with LoRA the critic itself (adapters disabled)
    rm_meta: dict                  # reward_model.json: the held-out reward mean / std
    critic_keys: set               # the critic's trained parameters (LoRA: adapters and head)
    # what the optimizer updates and sharded checkpoints hold: actor and critic
    trained: torch.nn.ModuleDict


def build_models(dist, cfg, tokenizer, policy, reference, reward_path: str) -> PPOModels:
    """Actor, reference, critic and reward model, each wrapped by the strategy `dist` (the LoRA
    reference and reward model are the actor and critic themselves, wrapped once)."""
    reward_model, _, rm_meta = load_reward_model(reward_path, on_meta=not dist.is_main)
    check_same_tokenizer(rm_meta, tokenizer, f"loss.reward_model={reward_path}")
    reward_model.to(next(policy.parameters()).device).requires_grad_(False)
    if lora.enabled(cfg.model):  # adapters on the backbone, the value head trained whole
        critic = reward_model = lora.apply_lora(reward_model, cfg.model.lora, "score")
    else:
        critic = copy.deepcopy(reward_model).requires_grad_(True)
    wrapped_policy, wrapped_critic = dist.wrap(policy), dist.wrap(critic)
    wrapped_reference = wrapped_policy if reference is policy else dist.wrap(
        reference.requires_grad_(False), train=False)
    wrapped_reward = wrapped_critic if reward_model is critic else dist.wrap(reward_model,
                                                                            train=False)
    for model in (wrapped_policy, wrapped_reference, wrapped_critic, wrapped_reward):
        model.eval()  # dropout off everywhere: rollout and update see the same function
    critic_keys = {k for k, p in wrapped_critic.named_parameters() if p.requires_grad}
    return PPOModels(wrapped_policy, wrapped_reference, wrapped_critic, wrapped_reward, rm_meta,
                     critic_keys, torch.nn.ModuleDict({"policy": wrapped_policy,
                                                       "critic": wrapped_critic}))


def critic_state(dist, models: PPOModels) -> dict:
    """critic.pt's state (collective): the whole critic, or with LoRA only what trains (its
    frozen part is loss.reward_model itself)."""
    state = dist.full_state(models.critic)
    if lora.is_lora(models.critic):
        state = {k: v for k, v in state.items() if k in models.critic_keys}
    return state


def load_critic(models: PPOModels, ckpt_dir: str):
    """The critic from a checkpoint's critic.pt (runs whose shards did not hold it)."""
    state = torch.load(f"{ckpt_dir}/critic.pt", map_location="cpu", weights_only=True)["state"]
    missing, unexpected = models.critic.load_state_dict(state, strict=False)
    missing = [k for k in missing if k in models.critic_keys]
    if missing or unexpected:
        raise ValueError(f"{ckpt_dir}/critic.pt does not match the critic (model.lora "
                         f"changed?): missing {missing[:3]}, unexpected {unexpected[:3]}")
