"""AlpacaEval 2's length-controlled win rate of judged annotations, offline.

    python scripts/alpaca_eval_lc.py labels/annotations.json           # label_ai_preferences.py's
    python scripts/alpaca_eval_lc.py OUT/alpaca_eval/results/model/annotations.json   # alpaca_eval's
    python scripts/alpaca_eval_lc.py annotations.json --glm length_controlled_v1 --gamed df_gamed.csv

Reads AlpacaEval-style annotations (output_1 = the baseline / reference, output_2 = the model,
preference 1..2, null = failed) and prints the raw and length-controlled win rates of output_2
in %, with standard errors and the GLM's weights; writes them to --out (default: beside the
annotations, length_controlled.json). harness/evaluation/length_controlled.py has the GLM.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.checkpoints import atomic_write_text  # noqa: E402
from harness.evaluation.length_controlled import GLMS, length_controlled_win_rate  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("annotations", help="annotations.json (a JSON list of rows)")
    p.add_argument("--glm", choices=sorted(GLMS), default="length_controlled_minimal")
    p.add_argument("--gamed", help="alpaca_eval's df_gamed.csv (length_controlled_noreg / v1 on "
                   "AlpacaEval's own 805 instructions, in their order)")
    p.add_argument("--out", help="JSON path (default: length_controlled.json beside the input)")
    args = p.parse_args(argv)
    with open(args.annotations, encoding="utf-8") as f:
        rows = json.load(f)
    if not isinstance(rows, list) or not all(
            isinstance(r, dict) and {"output_1", "output_2", "preference"} <= set(r) for r in rows):
        raise SystemExit(f"{args.annotations}: expected a JSON list of rows with output_1, "
                         "output_2 and preference")
    try:
        lc = length_controlled_win_rate(rows, args.glm, args.gamed)
    except ValueError as e:  # too few judged pairs, a GLM without its data: one clear line
        raise SystemExit(f"{args.annotations}: no length-controlled win rate: {e}") from None
    result = {"annotations": args.annotations, **lc}
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.annotations)),
                                   "length_controlled.json")
    atomic_write_text(out, json.dumps(result, indent=1) + "\n")
    print(f"length-controlled win rate {result['length_controlled_winrate']:.1f}% (se "
          f"{result['lc_standard_error']:.1f}), raw {result['win_rate']:.1f}% (se "
          f"{result['standard_error']:.1f}) over {result['n']} pairs, {result['failed']} failed "
          f"[{args.glm}]; wrote {out}")
    return result


if __name__ == "__main__":
    main()
