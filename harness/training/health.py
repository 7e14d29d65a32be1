"""The health guard of a training loop: a run that has gone bad stops, naming the statistic,
before it takes a bad optimizer step or writes bad weights, so LATEST stays on the last good
checkpoint.

    guard = HealthGuard(cfg)                       # reads cfg.health (config/config.yaml)
    guard.check_step(state, loss, grad_norm)       # after backward and clipping, before step()
    guard.check_weights(model, state)              # before a checkpoint is written

A step stops the run (TrainingDiverged) when its training loss or its gradient norm (before
clipping) is not finite, when the loss exceeds health.max_loss or its moving average exceeds
health.max_loss_ratio times the run's first training loss (kept in the loop's state, so a resumed run keeps the same
limit), or when the gradient norm exceeds health.max_grad_norm; weights are checked for NaN /
inf before every save. The values it checks are the same on every rank (reduced), so all ranks
stop together. Both loops can hold one: the offline loop (trainers.py) and the rollout loop.
"""

import math

import torch

from harness.parallel import distributed


class TrainingDiverged(FloatingPointError):
    """Training produced non-finite or exploding values; the message names the statistic."""


class HealthGuard:
    def __init__(self, cfg):
        health = cfg.get("health") or {}
        self.max_loss = health.get("max_loss")
        self.max_loss_ratio = health.get("max_loss_ratio")
        self.max_grad_norm = health.get("max_grad_norm")

    @staticmethod
    def _stop(state, what: str):
        raise TrainingDiverged(
            f"training stopped at optimizer step {state.steps + 1} ({state.examples} examples "
            f"seen): {what}. The weights of this step were not applied and nothing was saved: "
            "LATEST stays on the last good checkpoint. Lower lr (or raise warmup_steps), check "
            "the data, or change the limits in health.*")

    def check_step(self, state, loss: float | None, grad_norm: float):
        """Raise TrainingDiverged if this step's (reduced) loss or gradient norm is bad; the
        first finite loss of the run is recorded in state.first_loss. max_loss_ratio reads a
        moving average of the loss (weight 0.1 per step, state.loss_ema): one hard batch may
        cost ten times the first loss (IPO at beta 1 starts at 0.25 and meets batches at 8), a
        loss that keeps climbing may not."""
        if loss is not None:
            if not math.isfinite(loss):
                self._stop(state, f"loss/train={loss} is not finite")
            if self.max_loss is not None and loss > self.max_loss:
                self._stop(state, f"loss/train={loss:.4g} > health.max_loss={self.max_loss}")
            first = getattr(state, "first_loss", None)
            if first is None:
                state.first_loss = state.loss_ema = loss
            else:
                ema = 0.9 * (state.loss_ema if state.loss_ema is not None else first) + 0.1 * loss
                if self.max_loss_ratio and first > 0 and ema > self.max_loss_ratio * first:
                    self._stop(state, f"loss/train={loss:.4g}, its moving average {ema:.4g} > "
                               f"health.max_loss_ratio={self.max_loss_ratio} x the first step's "
                               f"loss {first:.4g}")
                state.loss_ema = ema
        if not math.isfinite(grad_norm):
            self._stop(state, f"grad_norm={grad_norm} is not finite")
        if self.max_grad_norm is not None and grad_norm > self.max_grad_norm:
            self._stop(state, f"grad_norm={grad_norm:.4g} > health.max_grad_norm="
                       f"{self.max_grad_norm}")

    @staticmethod
    def check_weights(model, state):
        """Collective when sharded: raise TrainingDiverged if any weight is NaN or inf."""
        bad = None
        for name, param in model.named_parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            if not torch.isfinite(local.detach()).all():
                bad = name
                break
        if distributed.max_across_ranks(torch.tensor(float(bad is not None))) > 0:
            raise TrainingDiverged(
                f"the weights are not finite ({bad or 'on another rank'}) at "
                f"{state.examples} examples: the checkpoint was not written and LATEST stays on "
                "the last good one. Lower lr, or check the data and model.archive")
