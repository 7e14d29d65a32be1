"""Peak memory per rank and step time: one process vs FSDP / tensor parallelism on 2 processes.

    python scripts/bench/bench_parallel.py                        # ~100M-param Llama, CPU, gloo
    python scripts/bench/bench_parallel.py --steps 5 --modes single fsdp
    python scripts/bench/bench_parallel.py --preset gpu-1b        # on a GPU box: 1B-class, NCCL

Every configuration runs under torchrun in fresh processes over the same random-init Llama-style
model and the same global batch of random tokens; the training step is the harness's own: the
chunked log-prob head (harness/models/modeling.py), the SFT loss, backward, clipping
(harness/parallelize.py) and AdamW, with the model wrapped by harness/parallelize.py exactly as
FSDPTrainer / TensorParallelTrainer wrap it. One JSON line per rank goes to stdout:
step_s (median seconds per optimizer step), peak_mib (peak RSS on CPU, or max allocated CUDA
memory, during the timed steps), setup_peak_mib (peak while building and wrapping the model),
after_setup_mib (memory held once the model is wrapped, before the first step). On CPU the
workers run with MALLOC_MMAP_THRESHOLD_=65536 (unless set), so RSS follows live memory.
"""

import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

PRESETS = {
    "cpu-100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                     num_attention_heads=12, num_key_value_heads=12, vocab_size=32000,
                     batch_size=4, seq_len=128, mp=None, ac=False),
    "gpu-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                   num_attention_heads=32, num_key_value_heads=8, vocab_size=32000,
                   batch_size=8, seq_len=1024, mp="bfloat16", ac=True),
}
MODES = {"single": 1, "fsdp": 2, "tp": 2}  # mode -> processes


def peak_mib(cuda: bool) -> float:
    import torch
    if cuda:
        return torch.cuda.max_memory_allocated() / 2**20
    match = re.search(r"^VmHWM:\s+(\d+)", Path("/proc/self/status").read_text(), re.M)
    return int(match.group(1)) / 1024


def reset_peak(cuda: bool):
    import torch
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        # hand freed heap pages back first (glibc keeps them otherwise: the full model each rank
        # loaded before sharding would stay in RSS), then restart VmHWM from the current RSS
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")


def build_model(args, preset: dict, world: int):
    """The preset's random-init Llama, wrapped for this mode; (model, config, parameters)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from harness.parallel import distributed, parallelize
    torch.manual_seed(0)
    config = LlamaConfig(**{k: v for k, v in preset.items() if k not in
                            ("batch_size", "seq_len", "mp", "ac")}, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    if args.ac or preset["ac"]:
        parallelize.apply_ac(model)
    if args.mode == "fsdp":
        parallelize.apply_fsdp(model, parallelize.build_mesh(world, 1), None, args.mp or preset["mp"])
    elif args.mode == "tp":
        parallelize.apply_tp(model.to(distributed.device()), parallelize.build_mesh(1, world)["tp"])
    else:
        model.to(distributed.device())
    return model, config, n_params


def worker(args):
    import torch
    import torch.distributed as dist
    from harness.parallel import distributed, parallelize
    from harness.models.modeling import sequence_logps
    preset = PRESETS[args.preset]
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    rank, world = dist.get_rank(), dist.get_world_size()
    model, config, n_params = build_model(args, preset, world)
    logps = getattr(model, "sequence_logps", lambda *a: sequence_logps(model, *a))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (preset["batch_size"], preset["seq_len"]),
                        generator=g)
    share = preset["batch_size"] // world if args.mode == "fsdp" else preset["batch_size"]
    ids = ids[rank * share:(rank + 1) * share] if args.mode == "fsdp" else ids
    ids = ids.to(distributed.device())
    mask, labels = torch.ones_like(ids), ids.clone()
    setup_peak = peak_mib(cuda)
    reset_peak(cuda)
    after_setup = peak_mib(cuda)
    times = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            reset_peak(cuda)
        dist.barrier()
        start = time.perf_counter()
        values, n = logps(ids, mask, labels, 4096)
        (-(values / n).mean()).backward()
        parallelize.clip_grad_norm(list(model.parameters()), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dist.barrier()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    print(json.dumps({"preset": args.preset, "mode": args.mode, "world_size": world, "rank": rank,
                      "params_m": round(n_params / 1e6, 1), "global_batch": preset["batch_size"],
                      "seq_len": preset["seq_len"], "steps": args.steps,
                      "step_s": round(statistics.median(times), 3),
                      "peak_mib": round(peak_mib(cuda), 1),
                      "setup_peak_mib": round(setup_peak, 1),
                      "after_setup_mib": round(after_setup, 1),
                      "device": "cuda" if cuda else "cpu", "threads": torch.get_num_threads()}),
          flush=True)
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-100m")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mp", default=None, help="FSDP mixed-precision dtype (gpu: bfloat16)")
    parser.add_argument("--ac", action="store_true", help="activation checkpointing")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # set in the torchrun workers
    args = parser.parse_args()
    if args.mode:
        return worker(args)
    for mode in args.modes:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(MODES[mode]), __file__, "--mode", mode, "--preset", args.preset,
               "--steps", str(args.steps), "--warmup", str(args.warmup)] + \
            (["--mp", args.mp] if args.mp else []) + (["--ac"] if args.ac else [])
        print(f"[bench_parallel] {mode}: {MODES[mode]} process(es)", file=sys.stderr, flush=True)
        # glibc otherwise serves frees up to 32 MiB from its heap and keeps them, so peak RSS
        # would count freed buffers (FSDP's gathers) as live memory; mmap'd blocks are returned
        env = {"MALLOC_MMAP_THRESHOLD_": "65536", **os.environ}
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
        for line in sorted(lines, key=lambda x: json.loads(x)["rank"]):
            print(line, flush=True)


if __name__ == "__main__":
    main()
