"""A run dir's integrity: one owner at a time, crash recovery, and the fault-injection hook.

    RUN_DIR/.lock                    an OS file lock (flock) held by the run's rank 0 for its
                                     whole life; the file names the owner (pid, host, command)
    RUN_DIR/.NAME.tmp-PID/           a checkpoint being written (complete once it holds COMPLETE)
    RUN_DIR/.NAME.old-PID/           the previous copy of NAME during a re-save of the same name
    RUN_DIR/.NAME.pruned-PID/        a checkpoint being deleted by keep_last
    RUN_DIR/.NAME.sharded-staging/   shards all ranks write before rank 0 adopts them

Every checkpoint write moves these hidden dirs in an order in which a SIGKILL at any instruction
leaves a complete copy of every checkpoint on disk (harness/checkpoints.py). `recover` puts a
run dir killed at any of those instants back in order: LATEST points at the newest complete
checkpoint, a hidden dir that is the only complete copy of a checkpoint is renamed into place,
and every other hidden dir is removed. `locate_latest` finds the same checkpoint read-only.

`fault_point(name)` marks each of those instants: tests kill the process there (HARNESS_FAULT
=NAME or NAME@N for the N-th time it is reached) or raise from a hook (set_fault_hook).
"""

import errno
import json
import os
import re
import signal
import socket
import sys
import time
from collections import Counter
from pathlib import Path

LATEST = "LATEST"
COMPLETE = ".complete"  # written last into a checkpoint dir being saved
LOCK_FILE = ".lock"
FAULT_ENV = "HARNESS_FAULT"
# every instant of save / re-save / prune a crash test must cover, in the order they happen
FAULT_POINTS = ("save:files", "save:complete", "save:renamed", "save:latest",
                "resave:latest-tmp", "resave:retired", "resave:renamed", "resave:latest",
                "prune:retired", "prune:deleting")
HIDDEN = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old|pruned)-(?P<pid>\d+)$")
REGULAR = re.compile(r"^(step|epoch)-\d+$")  # what LATEST may point at (not e.g. diverged-N)
STAGING = re.compile(r"^\.(?P<name>.+)\.sharded-staging$")

_fault_hook = None
_fault_counts = Counter()


def set_fault_hook(hook):
    """hook(point) is called at every fault point (None: only HARNESS_FAULT applies)."""
    global _fault_hook
    _fault_hook = hook


def fault_point(point: str):
    """A place where a crash must be survivable: the test hook, or SIGKILL when HARNESS_FAULT
    names this point (NAME, or NAME@N for its N-th occurrence in this process)."""
    if _fault_hook is not None:
        _fault_hook(point)
    wanted = os.environ.get(FAULT_ENV)
    if not wanted or wanted.split("@")[0] != point:
        return
    _fault_counts[point] += 1
    if _fault_counts[point] == int(wanted.partition("@")[2] or 1):
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def hidden_name(name: str, kind: str) -> str:
    """The hidden name of checkpoint `name` while it is written (tmp), retired (old) or pruned."""
    return f".{name}.{kind}-{os.getpid()}"


def remove_tree(path, point: str | None = None):
    """rm -r `path` (a dir or a link), file by file; `point` is a fault point after each file."""
    path = Path(path)
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    for root, dirs, files in os.walk(path, topdown=False):
        for f in files:
            os.unlink(os.path.join(root, f))
            if point:
                fault_point(point)
        for d in dirs:
            full = os.path.join(root, d)
            os.unlink(full) if os.path.islink(full) else os.rmdir(full)
    os.rmdir(path)


def fsync_dir(path):
    """Make renames inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- finding and recovery
def _complete(path: Path, kind: str | None) -> bool:
    """A visible or retired (old) checkpoint dir is complete by construction; one being written
    only once it holds COMPLETE; one being pruned never counts."""
    if not path.is_dir() or kind == "pruned":
        return False
    return kind != "tmp" or (path / COMPLETE).exists()


def _hidden(run_dir: Path) -> list[tuple[Path, str, str]]:
    """(path, checkpoint name, kind) of every hidden checkpoint dir, newest first."""
    out = []
    for p in run_dir.iterdir() if run_dir.is_dir() else ():
        m = HIDDEN.match(p.name)
        if m:
            out.append((p, m["name"], m["kind"]))
    return sorted(out, key=lambda x: x[0].lstat().st_mtime, reverse=True)


def _copies(run_dir: Path, name: str) -> list[Path]:
    """Complete copies of checkpoint `name`: the visible dir, then hidden ones (newest first)."""
    found = [run_dir / name] if _complete(run_dir / name, None) else []
    return found + [p for p, n, kind in _hidden(run_dir) if n == name and kind != "tmp"
                    and _complete(p, kind)] + [p for p, n, kind in _hidden(run_dir)
                                               if n == name and kind == "tmp" and _complete(p, kind)]


def locate_latest(run_dir) -> Path | None:
    """The complete checkpoint dir LATEST stands for, read-only, even in the instants of a
    killed save (LATEST briefly names a hidden copy, or a dir being renamed); None if none."""
    run_dir = Path(run_dir)
    link = run_dir / LATEST
    if not link.is_symlink() and not link.exists():
        return None
    target = os.readlink(link) if link.is_symlink() else LATEST
    if (run_dir / target).is_dir() and _complete(run_dir / target, _kind(target)):
        return (run_dir / target).resolve()
    m = HIDDEN.match(target)
    copies = _copies(run_dir, m["name"] if m else target)
    return copies[0].resolve() if copies else None


def _kind(name: str) -> str | None:
    m = HIDDEN.match(name)
    return m["kind"] if m else None


def _examples(ckpt: Path) -> int:
    """The example count a checkpoint was saved at (-1 if unreadable)."""
    try:
        import torch
        state = torch.load(ckpt / "trainer_state.pt", map_location="cpu", weights_only=False)
        return int((state.get("train_state") or state.get("ppo_state") or {})["examples"])
    except Exception:  # noqa: BLE001 (an unreadable checkpoint is simply not the newest)
        return -1


def point_latest(run_dir: Path, name: str):
    """LATEST -> name, atomically (a new link under a hidden name renamed over it)."""
    tmp = run_dir / hidden_name(LATEST, "tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp)
    os.replace(tmp, run_dir / LATEST)
    fsync_dir(run_dir)


def recover(run_dir) -> list[str]:
    """Put a run dir left by a killed process in order (call it holding the run-dir lock):
    checkpoints whose only complete copy is hidden are renamed into place, LATEST points at the
    newest complete one, and every other hidden dir is removed. Returns what was done."""
    run_dir, done = Path(run_dir), []
    latest = locate_latest(run_dir)
    m = HIDDEN.match(latest.name) if latest is not None else None
    if m:  # LATEST had moved on to a hidden copy (a re-save killed midway): it replaces NAME
        visible = run_dir / m["name"]
        if visible.exists():
            remove_tree(visible)
        os.replace(latest, visible)
        latest = visible.resolve()
        done.append(f"recovered {visible.name} from {m.string}")
    for path, name, kind in _hidden(run_dir):
        if path.exists() and _complete(path, kind) and not (run_dir / name).exists():
            os.replace(path, run_dir / name)  # the only complete copy of `name`
            done.append(f"recovered {name} from {path.name}")
            if REGULAR.match(name) and (latest is None or
                                        _examples(run_dir / name) > _examples(latest)):
                latest = (run_dir / name).resolve()
    if latest is None:  # killed between the first save's rename and its LATEST
        found = [p for p in run_dir.iterdir() if REGULAR.match(p.name) and _complete(p, None)
                 and (p / "trainer_state.pt").exists()] if run_dir.is_dir() else []
        latest = max(found, key=_examples).resolve() if found else None
    for p in run_dir.iterdir() if run_dir.is_dir() else ():
        if HIDDEN.match(p.name) or STAGING.match(p.name):
            remove_tree(p)
            done.append(f"removed the stale {p.name}")
    if latest is not None and os.path.realpath(run_dir / LATEST) != str(latest):
        point_latest(run_dir, latest.name)
        done.append(f"LATEST -> {latest.name}")
    return done


# -------------------------------------------------------------------------------- the lock
class RunDirInUse(RuntimeError):
    """Another live process owns the run dir."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_text(owner: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("since", 0)))
    return (f"pid {owner.get('pid')} on host {owner.get('host')} (since {since}: "
            f"{owner.get('command', '?')[:120]})")


class RunDirLock:
    """The run dir's owner: an exclusive flock on RUN_DIR/.lock, held until release() or the
    process ends (the OS drops it even after SIGKILL). The file names the owner for the error a
    second process gets; a file left by an owner that is gone is a stale lock, taken over with a
    note. Where the file system has no flock (some network mounts) the file itself is the lock,
    and a stale one is one whose pid is dead on this host."""

    def __init__(self, run_dir):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd = None
        self.note = None  # the stale owner taken over, if any

    def acquire(self) -> "RunDirLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            import fcntl
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = self._read(fd)
            os.close(fd)
            raise RunDirInUse(f"run dir {self.path.parent} is in use by {_owner_text(owner)}; "
                              "two processes on one run dir would corrupt it: wait for that "
                              f"run to end or stop it (kill {owner.get('pid')})") from None
        except OSError as err:
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            self._without_flock(fd)
        previous = self._read(fd)
        if previous.get("pid") and previous.get("pid") != os.getpid():
            self.note = f"took over the stale lock of {_owner_text(previous)}, which is gone"
        self._write(fd)
        self.fd = fd
        return self

    def _without_flock(self, fd):
        owner = self._read(fd)
        here = owner.get("host") == socket.gethostname()
        if owner.get("pid") and (not here or _alive(owner["pid"])):
            os.close(fd)
            raise RunDirInUse(f"run dir {self.path.parent} is in use by {_owner_text(owner)} "
                              f"(no OS file locks on this file system: delete {self.path} if "
                              "that process is gone)")

    @staticmethod
    def _read(fd) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            return json.loads(os.read(fd, 4096).decode() or "{}")
        except (ValueError, UnicodeDecodeError):
            return {}

    @staticmethod
    def _write(fd):
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time(),
                 "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(owner).encode())
        os.fsync(fd)

    def release(self):
        if self.fd is not None:
            os.ftruncate(self.fd, 0)  # a clean exit leaves no owner behind
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
