"""Label preference pairs with a judge and write an AlpacaEval-style annotations.json.

    # two sample sets (e.g. SFT policy vs reference): output_1 from A, output_2 from B
    python scripts/label_ai_preferences.py --samples A.jsonl B.jsonl --out-dir labels/ \\
        --judge llm --judge-base-url http://127.0.0.1:8000/v1 --judge-model judge --template toy
    # two samples per prompt from one file, labelled by the toy task's gold reward
    python scripts/label_ai_preferences.py --samples samples.jsonl --judge gold:toy --out-dir labels/

Every pair is judged in both orders (a disagreement is a tie, counted); requests run
concurrently with retries and backoff; each finished unit is appended (fsync'd) to
OUT_DIR/results.jsonl, so rerunning the same command after a crash or SIGKILL resumes without
losing, duplicating or relabelling anything. Failed items are listed, never guessed (their
preference is null). Writes OUT_DIR/annotations.json (train with `prefs_path=`), summary.json
(counts, win rate of output_2 with a 95% interval, tokens, cost) and summary.png. Token
counts are the endpoint's `usage` of the answers kept (attempts that were retried are not in
them). The API key is read from the environment variable named by --api-key-env, nowhere else.
"""

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness.checkpoints import atomic_write_text  # noqa: E402
from harness.feedback.judges import DISAGREEMENT_RULES, JUDGES, make_judge  # noqa: E402
from harness.feedback.openai_client import GaveUp, add_client_args, default_key_env  # noqa: E402
from harness.feedback.results_log import FAILED, ResultsLog, fingerprint, run_resumable  # noqa: E402
from harness.feedback.sample_files import make_pairs, read_samples  # noqa: E402
from harness.feedback.win_rate import win_rate  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", nargs="+", required=True, metavar="FILE",
                   help="one file (pairs of samples per prompt) or two (A vs B, matched by prompt); "
                        "generate_samples.py JSONL or AlpacaEval outputs JSON")
    p.add_argument("--out-dir", required=True, help="results.jsonl, annotations.json, summary.*")
    p.add_argument("--judge", default="llm", help=f"judge: one of {sorted(JUDGES)}, as NAME or "
                                                  "NAME:ARG (gold:toy)")
    p.add_argument("--judge-base-url", help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--judge-model", help="model name sent to the endpoint")
    p.add_argument("--template", default="default", help="judge prompt: a name in "
                                                         "assets/judge_templates/ or a JSON file")
    p.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    p.add_argument("--verdict", choices=["text", "logprobs"], default="text",
                   help="read the verdict from the answer text or the answer token's logprobs")
    p.add_argument("--judge-max-tokens", type=int, default=8)
    p.add_argument("--orders-disagree", choices=DISAGREEMENT_RULES, default="tie",
                   help="a pair whose two orders pick different winners: a tie (default), or "
                        "decided by the mean of the two orders' probabilities (balanced position "
                        "calibration, for logprob verdicts of a position-biased judge); results "
                        "already judged are recombined, not asked again")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    add_client_args(p)  # key, organisation, project, headers, Azure, retries
    p.add_argument("--retry-failed", action="store_true",
                   help="judge again the units a previous run marked failed")
    p.add_argument("--allow-unmatched", action="store_true",
                   help="with two sample files, label the prompts both have and report the rest "
                        "(default: stop with the list)")
    p.add_argument("--price-input", type=float, default=0.0, help="$ per 1M prompt tokens")
    p.add_argument("--price-output", type=float, default=0.0, help="$ per 1M completion tokens")
    args = p.parse_args(argv)
    default_key_env(args)
    if len(args.samples) > 2:
        p.error("--samples takes one or two files")
    if args.concurrency < 1 or args.max_attempts < 1:
        p.error("--concurrency and --max-attempts must be >= 1")
    return args


def judge_work(judge):
    def work(item, on_retry):
        pair, unit = item
        try:
            return "ok", {"pair": pair["id"], "unit": unit,
                          **judge.judge_unit(pair, unit, on_retry)}
        except GaveUp as e:
            return FAILED, {"pair": pair["id"], "unit": unit, "errors": e.errors}
    return work


def annotations(pairs, judge, log: ResultsLog) -> tuple[list[dict], dict]:
    rows, counts, failed = [], {"disagreements": 0, "identical": 0}, []
    for pair in pairs:
        row = {k: pair[k] for k in ("instruction", "output_1", "output_2", "generator_1",
                                    "generator_2")}
        row.update(annotator=judge.name, preference=None, pair_id=pair["id"])
        if pair["output_1"] == pair["output_2"]:
            row["preference"], counts["identical"] = 1.5, counts["identical"] + 1
        else:
            records = {u: log.records.get(f"{pair['id']}/{u}") for u in judge.units}
            if all(r is not None and r["status"] == "ok" for r in records.values()):
                row["preference"], disagreed = judge.combine(records)
                counts["disagreements"] += disagreed
                row["order_disagreement"] = disagreed
            else:
                errors = [r["errors"][-1] for r in records.values() if r and r["status"] == FAILED]
                failed.append({"pair_id": pair["id"], "instruction": pair["instruction"][:200],
                               "last_error": errors[0] if errors else "not judged"})
        rows.append(row)
    counts["failed_items"] = failed
    return rows, counts


def usage_summary(log: ResultsLog, args) -> dict:
    tokens_in = sum(r.get("prompt_tokens", 0) for r in log.records.values())
    tokens_out = sum(r.get("completion_tokens", 0) for r in log.records.values())
    cost = (tokens_in * args.price_input + tokens_out * args.price_output) / 1e6
    return {"prompt_tokens": tokens_in, "completion_tokens": tokens_out, "cost_usd": round(cost, 6)}


def plot_summary(rate, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3))
    names = ["output_2 wins", "ties", "output_1 wins", "failed"]
    ax.bar(names, [rate.wins, rate.ties, rate.losses, rate.failed],
           color=["tab:green", "tab:gray", "tab:red", "black"])
    ax.set_title(str(rate).split(" over")[0], fontsize=9)
    ax.set_ylabel("pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pairs, unmatched = make_pairs([read_samples(f) for f in args.samples], args.allow_unmatched)
    judge = make_judge(args.judge, args)
    with ResultsLog(str(out / "results.jsonl"), fingerprint(judge.config)) as log:
        todo = [(f"{p['id']}/{u}", (p, u)) for p in pairs if p["output_1"] != p["output_2"]
                for u in judge.units if not log.done(f"{p['id']}/{u}", args.retry_failed)]
        units_total = sum(p["output_1"] != p["output_2"] for p in pairs) * len(judge.units)
        print(f"{len(pairs)} pairs, {units_total} judge requests: {units_total - len(todo)} "
              f"already in {out / 'results.jsonl'}, {len(todo)} to do")
        stats = run_resumable(todo, judge_work(judge), log, args.concurrency, "judging")
        rows, counts = annotations(pairs, judge, log)
        usage = usage_summary(log, args)
    rate = win_rate([r["preference"] for r in rows])
    nothing_labelled = rate.n == 0 and bool(counts["failed_items"])
    if not nothing_labelled:  # an all-null annotations.json would only fail training later
        atomic_write_text(out / "annotations.json", json.dumps(rows, indent=1, ensure_ascii=False))
    summary = {"judge": judge.name, "pairs": len(pairs), "this_run": stats, **usage,
               "win_rate_output_2": rate.as_dict(), "order_disagreements": counts["disagreements"],
               "identical_outputs": counts["identical"], "unmatched_prompts": unmatched,
               "failed_items": counts["failed_items"]}
    atomic_write_text(out / "summary.json", json.dumps(finite_or_null(summary), indent=1,
                                                       ensure_ascii=False, allow_nan=False))
    plot_summary(rate, out / "summary.png")
    settled = "decided by the mean" if args.orders_disagree == "mean" else "ties"
    print(f"{rate}; order disagreements ({settled}): {counts['disagreements']}; tokens "
          f"{usage['prompt_tokens']} in / {usage['completion_tokens']} out, cost ${usage['cost_usd']}")
    for item in counts["failed_items"][:20]:
        print(f"FAILED {item['pair_id']}: {item['last_error'][:150]}")
    if nothing_labelled:
        raise SystemExit(f"label_ai_preferences.py: error: all {len(counts['failed_items'])} "
                         f"pairs failed, nothing was labelled (last error: "
                         f"{counts['failed_items'][-1]['last_error'][:200]}); check the judge "
                         f"URL, --judge-model, --template and --verdict. {out / 'summary.json'} "
                         "lists the failures; rerun with --retry-failed once fixed")
    print(f"wrote {out / 'annotations.json'} and {out / 'summary.json'}")
    return summary


def finite_or_null(obj):
    """`obj` with NaN / inf floats as null (JSON has no NaN; a rate over no pairs is null)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_null(v) for v in obj]
    return obj


if __name__ == "__main__":
    main()
