"""Entry point: compose the config, check it, load models and data, run the trainer.

    python train.py                                   # SFT of the bundled tiny model on toy data
    python train.py loss=dpo loss.beta=0.1 model.archive=RUN     # a run dir, checkpoint dir or policy.pt
    python train.py resume=RUN_DIR                    # continue a killed run exactly
    torchrun --nproc_per_node 8 train.py trainer=FSDPTrainer ...   # or plain python: it spawns

A config or data error is one line on stderr and a non-zero exit, before any model loads where
it can be (debug=true or HYDRA_FULL_ERROR=1 shows the traceback). Heavy modules are imported
only once the config has passed its checks.
"""

import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from harness.training.cli import (clean_errors, first_usable_dir, precheck, remove_if_empty,
                                  show_tracebacks)

# keys a resumed run may change on the command line; everything else comes from the run's config
RESUMABLE = ("n_epochs", "n_examples", "eval_every", "save_every", "keep_last", "debug",
             "wandb", "minimum_log_interval_secs", "export_hf", "sample_during_eval",
             "nproc_per_node", "local_dirs", "gold_eval_prompts", "health",
             "resume_accept_data_change", "num_threads")
OmegaConf.register_new_resolver("first_usable_dir", first_usable_dir, replace=True)


def loop_class(cfg):
    """The loop that runs `loss=`: the offline BasicTrainer, or the loss's own (PPO's rollouts)."""
    from harness.objectives import get_loss_spec
    from trainers import BasicTrainer
    return get_loss_spec(cfg.loss.name).loop or BasicTrainer


def check_light(cfg: DictConfig):
    """The checks that need no torch and no model: they run before Hydra even starts the job
    (harness/training/cli.precheck), so a typo fails in about a second."""
    from harness.data.chat import check_option as check_chat_option
    from harness.data.sources import check_spec
    from harness.training.options import check_ranges
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"missing required config value(s): {', '.join(missing)} "
                         f"(set them on the command line, e.g. {missing[0]}=...)")
    check_ranges(cfg)
    check_chat_option(cfg.get("chat_template", "auto"))
    for spec in cfg.datasets:
        check_spec(str(spec))
    rank = OmegaConf.select(cfg, "model.lora.r")
    if rank is not None and not (isinstance(rank, int) and not isinstance(rank, bool) and rank > 0):
        raise ValueError(f"model.lora.r={rank!r} must be a positive integer rank (null = no LoRA)")
    every = cfg.save_every
    if every is not None and not (isinstance(every, int) and every > 0) and not (
            isinstance(every, str) and every.startswith("epoch_") and every[6:].isdigit()
            and int(every[6:]) > 0):
        raise ValueError(f"save_every={every!r}: use an example count (e.g. 10000) or epoch_N")
    if cfg.amp_dtype not in (None, "bfloat16", "float16"):
        raise ValueError(f"amp_dtype={cfg.amp_dtype!r}: use bfloat16, float16 or null")
    if cfg.max_prompt_length >= cfg.max_length:
        raise ValueError(f"max_prompt_length={cfg.max_prompt_length} must be below "
                         f"max_length={cfg.max_length}")
    archive = cfg.model.get("archive")
    if archive and not os.path.exists(archive):
        raise FileNotFoundError(f"model.archive={archive!r} does not exist (give a policy.pt, a "
                                "checkpoint dir or a run dir)")
    if cfg.get("micro_batch_tokens") is not None and cfg.gradient_accumulation_steps != 1:
        raise ValueError("micro_batch_tokens splits the batch itself: keep "
                         f"gradient_accumulation_steps=1 (got {cfg.gradient_accumulation_steps})")


def check_config(cfg: DictConfig, world_size: int = 1, overrides=()):
    """Every check that needs no model, so bad input fails in seconds, not after loading 70B.
    world_size: the number of ranks the run will have; overrides: the command-line overrides
    (an option given there that this run would not read is refused)."""
    from harness.objectives import did_you_mean, get_loss_spec, loss_options
    from harness.parallel import distributed
    from harness.training.judged_eval import check_eval_judge
    from harness.training.options import check_options_read
    from harness.training.strategy import strategy_class
    check_light(cfg)
    spec = get_loss_spec(cfg.loss.name)
    loss_options(cfg.loss)
    layout = distributed.trainer_layout(cfg)
    loop = loop_class(cfg)
    check_options_read(cfg, overrides, loop.reads(spec, cfg) | strategy_class(cfg).READS,
                       loop.behaves_as(spec, cfg), cfg.loss.name,
                       f"{loop.__name__} with trainer={cfg.trainer.name}")
    if spec.check is not None:
        spec.check(cfg, world_size)
    check_eval_judge(cfg.get("eval_judge"))
    import torch
    if not isinstance(getattr(torch.optim, str(cfg.optimizer), None), type):
        raise ValueError(f"optimizer={cfg.optimizer!r} is not a torch.optim class (e.g. "
                         f"RMSprop, AdamW, Adam, SGD); {did_you_mean(str(cfg.optimizer), dir(torch.optim))}")
    check_batch_split(cfg, world_size)
    if OmegaConf.select(cfg, "model.lora.r") and layout.tensor_parallel:
        raise ValueError("model.lora with trainer=TensorParallelTrainer is not supported; use "
                         "trainer=FSDPTrainer or BasicTrainer for LoRA")


def check_batch_split(cfg: DictConfig, world_size: int):
    """batch_size must split evenly into micro-batches and those over the data-parallel ranks."""
    from harness.parallel import distributed
    dp = world_size // distributed.tensor_parallel_size(cfg, world_size)
    accum = cfg.gradient_accumulation_steps
    if cfg.batch_size % (accum * dp):
        good = (cfg.batch_size // (accum * dp) + 1) * accum * dp
        raise ValueError(
            f"batch_size={cfg.batch_size} is not divisible by gradient_accumulation_steps="
            f"{accum} x {dp} data-parallel rank(s) = {accum * dp}: set batch_size to a multiple "
            f"of {accum * dp} (e.g. {good}), or change gradient_accumulation_steps or the number"
            " of processes")


def resumed_config(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """The killed run's own config, plus the RESUMABLE keys given on this command line; any
    other key given with a value other than the run's is refused (it would be ignored)."""
    saved_path = os.path.join(cfg.resume, "config.yaml")
    if not os.path.exists(saved_path):
        raise FileNotFoundError(f"resume={cfg.resume!r}: {saved_path} not found (is it a run dir?)")
    saved = OmegaConf.load(saved_path)
    refused = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if key == "resume" or key.startswith("hydra."):
            continue
        if key.split(".")[0] in RESUMABLE:
            OmegaConf.update(saved, key, OmegaConf.select(cfg, key), force_add=True)
        elif OmegaConf.select(saved, key, default=None) != OmegaConf.select(cfg, key):
            refused.append(key)
    if refused:
        raise ValueError(f"resume= continues the run with its own settings, so {', '.join(refused)}"
                         f" cannot change; keys a resume may change: {', '.join(RESUMABLE)} (start "
                         "a new run, e.g. with model.archive=RUN_DIR, to change the others)")
    saved.resume = cfg.resume
    saved.local_run_dir = os.path.abspath(cfg.resume)  # the run dir, even if it was moved
    return saved


def resolve_archive(cfg: DictConfig):
    """model.archive may name a policy.pt, a checkpoint dir or a run dir (its LATEST); the
    config records the policy.pt it resolved to. A missing or unreadable one fails here."""
    archive = cfg.model.archive
    if not archive:
        return
    from harness.checkpoints import find_policy
    if os.path.isdir(archive):
        found = find_policy(archive)
        if found is None:
            raise FileNotFoundError(f"model.archive={archive!r} is a directory without policy.pt "
                                    "or LATEST/policy.pt: give a policy.pt, a checkpoint dir or a "
                                    "run dir with a checkpoint")
        cfg.model.archive = os.path.abspath(found)
    elif not os.path.isfile(archive):
        raise FileNotFoundError(f"model.archive={archive!r} does not exist")
    from harness.models.modeling import check_archive
    check_archive(cfg.model.archive)


def seed_everything(seed: int):
    import random

    import numpy as np
    import torch
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: DictConfig, overrides: list[str] = (), run_parent: str | None = None) -> str:
    """Train as configured; returns the run dir. `overrides` are the command-line overrides;
    `run_parent`: where the fresh run dir goes (default: the first usable local_dirs entry).
    Under torchrun (or spawned by main) every rank runs this; rank 0 owns the run dir."""
    from harness.parallel import distributed
    if cfg.resume:
        cfg = resumed_config(cfg, overrides)
    check_config(cfg, distributed.planned_world_size(cfg), overrides)
    resolve_archive(cfg)
    if cfg.get("chat_template", "auto") not in ("auto", "none"):  # a file, named wherever run
        cfg.chat_template = os.path.abspath(os.path.expanduser(cfg.chat_template))
    from harness.models.modeling import check_model_source
    check_model_source(cfg.model.name_or_path)
    if cfg.get("num_threads"):
        import torch
        torch.set_num_threads(cfg.num_threads)
    created = distributed.init(cfg)
    distributed.quiet_unless_main(cfg.debug)
    try:
        return _run(cfg, run_parent)
    finally:
        if created:
            import torch.distributed as dist
            dist.destroy_process_group()


def _run(cfg: DictConfig, run_parent: str | None) -> str:
    from harness import checkpoints, run_dir as run_dirs
    from harness.parallel import distributed
    from harness.training.strategy import strategy_class
    OmegaConf.resolve(cfg)
    lock, fresh = None, cfg.local_run_dir is None or not os.path.exists(cfg.local_run_dir)
    if cfg.local_run_dir is None:  # rank 0 makes a fresh dir; every rank takes its name
        cfg.local_run_dir = distributed.broadcast_object(checkpoints.get_local_run_dir(
            cfg.exp_name, [run_parent] if run_parent else cfg.local_dirs)
            if distributed.is_main() else None)
    run_dir = cfg.local_run_dir
    if distributed.is_main():
        os.makedirs(run_dir, exist_ok=True)  # a local_run_dir given on the command line
    try:
        if distributed.is_main():  # one owner per run dir; a resume first repairs a killed save
            lock = run_dirs.RunDirLock(run_dir).acquire()
            for note in ([lock.note] if lock.note else []) + (
                    run_dirs.recover(run_dir) if cfg.resume else []):
                print(f"run dir: {note}")
        ckpt = distributed.broadcast_object(checkpoints.resume_dir(run_dir) if cfg.resume and
                                            distributed.is_main() else None)
        resume = checkpoints.load_for_resume(run_dir, strategy_class(cfg).sharded_checkpoints,
                                             ckpt) if cfg.resume else None
        if distributed.is_main() and not cfg.resume:
            checkpoints.atomic_write_text(os.path.join(run_dir, "config.yaml"),
                                          OmegaConf.to_yaml(cfg))
            print(OmegaConf.to_yaml(cfg))
        print(f"run dir: {run_dir}")
        _train(cfg, run_dir, resume)
        if distributed.is_main():  # the toy task's report: gold reward of start vs trained
            from harness.evaluation.run_report import final_gold_eval
            final_gold_eval(cfg, run_dir)
    except BaseException:
        if fresh and distributed.is_main():
            remove_if_empty(run_dir)  # a run that never started leaves nothing behind
        raise
    finally:
        if lock is not None:
            lock.release()
    print(f"done: {run_dir}")
    return run_dir


def _train(cfg: DictConfig, run_dir: str, resume: dict | None):
    from harness.models import lora
    from harness.models.modeling import load_model, load_tokenizer
    from harness.objectives import base_model_notice, load_policy, needs_reference
    from harness.parallel import distributed
    from harness.parallel.parallelize import single_process_device_map
    from harness.training.strategy import strategy_class
    seed_everything(cfg.seed)
    if not resume:
        base_model_notice(cfg)
    tokenizer = load_tokenizer(cfg.model.tokenizer_name_or_path or cfg.model.name_or_path,
                               cfg.get("chat_template", "auto"),
                               "model.tokenizer_name_or_path" if cfg.model.tokenizer_name_or_path
                               else "model.name_or_path")
    # a resumed run restores its own weights, except a LoRA run's base: its checkpoints hold
    # the adapters (sharded/ has everything, but only distributed trainers read it)
    archive = cfg.model.archive if not resume or lora.enabled(cfg.model) else None
    # distributed trainers place (and shard) the model themselves, and only rank 0 reads the
    # weights: the others build the bare architecture and receive their shards from it
    device_map = None if distributed.trainer_layout(cfg).processes else single_process_device_map()
    meta = strategy_class(cfg).sharded_checkpoints and not distributed.is_main()
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


@hydra.main(version_base="1.3", config_path="config", config_name="config")
def main(cfg: DictConfig):
    debug = show_tracebacks(cfg)
    overrides = list(HydraConfig.get().overrides.task)
    run_parent = None
    if HydraConfig.get().mode.name == "MULTIRUN":  # every job's run dir inside the sweep dir
        run_parent = HydraConfig.get().sweep.dir
    launch = clean_errors(resumed_config, debug, cfg, overrides) if cfg.resume else cfg
    from harness.parallel import distributed
    nproc = distributed.processes_to_spawn(launch)
    if nproc:  # `python train.py trainer=FSDPTrainer`: start the local ranks ourselves
        clean_errors(check_config, debug, launch, nproc, overrides)
        clean_errors(distributed.spawn, debug, run_rank, nproc, launch.fsdp_port, cfg,
                     overrides, run_parent, debug)
    else:
        clean_errors(run, debug, cfg, overrides, run_parent)


def run_rank(cfg, overrides, run_parent, debug):
    """One spawned rank: run() with clean errors (the launcher exits with the rank's code)."""
    clean_errors(run, debug, cfg, overrides, run_parent)


def light_check(cfg: DictConfig, overrides: list[str]):
    """What precheck runs on the composed config: the resume rule and check_light."""
    check_light(resumed_config(cfg, overrides) if cfg.get("resume") else cfg)


if __name__ == "__main__":
    precheck(sys.argv[1:], light_check)
    main()
