"""PPO's four models: how they are built and wrapped (LoRA, the trainer's parallelism) and how
they are checkpointed and restored. A part of PPOTrainer (harness/rl/ppo.py), kept apart.

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
from dataclasses import asdict, replace

import torch

from harness import checkpoints
from harness.parallel import distributed
from harness.models import lora
from harness.models import reward_model as rm
from harness.models.modeling import save_hf_model


class PPOModels:
    """A base of PPOTrainer (before SingleProcess, whose hooks it uses; ShardedModels overrides
    those and load_training_state for the distributed trainers)."""

    def _build_models(self, policy, reference):
        """Actor, reference, critic and reward model, each wrapped for this trainer (the LoRA
        reference and reward model are the actor and critic themselves, wrapped once)."""
        path = self.opts.reward_model
        reward_model, _, self.rm_meta = rm.load_reward_model(path, on_meta=not self.is_main)
        rm.check_same_tokenizer(self.rm_meta, self.tokenizer, f"loss.reward_model={path}")
        reward_model.to(next(policy.parameters()).device).requires_grad_(False)
        if lora.enabled(self.cfg.model):  # adapters on the backbone, the value head trained whole
            critic = reward_model = lora.apply_lora(reward_model, self.cfg.model.lora, "score")
        else:
            critic = copy.deepcopy(reward_model).requires_grad_(True)
        self.policy, self.critic = self.wrap(policy), self.wrap(critic)
        self.reference = self.policy if reference is policy else self.wrap(
            reference.requires_grad_(False), train=False)
        self.reward_model = self.critic if reward_model is critic else self.wrap(
            reward_model, train=False)
        for model in (self.policy, self.reference, self.critic, self.reward_model):
            model.eval()  # dropout off everywhere: rollout and update see the same function
        self.trained = torch.nn.ModuleDict({"policy": self.policy, "critic": self.critic})
        self.critic_keys = {k for k, p in self.critic.named_parameters() if p.requires_grad}

    def save(self, name: str | None = None):
        """Collective (every rank gathers and writes its shards); rank 0 writes the files."""
        if self.cfg.debug:
            return
        st = self.state
        name = name or f"step-{st.examples}"
        policy, critic = self.full_state(self.policy), self.full_state(self.critic)
        optimizer_state = self.optimizer_state_dict()
        self.save_shards(name)
        if self.is_main:
            merged = lora.merged_state(policy, self.cfg.model.lora) \
                if lora.is_lora(self.policy) else policy
            if lora.is_lora(self.critic):  # its frozen part is loss.reward_model itself
                critic = {k: v for k, v in critic.items() if k in self.critic_keys}
            path = checkpoints.save_checkpoint(
                self.run_dir, name, st.examples, {"examples": st.examples}, merged,
                optimizer_state, self.scheduler.state_dict(),
                {"ppo_state": asdict(st), "rng": checkpoints.rng_state()},
                lambda d: self.write_extras(name, d, policy, merged, critic))
            checkpoints.prune_checkpoints(self.run_dir, self.cfg.keep_last)
            print(f"saved {path}")
        distributed.barrier()
        st.last_save = st.examples

    def write_extras(self, name, ckpt_dir, policy: dict, merged: dict, critic: dict):
        """critic.pt, and as the offline loop writes them: sharded/, adapter/, hf/."""
        checkpoints.adopt_shards(self.run_dir, name, ckpt_dir)
        torch.save({"step_idx": self.state.examples, "state": critic}, ckpt_dir / "critic.pt")
        if lora.is_lora(self.policy):
            lora.save_adapter(self.policy, policy, ckpt_dir / checkpoints.ADAPTER)
        if self.cfg.export_hf:
            save_hf_model(lora.causal_lm(self.policy).config, merged, ckpt_dir / "hf")
            self.tokenizer.save_pretrained(ckpt_dir / "hf")

    def _restore(self, resume: dict):
        self.load_training_state(resume)
        self.scheduler.load_state_dict(resume["scheduler"]["state"])
        self.state = replace(self.state, **resume["trainer"]["ppo_state"])
        checkpoints.set_rng_state(resume["trainer"]["rng"])
        print(f"resumed from {resume['dir']} at {self.state.examples} prompts")

    def load_training_state(self, resume: dict):
        """The actor (or its adapters) and optimizer, then the critic from critic.pt."""
        super().load_training_state(resume)
        state = torch.load(f"{resume['dir']}/critic.pt", map_location="cpu",
                           weights_only=True)["state"]
        missing, unexpected = self.critic.load_state_dict(state, strict=False)
        missing = [k for k in missing if k in self.critic_keys]
        if missing or unexpected:
            raise ValueError(f"{resume['dir']}/critic.pt does not match the critic (model.lora "
                             f"changed?): missing {missing[:3]}, unexpected {unexpected[:3]}")
