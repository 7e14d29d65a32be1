"""Entry point: compose the config, check it, load models and data, run the trainer.

    python train.py                                   # SFT of the bundled tiny model on toy data
    python train.py loss=dpo loss.beta=0.1 model.archive=RUN/LATEST/policy.pt
    python train.py resume=RUN_DIR                    # continue a killed run exactly
"""

import os
import random

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from harness.checkpoints import atomic_write_text, get_local_run_dir, load_for_resume

# keys a resumed run may change on the command line; everything else comes from the run's config
RESUME_OVERRIDABLE = ("n_epochs", "n_examples", "eval_every", "save_every", "keep_last", "debug",
                      "wandb", "minimum_log_interval_secs", "export_hf", "sample_during_eval")


def check_config(cfg: DictConfig):
    """Every check that needs no model, so bad input fails in a second, not after loading 70B."""
    from preference_datasets import DATASETS
    from harness.objectives import get_loss_spec, loss_kwargs
    from trainers import TRAINERS
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"missing required config value(s): {', '.join(missing)} "
                         f"(set them on the command line, e.g. {missing[0]}=...)")
    get_loss_spec(cfg.loss.name)
    loss_kwargs(cfg.loss)
    if cfg.trainer.name not in TRAINERS:
        raise ValueError(f"unknown trainer={cfg.trainer.name!r}; choose one of {sorted(TRAINERS)}")
    if not isinstance(getattr(torch.optim, str(cfg.optimizer), None), type):
        raise ValueError(f"optimizer={cfg.optimizer!r} is not a torch.optim class "
                         "(e.g. RMSprop, AdamW, Adam, SGD)")
    for spec in cfg.datasets:
        if str(spec).split(":", 1)[0] not in DATASETS:
            raise ValueError(f"unknown dataset {spec!r} in datasets=; registered: {sorted(DATASETS)}")
    if cfg.batch_size % cfg.gradient_accumulation_steps:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by "
                         f"gradient_accumulation_steps={cfg.gradient_accumulation_steps}")
    every = cfg.save_every
    if every is not None and not (isinstance(every, int) and every > 0) and not (
            isinstance(every, str) and every.startswith("epoch_") and every[6:].isdigit()):
        raise ValueError(f"save_every={every!r}: use an example count (e.g. 10000) or epoch_N")
    if not 0 < cfg.data_fraction <= 1:
        raise ValueError(f"data_fraction={cfg.data_fraction} must be in (0, 1]")
    if cfg.max_prompt_length >= cfg.max_length:
        raise ValueError(f"max_prompt_length={cfg.max_prompt_length} must be below "
                         f"max_length={cfg.max_length}")


def resumed_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The killed run's own config, plus the RESUME_OVERRIDABLE keys given on this command line."""
    saved_path = os.path.join(cfg.resume, "config.yaml")
    if not os.path.exists(saved_path):
        raise FileNotFoundError(f"resume={cfg.resume!r}: {saved_path} not found")
    saved = OmegaConf.load(saved_path)
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key.split(".")[0] in RESUME_OVERRIDABLE:
            OmegaConf.update(saved, key, OmegaConf.select(cfg, key), force_add=True)
    saved.resume = cfg.resume
    return saved


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: DictConfig, overrides: list[str] = ()) -> str:
    """Train as configured; returns the run dir. `overrides` are the command-line overrides."""
    resume = None
    if cfg.resume:
        cfg = resumed_config(cfg, overrides)
        resume = load_for_resume(cfg.resume)
    check_config(cfg)
    from harness.modeling import check_model_source, load_model, load_tokenizer
    from harness.objectives import get_loss_spec, load_policy, needs_reference
    from trainers import TRAINERS
    check_model_source(cfg.model.name_or_path)
    OmegaConf.resolve(cfg)
    if cfg.local_run_dir is None:
        cfg.local_run_dir = get_local_run_dir(cfg.exp_name, cfg.local_dirs)
    run_dir = cfg.local_run_dir
    os.makedirs(run_dir, exist_ok=True)
    atomic_write_text(os.path.join(run_dir, "config.yaml"), OmegaConf.to_yaml(cfg))
    print(OmegaConf.to_yaml(cfg))
    print(f"run dir: {run_dir}")
    seed_everything(cfg.seed)

    tokenizer = load_tokenizer(cfg.model.tokenizer_name_or_path or cfg.model.name_or_path)
    archive = None if resume else cfg.model.archive  # a resumed run restores its own weights
    policy = load_policy(cfg, archive)
    if cfg.activation_checkpointing:
        policy.gradient_checkpointing_enable()
    reference = None
    if needs_reference(cfg.loss):
        reference = load_model(cfg.model.name_or_path, cfg.model.reference_dtype,
                               cfg.model.archive).eval()
    # the offline loop of trainer=..., unless the loss brings its own (PPO's rollout loop)
    trainer_cls = get_loss_spec(cfg.loss.name).trainer or TRAINERS[cfg.trainer.name]
    trainer = trainer_cls(policy, tokenizer, cfg, run_dir, reference, resume)
    trainer.train()
    print(f"done: {run_dir}")
    return run_dir


@hydra.main(version_base="1.3", config_path="config", config_name="config")
def main(cfg: DictConfig):
    run(cfg, HydraConfig.get().overrides.task)


if __name__ == "__main__":
    main()
