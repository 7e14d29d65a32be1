"""Checkpoints survive a crash at every instruction of save, re-save and prune; a run dir has one
owner at a time; the launcher's death takes its workers down.

The fast tests crash in-process (a fault hook raises at each point of harness/run_dir.FAULT_
POINTS) and check what recovery leaves; the slow test SIGKILLs train.py at each point and checks
that resuming ends on the uninterrupted run's eval loss."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness import checkpoints, run_dir
from harness.training.run_logging import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TRAIN = [sys.executable, str(ROOT / "train.py")]


class Crash(BaseException):
    """A simulated kill: nothing catches a BaseException that is not an Exception."""


def save(path, name, x, keep_last=None):
    checkpoints.save_checkpoint(path, name, x, {}, {"w": torch.full((2,), float(x))}, {}, {},
                                {"train_state": {"examples": x}})
    checkpoints.prune_checkpoints(path, keep_last)


def scenario(path):
    """step-1, step-2 (pruning step-1), then a re-save of step-2: every fault point, in order."""
    save(path, "step-1", 1, keep_last=1)
    save(path, "step-2", 2, keep_last=1)
    save(path, "step-2", 3, keep_last=1)


def crash_at(point, nth):
    seen = []

    def hook(name):
        seen.append(name)
        if name == point and seen.count(point) == nth:
            raise Crash(point)
    return hook


# what LATEST holds after recovery (examples), for a crash at each point (and occurrence) of
# the scenario; None: the crash came before any checkpoint existed
EXPECTED = {("save:files", 1): None, ("save:complete", 1): 1, ("save:renamed", 1): 1,
            ("save:latest", 1): 1, ("save:files", 2): 1, ("save:complete", 2): 2,
            ("save:renamed", 2): 1, ("save:latest", 2): 2, ("prune:retired", 1): 2,
            ("prune:deleting", 1): 2, ("resave:latest-tmp", 1): 3, ("resave:retired", 1): 3,
            ("resave:renamed", 1): 3, ("resave:latest", 1): 3}


def test_every_fault_point_is_covered():
    assert {p for p, _ in EXPECTED} == set(run_dir.FAULT_POINTS)


@pytest.mark.parametrize("point, nth", list(EXPECTED), ids=[f"{p}@{n}" for p, n in EXPECTED])
def test_recovery_after_a_crash_at_every_point(tmp_path, point, nth):
    run_dir.set_fault_hook(crash_at(point, nth))
    try:
        with pytest.raises(Crash):
            scenario(tmp_path)
    finally:
        run_dir.set_fault_hook(None)
    found = run_dir.locate_latest(tmp_path)  # readers find the complete copy, read-only
    run_dir.recover(tmp_path)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    for ckpt in tmp_path.glob("step-*"):  # nothing visible is half written or half deleted
        assert (ckpt / run_dir.COMPLETE).exists() and (ckpt / "trainer_state.pt").exists()
    if EXPECTED[point, nth] is None:
        with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
            checkpoints.resume_dir(tmp_path)
    else:
        resumed = checkpoints.load_for_resume(tmp_path)
        x = resumed["trainer"]["train_state"]["examples"]
        assert x == EXPECTED[point, nth]
        assert torch.load(Path(resumed["dir"]) / "policy.pt")["state"]["w"][0].item() == x
        if (tmp_path / "LATEST").exists() and found is not None:
            assert found.name.lstrip(".").split(".")[0] in (Path(resumed["dir"]).name,
                                                            "step-1", "step-2")
    save(tmp_path, "step-2", 3, keep_last=1)  # the resumed run carries on
    assert checkpoints.load_for_resume(tmp_path)["trainer"]["train_state"]["examples"] == 3


def test_legacy_gap_between_moving_the_old_copy_and_the_new_one(tmp_path):
    """What the old writer left when killed mid re-save: LATEST dangling, both copies hidden."""
    save(tmp_path, "step-8", 8)
    os.replace(tmp_path / "step-8", tmp_path / ".step-8.old-123")
    (tmp_path / ".step-8.tmp-123").mkdir()
    (tmp_path / ".step-8.tmp-123" / "policy.pt").write_bytes(b"partial")
    assert run_dir.locate_latest(tmp_path) == (tmp_path / ".step-8.old-123").resolve()
    run_dir.recover(tmp_path)
    assert checkpoints.load_for_resume(tmp_path)["trainer"]["train_state"]["examples"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step-8"]


def test_a_failed_write_names_the_disk_and_keeps_latest(tmp_path):
    save(tmp_path, "step-1", 1)

    def full(_dir):
        raise OSError(28, "No space left on device")
    with pytest.raises(checkpoints.CheckpointWriteError, match=r"step-2 could not be written.*"
                       r"No space left on device.*GiB free.*LATEST still points"):
        checkpoints.save_checkpoint(tmp_path, "step-2", 2, {}, {"w": torch.zeros(1)}, {}, {},
                                    {"train_state": {"examples": 2}}, full)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step-1"]


# ------------------------------------------------------------------------------ the lock
HOLD = "import sys, time; from harness.run_dir import RunDirLock; RunDirLock(sys.argv[1]).acquire(); " \
       "print('held', flush=True); time.sleep(600)"


def test_run_dir_lock_refuses_a_second_owner_and_takes_over_a_stale_one(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(run_dir.RunDirInUse, match=rf"in use by pid {holder.pid} on host"):
            run_dir.RunDirLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = run_dir.RunDirLock(tmp_path).acquire()  # the OS dropped the dead owner's lock
    assert f"pid {holder.pid}" in lock.note and "stale" in lock.note
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    lock.release()
    assert run_dir.RunDirLock(tmp_path).acquire().note is None  # a clean release leaves no owner


# ------------------------------------------------------------------- SIGKILL end to end
COMMON = ["wandb.enabled=false", "n_examples=96", "batch_size=16", "save_every=32", "keep_last=1",
          "eval_every=48", "n_eval_examples=16", "eval_batch_size=16", "sample_during_eval=false",
          "gold_eval_prompts=0", "minimum_log_interval_secs=0"]


def train(base, *args, fault=None, expect_kill=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(run_dir.FAULT_ENV, None)
    if fault:
        env[run_dir.FAULT_ENV] = fault
    out = subprocess.run([*TRAIN, *args], cwd=base, env=env, capture_output=True, text=True,
                         timeout=600)
    if expect_kill:
        assert out.returncode == -signal.SIGKILL, (fault, out.returncode, out.stderr[-2000:])
    else:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


def final_eval_loss(run):
    return [r["loss/eval"] for r in read_metrics(run / "metrics.jsonl") if "loss/eval" in r][-1]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    base = tmp_path_factory.mktemp("full")
    train(base, f"local_dirs=[{base}]", *COMMON)
    (run,) = base.glob("toy_sft_*")
    return run, final_eval_loss(run)


KILLS = [(p, "2" if p.startswith("save:") else "1") for p in run_dir.FAULT_POINTS]


@pytest.mark.slow
@pytest.mark.parametrize("point, nth", KILLS, ids=[p for p, _ in KILLS])
def test_sigkill_at_every_point_then_resume_ends_on_the_uninterrupted_loss(
        tmp_path, uninterrupted, point, nth):
    """save:* are killed in the second save (a LATEST exists), prune:* in the first prune, and
    resave:* in the re-save of the last checkpoint that resuming a run killed after its last
    save performs."""
    full, expected = uninterrupted
    first = "run:finished" if point.startswith("resave:") else f"{point}@{nth}"
    train(tmp_path, f"local_dirs=[{tmp_path}]", *COMMON, fault=first, expect_kill=True)
    (run,) = tmp_path.glob("toy_sft_*")
    if point.startswith("resave:"):
        train(tmp_path, f"resume={run}", fault=point, expect_kill=True)
    out = train(tmp_path, f"resume={run}")
    assert "resumed from" in out.stdout
    assert final_eval_loss(run) == pytest.approx(expected, rel=1e-6)
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".lock"]
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == \
        [r["step"] for r in read_metrics(full / "metrics.jsonl")]


@pytest.mark.slow
def test_a_second_resume_of_a_live_run_is_refused(tmp_path):
    args = [f"local_dirs=[{tmp_path}]", *COMMON, "n_examples=100000", "save_every=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    live = subprocess.Popen([*TRAIN, *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not list(tmp_path.glob("toy_sft_*/LATEST")):
            time.sleep(0.2)
        (run,) = tmp_path.glob("toy_sft_*")
        out = subprocess.run([*TRAIN, f"resume={run}"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 1
        assert f"is in use by pid {live.pid} on host" in out.stderr
        assert "Traceback" not in out.stderr
    finally:
        live.send_signal(signal.SIGKILL)
        live.wait()
