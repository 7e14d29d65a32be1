"""Generation benchmark: our sampling paths against plain `model.generate`, same model and prompts.

    python scripts/bench/bench_generate.py --preset cpu-tiny         # under a minute on 2 CPU cores
    python scripts/bench/bench_generate.py --preset cpu-100m --out gen.jsonl
    python scripts/bench/bench_generate.py --preset h100-1b          # 64 prompts x 256 new tokens, GPU

One JSON line per configuration goes to stdout (and is appended to --out); progress to stderr.
The peer is plain `model.generate` over the prompts in order, `batch_size` at a time. Ours are
the three paths that sample: harness.models.generation.sample (evaluate.py, generate_samples.py, eval
samples), PPO rollouts (harness.rl.rollout.generate, one batch per rollout) and the server's engine
(harness.feedback.serving: ModelBackend behind the Batcher, one request per prompt, no HTTP), each plain
and with the speed levers of SamplingConfig: sort_by_length, batch_tokens, static_cache.

Every row generates exactly `new_tokens` tokens (min_new_tokens = max_new_tokens: EOS is held
back), so every configuration does the same work; a random-init model would rarely end a row
anyway, but the tiny vocabulary of cpu-tiny makes EOS likely enough to matter. Each
configuration runs in a fresh subprocess (its own peak memory): one untimed pass over the first
batch (on a GPU with static_cache that pays the decode step's compile), then `repeats` timed
passes over all prompts; figures are medians. Prompts come from the same HH-like length mix as
scripts/bench/bench.py (scripts/bench/benchlib.py). docs/performance.md holds measured figures.
"""

import argparse
import datetime
import json
import statistics
import shutil
import sys
import time
from pathlib import Path

from benchlib import (MODELS, Memory, add_model_args, build_model_dir,
                      check_device, emit, host_info, log, make_rows, n_params, ratio, run_worker,
                      setup, synchronize)

PRESETS = {  # max_length: prompts come from the length mix of this length (up to half of it)
    "cpu-tiny": dict(MODELS["cpu-tiny"], max_length=128, n_prompts=64, new_tokens=64,
                     batch_size=16, repeats=3),
    "cpu-100m": dict(MODELS["cpu-100m"], max_length=256, n_prompts=24, new_tokens=24,
                     batch_size=8, repeats=3),
    "h100-1b": dict(MODELS["h100-1b"], max_length=1024, n_prompts=64, new_tokens=256,
                    batch_size=64, repeats=3),
}
# (config, path, SamplingConfig levers); "token_budget" is batch_tokens = batch_size x (longest
# prompt + new_tokens): the KV-cache bound of the fixed batch size, filled by more short prompts
CONFIGS = [("generate", "plain", {}),
           ("sample", "sample", {}),
           ("sample_sorted", "sample", {"sort_by_length": True}),
           ("sample_token_budget", "sample", {"sort_by_length": True, "batch_tokens": "budget"}),
           ("sample_static_cache", "sample", {"static_cache": True}),
           ("rollout", "rollout", {}),
           ("rollout_static_cache", "rollout", {"static_cache": True}),
           ("serve", "serve", {})]


# ---------------------------------------------------------------------------- workers
def plain_pass(model, tok, encoded, spec, batches):
    """The peer: model.generate on left-padded batches, nothing else."""
    import torch
    from transformers import GenerationConfig
    from harness.data.tokens import pad_with_mask
    device = next(model.parameters()).device
    cfg = GenerationConfig(max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"],
                           do_sample=True, top_k=0, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)
    new = 0
    with torch.no_grad():
        for index, rows in enumerate(batches):
            ids, mask = (t.to(device) for t in pad_with_mask(
                [encoded[i] for i in rows], tok.pad_token_id, left=True))
            torch.manual_seed(index)
            new += (model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
                    .shape[1] - ids.shape[1]) * len(rows)
    return new


def sample_pass(model, tok, prompts, spec, levers):
    from harness.models.generation import SamplingConfig, sample
    cfg = SamplingConfig(max_new_tokens=spec["new_tokens"], min_new_tokens=spec["new_tokens"],
                         batch_size=spec["batch_size"], **levers)
    return sum(len(s.completion_ids) for s in sample(model, tok, prompts, cfg, progress=False))


def rollout_pass(model, tok, prompts, spec, levers):
    """PPO's rollout generation: one generate() call per rollout batch of batch_size prompts,
    laid out as the PPO tensors (harness.rl.rollout.build_batch)."""
    from harness.rl.rollout import build_batch, generate
    device, bs, new = next(model.parameters()).device, spec["batch_size"], 0
    for start in range(0, len(prompts), bs):
        chunk = prompts[start:start + bs]
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p in chunk]
        samples = generate(model, tok, ids, chunk, spec["new_tokens"], 1.0, start,
                           list(range(start, start + len(chunk))),
                           min_new_tokens=spec["new_tokens"], **levers)
        batch = build_batch(samples, tok.pad_token_id, device)
        new += int(batch.mask.sum())
    return new


def serve_pass(batcher, backend, prompts, spec):
    """One request per prompt, all in flight at once; the Batcher runs them batch_size at a
    time through ModelBackend.generate, as scripts/serve.py does."""
    from harness.feedback.openai_api import Params
    params = Params(max_tokens=spec["new_tokens"], temperature=1.0, top_p=1.0, n=1,
                    top_logprobs=None, stop=(), seed=0)
    futures = [batcher.submit(backend, [p], params) for p in prompts]
    return sum(f.result()[0]["completion_tokens"] for f in futures)


def worker(spec: dict):
    import torch
    import harness.rl.rollout  # noqa: F401  (every path's modules load before the memory baseline)
    from harness.models.generation import plan_batches, SamplingConfig
    from harness.models.modeling import load_model, load_tokenizer
    from harness.feedback.serving import Batcher, ModelBackend
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    check_device(spec["preset"], spec["device"])
    device = spec["device"]
    mem = Memory(device)
    tok = load_tokenizer(spec["model_dir"])
    model = load_model(spec["model_dir"], spec["dtype"]).to(device).eval()
    prompts = [json.loads(line)["prompt"] for line in Path(spec["data"]).read_text().splitlines()]
    encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    levers = {k: spec["batch_tokens"] if v == "budget" else v for k, v in spec["levers"].items()}
    bs = spec["batch_size"]
    if spec["path"] == "plain":
        batches = plan_batches([len(e) for e in encoded], SamplingConfig(batch_size=bs))
        run = lambda part: plain_pass(model, tok, encoded, spec,  # noqa: E731
                                      batches[:1] if part else batches)
    elif spec["path"] == "serve":
        backend = ModelBackend("policy", model, tok, spec["new_tokens"],
                               dict(min_new_tokens=spec["new_tokens"], **levers))
        batcher = Batcher(max_batch=bs, wait_s=0.05)
        run = lambda part: serve_pass(batcher, backend,  # noqa: E731
                                      prompts[:bs] if part else prompts, spec)
    else:
        fn = {"sample": sample_pass, "rollout": rollout_pass}[spec["path"]]
        run = lambda part: fn(model, tok,  # noqa: E731
                              prompts[:bs] if part else prompts, spec, levers)
    synchronize(device)
    start = time.perf_counter()
    run(True)  # warm-up: the first batch (a GPU compiles the static-cache decode step here)
    synchronize(device)
    warmup_s = time.perf_counter() - start
    mem.start_steps()
    times, new_tokens = [], []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        new_tokens.append(run(False))
        synchronize(device)
        times.append(time.perf_counter() - start)
    if spec["path"] == "serve":
        batcher.close()
    expected = len(prompts) * spec["new_tokens"]
    if any(n != expected for n in new_tokens):
        raise RuntimeError(f"{spec['config']}: generated {new_tokens} tokens, expected {expected} "
                           "per pass (min_new_tokens should hold EOS back)")
    median = statistics.median(times)
    result = dict(time_s=median, times_s=[round(t, 4) for t in times],
                  warmup_s=round(warmup_s, 3), new_tokens_per_s=expected / median,
                  prompts_per_s=len(prompts) / median, new_tokens_per_pass=expected,
                  params=n_params(model), **mem.summary(), threads=torch.get_num_threads(),
                  torch=torch.__version__, gpu=torch.cuda.get_device_name()
                  if device == "cuda" else None)
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------- driver
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    p.add_argument("--prompts", type=int, help="prompts per pass")
    p.add_argument("--new-tokens", type=int, help="tokens generated per prompt")
    p.add_argument("--batch-size", type=int, help="prompts per generate() call")
    p.add_argument("--repeats", type=int, help="timed passes over all prompts")
    p.add_argument("--configs", nargs="+", choices=[c[0] for c in CONFIGS],
                   help="run only these configurations (the peer, generate, always runs)")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: torch's)")
    p.add_argument("--tokenizer", default="assets/tiny_model", help="tokenizer dir")
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--workdir", help="keep model and prompts here (default: a temp dir)")
    add_model_args(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key in ("prompts", "new_tokens", "batch_size", "repeats"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    preset, workdir, tokenizer = setup(
        args, PRESETS, {"prompts": "n_prompts", "new_tokens": "new_tokens",
                        "batch_size": "batch_size", "repeats": "repeats"}, "bench_generate_")
    log(f"preset {args.preset}: building the model and {preset['n_prompts']} prompts in {workdir}")
    params = build_model_dir(workdir / "model", preset, tokenizer)
    rows = make_rows(tokenizer, preset["n_prompts"], preset["max_length"],
                     preset["max_length"] // 2)[:preset["n_prompts"]]
    data = workdir / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows))
    lengths = [len(tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]) for r in rows]
    budget = preset["batch_size"] * (max(lengths) + preset["new_tokens"])
    log(f"model: {params / 1e6:.1f}M params ({preset['dtype']}, {preset['device']}); prompt "
        f"tokens {min(lengths)}-{max(lengths)} (median {statistics.median(lengths):.0f})")
    base = dict(preset, preset=args.preset, model_dir=str(workdir / "model"), data=str(data),
                threads=args.threads, batch_tokens=budget)
    header = dict(preset=args.preset, mode="generation", device=preset["device"],
                  dtype=preset["dtype"], n_prompts=preset["n_prompts"],
                  new_tokens=preset["new_tokens"], batch_size=preset["batch_size"],
                  repeats=preset["repeats"], prompt_tokens=dict(
                      min=min(lengths), median=statistics.median(lengths), max=max(lengths)),
                  date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  host=host_info())
    peer, failed = None, False
    for config, path, levers in CONFIGS:
        if args.configs and config not in args.configs and path != "plain":
            continue
        shown = {k: budget if v == "budget" else v for k, v in levers.items()}
        line = dict(header, config=config, path=path, levers=shown)
        result = run_worker(__file__, dict(base, config=config, path=path, levers=levers),
                            workdir, config)
        line.update(result)
        if "error" in result:
            failed = True
        else:
            log(f"{config}: {result['new_tokens_per_s']:.0f} new tok/s, "
                f"peak +{result['peak_memory_delta_mib']:.0f} MiB")
            if path == "plain":
                peer = result
            elif peer is not None:
                line["vs_generate"] = {
                    "new_tokens_per_s_ratio": ratio(result["new_tokens_per_s"],
                                                    peer["new_tokens_per_s"]),
                    "peak_memory_delta_ratio": ratio(result["peak_memory_delta_mib"],
                                                     peer["peak_memory_delta_mib"])}
        emit(line, args.out)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
