"""Gather the final metrics of every run in a sweep folder into one markdown / CSV table.

    python scripts/summarize_runs.py .cache/frontier                  # markdown on stdout
    python scripts/summarize_runs.py SWEEP --md table.md --csv table.csv
    python scripts/summarize_runs.py SWEEP --all                      # train metrics too

Columns: the run, every config key that differs between runs (e.g. loss.beta), the step, the
final evaluation metrics (loss/eval, rewards_eval/..., logps_eval/...) and, where
scripts/evaluate.py has scored a run's LATEST checkpoint, its gold reward, KL and win rate
(eval/...). See harness/evaluation/sweep_summary.py.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.checkpoints import atomic_write_text  # noqa: E402
from harness.evaluation.sweep_summary import collect, to_csv, to_markdown  # noqa: E402


# per-step training scalars logged without a "/": shown with --all only
TRAIN_SCALARS = {"grad_norm", "examples_per_second", "tokens_per_second", "lr"}


def default_columns(rows: list[dict]) -> list[str]:
    """run, varied config keys, evaluation metrics, step (train metrics only with --all)."""
    columns = []
    for row in rows:
        for key in row:
            wanted = "eval" in key if "/" in key else key not in TRAIN_SCALARS
            if key not in columns and wanted:
                columns.append(key)
    return [c for c in columns if c not in ("step", "counters/examples")] + ["step"]


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("folder", help="a sweep folder (searched recursively for run dirs)")
    p.add_argument("--md", help="write the markdown table here (default: stdout)")
    p.add_argument("--csv", help="also write a CSV table here")
    p.add_argument("--all", action="store_true", help="every metric, train metrics included")
    args = p.parse_args(argv)
    rows = collect(args.folder)
    columns = None if args.all else default_columns(rows)
    markdown = to_markdown(rows, columns)
    if args.md:
        atomic_write_text(args.md, markdown)
    else:
        print(markdown, end="")
    if args.csv:
        atomic_write_text(args.csv, to_csv(rows, columns))
    print(f"{len(rows)} runs from {args.folder}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    main()
