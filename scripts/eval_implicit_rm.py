"""Score checkpoints as reward models on held-out preference pairs (RewardBench style).

    python scripts/eval_implicit_rm.py DPO_RUN                         # toy test pairs, the run's beta
    python scripts/eval_implicit_rm.py DPO_RUN IPO_RUN --datasets toy hh:/data/hh-rlhf --n-pairs 500
    python scripts/eval_implicit_rm.py DPO_RUN --reference SFT_RUN/LATEST/policy.pt --beta 0.1
    python scripts/eval_implicit_rm.py RM_RUN                          # a loss=reward checkpoint

A DPO-family checkpoint is scored by beta * log(pi / pi_ref) of each response, a reward-model
checkpoint by its head; the accuracy (chosen scored above rejected, ties half) is reported per
dataset, over all pairs and as the mean over datasets (harness/evaluation/implicit_rm.py has
the definitions). Each checkpoint gets implicit_rm_<split>.json and .png in its checkpoint dir
(or --out), and one line per dataset on stdout.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.checkpoints import atomic_write_text, output_path  # noqa: E402
from harness.evaluation.implicit_rm import evaluate, format_lines, load_scorer, plot  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="run dir, checkpoint dir or policy.pt")
    p.add_argument("--datasets", nargs="+", default=["toy"],
                   help="registered datasets, NAME or NAME:PATH (default: toy)")
    p.add_argument("--split", default="test")
    p.add_argument("--n-pairs", type=int, help="the first N pairs of each dataset")
    p.add_argument("--reference", help="reference checkpoint (default: the run's model.archive, "
                   "else its base model)")
    p.add_argument("--beta", type=float, help="default: the run's loss.beta")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", help="JSON path (one checkpoint only; default: next to it)")
    args = p.parse_args(argv)
    if args.out and len(args.checkpoints) > 1:
        p.error("--out takes one checkpoint")
    if args.n_pairs is not None and args.n_pairs < 1:
        p.error("--n-pairs must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    results = []
    for path in args.checkpoints:
        scorer, about = load_scorer(path, args.reference, args.beta, args.device, args.dtype)
        result = {"scorer": about, **evaluate(scorer, args.datasets, args.split, args.n_pairs)}
        out = args.out or output_path(path, f"implicit_rm_{args.split}.json")
        atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        plot(result, os.path.splitext(out)[0] + ".png")
        print(f"{path} ({about['kind']}):")
        for line in format_lines(result):
            print(f"  {line}")
        print(f"  wrote {out}")
        results.append(result)
    return results


if __name__ == "__main__":
    main()
