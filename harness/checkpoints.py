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
written under a temporary name and renamed into place, and LATEST is a symlink swapped with
os.replace, so a crash at any moment leaves either the old or the new checkpoint, never half.
"""

import datetime
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from omegaconf import OmegaConf

LATEST = "LATEST"
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
    return {"python": random.getstate(), "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir, name: str, step_idx: int, metrics: dict, policy_state: dict,
                    optimizer_state: dict | None, scheduler_state: dict | None,
                    trainer_state: dict | None, extra_writer=None) -> Path:
    """Write run_dir/name atomically and point LATEST at it. `extra_writer(tmp_dir)` may add
    files (e.g. a Hugging Face export) inside the same atomic unit."""
    run_dir = Path(run_dir)
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files = {"policy.pt": policy_state, "optimizer.pt": optimizer_state,
             "scheduler.pt": scheduler_state}
    for fname, state in files.items():
        if state is not None:
            torch.save({"step_idx": step_idx, "state": state, "metrics": metrics}, tmp / fname)
    if trainer_state is not None:
        torch.save(trainer_state, tmp / "trainer_state.pt")
    if extra_writer is not None:
        extra_writer(tmp)
    if final.exists():  # re-saving the same step (e.g. final save after a step save)
        old = run_dir / f".{name}.old-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _point_latest(run_dir, name)
    return final


def _point_latest(run_dir: Path, name: str):
    link_tmp = run_dir / f".{LATEST}.tmp-{os.getpid()}"
    if link_tmp.is_symlink() or link_tmp.exists():
        link_tmp.unlink()
    os.symlink(name, link_tmp)
    os.replace(link_tmp, run_dir / LATEST)


def prune_checkpoints(run_dir, keep_last: int | None):
    """Delete all but the newest `keep_last` step-N dirs (epoch-N dirs and LATEST's target stay)."""
    if not keep_last:
        return
    run_dir = Path(run_dir)
    latest = os.path.realpath(run_dir / LATEST)
    steps = sorted((p for p in run_dir.glob("step-*") if p.name[5:].isdigit()),
                   key=lambda p: int(p.name[5:]))
    for p in steps[:-keep_last]:
        if os.path.realpath(p) != latest:
            shutil.rmtree(p, ignore_errors=True)


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


def load_for_resume(run_dir, sharded: bool = False) -> dict:
    """The LATEST checkpoint of a run dir, for exact resume; clear errors when there is none.

    sharded=True (distributed trainers): weights and optimizer come from sharded/, so the full
    policy.pt / optimizer.pt are not read into every rank's memory."""
    ckpt = Path(run_dir) / LATEST
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"resume={run_dir!r}: no such run directory")
    if not (ckpt / "trainer_state.pt").exists():
        raise FileNotFoundError(f"resume={run_dir!r}: no complete checkpoint to resume from "
                                f"({ckpt}/trainer_state.pt missing); start a fresh run instead")
    load = lambda f: torch.load(ckpt / f, map_location="cpu", weights_only=False)  # noqa: E731
    out = {"dir": str(ckpt.resolve()), "scheduler": load("scheduler.pt"),
           "trainer": load("trainer_state.pt")}
    if sharded:
        if not (ckpt / SHARDED).is_dir():
            raise FileNotFoundError(f"resume={run_dir!r}: {ckpt} has no {SHARDED}/ dir (it was "
                                    "saved by BasicTrainer; resume it with that trainer)")
        out[SHARDED] = ckpt.resolve() / SHARDED
    else:
        out.update(policy=load("policy.pt"), optimizer=load("optimizer.pt"))
    if (ckpt / ADAPTER).is_dir():
        out[ADAPTER] = ckpt.resolve() / ADAPTER
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
    for candidate in (os.path.join(path, POLICY), os.path.join(path, LATEST, POLICY)):
        if os.path.isfile(candidate):
            return candidate
    return None


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
