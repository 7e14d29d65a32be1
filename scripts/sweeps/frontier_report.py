"""Table, plot and verdicts of a frontier sweep (written by scripts/sweeps/frontier.sh).

    python scripts/sweeps/frontier_report.py SWEEP_DIR --md docs/frontier.md --png docs/frontier.png

SWEEP_DIR holds sft/ (the SFT run, its evaluation, base_model_eval.json) and one folder per
method whose runs were evaluated against the SFT checkpoint. Writes the markdown table, the PNG
(gold reward against KL(policy || SFT), one colour per method) and, next to the markdown, a
JSON with the same rows and the verdicts the issue asks for: does SFT beat the base model, does
each method beat SFT by more than the 95% intervals (the method's interval lies wholly above
SFT's), and does KL fall as beta rises.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from harness.checkpoints import atomic_write_text  # noqa: E402
from harness.evaluation.sweep_summary import (find_runs, flat_config, latest_evaluation,  # noqa: E402
                                   varying_keys)

SETTING_KEYS = ("loss.beta", "loss.label_smoothing")


def _row(method: str, setting: dict, result: dict, run: str) -> dict:
    return {"method": method, "setting": setting, "gold": result["gold_reward"],
            "gold_ci95": result["gold_reward_ci95"], "kl": result["kl"], "kl_ci95": result["kl_ci95"],
            "length": result["length"], "win_rate": result["win_rate"], "run": run}


def collect_rows(sweep: Path) -> list[dict]:
    """base, sft, then every method folder's evaluated runs, sorted by their setting."""
    base_file = sweep / "sft" / "base_model_eval.json"
    sft_runs = find_runs(sweep / "sft")
    if not base_file.exists() or len(sft_runs) != 1 or not latest_evaluation(sft_runs[0]):
        raise FileNotFoundError(f"{sweep}/sft must hold one evaluated SFT run and "
                                "base_model_eval.json: run scripts/sweeps/frontier.sh first")
    base = json.loads(base_file.read_text())
    rows = [_row("base", {}, base, base.get("checkpoint", "assets/tiny_model")),
            _row("sft", {}, latest_evaluation(sft_runs[0]), str(sft_runs[0].relative_to(sweep)))]
    for folder in sorted(p for p in sweep.iterdir() if p.is_dir() and p.name != "sft"):
        runs = [r for r in find_runs(folder) if latest_evaluation(r)]
        configs = [flat_config(r) for r in runs]
        # the swept keys, and beta / label smoothing even when a method has a single run
        keys = [k for k in SETTING_KEYS if any(k in c for c in configs)]
        keys += [k for k in varying_keys(configs) if k not in keys and k != "exp_name"]
        method_rows = [_row(folder.name, {k: c.get(k) for k in keys}, latest_evaluation(r),
                            str(r.relative_to(sweep))) for r, c in zip(runs, configs)]
        rows += sorted(method_rows, key=lambda r: [str(v) if not isinstance(v, (int, float))
                                                   else f"{v:020.6f}" for v in r["setting"].values()])
    return rows


def verdicts(rows: list[dict]) -> dict:
    """The claims of the frontier, each checked on these numbers."""
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    (base,), (sft,) = by.pop("base"), by.pop("sft")
    above = lambda a, b: a["gold"] - a["gold_ci95"] > b["gold"] + b["gold_ci95"]  # noqa: E731
    out = {"sft_beats_base": above(sft, base), "sft_minus_base": sft["gold"] - base["gold"],
           "methods": {}}
    for method, method_rows in by.items():
        best = max(method_rows, key=lambda r: r["gold"])
        betas = [(r["setting"].get("loss.beta"), r["kl"]) for r in method_rows]
        kl_falls = None
        if len({b for b, _ in betas}) > 1 and all(b is not None for b, _ in betas):
            kls = [kl for _, kl in sorted(betas)]
            kl_falls = all(a > b for a, b in zip(kls, kls[1:]))
        out["methods"][method] = {"best_setting": best["setting"], "best_gold": best["gold"],
                                  "minus_sft": best["gold"] - sft["gold"],
                                  "beats_sft_beyond_ci": above(best, sft),
                                  "kl_falls_as_beta_rises": kl_falls}
    return out


def markdown(rows: list[dict], v: dict, title: str, settings: str = "") -> str:
    lines = [f"# {title}", "", *([settings, ""] if settings else []),
             "Gold reward and KL(policy || SFT) per sequence on the held-out toy prompts, one sample",
             "per prompt, mean +- 95% interval (1.96 standard errors). Win rate: against the SFT",
             "model's samples under the gold reward, a tie counting half.", "",
             "| method | setting | gold reward | KL (nats) | length | win rate vs SFT | run |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        setting = ", ".join(f"{k.split('.')[-1]}={val}" for k, val in r["setting"].items())
        lines.append(f"| {r['method']} | {setting} | {r['gold']:.3f} +- {r['gold_ci95']:.3f} | "
                     f"{r['kl']:.2f} +- {r['kl_ci95']:.2f} | {r['length']:.1f} | "
                     f"{r['win_rate']:.3f} | {r['run']} |")
    lines += ["", f"- SFT over base: {v['sft_minus_base']:+.3f} "
              f"({'beyond' if v['sft_beats_base'] else 'NOT beyond'} the 95% intervals)"]
    for method, m in v["methods"].items():
        setting = ", ".join(f"{k.split('.')[-1]}={val}" for k, val in m["best_setting"].items())
        falls = {True: "KL falls as beta rises", False: "KL does NOT fall monotonically as beta "
                 "rises", None: "no beta grid"}[m["kl_falls_as_beta_rises"]]
        lines.append(f"- {method}: best {setting or '(single run)'} {m['minus_sft']:+.3f} over SFT "
                     f"({'beyond' if m['beats_sft_beyond_ci'] else 'NOT beyond'} the 95% "
                     f"intervals); {falls}")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5.5))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    others = [m for m in methods if m not in ("base", "sft")]
    colours = {"base": "grey", "sft": "black", **{m: plt.cm.tab20(i % 20) for i, m in
                                                  enumerate(others)}}
    markers = "os^Dv<>pPX"
    for i, method in enumerate(methods):
        pts = [r for r in rows if r["method"] == method]
        style = dict(marker="*", markersize=14) if method in ("base", "sft") else \
            dict(marker=markers[i % len(markers)])
        ax.errorbar([r["kl"] for r in pts], [r["gold"] for r in pts],
                    xerr=[r["kl_ci95"] for r in pts], yerr=[r["gold_ci95"] for r in pts],
                    color=colours[method], label=method, capsize=3, linestyle="-"
                    if len(pts) > 1 else "none", alpha=0.9, **style)
        varying = [k for k in pts[0]["setting"] if len({str(r["setting"].get(k)) for r in pts}) > 1]
        for r in pts:  # the settings that differ between the method's points
            label = ", ".join(f"{k.split('.')[-1].replace('beta', 'β')}={r['setting'][k]}"
                              for k in varying)
            if label:
                ax.annotate(label, (r["kl"], r["gold"]), textcoords="offset points",
                            xytext=(4, 4), fontsize=6, color=colours[method])
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("KL(policy || SFT reference), nats per sequence")
    ax.set_ylabel("mean gold reward (95% CI)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("sweep", help="the --out folder of frontier.sh")
    p.add_argument("--md", required=True)
    p.add_argument("--png", required=True)
    p.add_argument("--title", default="Reward vs KL frontier on the toy task (tiny model)")
    p.add_argument("--settings", default="", help="a line on how the sweep was run, for the table")
    args = p.parse_args(argv)
    rows = collect_rows(Path(args.sweep))
    v = verdicts(rows)
    text = markdown(rows, v, args.title, args.settings)
    atomic_write_text(args.md, text)
    atomic_write_text(str(Path(args.md).with_suffix(".json")),
                      json.dumps({"rows": rows, "verdicts": v}, indent=2) + "\n")
    plot(rows, args.png, args.title)
    print(text)
    print(f"wrote {args.md}, {args.png}, {Path(args.md).with_suffix('.json')}")
    return v


if __name__ == "__main__":
    main()
