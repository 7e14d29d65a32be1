"""Metrics to metrics.jsonl, wandb (as the reference) and a PNG of the curves."""

import json
import math
import netrc
import os
import time
import uuid
from pathlib import Path

from harness.checkpoints import atomic_write_text

FINAL_EVAL = "final_eval.json"  # harness/evaluation/run_report.py: the gold reward at the end


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


class RunLogger:
    """Appends one JSON line per log call: {"step": examples seen, metric: value, ...}.

    On resume, lines logged after the resumed checkpoint was saved are dropped first: they will
    be logged again, identically, by the resumed run.
    """

    def __init__(self, run_dir, config: dict, wandb_cfg, exp_name: str, resume_step=None,
                 evaluated_at_resume: bool = True, min_interval_secs: float = 0.0):
        self.run_dir = Path(run_dir)
        self.min_interval_secs, self._last_train_log = min_interval_secs, -math.inf
        self.path = self.run_dir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # an evaluation due at the checkpoint's own step runs after the save, so unless the
            # checkpoint records it as done, the resumed run logs it again
            def logged_before_save(row):
                return row["step"] < resume_step or row["step"] == resume_step and (
                    evaluated_at_resume or not any("eval" in k for k in row))
            keep = [line for line in self.path.read_text().splitlines()
                    if line.strip() and logged_before_save(json.loads(line))]
            atomic_write_text(self.path, "".join(f"{line}\n" for line in keep))
        self.wandb = None
        if wandb_cfg.enabled:
            self.wandb = self._init_wandb(config, wandb_cfg, exp_name)

    def _init_wandb(self, config, wandb_cfg, exp_name):
        import wandb
        id_file = self.run_dir / "wandb_id.txt"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        atomic_write_text(id_file, run_id)
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_credentials_present()
                                                 else "offline")
        if mode == "offline":
            print("wandb: no credentials found, logging offline to the run dir "
                  "(wandb sync it later, or wandb.enabled=false to turn it off)")
        return wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, config=config,
                          name=exp_name, dir=str(self.run_dir), id=run_id, resume="allow",
                          mode=mode)

    def log(self, metrics: dict, step: int):
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def log_train(self, metrics: dict, step: int):
        """Training metrics, at most once per minimum_log_interval_secs (evaluations: log)."""
        if time.monotonic() - self._last_train_log >= self.min_interval_secs:
            self.log(metrics, step)
            self._last_train_log = time.monotonic()

    def log_samples(self, step: int, rows: list[dict]):
        """rows: [{"prompt", "policy", ("reference")}] -> samples/step-N.jsonl and a wandb table."""
        folder = self.run_dir / "samples"
        folder.mkdir(exist_ok=True)
        atomic_write_text(folder / f"step-{step}.jsonl",
                          "".join(json.dumps(r) + "\n" for r in rows))
        if self.wandb is not None and rows:
            import wandb
            columns = list(rows[0])
            table = wandb.Table(columns=["step", *columns],
                                data=[[step, *(r[c] for c in columns)] for r in rows])
            self.wandb.log({"samples": table}, step=step)

    def plot(self) -> Path | None:
        """curves.png: every loss / reward / KL metric against examples seen."""
        return plot_metrics(self.path, self.run_dir / "curves.png")

    def close(self):
        self.plot()
        if self.wandb is not None:
            self.wandb.finish()


class NullLogger:
    """What ranks other than 0 log with: nothing (rank 0 logs the metrics of all ranks)."""

    def log(self, metrics: dict, step: int):
        pass

    def log_train(self, metrics: dict, step: int):
        pass

    def log_samples(self, step: int, rows: list[dict]):
        pass

    def close(self):
        pass


def read_metrics(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(metrics_path, out_path) -> Path | None:
    """curves.png: every loss / reward / KL metric against examples seen, and the gold reward of
    the start and the trained model when the run was evaluated at its end (final_eval.json)."""
    rows = read_metrics(metrics_path)
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    groups = {}  # "loss" -> {"loss/train": [(step, v)], "loss/eval": [...]}
    for row in rows:
        for key, value in row.items():
            family = key.split("/")[0].replace("_train", "").replace("_eval", "")
            if "/" in key and family in ("loss", "rewards", "logps", "kl"):
                # rewards_* / kl_* panels: one per statistic, train and eval together
                by_stat = family in ("rewards", "kl")
                groups.setdefault(f"{family}: {key.rsplit('/', 1)[1]}" if by_stat else family, {}) \
                    .setdefault(key, []).append((row["step"], value))
    final = Path(metrics_path).parent / FINAL_EVAL
    final = json.loads(final.read_text()) if final.exists() else None
    panels = len(groups) + (final is not None)
    cols = min(4, panels)  # wrap into rows of at most 4 panels
    rows_n = -(-panels // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.5 * cols, 3.5 * rows_n), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    for ax, (title, series) in zip(axes.flat, sorted(groups.items())):
        for key, points in sorted(series.items()):
            xs, ys = zip(*points)
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("examples seen")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if final is not None:
        _gold_panel(axes.flat[len(groups)], final)
    fig.tight_layout()
    tmp = Path(f"{out_path}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_path)
    return Path(out_path)


def _gold_panel(ax, final: dict):
    """Gold reward of the start and the trained model, with 95% intervals and the win rate."""
    means = [final["start_gold_reward"], final["trained_gold_reward"]]
    errors = [final["start_gold_reward_ci95"], final["trained_gold_reward_ci95"]]
    ax.bar(["start", "trained"], means, yerr=errors, capsize=6, color=["tab:gray", "tab:green"])
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set_title(f"gold reward ({final['gold_reward_name']}, n={final['n_prompts']}, 95% CI)")
    ax.set_xlabel(f"win rate of trained over start: {final['win_rate']:.2f} "
                  f"+- {final['win_rate_ci95']:.2f}")
    ax.grid(alpha=0.3, axis="y")
