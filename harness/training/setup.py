"""What both training loops build the same way: the optimizer and its warmup schedule, the
logger, and the train / held-out example splits."""

import inspect
import json
import os

import torch
from omegaconf import OmegaConf

from harness import checkpoints
from harness.checkpoints import atomic_write_text
from harness.data.validate import DataError
from harness.parallel import distributed
from harness.training.run_logging import NullLogger, RunLogger
from preference_datasets import load_examples

DATA_FINGERPRINT = "data_fingerprint.json"


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
    it), and a seeded subset of n_eval_examples of the test split, fixed for the whole run.
    Sources without test examples (the hash split of a small file can be empty) are said so;
    with none at all, a seeded slice of train is held out for evaluation instead. The data's
    identity is stored in the run dir and checked on resume (check_data_identity)."""
    fingerprints = {"train": {}, "test": {}}
    common = dict(sft_mode=sft_mode, seed=cfg.seed, prefs_path=cfg.prefs_path,
                  num_turns=cfg.num_turns, record_examples=record_examples,
                  cache_dir=checkpoints.first_usable_dir(cfg.local_dirs))
    train = load_examples(list(cfg.datasets), "train", data_fraction=cfg.data_fraction,
                          fingerprints=fingerprints["train"], **common)
    test = load_examples(list(cfg.datasets), "test", allow_empty=True,
                         fingerprints=fingerprints["test"], **common)
    generator = torch.Generator().manual_seed(cfg.seed)
    if not test:
        n = min(cfg.n_eval_examples, len(train) // 20 or 1)
        if len(train) < 2:
            raise DataError(f"datasets={list(cfg.datasets)}: {len(train)} train example(s) and "
                            "no test split: too few to train and evaluate")
        order = torch.randperm(len(train), generator=generator).tolist()
        test, train = [train[i] for i in order[:n]], [train[i] for i in sorted(order[n:])]
        if distributed.is_main():
            print(f"warning: datasets={list(cfg.datasets)} have no test examples: {n} of the "
                  f"{len(train) + n} train examples are held out for evaluation instead (not "
                  "trained on)")
    check_data_identity(cfg, fingerprints)
    order = torch.randperm(len(test), generator=generator)
    return train, [test[i] for i in order[:cfg.n_eval_examples].tolist()]


# the options that decide which examples a run sees (besides the sources' contents)
DATA_OPTIONS = ("datasets", "data_fraction", "num_turns", "prefs_path", "seed",
                "n_eval_examples", "max_length", "max_prompt_length")


def check_data_identity(cfg, fingerprints: dict):
    """Exact resume needs the examples the run started with: the fingerprint of each source's
    examples and the data options are stored in RUN_DIR/data_fingerprint.json and compared on
    resume; a change is refused unless resume_accept_data_change=true."""
    if cfg.get("local_run_dir") is None:
        return
    path = os.path.join(cfg.local_run_dir, DATA_FINGERPRINT)
    current = {"sources": fingerprints, "options": {
        k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v
        for k, v in ((k, cfg.get(k)) for k in DATA_OPTIONS)}}
    if cfg.get("resume") and os.path.exists(path):
        saved = json.loads(open(path).read())
        changed = [f"{split} examples of {spec}" for split in ("train", "test")
                   for spec in sorted(set(saved["sources"][split]) | set(fingerprints[split]))
                   if saved["sources"][split].get(spec) != fingerprints[split].get(spec)]
        changed += [f"option {k}" for k in DATA_OPTIONS
                    if saved["options"].get(k) != current["options"][k]]
        if changed and not cfg.get("resume_accept_data_change"):
            raise DataError(
                f"resume={cfg.resume}: the data changed since the run started ({', '.join(changed)}"
                "), so the resumed run would not continue the same training. Restore the data, "
                "or accept the change with resume_accept_data_change=true (training continues "
                "from the saved position in the new data)")
        if changed and distributed.is_main():
            print(f"warning: resuming on changed data ({', '.join(changed)}), as "
                  "resume_accept_data_change=true allows")
        if not changed:
            return
    if distributed.is_main():
        atomic_write_text(path, json.dumps(current, indent=1) + "\n")
