"""What both training loops build the same way: the optimizer and its warmup schedule, the
logger, and the train / held-out example splits."""

import inspect

import torch
from omegaconf import OmegaConf

from harness import checkpoints
from harness.training.run_logging import NullLogger, RunLogger
from preference_datasets import load_examples


def make_optimizer(param_groups: list[dict], cfg):
    """torch.optim.<cfg.optimizer> over `param_groups` ({"params", optional "lr"}; lr defaults to
    cfg.lr). fused_optimizer picks the fused kernel where the class has one (one kernel for all
    parameters instead of one per tensor), else torch's default (foreach)."""
    cls = getattr(torch.optim, cfg.optimizer)
    kwargs = {"lr": cfg.lr}
    if cfg.fused_optimizer and "fused" in inspect.signature(cls).parameters:
        kwargs["fused"] = True
    return cls(param_groups, **kwargs)


def make_scheduler(optimizer, cfg):
    """Linear warmup over warmup_steps optimizer steps, then constant (the reference's)."""
    warmup = cfg.warmup_steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             lambda step: min(1.0, (step + 1) / (warmup + 1)))


def make_logger(cfg, run_dir, is_main: bool, state, resumed: bool):
    """metrics.jsonl / wandb / curves.png in rank 0; nothing elsewhere. On resume, lines
    logged after the checkpoint are dropped (the resumed run logs them again)."""
    if not is_main:
        return NullLogger()
    return RunLogger(run_dir, OmegaConf.to_container(cfg, resolve=True),
                     cfg.wandb if not cfg.debug else OmegaConf.create({"enabled": False}),
                     cfg.exp_name, resume_step=state.examples if resumed else None,
                     evaluated_at_resume=state.last_eval == state.examples,
                     min_interval_secs=cfg.minimum_log_interval_secs)


def load_splits(cfg, *, sft_mode: bool, record_examples=None) -> tuple[list, list]:
    """(train examples, held-out examples): the train split of cfg.datasets (data_fraction of
    it), and a seeded subset of n_eval_examples of the test split, fixed for the whole run."""
    common = dict(sft_mode=sft_mode, seed=cfg.seed, prefs_path=cfg.prefs_path,
                  num_turns=cfg.num_turns, record_examples=record_examples,
                  cache_dir=checkpoints.first_usable_dir(cfg.local_dirs))
    train = load_examples(list(cfg.datasets), "train", data_fraction=cfg.data_fraction, **common)
    test = load_examples(list(cfg.datasets), "test", **common)
    order = torch.randperm(len(test), generator=torch.Generator().manual_seed(cfg.seed))
    return train, [test[i] for i in order[:cfg.n_eval_examples].tolist()]
