"""Evaluate checkpoints against a gold reward: reward (95% CI), KL to the reference, length, win rate.

    python scripts/evaluate.py RUN/LATEST/policy.pt                 # reference from the run config
    python scripts/evaluate.py RUN_A RUN_B --reference SFT_RUN/LATEST/policy.pt --n-prompts 128
    python scripts/evaluate.py /models/hf_dir --reference /models/base --out result.json
    python scripts/evaluate.py CKPT --gold mytask --import mytask.rewards   # your own gold reward
    python scripts/evaluate.py CKPT --reward-model RM_RUN    # a trained reward model as the gold

Each checkpoint gets a JSON next to it (eval_<gold>_seed<seed>.json in its checkpoint dir) and
one line on stdout. The metrics are defined in harness/evaluation/gold_eval.py.
"""

import argparse
import importlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from harness.evaluation.gold_eval import (EvalConfig, evaluate, format_line, output_path,  # noqa: E402
                                write_result)
from harness.models.generation import SamplingConfig, add_speed_args, speed_options  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="policy.pt, checkpoint dir, run dir or HF model dir")
    p.add_argument("--reference", help="the reference checkpoint (default: the run's model.archive, "
                   "else its base model)")
    p.add_argument("--base-model", help="base model dir of a policy.pt that has no run config.yaml")
    p.add_argument("--reference-base-model", help="the same, for the reference")
    p.add_argument("--gold", default="toy", help="registered gold reward name (default: toy)")
    p.add_argument("--reward-model", metavar="RM", help="score with a reward-model checkpoint "
                   "(a loss=reward run dir, checkpoint dir or policy.pt) instead of --gold")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import a module first (one that registers a gold reward or dataset)")
    p.add_argument("--dataset", default="toy", help="registered dataset (NAME or NAME:PATH) whose "
                   "split gives the prompts (default: toy)")
    p.add_argument("--split", default="test")
    p.add_argument("--prompts-file", help="JSON list of prompts or JSONL with a 'prompt' key "
                   "(instead of --dataset)")
    p.add_argument("--n-prompts", type=int, help="use the first N prompts (default: all)")
    p.add_argument("--policy-prompt-suffix", default="auto", metavar="auto|none|TEXT",
                   help="text appended to the policy's prompts: auto (default) = what its run's "
                   "loss asks for, e.g. a CoH model's positive phrase ' A helpful answer:'; none; "
                   "or the text itself. Gold reward and reference use the plain prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    add_speed_args(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--out", help="output JSON path (one checkpoint only; default: next to it)")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.out and len(args.checkpoints) > 1:
        raise SystemExit("--out names one file: evaluate one checkpoint at a time with it")
    for module in args.imports:
        importlib.import_module(module)
    if args.reward_model:  # registered as a gold reward named rm-<run>-<checkpoint>
        from harness.models.reward_model import register_reward_checkpoint
        args.gold = register_reward_checkpoint(args.reward_model, device=args.device)
    cfg = EvalConfig(gold=args.gold, dataset=args.dataset, split=args.split,
                     n_prompts=args.n_prompts, prompts_file=args.prompts_file,
                     sampling=SamplingConfig(max_new_tokens=args.max_new_tokens,
                                             temperature=args.temperature, top_p=args.top_p,
                                             batch_size=args.batch_size, seed=args.seed,
                                             **speed_options(args)),
                     policy_prompt_suffix=args.policy_prompt_suffix,
                     base_model=args.base_model, reference_base_model=args.reference_base_model,
                     device=args.device, dtype=args.dtype)
    cache, results = {}, []
    for ckpt in args.checkpoints:
        result = evaluate(ckpt, args.reference, cfg, cache)
        path = args.out or output_path(ckpt, args.gold, args.seed)
        write_result(result, path)
        print(format_line(result) + f" -> {path}", flush=True)
        results.append(result)
    return results


if __name__ == "__main__":
    try:
        main()
    except (ValueError, KeyError, FileNotFoundError) as e:  # bad input: the message, no traceback
        raise SystemExit(f"evaluate.py: error: {e.args[0] if isinstance(e, KeyError) else e}")
