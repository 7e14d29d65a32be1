"""The figures of scripts/bench/gpu_check.py's steps: the benchmark lines boiled down to what the
issue asks (ratios to the peers, MFU, peak memory, targets), the time line printed per step and
the markdown table. Standard library only."""

# the speed goals (docs/performance.md): ours / peer on the same run, higher is better
TARGETS = {"dpo_epoch": {"vs_trl_ref": 2.0, "vs_trl_precomputed": 1.5},
           "sft_compiled": {"vs_bare_compiled": 0.9}}
# step -> {figure name: (config, impl)} of the benchmark lines it reads
EXPECTED = {
    "dpo_epoch": {"trl_ref": ("dpo_ref_in_memory", "trl"),
                  "trl_precomputed": ("dpo_precomputed", "trl"),
                  "ours": ("dpo_precomputed_packed", "ours")},
    "sft_compiled": {"bare_compiled": ("sft", "bare"), "ours": ("sft", "ours")},
    "generation": {"generate": ("generate", None), "ours": ("sample_static_cache", None)},
}
RATE = {"dpo_epoch": "pairs_per_s", "sft_compiled": "tokens_per_s",
        "generation": "new_tokens_per_s"}
KEEP = ("pairs_per_s", "tokens_per_s", "new_tokens_per_s", "wall_s", "prepass_s",
        "step_time_s", "warmup_s", "mfu", "peak_memory_mib", "memory_kind", "levers", "gpu")


def _pick(lines: list[dict], config: str, impl: str | None) -> dict | None:
    for line in lines:
        if line.get("config") == config and (impl is None or line.get("impl") == impl):
            return line
    return None


def bench_figures(step: str, lines: list[dict]) -> tuple[dict, str | None]:
    """(figures, error) of a benchmark step from its JSON lines: each configuration's rates,
    MFU and peak memory, ours / each peer on the step's rate, and whether the targets hold."""
    figures, missing = {}, []
    for name, (config, impl) in EXPECTED[step].items():
        line = _pick(lines, config, impl)
        if line is None or "error" in line or "skipped" in line:
            why = "no line" if line is None else line.get("error") or line.get("skipped")
            missing.append(f"{config}{f' ({impl})' if impl else ''}: {why}")
            continue
        figures[name] = {k: line[k] for k in KEEP if k in line}
    rate = RATE[step]
    for name in list(figures):
        if name != "ours" and "ours" in figures:
            figures[f"vs_{name}"] = round(figures["ours"][rate] / figures[name][rate], 3)
    goals = TARGETS.get(step, {})
    figures["targets"] = {f"{k} >= {v}": figures[k] >= v for k, v in goals.items()
                          if k in figures}
    return figures, "; ".join(missing) or None


def time_line(line: dict, elapsed: float) -> str:
    budget = f" / {line['budget_s']:.0f} s" if line.get("budget_s") else ""
    text = f"+{elapsed:6.1f} s  {line['status']:<8} {line['seconds']:6.1f} s{budget:<8}  " \
           f"{line['step']}"
    return text + (f"  -- {line['error'][:300]}" if line.get("error") else "")


def _mib(x) -> str:
    return f"{x / 1024:.1f} GiB" if x >= 1024 else f"{x:.0f} MiB"


def _smoke_text(f: dict) -> str:
    parts = []
    if "logp_dev" in f:
        parts.append(f"log-probs {f['logp_dev']:.2g} nats/token from plain (tol {f['logp_tol']})")
    if "grad_norm_rel_dev" in f:
        parts.append(f"1st grad norm {f['grad_norm_rel_dev']:.2%} from {f['grad_norm_twin']}")
    if "context_effect" in f:
        parts.append(f"a wrong prompt moves log-probs {f['context_effect']:.3g} nats/token")
    if "first_ratio_max_dev" in f:
        parts.append(f"max abs(ratio - 1) before the update {f['first_ratio_max_dev']:.2g} "
                     f"(tol {f['ratio_tol']}, {f['dtype']}); rollout+update "
                     f"{f['ppo_step_s']:.2f} s")
    if "token_match" in f:
        parts.append(f"static = dynamic cache on {f['token_match']:.0%} of greedy tokens; "
                     f"{f['static_new_tokens_per_s']:.0f} new tok/s after a "
                     f"{f['static_warmup_s']:.1f} s first call")
    if f.get("losses"):
        parts.append("loss " + " -> ".join(f"{x:.4g}" for x in f["losses"]))
    if f.get("step_s"):
        parts.append("steps " + ", ".join(f"{x:.3g}" for x in f["step_s"]) + " s")
    if "peak_mib" in f:
        parts.append(f"peak {_mib(f['peak_mib'])} (steps {_mib(f['steps_peak_mib'])})")
    if "note" in f:
        parts.append(f["note"])
    return "; ".join(parts)


def _bench_text(step: str, f: dict) -> str:
    rate = RATE[step]
    unit = {"pairs_per_s": "pairs/s", "tokens_per_s": "tok/s",
            "new_tokens_per_s": "new tok/s"}[rate]
    parts = []
    for name in EXPECTED[step]:
        if name not in f:
            continue
        row = f[name]
        text = f"{name} {row[rate]:.4g} {unit}"
        if step == "dpo_epoch":
            text += f" ({row['tokens_per_s']:.0f} tok/s, {row['wall_s']:.1f} s)"
        if row.get("mfu") is not None:
            text += f", MFU {row['mfu']:.1%}"
        if "peak_memory_mib" in row:
            text += f", peak {_mib(row['peak_memory_mib'])}"
        if name != "ours" and f"vs_{name}" in f:
            text += f": ours {f[f'vs_{name}']:.2f}x"
        parts.append(text)
    parts += [f"target {k}: {'met' if ok else 'NOT met'}" for k, ok in f["targets"].items()]
    return "; ".join(parts)


def _env_text(f: dict) -> str:
    names = ("gpu", "torch", "cuda", "transformers", "peft", "trl", "datasets", "hydra-core",
             "python")
    text = ", ".join(f"{k} {f[k]}" for k in names if f.get(k))
    if f.get("bf16_matmul_tflops"):
        text += f"; bf16 matmul {f['bf16_matmul_tflops']} TFLOP/s measured"
    return text


def figures_text(line: dict) -> str:
    f = line.get("figures") or {}
    step = line["step"]
    if step in EXPECTED:
        text = _bench_text(step, f) if f else ""
    elif step.endswith("/env"):
        text = _env_text(f)
    elif step.startswith("smoke/"):
        text = _smoke_text(f)
    elif "wheels" in f:
        text = f"{len(f['wheels'])} wheels into {f['site']}"
    else:
        text = f.get("note", "")
    if line.get("error"):
        text = (text + "; " if text else "") + f"**{line['error'][:400]}**"
    return text.replace("|", "/").replace("\n", " ")


def markdown(header: dict, lines: list[dict], summary: dict) -> str:
    env = next((x.get("figures") or {} for x in lines if x["step"].endswith("/env")), {})
    where = "dry run on a CPU (tiny presets)" if header["dry_run"] else \
        env.get("gpu", "GPU (device unknown: the env path did not run)")
    deadline = f", deadline {header['deadline_s']:.0f} s" if header.get("deadline_s") else ""
    out = [f"### GPU check: {where}, {header['date']}", "",
           f"`bash scripts/gpu_check.sh {' '.join(header['argv'])}` at commit "
           f"{header.get('commit') or '(unknown)'}: {summary['total_s']:.0f} s in all{deadline}; "
           f"{summary['pass']} passed, {summary['fail']} failed, {summary['timeout']} timed "
           f"out, {summary['skipped']} skipped.", ""]
    if env:
        out += [_env_text(env), ""]
    out += ["| step | result | s | budget s | figures |", "|---|---|---|---|---|"]
    for line in lines:
        budget = f"{line['budget_s']:.0f}" if line.get("budget_s") else ""
        out.append(f"| {line['step']} | {line['status']} | {line['seconds']:.1f} | {budget} | "
                   f"{figures_text(line)} |")
    return "\n".join(out) + "\n"


def plot(lines: list[dict], path) -> bool:
    """gpu_check.png: each step's time against its budget (coloured by result), and ours over
    each peer for the benchmarks against their targets. False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colour = {"pass": "tab:green", "fail": "tab:red", "timeout": "tab:orange",
              "skipped": "tab:gray"}
    ratios = [(f"{x['step']}\n{k[3:]}", v, TARGETS.get(x["step"], {}).get(k))
              for x in lines if x["step"] in EXPECTED for k, v in (x.get("figures") or {}).items()
              if k.startswith("vs_")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, max(4, 0.28 * len(lines))),
                                      gridspec_kw={"width_ratios": [2, 1]})
    names = [x["step"] for x in lines][::-1]
    left.barh(names, [x["seconds"] for x in lines][::-1],
              color=[colour[x["status"]] for x in lines][::-1])
    left.scatter([x.get("budget_s") or 0 for x in lines][::-1], names, marker="|", s=200,
                 color="black", label="budget")
    left.set_xlabel("seconds (bar: this run, coloured by result; |: budget)")
    left.tick_params(axis="y", labelsize=7)
    if ratios:
        right.barh([r[0] for r in ratios][::-1], [r[1] for r in ratios][::-1], color="tab:blue")
        targets = [r for r in ratios if r[2]]
        right.scatter([r[2] for r in targets], [r[0] for r in targets], marker="|", s=300,
                      color="black")
        right.axvline(1.0, color="gray", lw=0.8)
        right.set_xlabel("ours / peer, same run (|: target)")
        right.tick_params(axis="y", labelsize=7)
    else:
        right.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
