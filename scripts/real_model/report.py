"""Report of scripts/real_model/results.sh: the frontier table and plot on SmolLM2, CoH's
steering and control comparison, and the real LLM judge's agreement with the gold reward.

    python scripts/real_model/report.py OUT_DIR --md docs/real_model.md --png docs/real_model.png

Writes the markdown, the PNG (gold reward against KL(policy || SFT)) and a JSON beside the
markdown with every number and verdict.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "sweeps"))

from frontier_report import collect_rows, markdown, plot, verdicts  # noqa: E402
from harness.checkpoints import atomic_write_text  # noqa: E402
from harness.evaluation.stats import mean_ci  # noqa: E402


def above(a: dict, b: dict) -> bool:
    """a's 95% interval lies wholly above b's."""
    return a["gold_reward"] - a["gold_reward_ci95"] > b["gold_reward"] + b["gold_reward_ci95"]


def steering(out: Path, rows: list[dict]) -> dict:
    """CoH prompted with its positive vs its negative phrase, and CoH vs the SFT control."""
    pos, neg = (json.loads((out / "steering" / f"coh_{p}.json").read_text())
                for p in ("positive", "negative"))
    best = {r["method"]: r for r in rows}
    coh, control = best.get("coh"), best.get("sft_continued")
    return {"positive": [pos["gold_reward"], pos["gold_reward_ci95"]],
            "negative": [neg["gold_reward"], neg["gold_reward_ci95"]],
            "positive_beats_negative_beyond_ci": above(pos, neg),
            "coh": coh and [coh["gold"], coh["gold_ci95"]],
            "sft_continued": control and [control["gold"], control["gold_ci95"]],
            "coh_at_least_control": bool(coh and control and coh["gold"] + coh["gold_ci95"] >=
                                         control["gold"] - control["gold_ci95"]),
            "coh_beats_control_beyond_ci": bool(coh and control and coh["gold"] - coh["gold_ci95"]
                                                > control["gold"] + control["gold_ci95"])}


def first_shown_rate(results: Path) -> float | None:
    """How often the judge picked the answer shown first (0.5: no position bias)."""
    units = [json.loads(x) for x in results.read_text().splitlines()]
    # p_output_2 is mapped back to output_2's side; in order "ba" output_2 is shown first
    picks = [(r["p_output_2"] < 0.5) if r["unit"] == "ab" else (r["p_output_2"] > 0.5)
             for r in units if r.get("status") == "ok" and r["p_output_2"] != 0.5]
    return sum(picks) / len(picks) if picks else None


def judge_agreement(out: Path) -> dict:
    """The LLM judge's labels against the gold reward's on the same pairs (both decisive)."""
    ai = out / "ai_feedback"
    read = lambda d: {r["pair_id"]: r["preference"]  # noqa: E731  null: a failed pair
                      for r in json.loads((ai / d / "annotations.json").read_text())}
    llm, gold = read("labels"), read("gold_labels")
    sign = lambda p: None if p is None or p == 1.5 else p > 1.5  # noqa: E731  True: output_2
    both = [(sign(llm[i]), sign(gold[i])) for i in llm if i in gold]
    decisive = [(a, g) for a, g in both if a is not None and g is not None]
    agree, ci = mean_ci([float(a == g) for a, g in decisive]) if len(decisive) > 1 else (None, None)
    summary = json.loads((ai / "labels" / "summary.json").read_text())
    dpo = json.loads((ai / "dpo_ai_eval.json").read_text())
    return {"pairs": len(both), "decisive_both": len(decisive), "agreement": agree,
            "agreement_ci95": ci, "llm_ties": sum(a is None for a, _ in both),
            "gold_ties": sum(g is None for _, g in both),
            "order_disagreements": summary.get("order_disagreements"),
            "first_shown_rate": first_shown_rate(ai / "labels" / "results.jsonl"),
            "dpo_on_ai_labels": {k: dpo[k] for k in ("gold_reward", "gold_reward_ci95", "kl",
                                                     "kl_ci95", "win_rate", "n_prompts")}}


def control_verdict(s: dict) -> str:
    if s["coh_beats_control_beyond_ci"]:
        return "better beyond the 95% intervals"
    if not s["coh_at_least_control"]:
        return "WORSE beyond the 95% intervals"
    higher = s["coh"][0] >= s["sft_continued"][0]  # both exist: coh_at_least_control holds
    return ("no different within the 95% intervals (at least as good; its mean is "
            f"{'higher' if higher else 'lower'})")


def extra_markdown(s: dict, j: dict) -> str:
    f = lambda pair: "n/a" if not pair else f"{pair[0]:.3f} +- {pair[1]:.3f}"  # noqa: E731
    agree = "n/a" if j["agreement"] is None else f"{j['agreement']:.3f} +- {j['agreement_ci95']:.3f}"
    d = j["dpo_on_ai_labels"]
    first = "n/a" if j["first_shown_rate"] is None else f"{j['first_shown_rate']:.3f}"
    return "\n".join([
        "", "## Does Chain of Hindsight read its feedback phrase?", "",
        f"- CoH sampled after \" A helpful answer:\": gold {f(s['positive'])}; after "
        f"\" An unhelpful answer:\": {f(s['negative'])} "
        f"({'beyond' if s['positive_beats_negative_beyond_ci'] else 'NOT beyond'} the 95% intervals)",
        f"- CoH {f(s['coh'])} vs SFT continued on the same examples {f(s['sft_continued'])}: "
        f"CoH {control_verdict(s)}",
        "", "## A real LLM judge: the released SmolLM2 served by scripts/serve.py", "",
        f"- {j['pairs']} pairs of SFT samples judged in both orders (logprob verdicts, toy "
        f"template); in {j['order_disagreements']} pairs the two orders picked different winners; "
        f"the answer shown first was picked in {first} of the judgments (0.5: no position bias)",
        "- a disagreement is decided by the mean of the two orders' probabilities (balanced "
        "position calibration, `--orders-disagree mean`)",
        f"- agreement with the gold reward on the {j['decisive_both']} pairs both call decisive: "
        f"{agree} (chance: 0.5)",
        f"- DPO (beta 0.1) on the judge's labels: gold {d['gold_reward']:.3f} +- "
        f"{d['gold_reward_ci95']:.3f}, KL {d['kl']:.2f} +- {d['kl_ci95']:.2f}, win rate vs SFT "
        f"{d['win_rate']:.3f} on {d['n_prompts']} prompts", ""])


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out", help="the --out folder of results.sh")
    p.add_argument("--md", required=True)
    p.add_argument("--png", required=True)
    p.add_argument("--mode", default="full")
    p.add_argument("--seconds", type=int, help="wall clock of the whole pipeline")
    p.add_argument("--settings", default="")
    p.add_argument("--reused", default="", help="training runs results.sh --reuse kept")
    args = p.parse_args(argv)
    out = Path(args.out)
    rows = collect_rows(out)
    v = verdicts(rows)
    s, j = steering(out, rows), judge_agreement(out)
    title = "SmolLM2-135M-Instruct on the toy task (its ChatML template), CPU"
    minutes = f", {args.seconds / 60:.0f} minutes" if args.seconds else ""
    if args.reused:
        minutes += (f" for this invocation, which reused the training runs of an earlier one "
                    f"({args.reused})")
    settings = (f"Made by `bash scripts/real_model/results.sh{'' if args.mode == 'full' else ' --' + args.mode}`"
                f" ({args.mode} mode{minutes}); "
                f"{args.settings}. The base row is the released SmolLM2-135M-Instruct.")
    text = markdown(rows, v, title, settings) + extra_markdown(s, j)
    atomic_write_text(args.md, text)
    atomic_write_text(str(Path(args.md).with_suffix(".json")), json.dumps(
        {"rows": rows, "verdicts": v, "coh": s, "judge": j, "seconds": args.seconds}, indent=2) + "\n")
    plot(rows, args.png, title)
    print(text)
    return {"verdicts": v, "coh": s, "judge": j}


if __name__ == "__main__":
    main()
