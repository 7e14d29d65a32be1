"""train.py's command line: config and usage errors as one line, before anything heavy loads.

    precheck(argv)                  compose the config as Hydra will; an unknown key, group choice
                                    or unparsable override is one line ("did you mean ...?")
    clean_errors(fn, debug, *args)  fn(*args); a usage / data / run error prints `error: ...` on
                                    stderr and exits 1 (2 for the command line itself), without a
                                    traceback unless debug=true or HYDRA_FULL_ERROR=1
    remove_if_empty(run_dir)        a run that failed before it logged or saved anything leaves
                                    no run dir behind

This module imports no torch, so a bad command line fails in about a second.
"""

import difflib
import os
import shutil
import sys
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from harness.checkpoints import REPO_ROOT, CheckpointWriteError, first_usable_dir  # noqa: F401
from harness.run_dir import RunDirInUse, locate_latest

CONFIG_DIR = str(REPO_ROOT / "config")
# what a user can cause and fix: the message says how, a traceback would only hide it
CLEAN_ERRORS = (ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
                PermissionError, FloatingPointError, RunDirInUse, CheckpointWriteError,
                OmegaConfBaseException)
# flags after which Hydra prints something instead of running (nothing to check)
HYDRA_INFO = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve",
              "--shell-completion", "-sc")


class UsageError(ValueError):
    """The command line itself is wrong (exit code 2)."""


def show_tracebacks(cfg=None) -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1" or bool(cfg is not None and cfg.get("debug"))


def _rank_prefix() -> str:
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f"[rank {rank}] "


def clean_errors(fn, debug: bool, *args):
    """fn(*args), with the errors a user can fix printed as one line (see the module doc)."""
    if debug:
        return fn(*args)
    try:
        return fn(*args)
    except CLEAN_ERRORS as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{_rank_prefix()}error: {message}", file=sys.stderr, flush=True)
        sys.exit(2 if isinstance(err, UsageError) else 1)
    except Exception as err:  # noqa: BLE001 (a spawned rank failed: it printed its own line)
        code = getattr(err, "exit_code", None)
        if type(err).__name__ == "ProcessExitedException" and code:
            sys.exit(code)
        raise


# ------------------------------------------------------------------------------ precheck
def _first_values(overrides: list[str]) -> list[str]:
    """A multirun's overrides with each sweep cut to its first value (enough to check them)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    out = []
    try:
        parsed_all = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 (compose reports the unparsable one)
        return overrides
    for text, parsed in zip(overrides, parsed_all):
        if parsed.is_sweep_override():
            first = next(iter(parsed.sweep_string_iterator()), None)
            text = f"{text.split('=', 1)[0]}={first}"
        out.append(text)
    return out


def _compose(overrides):
    from hydra import compose, initialize_config_dir
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _explain(err: Exception, overrides: list[str]) -> str:
    """One line for a Hydra composition error: the key or choice, and what would work."""
    import re
    text = " ".join(str(err).split())
    bad = re.search(r"Could not override '([^']+)'", text)
    if bad:
        key = bad.group(1)
        parent, _, leaf = key.rpartition(".")
        try:
            cfg = _compose([o for o in overrides if o.lstrip("+~").split("=", 1)[0] != key])
            node = OmegaConf.select(cfg, parent) if parent else cfg
            known = [k for k in node if k not in ("name", "hydra")] if OmegaConf.is_dict(node) else []
        except Exception:  # noqa: BLE001
            cfg, known = None, []
        close = difflib.get_close_matches(leaf, known, n=1)
        hint = f"did you mean {(parent + '.' if parent else '') + close[0]!r}? " if close else ""
        if parent == "loss" and cfg is not None:
            return f"{key} is not an option of loss={cfg.loss.name}: {hint}its options are " \
                   f"{', '.join(known) or 'none'}"
        if parent:
            return f"{key} is not a key of {parent}: {hint}its keys are {', '.join(known)}"
        return (f"{key} is not an option: {hint}every option is documented in "
                "config/config.yaml (`python train.py --cfg job` prints them)")
    missing = re.search(r"Could not find '([^/']+)/([^']+)'", text)
    if missing:
        group, choice = missing.groups()
        options = sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))
        close = difflib.get_close_matches(choice, options, n=1)
        return (f"{group}={choice}: no such {group}; "
                f"{f'did you mean {close[0]!r}? ' if close else ''}choose one of {', '.join(options)}")
    return f"could not read the command line: {text.split(' Set the environment')[0]}"


def precheck(argv: list[str], check=None):
    """Compose the config from the command line as Hydra will, before Hydra and torch load; a
    composition error, or one that check(cfg, overrides) raises, is one line (exit 2). A
    multirun is checked with the first value of each sweep."""
    if any(a in HYDRA_INFO or a.startswith("--config") or a.startswith("-cp") or
           a.startswith("-cn") for a in argv) or show_tracebacks():
        return
    overrides = [a for a in argv if not a.startswith("-")]
    if "-m" in argv or "--multirun" in argv:
        overrides = _first_values(overrides)

    def compose():
        try:
            cfg = _compose(overrides)
        except Exception as err:  # noqa: BLE001 (Hydra's own exception types vary by version)
            raise UsageError(_explain(err, overrides)) from err
        if check is not None and not cfg.get("debug"):
            try:
                check(cfg, overrides)
            except CLEAN_ERRORS as err:
                raise UsageError(str(err)) from err
    clean_errors(compose, False)


# ---------------------------------------------------------------------------- run dirs
NOTHING_YET = {"config.yaml", ".lock", "data_fingerprint.json", "wandb", "wandb_id.txt"}


def remove_if_empty(run_dir):
    """Remove a fresh run dir that holds nothing a user could look at or resume from (it
    failed before its first metrics or checkpoint), so sweeps never count it."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir() or locate_latest(run_dir) is not None:
        return
    if all(p.name in NOTHING_YET for p in run_dir.iterdir()):
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"run dir: removed {run_dir}, the run stopped before it logged anything",
              file=sys.stderr)
