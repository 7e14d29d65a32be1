"""Entry point: compose the config, check it, load models and data, run the trainer.

    python train.py                                   # SFT of the bundled tiny model on toy data
    python train.py loss=dpo loss.beta=0.1 model.archive=RUN/LATEST/policy.pt
    python train.py resume=RUN_DIR                    # continue a killed run exactly
    torchrun --nproc_per_node 8 train.py trainer=FSDPTrainer ...   # or plain python: it spawns
"""

import os
import random

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from harness.parallel import distributed
from harness.checkpoints import atomic_write_text, get_local_run_dir, load_for_resume

# keys a resumed run may change on the command line; everything else comes from the run's config
RESUME_OVERRIDABLE = ("n_epochs", "n_examples", "eval_every", "save_every", "keep_last", "debug",
                      "wandb", "minimum_log_interval_secs", "export_hf", "sample_during_eval",
                      "nproc_per_node")


def loop_class(cfg):
    """The loop that runs `loss=`: the offline BasicTrainer, or the loss's own (PPO's rollouts)."""
    from harness.objectives import get_loss_spec
    from trainers import BasicTrainer
    return get_loss_spec(cfg.loss.name).loop or BasicTrainer


def check_config(cfg: DictConfig, world_size: int = 1, overrides=()):
    """Every check that needs no model, so bad input fails in a second, not after loading 70B.
    world_size: the number of ranks the run will have; overrides: the command-line overrides
    (an option given there that this run would not read is refused)."""
    from harness.data.chat import check_option as check_chat_option
    from harness.data.sources import DATASETS
    from harness.objectives import get_loss_spec, loss_options
    from harness.training.options import check_options_read
    from harness.training.strategy import strategy_class
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"missing required config value(s): {', '.join(missing)} "
                         f"(set them on the command line, e.g. {missing[0]}=...)")
    spec = get_loss_spec(cfg.loss.name)
    loss_options(cfg.loss)
    layout = distributed.trainer_layout(cfg)
    loop = loop_class(cfg)
    check_options_read(cfg, overrides, loop.reads(spec, cfg) | strategy_class(cfg).READS,
                       loop.behaves_as(spec, cfg), cfg.loss.name,
                       f"{loop.__name__} with trainer={cfg.trainer.name}")
    if spec.check is not None:
        spec.check(cfg, world_size)
    if not isinstance(getattr(torch.optim, str(cfg.optimizer), None), type):
        raise ValueError(f"optimizer={cfg.optimizer!r} is not a torch.optim class "
                         "(e.g. RMSprop, AdamW, Adam, SGD)")
    for spec in cfg.datasets:
        if str(spec).split(":", 1)[0] not in DATASETS:
            raise ValueError(f"unknown dataset {spec!r} in datasets=; registered: {sorted(DATASETS)}")
    check_batch_split(cfg, world_size)
    check_micro_batch_tokens(cfg)
    rank = OmegaConf.select(cfg, "model.lora.r")
    if rank is not None and not (isinstance(rank, int) and rank > 0):
        raise ValueError(f"model.lora.r={rank!r} must be a positive integer rank (null = no LoRA)")
    if rank and layout.tensor_parallel:
        raise ValueError("model.lora with trainer=TensorParallelTrainer is not supported; use "
                         "trainer=FSDPTrainer or BasicTrainer for LoRA")
    every = cfg.save_every
    if every is not None and not (isinstance(every, int) and every > 0) and not (
            isinstance(every, str) and every.startswith("epoch_") and every[6:].isdigit()):
        raise ValueError(f"save_every={every!r}: use an example count (e.g. 10000) or epoch_N")
    if not 0 < cfg.data_fraction <= 1:
        raise ValueError(f"data_fraction={cfg.data_fraction} must be in (0, 1]")
    if cfg.amp_dtype not in (None, "bfloat16", "float16"):
        raise ValueError(f"amp_dtype={cfg.amp_dtype!r}: use bfloat16, float16 or null")
    check_chat_option(cfg.get("chat_template", "auto"))
    if cfg.max_prompt_length >= cfg.max_length:
        raise ValueError(f"max_prompt_length={cfg.max_prompt_length} must be below "
                         f"max_length={cfg.max_length}")


def check_batch_split(cfg: DictConfig, world_size: int):
    """batch_size must split evenly into micro-batches and those over the data-parallel ranks."""
    dp = world_size // distributed.tensor_parallel_size(cfg, world_size)
    accum = cfg.gradient_accumulation_steps
    if cfg.batch_size % (accum * dp):
        good = (cfg.batch_size // (accum * dp) + 1) * accum * dp
        raise ValueError(
            f"batch_size={cfg.batch_size} is not divisible by gradient_accumulation_steps="
            f"{accum} x {dp} data-parallel rank(s) = {accum * dp}: set batch_size to a multiple "
            f"of {accum * dp} (e.g. {good}), or change gradient_accumulation_steps or the number"
            " of processes")


def check_micro_batch_tokens(cfg: DictConfig):
    budget = cfg.get("micro_batch_tokens")
    if budget is None:
        return
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ValueError(f"micro_batch_tokens={budget!r} must be a positive number of token "
                         "positions (null = split by gradient_accumulation_steps)")
    if cfg.gradient_accumulation_steps != 1:
        raise ValueError("micro_batch_tokens splits the batch itself: keep "
                         f"gradient_accumulation_steps=1 (got {cfg.gradient_accumulation_steps})")


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
    saved.local_run_dir = os.path.abspath(cfg.resume)  # the run dir, even if it was moved
    return saved


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: DictConfig, overrides: list[str] = ()) -> str:
    """Train as configured; returns the run dir. `overrides` are the command-line overrides.
    Under torchrun (or spawned by main) every rank runs this; rank 0 owns the run dir."""
    if cfg.resume:
        cfg = resumed_config(cfg, overrides)
    check_config(cfg, distributed.planned_world_size(cfg), overrides)
    if cfg.get("chat_template", "auto") not in ("auto", "none"):  # a file, named wherever run
        cfg.chat_template = os.path.abspath(os.path.expanduser(cfg.chat_template))
    from harness.models.modeling import check_model_source
    check_model_source(cfg.model.name_or_path)
    created = distributed.init(cfg)
    try:
        return _run(cfg)
    finally:
        if created:
            import torch.distributed as dist
            dist.destroy_process_group()


def _run(cfg: DictConfig) -> str:
    from harness.models import lora
    from harness.models.modeling import load_model, load_tokenizer
    from harness.parallel.parallelize import single_process_device_map
    from harness.objectives import load_policy, needs_reference
    from harness.training.strategy import strategy_class
    sharded = strategy_class(cfg).sharded_checkpoints
    resume = load_for_resume(cfg.resume, sharded) if cfg.resume else None
    OmegaConf.resolve(cfg)
    if cfg.local_run_dir is None:  # rank 0 makes a fresh dir; every rank takes its name
        cfg.local_run_dir = distributed.broadcast_object(
            get_local_run_dir(cfg.exp_name, cfg.local_dirs) if distributed.is_main() else None)
    run_dir = cfg.local_run_dir
    if distributed.is_main():
        os.makedirs(run_dir, exist_ok=True)
        atomic_write_text(os.path.join(run_dir, "config.yaml"), OmegaConf.to_yaml(cfg))
        print(OmegaConf.to_yaml(cfg))
        print(f"run dir: {run_dir}")
    seed_everything(cfg.seed)

    tokenizer = load_tokenizer(cfg.model.tokenizer_name_or_path or cfg.model.name_or_path,
                               cfg.get("chat_template", "auto"))
    # a resumed run restores its own weights, except a LoRA run's base: its checkpoints hold
    # the adapters (sharded/ has everything, but only distributed trainers read it)
    archive = cfg.model.archive if not resume or lora.enabled(cfg.model) else None
    # distributed trainers place (and shard) the model themselves, and only rank 0 reads the
    # weights: the others build the bare architecture and receive their shards from it
    device_map = None if distributed.trainer_layout(cfg).processes else single_process_device_map()
    meta = sharded and not distributed.is_main()
    policy = load_policy(cfg, archive, device_map=device_map, meta=meta)
    reference = None
    if lora.enabled(cfg.model):
        policy = lora.apply_lora(policy, cfg.model.lora)
        reference = policy if needs_reference(cfg.loss) else None  # adapters off = the base
    elif needs_reference(cfg.loss):
        reference = load_model(cfg.model.name_or_path, cfg.model.reference_dtype,
                               cfg.model.archive, device_map, meta).eval()
    trainer = loop_class(cfg)(policy, tokenizer, cfg, run_dir, reference, resume)
    trainer.train()
    print(f"done: {run_dir}")
    return run_dir


@hydra.main(version_base="1.3", config_path="config", config_name="config")
def main(cfg: DictConfig):
    overrides = list(HydraConfig.get().overrides.task)
    launch = resumed_config(cfg, overrides) if cfg.resume else cfg  # a resume keeps its trainer
    nproc = distributed.processes_to_spawn(launch)
    if nproc:  # `python train.py trainer=FSDPTrainer`: start the local ranks ourselves
        check_config(launch, nproc, overrides)
        distributed.spawn(run, nproc, launch.fsdp_port, cfg, overrides)
    else:
        run(cfg, overrides)


if __name__ == "__main__":
    main()
