"""N samples per prompt from a checkpoint, batched and seeded, as JSONL with provenance.

    python scripts/generate_samples.py RUN/LATEST/policy.pt --prompts toy --split test \\
        --n-samples 2 --temperature 1.0 --top-p 1.0 --out samples.jsonl
    python scripts/generate_samples.py /models/hf-dir --prompts eval_set.json --n-samples 1 \\
        --format alpaca_eval --generator my-model --out outputs.json     # for alpaca_eval
    python scripts/generate_samples.py CKPT --prompts toy --start 100 --end 200 --out part.jsonl

--prompts is a registry dataset spec (toy, hh, hh:/data/hh, ...; its --split prompts) or a
JSON/JSONL file of prompts/instructions (harness.feedback.sample_files.load_prompt_set). --start/--end
select an exact slice of that fixed prompt order (scripts/parallel_sample.sh shards with
them); --count-prompts prints the prompt count and exits. Sample k of every prompt is drawn
with seed (seed, start, k), so reruns repeat exactly; a different sharding draws other (equally
valid) samples. Every row records the checkpoint and the settings that made it.
"""

import argparse
import datetime
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.checkpoints import atomic_write_text  # noqa: E402
from harness.models.generation import add_speed_args, speed_options  # noqa: E402
from harness.feedback.sample_files import instruction_of, load_prompt_set, sample_row  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?", help="policy.pt, checkpoint/run dir, or HF model dir")
    p.add_argument("--prompts", required=True, help="dataset spec or prompt file")
    p.add_argument("--split", default="test", help="split of a dataset spec")
    p.add_argument("--out", help="output file (.jsonl; .json for --format alpaca_eval)")
    p.add_argument("--format", choices=["jsonl", "alpaca_eval"], default="jsonl")
    p.add_argument("--n-samples", type=int, default=2)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--start", type=int, default=0, help="first prompt index (inclusive)")
    p.add_argument("--end", type=int, default=None, help="last prompt index (exclusive)")
    p.add_argument("--base-model", help="base model for a policy.pt without a run config.yaml")
    p.add_argument("--generator", help="name recorded with the samples (default: checkpoint)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if present)")
    p.add_argument("--count-prompts", action="store_true", help="print the prompt count, exit")
    add_speed_args(p)
    args = p.parse_args(argv)
    if not args.count_prompts and (args.checkpoint is None or args.out is None):
        p.error("give a checkpoint and --out (or --count-prompts)")
    if args.n_samples < 1:
        p.error("--n-samples must be >= 1")
    if args.format == "alpaca_eval" and args.n_samples != 1:
        p.error("--format alpaca_eval writes one output per instruction: use --n-samples 1")
    return args


def select(prompts: list[str], start: int, end: int | None) -> tuple[list[str], int]:
    end = len(prompts) if end is None else end
    if not 0 <= start < end <= len(prompts):
        raise ValueError(f"--start {start} --end {end} is not a non-empty range within the "
                         f"{len(prompts)} prompts")
    return prompts[start:end], end


def _seed(seed: int, start: int, k: int) -> int:
    digest = hashlib.sha256(f"{seed}/{start}/{k}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def generate(args, prompts: list[str]) -> list[list[str]]:
    """samples[i][k]: sample k of prompt i."""
    import torch
    from harness.models.generation import SamplingConfig, sample
    from harness.models.modeling import load_checkpoint
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = load_checkpoint(args.checkpoint, base_model=args.base_model, device=device)
    per_prompt = [[] for _ in prompts]
    for k in range(args.n_samples):
        cfg = SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.batch_size,
                             seed=_seed(args.seed, args.start, k), **speed_options(args))
        for i, s in enumerate(sample(model, tok, prompts, cfg, desc=f"sample {k + 1}/{args.n_samples}")):
            per_prompt[i].append(" " + s.completion.lstrip(" ") if s.completion else s.completion)
    return per_prompt


def main(argv=None):
    args = parse_args(argv)
    prompts = load_prompt_set(args.prompts, args.split)
    if args.count_prompts:
        print(len(prompts))
        return
    chosen, end = select(prompts, args.start, args.end)
    samples = generate(args, chosen)
    generator = args.generator or args.checkpoint
    provenance = {"checkpoint": str(Path(args.checkpoint).resolve()) if Path(args.checkpoint).exists()
                  else args.checkpoint, "base_model": args.base_model, "prompts": args.prompts,
                  "split": args.split, "range": [args.start, end], "n_samples": args.n_samples,
                  "temperature": args.temperature, "top_p": args.top_p,
                  "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
                  **speed_options(args),
                  "seed": args.seed, "created": datetime.datetime.now(datetime.UTC).isoformat()}
    if args.format == "alpaca_eval":
        rows = [{"instruction": instruction_of(p), "output": s[0].lstrip(" "), "generator": generator,
                 "dataset": args.prompts} for p, s in zip(chosen, samples)]
        text = json.dumps(rows, indent=1, ensure_ascii=False)
    else:
        text = "".join(json.dumps({"index": args.start + i, **sample_row(p, s, generator, provenance)},
                                  ensure_ascii=False) + "\n"
                       for i, (p, s) in enumerate(zip(chosen, samples)))
    atomic_write_text(args.out, text)
    print(f"wrote {len(chosen)} prompts x {args.n_samples} samples to {args.out}")


if __name__ == "__main__":
    main()
