"""Training benchmark: our BasicTrainer against TRL's DPOTrainer, same weights and data.

    python scripts/bench/bench.py --preset cpu-tiny                  # about a minute on 2 CPU cores
    python scripts/bench/bench.py --preset cpu-100m --out bench.jsonl
    python scripts/bench/bench.py --preset h100-1b                   # needs a CUDA GPU
    python scripts/bench/bench.py --preset cpu-tiny --only ours --steps 2 --warmup 1
    python scripts/bench/bench.py --preset cpu-tiny --epoch          # whole DPO epochs, wall clock
    python scripts/bench/bench.py --preset cpu-tiny --epoch --configs dpo_precomputed:trl \
        dpo_precomputed_packed:ours                                  # CONFIG:IMPL picks one run
    python scripts/bench/bench.py --preset h100-1b --configs sft --only bare ours --compile \
        --fixed-length           # SFT vs a bare step with compiled blocks, [batch, max_length]
    python scripts/bench/bench.py --preset h100-1b --device cpu --model cpu-tiny --epoch --pairs 8
                                                       # the GPU preset's code path, on a CPU

One JSON line per configuration goes to stdout (and is appended to --out); progress to stderr.
Configurations: SFT (a bare HF step as the peer; ours; ours packed); DPO with the reference
model in memory (TRL, ours); DPO with reference log-probs precomputed in a pre-pass (TRL, ours;
ours with packing + prefix sharing). Every configuration runs in a fresh
subprocess, so its peak memory is its own, over the same random-init Llama-style model (saved
with save_pretrained and loaded through our config, `model=blank_model`, as train.py does) and
the same generated HH-like preference file, visited in the same order with the same batches.
TRL's steps are timed by a TrainerCallback (on_step_begin -> on_step_end), ours around
`BasicTrainer.train_step`: both spans are forward + backward + clip + optimizer step, without
data loading.

--epoch runs one epoch of DPO over `--pairs` pairs of the same length mix and times each
trainer's whole wall clock: ours is train.py's own path (train.run: load the models, load and
tokenize the data, the reference pre-pass, every step, the closing one-example evaluation and
the metrics plot), TRL's is loading the models, DPOTrainer(...) (tokenizing, its pre-pass) and
trainer.train(). Both import their modules first (not timed). It reports pairs/s and non-pad
tokens/s of that wall clock, the pre-pass time and the process's peak memory. --levers adds
config overrides to our runs (e.g. micro_batch_tokens=1024). docs/performance.md explains the
fields and holds measured figures.
"""

import argparse
import datetime
import gc
import importlib.util
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from bench_peers import run_bare, run_trl
from benchlib import (MODELS, REPO, Memory, add_model_args, build_model_dir,
                      check_device, emit, host_info, log, make_fixed_rows, make_rows, n_params,
                      ratio, run_worker, setup, timed)

_COMMON = dict(lr=1e-6, beta=0.1)
PRESETS = {
    "cpu-tiny": dict(MODELS["cpu-tiny"], **_COMMON, batch_size=4, max_length=128, steps=10,
                     warmup=2, epoch_pairs=512),
    "cpu-100m": dict(MODELS["cpu-100m"], **_COMMON, batch_size=2, max_length=256, steps=3,
                     warmup=1, epoch_pairs=24),
    "h100-1b": dict(MODELS["h100-1b"], **_COMMON, batch_size=8, max_length=1024, steps=20,
                    warmup=3, epoch_pairs=2048),
}
# (config, impl, loss, reference, our speed levers, the TRL configs it is compared with);
# TRL runs before ours so our line can carry the ratios
FAST = ("packing=true", "prefix_sharing=true", "fused_optimizer=true")
CONFIGS = [("sft", "bare", "sft", "none", (), ()),
           ("sft", "ours", "sft", "none", (), ("sft",)),
           ("sft_packed", "ours", "sft", "none", ("packing=true", "fused_optimizer=true"),
            ("sft",)),
           ("dpo_ref_in_memory", "trl", "dpo", "in_memory", (), ()),
           ("dpo_ref_in_memory", "ours", "dpo", "in_memory", (), ("dpo_ref_in_memory",)),
           ("dpo_precomputed", "trl", "dpo", "precomputed", (), ()),
           ("dpo_precomputed", "ours", "dpo", "precomputed", (), ("dpo_precomputed",)),
           ("dpo_precomputed_packed", "ours", "dpo", "precomputed", FAST,
            ("dpo_ref_in_memory", "dpo_precomputed"))]
# --epoch: DPO over one whole epoch; TRL with the reference in memory and precomputed
EPOCH_CONFIGS = [c for c in CONFIGS if c[2] == "dpo"]
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0}  # dense


# ---------------------------------------------------------------------------- workers
def compose_config(spec: dict):
    from hydra import compose, initialize_config_dir
    import train  # noqa: F401  (registers the get_local_run_dir resolver)
    overrides = [
        "model=blank_model", f"model.name_or_path={spec['model_dir']}",
        "model.block_name=LlamaDecoderLayer", f"model.policy_dtype={spec['dtype']}",
        f"model.reference_dtype={spec['dtype']}", f"loss={spec['loss']}",
        f"datasets=[json:{spec['data']}]", f"batch_size={spec['batch_size']}",
        f"eval_batch_size={spec['batch_size']}", f"max_length={spec['max_length']}",
        f"max_prompt_length={spec['max_length'] // 2}", "n_eval_examples=1",
        f"lr={spec['lr']}", f"optimizer={spec['optimizer']}", "wandb.enabled=false",
        "debug=true", "sample_during_eval=false", f"local_dirs=[{spec['tmp']}]",
        f"local_run_dir={spec['tmp']}/run",
        f"precompute_reference={str(spec['reference'] == 'precomputed').lower()}",
        *spec.get("levers", ()), *(["compile=true"] if spec.get("compile") else []),
        # one epoch, no evaluation on the way (TRL's eval_strategy="no"); the closing one is
        # over n_eval_examples=1
        *(["n_epochs=1", "do_first_eval=false", f"eval_every={10**12}"] if spec["epoch"] else [])]
    if spec["loss"] == "dpo":
        overrides.append(f"loss.beta={spec['beta']}")
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    train.check_config(cfg)
    return cfg


def run_ours(spec: dict) -> dict:
    import torch
    import train
    from harness.models.modeling import load_model, load_tokenizer
    from trainers import BasicTrainer
    device, cfg = spec["device"], compose_config(spec)
    mem = Memory(device)
    train.seed_everything(cfg.seed)
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    policy = load_model(cfg.model.name_or_path, cfg.model.policy_dtype).to(device)
    reference = None
    if spec["reference"] != "none":
        reference = load_model(cfg.model.name_or_path, cfg.model.reference_dtype).eval().to(device)
    os.makedirs(cfg.local_run_dir, exist_ok=True)
    trainer = BasicTrainer(policy, tokenizer, cfg, cfg.local_run_dir, reference)
    del reference  # the trainer holds the only reference, so the pre-pass really frees it
    prepass_s = timed(trainer.prepare_reference, device)
    prepass_pairs = len(trainer.reference_table) if trainer.reference_table else 0
    gc.collect()
    batches = list(trainer.train_batches.epoch_batches(0))  # tokenise outside the timed steps
    mem.start_steps()
    times = [timed(lambda b=b: trainer.train_step(b), device) for b in batches]
    masks = ("chosen_attention_mask", "rejected_attention_mask")
    tokens = [sum(int(b[k].sum()) for k in masks if k in b) for b in batches]
    padded = [positions_per_forward(trainer, b) for b in batches]
    return dict(times=times, tokens=tokens, padded=padded, prepass_s=prepass_s,
                prepass_pairs=prepass_pairs, params=n_params(policy), mem=mem,
                examples=[len(b["uid"]) for b in batches], versions={"torch": torch.__version__})


def positions_per_forward(trainer, batch) -> int:
    """Token positions our forward really computes: packed rows, or the padded [2B, T] batch
    (chosen and rejected padded to one length; SFT [B, T])."""
    packed = trainer.packed(batch, trainer.spec.paired)
    if packed is not None:
        return packed.input_ids.numel()
    masks = [k for k in ("chosen_attention_mask", "rejected_attention_mask") if k in batch]
    return len(masks) * len(batch["uid"]) * max(batch[k].shape[1] for k in masks)


def summarize(spec: dict, raw: dict) -> dict:
    """Medians over the timed steps (after warmup) and the end-to-end figure."""
    import torch
    warm = spec["warmup"]
    times, tokens, examples = raw["times"][warm:], raw["tokens"][warm:], raw["examples"][warm:]
    if not times:
        raise RuntimeError(f"no timed steps: {len(raw['times'])} steps ran, warmup={warm}")
    median = statistics.median(times)
    total_s = raw["prepass_s"] + sum(raw["times"])
    out = dict(
        step_time_s=median, step_times_s=[round(t, 5) for t in times],
        examples_per_s=statistics.median(e / t for e, t in zip(examples, times)),
        tokens_per_s=statistics.median(n / t for n, t in zip(tokens, times)),
        tokens_per_step=statistics.mean(tokens),
        padded_tokens_per_step=statistics.mean(raw["padded"][warm:]),
        prepass_s=raw["prepass_s"], prepass_pairs=raw["prepass_pairs"],
        e2e_s=total_s, e2e_examples_per_s=sum(raw["examples"]) / total_s,
        params=raw["params"], **raw["mem"].summary(), mfu=None, threads=torch.get_num_threads(),
        **raw["versions"])
    if spec["device"] == "cuda":
        out["mfu"] = mfu(spec, raw["params"], out["tokens_per_s"])
        out["gpu"] = torch.cuda.get_device_name()
    return out


def mfu(spec: dict, params: int, tokens_per_s: float) -> float | None:
    """Model FLOPs utilisation on CUDA: the policy's training FLOPs (6 N per non-pad token; a
    reference forward is not counted) per second over the chip's dense bf16 peak."""
    import torch
    name = torch.cuda.get_device_name()
    peak = spec.get("peak_tflops") or next(
        (v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return 6 * params * tokens_per_s / (peak * 1e12) if peak else None


def run_ours_epoch(spec: dict) -> dict:
    """One epoch through train.py's own path (train.run: load the models, tokenize, the
    reference pre-pass, every step, the closing evaluation of one example), timed whole."""
    import torch
    import train
    from trainers import BasicTrainer
    device, cfg = spec["device"], compose_config(spec)
    mem = Memory(device)
    prepass = []
    prepare = BasicTrainer.prepare_reference
    BasicTrainer.prepare_reference = lambda self, *args: prepass.append(
        timed(lambda: prepare(self, *args), device))
    wall_s = timed(lambda: train.run(cfg), device)
    return dict(wall_s=wall_s, prepass_s=sum(prepass), mem=mem,
                versions={"torch": torch.__version__})


def summarize_epoch(spec: dict, raw: dict) -> dict:
    """Pairs and non-pad tokens per second of wall clock over the whole epoch."""
    import torch
    wall = raw["wall_s"]
    out = dict(pairs=spec["n_pairs"], steps=-(-spec["n_pairs"] // spec["batch_size"]),
               wall_s=round(wall, 3), pairs_per_s=spec["n_pairs"] / wall,
               tokens_per_s=spec["epoch_tokens"] / wall, epoch_tokens=spec["epoch_tokens"],
               prepass_s=round(raw["prepass_s"], 3), params=spec["params"],
               **raw["mem"].summary(), mfu=None, threads=torch.get_num_threads(),
               **raw["versions"])
    if spec["device"] == "cuda":
        out["mfu"] = mfu(spec, spec["params"], out["tokens_per_s"])
        out["gpu"] = torch.cuda.get_device_name()
    return out


def epoch_tokens(data: Path, tokenizer, max_length: int) -> int:
    """Non-pad tokens of one epoch: prompt + chosen and prompt + rejected of every train pair,
    as both trainers tokenize them (no truncation: make_rows keeps every pair within
    max_length)."""
    from preference_datasets import load_examples, tokenize_example
    examples = load_examples([f"json:{data}"], "train", sft_mode=False, seed=0)
    return sum(len(t["chosen_input_ids"]) + len(t["rejected_input_ids"]) for t in (
        tokenize_example(e, tokenizer, max_length, max_length // 2) for e in examples))


def warm_imports():
    """Import what either trainer imports lazily, so an epoch's wall clock counts work, not
    module loading (a Python process pays that once)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401  (our run logger plots the metrics at the end)
    if importlib.util.find_spec("trl") is not None:  # the peer; --only ours runs without it
        import trl  # noqa: F401
    import train  # noqa: F401
    import trainers  # noqa: F401
    from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: F401


def worker(spec: dict):
    import torch
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    check_device(spec["preset"], spec["device"])
    if spec["epoch"]:
        warm_imports()
        raw = {"trl": run_trl, "ours": run_ours_epoch}[spec["impl"]](spec)
        result = summarize_epoch(spec, raw)
    else:
        raw = {"trl": run_trl, "bare": run_bare, "ours": run_ours}[spec["impl"]](spec)
        result = summarize(spec, raw)
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------- driver
def ratios(ours: dict, peer: dict, epoch: bool) -> dict:
    if epoch:
        return {"pairs_per_s_ratio": ratio(ours["pairs_per_s"], peer["pairs_per_s"]),
                "peak_memory_delta_ratio": ratio(ours["peak_memory_delta_mib"],
                                                 peer["peak_memory_delta_mib"]),
                "wall_s_ratio": ratio(ours["wall_s"], peer["wall_s"])}
    return {"step_time_ratio": ratio(ours["step_time_s"], peer["step_time_s"]),
            "tokens_per_s_ratio": ratio(ours["tokens_per_s"], peer["tokens_per_s"]),
            "peak_memory_delta_ratio": ratio(ours["peak_memory_delta_mib"],
                                             peer["peak_memory_delta_mib"]),
            "e2e_s_ratio": ratio(ours["e2e_s"], peer["e2e_s"])}


def model_and_params(args, workdir: Path, preset: dict, tokenizer) -> tuple[str, int]:
    """(model dir, parameters): --model-dir's pretrained model, or the preset's, built."""
    if not args.model_dir:
        return str(workdir / "model"), build_model_dir(workdir / "model", preset, tokenizer)
    from harness.models.modeling import load_model
    return args.model_dir, n_params(load_model(args.model_dir, "float32"))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    p.add_argument("--epoch", action="store_true", help="time one whole epoch of DPO per config "
                   "(wall clock from loading to the last step) instead of single steps")
    p.add_argument("--pairs", type=int, help="--epoch: train pairs in the epoch")
    p.add_argument("--steps", type=int, help="timed steps (after warmup)")
    p.add_argument("--warmup", type=int, help="untimed steps first")
    p.add_argument("--batch-size", type=int, help="pairs (DPO) or examples (SFT) per step")
    p.add_argument("--max-length", type=int, help="prompt + response tokens at most")
    p.add_argument("--only", nargs="+", choices=["ours", "trl", "bare"],
                   help="run only these implementations")
    p.add_argument("--optimizer", default="RMSprop", help="torch.optim class for both trainers")
    p.add_argument("--configs", nargs="+", help="run only these configurations "
                   f"({', '.join(dict.fromkeys(c[0] for c in CONFIGS + EPOCH_CONFIGS))}), or "
                   "CONFIG:IMPL for one implementation of one (dpo_precomputed:trl)")
    p.add_argument("--levers", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra config overrides for every one of our runs (e.g. "
                   "micro_batch_tokens=2048)")
    p.add_argument("--compile", action="store_true", help="our runs with compile=true, the bare "
                   "step with each decoder block compiled")
    p.add_argument("--fixed-length", action="store_true", help="every prompt max_length // 4 "
                   "tokens and every response the rest: each batch [batch, max_length]")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: torch's)")
    p.add_argument("--tokenizer", default="assets/tiny_model", help="tokenizer dir")
    p.add_argument("--model-dir", help="benchmark this pretrained model (a HF dir or "
                   "packaged:NAME, e.g. packaged:smollm2_135m) with its own tokenizer instead of "
                   "building the preset's random one; the preset gives the batch and lengths")
    p.add_argument("--peak-tflops", type=float, help="accelerator peak for MFU (default: by name)")
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--workdir", help="keep model, data and run dirs here (default: a temp dir)")
    add_model_args(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.pairs is not None and (not args.epoch or args.pairs < 1):
        p.error("--pairs N (N >= 1) goes with --epoch")
    if args.model_dir and not args.worker:  # its own tokenizer makes the pairs, for both trainers
        from harness.models.modeling import check_model_source
        args.model_dir = args.tokenizer = check_model_source(args.model_dir, "--model-dir")
    return args


def write_pairs(path: Path, tokenizer, n_rows: int, max_length: int, fixed: bool) -> Path:
    rows = make_fixed_rows(tokenizer, n_rows, max_length) if fixed else \
        make_rows(tokenizer, n_rows, max_length, max_length // 2)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def selected(args, config: str, impl: str) -> bool:
    """--only IMPL... and --configs CONFIG or CONFIG:IMPL..."""
    return not (args.only and impl not in args.only) and not (
        args.configs and not {config, f"{config}:{impl}"} & set(args.configs))


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    preset, workdir, tokenizer = setup(
        args, PRESETS, {k: k for k in ("steps", "warmup", "batch_size", "max_length")}, "bench_")
    n_rows = (args.pairs or preset["epoch_pairs"]) if args.epoch else \
        (preset["warmup"] + preset["steps"]) * preset["batch_size"]
    log(f"preset {args.preset}: building the model and {n_rows} train rows in {workdir}")
    model_dir, params = model_and_params(args, workdir, preset, tokenizer)
    data = write_pairs(workdir / "pairs.jsonl", tokenizer, n_rows, preset["max_length"],
                       args.fixed_length)
    log(f"model: {params / 1e6:.1f}M params ({preset['dtype']}, {preset['device']})")
    base = dict(preset, preset=args.preset, model_dir=model_dir, data=str(data),
                optimizer=args.optimizer, peak_tflops=args.peak_tflops, threads=args.threads,
                compile=args.compile, epoch=args.epoch, n_pairs=n_rows, params=params,
                epoch_tokens=epoch_tokens(data, tokenizer, preset["max_length"])
                if args.epoch else None)
    header = dict(preset=args.preset, mode="epoch" if args.epoch else "steps", model=model_dir,
                  device=preset["device"], dtype=preset["dtype"],
                  batch_size=preset["batch_size"], max_length=preset["max_length"],
                  **({"pairs": n_rows} if args.epoch else {"steps": preset["steps"],
                                                            "warmup": preset["warmup"]}),
                  optimizer=args.optimizer, fixed_length=args.fixed_length,
                  date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  host=host_info())
    have_trl = importlib.util.find_spec("trl") is not None
    done, failed = {}, False
    for config, impl, loss, reference, levers, compare in (EPOCH_CONFIGS if args.epoch else
                                                           CONFIGS):
        if not selected(args, config, impl):
            continue
        ours_levers = list(levers) + args.levers if impl == "ours" else []
        compiled = args.compile and impl != "trl"  # TRL's trainer runs as it comes
        line = dict(header, config=config, impl=impl, loss=loss, reference=reference,
                    levers=ours_levers + (["compile=true"] if compiled else []))
        if impl == "trl" and not have_trl:
            line["skipped"] = "trl is not installed (pip install trl)"
        else:
            spec = dict(base, impl=impl, loss=loss, reference=reference, levers=ours_levers)
            result = run_worker(__file__, spec, workdir, f"{impl} {config}")
            line.update(result)
            failed |= "error" in result
            if "error" not in result:
                log(f"{impl} {config}: " + (
                    f"{result['pairs_per_s']:.2f} pairs/s over {result['wall_s']:.1f}s"
                    if args.epoch else f"median step {result['step_time_s']:.4f}s, "
                    f"{result['tokens_per_s']:.0f} tok/s") +
                    f", peak +{result['peak_memory_delta_mib']:.0f} MiB")
            peer = "bare" if loss == "sft" else "trl"  # SFT's peer is the bare step
            for peer_config in compare:
                other = done.get((peer_config, peer))
                if "error" not in result and other and not {"error", "skipped"} & set(other):
                    key = f"vs_{peer}" + ("" if peer_config == config else f"_{peer_config}")
                    line[key] = ratios(line, other, args.epoch)
        done[(config, impl)] = line
        emit(line, args.out)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
