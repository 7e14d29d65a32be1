"""The checkpoint writer and the resume state of both training loops.

A loop keeps a TrainState (its data position and counters; the rollout loop adds its own
fields) and saves through one CheckpointWriter: every rank gathers what it must (the policy's
full state, the optimizer's, its shards for exact resume), then rank 0 writes the checkpoint dir
through harness.checkpoints (atomic, LATEST, keep_last). `restore` puts a LATEST checkpoint
back into the loop's models, optimizer, scheduler and RNGs.
"""

from dataclasses import asdict, dataclass

import torch

from harness import checkpoints
from harness.models import lora
from harness.models.modeling import save_hf_model
from harness.parallel import distributed


@dataclass
class TrainState:
    """Everything besides weights and optimizer that exact resume needs."""
    epoch: int = 0
    epoch_offset: int = 0       # examples (prompts) of `epoch` already consumed
    examples: int = 0           # examples seen in total: the x axis of every metric
    steps: int = 0              # optimizer steps
    next_eval: int = 0          # example count at which the next evaluation is due
    last_save: int = -1         # example count of the newest checkpoint
    last_eval: int = -1         # example count of the newest evaluation
    first_loss: float | None = None  # the run's first training loss (health.max_loss_ratio)
    loss_ema: float | None = None    # its moving average since (health.max_loss_ratio)


class CheckpointWriter:
    """save(): collective (every rank gathers and writes its shards); rank 0 writes the files."""

    def __init__(self, run_dir, cfg, dist, tokenizer):
        self.run_dir, self.cfg, self.dist, self.tokenizer = run_dir, cfg, dist, tokenizer

    def save(self, state: TrainState, policy, trained, optimizer, scheduler,
             name: str | None = None, files: dict | None = None, extras=None,
             latest: bool = True):
        """Checkpoint `name` (default step-N): policy.pt (LoRA adapters merged), optimizer.pt,
        scheduler.pt, trainer_state.pt; sharded/ (sharded runs), adapter/ (LoRA), hf/
        (export_hf=true); `files` {filename: state dict gathered by the caller} (PPO's
        critic.pt) and `extras(ckpt_dir)`, the loss's own files, inside the same atomic dir.
        latest=False keeps LATEST where it is (weights kept for inspection, e.g. diverged-N)."""
        if self.cfg.debug:
            return
        name = name or f"step-{state.examples}"
        full = self.dist.full_state(policy)
        optimizer_state = self.dist.optimizer_state(trained, optimizer)
        self.dist.save_shards(self.run_dir, name, trained, optimizer)
        if self.dist.is_main:
            merged = lora.merged_state(full, self.cfg.model.lora) if lora.is_lora(policy) else full
            path = checkpoints.save_checkpoint(
                self.run_dir, name, state.examples, {"examples": state.examples}, merged,
                optimizer_state, scheduler.state_dict(),
                {"train_state": asdict(state), "rng": checkpoints.rng_state()},
                lambda ckpt_dir: self._write_extras(name, ckpt_dir, state, policy, full, merged,
                                                    files or {}, extras), latest=latest)
            checkpoints.prune_checkpoints(self.run_dir, self.cfg.keep_last)
            print(f"saved {path}")
        distributed.barrier()
        state.last_save = state.examples

    def _write_extras(self, name, ckpt_dir, state, policy, full: dict, merged: dict,
                      files: dict, extras):
        checkpoints.adopt_shards(self.run_dir, name, ckpt_dir)
        for filename, file_state in files.items():
            torch.save({"step_idx": state.examples, "state": file_state}, ckpt_dir / filename)
        if lora.is_lora(policy):
            lora.save_adapter(policy, full, ckpt_dir / checkpoints.ADAPTER)
        if extras is not None:
            extras(ckpt_dir)
        if self.cfg.export_hf:
            model = lora.causal_lm(policy)
            from transformers import PreTrainedModel
            if isinstance(model, PreTrainedModel):  # a causal LM, from the (merged) state dict
                save_hf_model(model.config, merged, ckpt_dir / "hf")
            else:  # a model with its own export (a reward model: backbone dir + head weights)
                model.save_pretrained(ckpt_dir / "hf", safe_serialization=True)
            self.tokenizer.save_pretrained(ckpt_dir / "hf")


def restore(resume: dict, dist, policy, trained, optimizer, scheduler, state_cls):
    """The loop's state from a checkpoint loaded by checkpoints.load_for_resume: weights and
    optimizer (dist decides from which files), scheduler, RNGs."""
    dist.load_training_state(resume, policy, trained, optimizer)
    scheduler.load_state_dict(resume["scheduler"]["state"])
    saved = resume["trainer"]
    # runs saved before both loops shared this writer kept PPO's state under "ppo_state"
    state = state_cls(**(saved.get("train_state") or saved["ppo_state"]))
    checkpoints.set_rng_state(saved["rng"])
    print(f"resumed from {resume['dir']} at {state.examples} examples")
    return state
