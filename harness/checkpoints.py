"""THE run-dir layout: run dirs, checkpoints, atomic writes, LATEST, exact-resume state, and
resolving whatever path a user gives (a policy.pt, a checkpoint dir, a run dir, a model dir).

    RUN_DIR/config.yaml              the run's composed config
    RUN_DIR/metrics.jsonl, curves.png, samples/
    RUN_DIR/step-N/, epoch-N/        checkpoint dirs; LATEST -> the newest one

A checkpoint dir (step-N/, epoch-N/) holds the reference-compatible files
    policy.pt     {"step_idx", "state", "metrics"}
    optimizer.pt  {"step_idx", "state", "metrics"}   (state = optimizer.state_dict())
    scheduler.pt  {"step_idx", "state", "metrics"}
plus trainer_state.pt (data position, counters, RNG states) for exact resume; distributed
trainers add sharded/ (torch.distributed.checkpoint: every rank's shards of model and optimizer,
loadable on any number of ranks) and LoRA runs add adapter/ (peft format). Each dir is
written under a hidden name, marked complete and renamed into place, and LATEST is a symlink
swapped with os.replace; a re-save of an existing name and keep_last pruning are ordered the
same way, so a crash at any instruction leaves a complete copy of every checkpoint, and
harness/run_dir.py puts the run dir back in order on the next start or resume.
"""

import datetime
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from harness.run_dir import (COMPLETE, LATEST, fault_point, fsync_dir, hidden_name, point_latest,
                             locate_latest, remove_tree)

SHARDED = "sharded"
ADAPTER = "adapter"
POLICY = "policy.pt"
RUN_CONFIG = "config.yaml"
# a reward-model checkpoint (loss=reward) also holds its statistics and its backbone's config and
# tokenizer, so that it loads without the base model dir
REWARD_META, REWARD_MODEL_DIR = "reward_model.json", "reward_model"
REPO_ROOT = Path(__file__).resolve().parent.parent


def first_usable_dir(local_dirs) -> str:
    """The first of `local_dirs` that exists and is writable, else the last one, created."""
    for base in local_dirs:
        if os.path.isdir(base) and os.access(base, os.W_OK):
            return base
    os.makedirs(local_dirs[-1], exist_ok=True)
    return local_dirs[-1]


def get_local_run_dir(exp_name: str, local_dirs) -> str:
    """Create and return {first usable local_dir}/{exp_name}_{timestamp}, never an existing dir.

    The timestamp has microseconds and creation is exclusive, so two runs started in the same
    second (a sweep) never share a directory.
    """
    base = first_usable_dir(local_dirs)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S_%f")
    for attempt in range(100):
        path = os.path.join(base, f"{exp_name}_{stamp}" + (f"_{attempt}" if attempt else ""))
        try:
            os.makedirs(path)
            return os.path.abspath(path)
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a fresh run dir under {base}")


def atomic_write_text(path, text: str):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    import numpy as np  # lazy, here and below: train.py checks a config without torch
    import torch
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict):
    import numpy as np
    import torch
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, permissions): names the disk."""


def _write_failed(err: BaseException, ckpt_dir: Path, name: str) -> CheckpointWriteError:
    try:
        usage = shutil.disk_usage(ckpt_dir.parent)
        disk = f"{usage.free / 2**30:.2f} GiB free of {usage.total / 2**30:.2f} GiB"
    except OSError:
        disk = "free space unknown"
    reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
    return CheckpointWriteError(
        f"checkpoint {name} could not be written to {ckpt_dir} ({reason}; the disk holding "
        f"{ckpt_dir.parent}: {disk}). LATEST still points at the previous checkpoint: free "
        "space (keep_last=N keeps fewer), or move the run with local_dirs=, then resume=")


def save_checkpoint(run_dir, name: str, step_idx: int, metrics: dict, policy_state: dict,
                    optimizer_state: dict | None, scheduler_state: dict | None,
                    trainer_state: dict | None, extra_writer=None, latest: bool = True) -> Path:
    """Write run_dir/name and point LATEST at it (latest=False: leave LATEST alone, e.g. for
    weights kept for inspection). `extra_writer(tmp_dir)` may add files (e.g. a Hugging Face
    export) inside the same unit. Crash-safe at every instruction (harness/run_dir.py): the dir
    is written under a hidden name, marked complete, then renamed into place; re-saving a name
    that exists swaps LATEST to the new copy before the old one is retired."""
    import torch
    run_dir = Path(run_dir)
    final = run_dir / name
    tmp = run_dir / hidden_name(name, "tmp")
    if tmp.exists():
        remove_tree(tmp)
    try:
        tmp.mkdir(parents=True)
        files = {"policy.pt": policy_state, "optimizer.pt": optimizer_state,
                 "scheduler.pt": scheduler_state, "trainer_state.pt": trainer_state}
        for fname, state in files.items():
            if state is not None:
                obj = state if fname == "trainer_state.pt" else \
                    {"step_idx": step_idx, "state": state, "metrics": metrics}
                torch.save(obj, tmp / fname)
                if fname == "policy.pt":
                    fault_point("save:files")  # a crash with the dir half written
        if extra_writer is not None:
            extra_writer(tmp)
        _sync_tree(tmp)
        atomic_write_text(tmp / COMPLETE, f"{step_idx}\n")
    except (OSError, RuntimeError) as err:
        if tmp.exists():
            remove_tree(tmp)
        raise _write_failed(err, tmp, name) from err
    fault_point("save:complete")
    if final.exists():
        _replace_existing(run_dir, name, tmp, latest)
    else:
        os.replace(tmp, final)
        fsync_dir(run_dir)
        fault_point("save:renamed")
        if latest:
            point_latest(run_dir, name)
            fault_point("save:latest")
    return final


def _sync_tree(path: Path):
    """fsync every file under `path`, so a checkpoint marked complete survives a power cut."""
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _replace_existing(run_dir: Path, name: str, tmp: Path, latest: bool):
    """Re-save of an existing name (e.g. the final save of a resumed run): LATEST moves to the
    new copy first, then the old copy is retired, the new one renamed into place, LATEST
    pointed at it and the old copy deleted; harness.run_dir.recover completes any prefix."""
    if latest:
        point_latest(run_dir, tmp.name)
        fault_point("resave:latest-tmp")
    old = run_dir / hidden_name(name, "old")
    os.replace(run_dir / name, old)
    fault_point("resave:retired")
    os.replace(tmp, run_dir / name)
    fsync_dir(run_dir)
    fault_point("resave:renamed")
    if latest:
        point_latest(run_dir, name)
        fault_point("resave:latest")
    remove_tree(old)


def prune_checkpoints(run_dir, keep_last: int | None):
    """Delete all but the newest `keep_last` step-N dirs (epoch-N dirs and LATEST's target stay).
    Each is renamed out of sight before it is deleted, so no half-deleted step-N is ever
    visible (a leftover hidden one is removed by harness.run_dir.recover)."""
    if not keep_last:
        return
    run_dir = Path(run_dir)
    latest = os.path.realpath(run_dir / LATEST)
    steps = sorted((p for p in run_dir.glob("step-*") if p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    for p in steps[:-keep_last]:
        if os.path.realpath(p) != latest:
            retired = run_dir / hidden_name(p.name, "pruned")
            os.replace(p, retired)
            fault_point("prune:retired")
            remove_tree(retired, point="prune:deleting")


def staging_dir(run_dir, name: str) -> Path:
    """Where all ranks write a checkpoint's shards before rank 0 moves them into the checkpoint
    (the same path on every rank, so it needs no broadcast)."""
    return Path(run_dir) / f".{name}.{SHARDED}-staging"


def adopt_shards(run_dir, name: str, ckpt_dir: Path):
    """Move the shards all ranks wrote for checkpoint `name` (if any) into its dir, sharded/."""
    staged = staging_dir(run_dir, name)
    if staged.exists():
        os.replace(staged, ckpt_dir / SHARDED)


def save_sharded(state: dict, path: Path):
    """Collective: each rank writes its own shards of `state` (DTensors) under `path`."""
    import torch.distributed.checkpoint as dcp
    dcp.save(state, checkpoint_id=str(path))


def load_sharded(state: dict, path: Path):
    """Collective, in place: fill this rank's shards of `state` from `path`, whatever the number
    of ranks that wrote it (DCP reshards on load)."""
    import torch.distributed.checkpoint as dcp
    dcp.load(state, checkpoint_id=str(path))


def resume_dir(run_dir) -> Path:
    """The one checkpoint dir a resume reads (LATEST resolved once, so a LATEST that moves
    meanwhile cannot mix two checkpoints); clear errors when there is none."""
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"resume={run_dir!r}: no such run directory")
    ckpt = locate_latest(run_dir)
    if ckpt is None or not (ckpt / "trainer_state.pt").exists():
        raise FileNotFoundError(f"resume={run_dir!r}: no complete checkpoint to resume from "
                                f"({LATEST}/trainer_state.pt missing); start a fresh run instead")
    return ckpt


def load_for_resume(run_dir, sharded: bool = False, ckpt: Path | None = None) -> dict:
    """The checkpoint `ckpt` (default: resume_dir(run_dir)) of a run dir, for exact resume.

    sharded=True (distributed trainers): weights and optimizer come from sharded/, so the full
    policy.pt / optimizer.pt are not read into every rank's memory."""
    import torch
    ckpt = Path(ckpt) if ckpt is not None else resume_dir(run_dir)
    load = lambda f: torch.load(ckpt / f, map_location="cpu", weights_only=False)  # noqa: E731
    out = {"dir": str(ckpt), "scheduler": load("scheduler.pt"),
           "trainer": load("trainer_state.pt")}
    if sharded:
        if not (ckpt / SHARDED).is_dir():
            raise FileNotFoundError(f"resume={run_dir!r}: {ckpt} has no {SHARDED}/ dir (it was "
                                    "saved by BasicTrainer; resume it with that trainer)")
        out[SHARDED] = ckpt / SHARDED
    else:
        out.update(policy=load("policy.pt"), optimizer=load("optimizer.pt"))
    if (ckpt / ADAPTER).is_dir():
        out[ADAPTER] = ckpt / ADAPTER
    return out


# ------------------------------------------------------------------------ resolving paths
def resolve_path(name_or_path: str) -> str:
    """A relative path that exists under the repo root (e.g. assets/tiny_model) works from any cwd;
    anything else (a hub id, an absolute path) is returned unchanged."""
    if name_or_path and not os.path.isabs(name_or_path) and not os.path.exists(name_or_path):
        candidate = REPO_ROOT / name_or_path
        if candidate.exists():
            return str(candidate)
    return name_or_path


def run_dir_of(archive: str) -> str:
    """The run dir of a checkpoint file: RUN_DIR/step-N/policy.pt -> RUN_DIR."""
    return os.path.dirname(os.path.dirname(os.path.abspath(archive)))


def run_config(archive: str):
    """The config.yaml of the run that wrote checkpoint file `archive`, or None."""
    path = os.path.join(run_dir_of(archive), RUN_CONFIG)
    return OmegaConf.load(path) if os.path.exists(path) else None


@dataclass(frozen=True)
class CheckpointRef:
    """Where a checkpoint's pieces live: the model dir (architecture and, without an archive,
    the weights), an optional policy.pt whose `state` replaces the weights, and the tokenizer."""
    model: str
    archive: str | None
    tokenizer: str


def find_policy(path: str) -> str | None:
    """The policy.pt of a checkpoint dir or of a run dir (its LATEST), else None."""
    if os.path.isfile(os.path.join(path, POLICY)):
        return os.path.join(path, POLICY)
    latest = locate_latest(path)
    return str(latest / POLICY) if latest and (latest / POLICY).is_file() else None


def resolve_checkpoint(path: str, base_model: str | None = None,
                       tokenizer: str | None = None) -> CheckpointRef:
    """Find the model dir, archive and tokenizer of `path`.

    `path` may be a policy.pt, a checkpoint dir (step-N/, LATEST/) holding one, a run dir (its
    LATEST/policy.pt is used), a Hugging Face model dir, or a hub id. For a policy.pt the base
    model is `base_model` if given, else model.name_or_path of the run's config.yaml (the
    checkpoint dir's parent)."""
    archive = None
    if os.path.isdir(path):
        archive = find_policy(path)
        if archive is None and not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"checkpoint {path!r} holds neither {POLICY}, "
                                    f"{LATEST}/{POLICY} nor a Hugging Face config.json")
    elif os.path.isfile(path):
        archive = path
    elif path.endswith(".pt"):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    if archive is None:  # a Hugging Face model dir or hub id
        return CheckpointRef(path, None, tokenizer or path)
    cfg = run_config(archive)
    run_model = OmegaConf.select(cfg, "model.name_or_path") if cfg is not None else None
    run_tokenizer = OmegaConf.select(cfg, "model.tokenizer_name_or_path") if cfg is not None else None
    model = base_model or run_model
    if model is None:
        raise ValueError(f"checkpoint {archive!r} is a {POLICY} without a run {RUN_CONFIG} next "
                         "to its checkpoint dir: name its base model (e.g. --base-model "
                         "assets/tiny_model)")
    return CheckpointRef(resolve_path(model), archive,
                         resolve_path(tokenizer or (None if base_model else run_tokenizer) or model))


def default_reference(policy_path: str) -> str:
    """The reference a run trained against: its model.archive (e.g. the SFT policy.pt), else its
    base model. Needs the run's config.yaml (the checkpoint dir's parent)."""
    ref = resolve_checkpoint(policy_path)
    if ref.archive is None:
        raise ValueError(f"{policy_path!r} is not a run checkpoint, so its reference is unknown: "
                         "name it (--reference PATH)")
    cfg = run_config(ref.archive)
    return OmegaConf.select(cfg, "model.archive") or OmegaConf.select(cfg, "model.name_or_path")


def output_path(policy_path: str, name: str) -> str:
    """Where a result file about a checkpoint goes: into its checkpoint / model dir (a run dir's
    LATEST)."""
    target = policy_path if os.path.isdir(policy_path) else os.path.dirname(
        os.path.abspath(policy_path))
    if not os.path.isdir(target):
        raise ValueError(f"{policy_path!r} is not a local checkpoint: give an output path (--out)")
    if os.path.isfile(os.path.join(target, LATEST, POLICY)):  # a run dir
        target = os.path.join(target, LATEST)
    return os.path.join(target, name)


def reward_checkpoint_dir(path) -> Path:
    """A reward model's run dir (-> LATEST), checkpoint dir, or its policy.pt -> the checkpoint
    dir (the one holding reward_model.json)."""
    path = Path(path)
    if path.name == POLICY:
        path = path.parent
    if (path / LATEST).exists() and not (path / REWARD_META).exists():
        path = path / LATEST
    if not (path / REWARD_META).exists():
        raise FileNotFoundError(
            f"{path} is not a reward-model checkpoint ({REWARD_META} missing). Train one with "
            "`python train.py loss=reward model.archive=SFT_RUN/LATEST/policy.pt` and pass its "
            "run dir or checkpoint dir")
    return path
