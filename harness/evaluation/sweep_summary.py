"""Gather the runs of a sweep folder into one table: what varied, and how each run ended.

A run is any folder holding train.py's config.yaml and metrics.jsonl (at any depth, so a sweep
folder with one sub-folder per method works). Per run the table holds
    run                 its path relative to the sweep folder
    <config keys>       every config value that differs between the runs (e.g. loss.beta)
    <metrics>           the last logged value of every metric (final eval and train metrics)
    eval/<metric>       gold-reward evaluation (scripts/evaluate.py) of its LATEST checkpoint
"""

import csv
import io
import json
from pathlib import Path

from omegaconf import OmegaConf

from harness.training.run_logging import read_metrics

# per-run bookkeeping that always differs and says nothing about the experiment
IGNORED_KEYS = {"local_run_dir", "local_dirs", "resume"}
EVAL_KEYS = ("gold_reward", "gold_reward_ci95", "kl", "kl_ci95", "length", "win_rate",
             "reference_gold_reward")


def find_runs(folder) -> list[Path]:
    """Run dirs under `folder`, sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"sweep folder {str(folder)!r} does not exist")
    return sorted(p.parent for p in folder.rglob("config.yaml")
                  if (p.parent / "metrics.jsonl").exists())


def flat_config(run_dir) -> dict:
    """config.yaml as {dotted.key: value} (lists kept whole)."""
    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{key}.")
            else:
                yield f"{prefix}{key}", value
    cfg = OmegaConf.to_container(OmegaConf.load(Path(run_dir) / "config.yaml"), resolve=False)
    return dict(walk(cfg, ""))


def final_metrics(run_dir) -> dict:
    """The last logged value of each metric, and the step (examples seen) of the last row."""
    out = {}
    for row in read_metrics(Path(run_dir) / "metrics.jsonl"):
        out.update(row)
    return out


def latest_evaluation(run_dir) -> dict | None:
    """The newest eval_*.json of the run's LATEST checkpoint, if it was evaluated."""
    files = sorted((Path(run_dir) / "LATEST").glob("eval_*.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(files[-1].read_text()) if files else None


def varying_keys(configs: list[dict]) -> list[str]:
    keys = sorted(set().union(*configs)) if configs else []
    return [k for k in keys if k not in IGNORED_KEYS and
            len({json.dumps(c.get(k), sort_keys=True, default=str) for c in configs}) > 1]


def collect(folder) -> list[dict]:
    """One row per run of the sweep folder (see the module docstring)."""
    runs = find_runs(folder)
    if not runs:
        raise ValueError(f"no runs (config.yaml + metrics.jsonl) under {str(folder)!r}")
    configs = [flat_config(r) for r in runs]
    keys = varying_keys(configs)
    rows = []
    for run, cfg in zip(runs, configs):
        row = {"run": str(run.relative_to(folder)), **{k: cfg.get(k) for k in keys}}
        row.update(final_metrics(run))
        evaluation = latest_evaluation(run)
        if evaluation:
            row.update({f"eval/{k}": evaluation[k] for k in EVAL_KEYS if k in evaluation})
        rows.append(row)
    return rows


def _columns(rows: list[dict]) -> list[str]:
    columns = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    return columns


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def to_markdown(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or _columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict], columns: list[str] | None = None) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns or _columns(rows), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
