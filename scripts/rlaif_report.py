"""Summarise an RLAIF run: mean gold reward of each model's outputs and the judged win rates.

    python scripts/rlaif_report.py --outputs base=B.json sft=S.json dpo=D.json \\
        --winrate "sft vs base=EVAL/sft/pairwise/summary.json" --out-dir OUT --gold toy

Outputs are AlpacaEval outputs files (generate_samples.py --format alpaca_eval); writes
OUT/report.json and OUT/report.png (gold reward per model with a 95% interval, win rates).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.checkpoints import atomic_write_text  # noqa: E402
from harness.data.dialogue import human_prompt  # noqa: E402
from harness.evaluation.stats import mean_ci  # noqa: E402
from harness.data.gold import get_gold_reward  # noqa: E402


def gold_stats(path: str, reward) -> dict:
    rows = json.loads(Path(path).read_text())
    values = [reward(human_prompt(r["instruction"]), " " + r["output"]) for r in rows]
    mean, ci95 = mean_ci(values)
    return {"n": len(values), "mean": mean, "ci95": ci95}


def _pairs(items, flag):
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"{flag} {item!r}: expected NAME=PATH")
        out[name] = path
    return out


def plot(report: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
    gold = report["gold_reward"]
    ax1.bar(list(gold), [g["mean"] for g in gold.values()], yerr=[g["ci95"] for g in gold.values()],
            capsize=4, color="tab:blue")
    ax1.set_title("mean gold reward (95% CI)")
    rates = report["judged_win_rate"]
    if rates:
        names = list(rates)
        mids = [100 * r["win_rate"] for r in rates.values()]
        errs = [[m - 100 * r["ci_low"] for m, r in zip(mids, rates.values())],
                [100 * r["ci_high"] - m for m, r in zip(mids, rates.values())]]
        ax2.bar(names, mids, yerr=errs, capsize=4, color="tab:green")
        ax2.axhline(50, color="gray", lw=0.8, ls="--")
        ax2.set_ylim(0, 100)
    ax2.set_title("judged win rate % (both orders, ties 1/2)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--outputs", nargs="+", required=True, metavar="NAME=FILE")
    p.add_argument("--winrate", nargs="*", metavar="LABEL=SUMMARY_JSON")
    p.add_argument("--gold", default="toy", help="registered gold reward")
    p.add_argument("--out-dir", required=True)
    args = p.parse_args(argv)
    reward = get_gold_reward(args.gold)
    report = {"gold_reward": {k: gold_stats(v, reward) for k, v in _pairs(args.outputs, "--outputs").items()},
              "judged_win_rate": {k: json.loads(Path(v).read_text())["win_rate_output_2"]
                                  for k, v in _pairs(args.winrate, "--winrate").items()}}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(report, indent=1))
    plot(report, out / "report.png")
    for name, g in report["gold_reward"].items():
        print(f"gold reward {name}: {g['mean']:.3f} +- {g['ci95']:.3f} (n={g['n']})")
    for name, r in report["judged_win_rate"].items():
        print(f"judged win rate {name}: {100 * r['win_rate']:.1f}% [{100 * r['ci_low']:.1f}, "
              f"{100 * r['ci_high']:.1f}] ({r['wins']} wins, {r['losses']} losses, {r['ties']} ties, "
              f"{r['failed']} failed)")
    print(f"wrote {out / 'report.json'} and {out / 'report.png'}")


if __name__ == "__main__":
    main()
