"""Pieces the benchmarks share: the random-init models, the HH-like length mix, peak memory,
timing, and running each configuration in a subprocess of its own.

scripts/bench/bench.py (training steps and epochs) and scripts/bench/bench_generate.py (generation) import
this module; docs/performance.md holds their figures.
"""

import json
import math
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# the model of each preset: shape, device and precision (the workloads live in each script)
MODELS = {
    "cpu-tiny": dict(device="cpu", dtype="float32", hidden_size=64, intermediate_size=176,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=768, tie_word_embeddings=True),
    "cpu-100m": dict(device="cpu", dtype="float32", hidden_size=768, intermediate_size=2048,
                     num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=None,
                     vocab_size=32000, tie_word_embeddings=True),
    "h100-1b": dict(device="cuda", dtype="bfloat16", hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    vocab_size=32000, tie_word_embeddings=True),
}

WORDS = ("the a to and of you it is that in for this with my can what how your be have not "
         "are on do if but so about would like just they there one could some more when good "
         "time think help know want make need people really way also well here because any "
         "very then them which should much other get than been way thing find work feel sure "
         "great idea place try give take going question answer tell right different best "
         "music movie hotel book review park friend family weekend dinner recipe garden travel "
         "city summer winter coffee water computer phone program python data problem reason "
         "example important possible usually probably actually maybe definitely recommend "
         "understand explain describe suggest consider remember happen change start stop").split()


def log(msg: str):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def proc_status_kib(key: str) -> int | None:
    try:
        match = re.search(rf"^{key}:\s+(\d+)", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None


class Memory:
    """Peak memory: CUDA max_memory_allocated, else the process's peak RSS (VmHWM), which
    Linux lets us reset (clear_refs 5) so the training steps get a peak of their own."""

    def __init__(self, device: str):
        import torch
        self.torch, self.cuda = torch, device == "cuda"
        self.kind = "cuda_max_allocated" if self.cuda else "peak_rss"
        self.baseline = self.now()  # after imports, before any model is loaded
        self.setup_peak = None

    def now(self) -> float:
        if self.cuda:
            return self.torch.cuda.memory_allocated() / 2**20
        kib = proc_status_kib("VmRSS")
        return kib / 1024 if kib is not None else 0.0

    def peak(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / 2**20
        kib = proc_status_kib("VmHWM")
        if kib is None:
            import resource
            kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kib / 1024

    def reset_peak(self):
        """Start the peak afresh from the memory in use now."""
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass  # no reset here: the peak then includes what came before

    def start_steps(self):
        """Remember the peak of loading + reference pre-pass, then measure the steps alone."""
        self.setup_peak = self.peak()
        self.reset_peak()

    def summary(self) -> dict:
        steps = self.peak()
        whole = max(steps, self.setup_peak or 0.0)
        return {"memory_kind": self.kind, "memory_baseline_mib": round(self.baseline, 1),
                "peak_memory_mib": round(whole, 1),
                "peak_memory_delta_mib": round(whole - self.baseline, 1),
                "step_peak_memory_delta_mib": round(steps - self.baseline, 1)}


def synchronize(device: str):
    if device == "cuda":
        import torch
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are listed once


def build_model_dir(out: Path, preset: dict, tokenizer, seed: int = 0) -> int:
    """A random-init Llama-style model + tokenizer saved like any HF model dir; returns #params.
    A dir built here before with the same shape, dtype, tokenizer and seed is reused as it is
    (scripts/bench/gpu_check.py's steps share one 1.1B model dir). A CUDA preset initialises
    the weights on the GPU (seconds, where a 1.1B init on the CPU takes a minute)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "tie_word_embeddings")
    config = LlamaConfig(**{k: preset[k] for k in keys},
                         vocab_size=max(preset["vocab_size"], len(tokenizer)),
                         max_position_embeddings=max(preset["max_length"], 512),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    init_device = "cuda" if preset["device"] == "cuda" and torch.cuda.is_available() else "cpu"
    built = Path(out) / "bench_build.json"  # written last: a killed build leaves none
    key = {"config": {k: getattr(config, k) for k in (*keys, "vocab_size",
                                                       "max_position_embeddings")},
           "dtype": preset["dtype"], "seed": seed, "init_device": init_device,
           "tokenizer": [tokenizer.name_or_path, len(tokenizer)]}
    if built.exists() and json.loads(built.read_text())["key"] == key:
        return json.loads(built.read_text())["params"]
    torch.manual_seed(seed)
    with torch.device(init_device):
        model = LlamaForCausalLM(config).to(getattr(torch, preset["dtype"]))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.model_max_length = config.max_position_embeddings  # the model's, not the tiny one's
    tokenizer.save_pretrained(out)
    params = n_params(model)
    built.write_text(json.dumps({"key": key, "params": params}))
    del model
    if init_device == "cuda":
        torch.cuda.empty_cache()  # this process only orchestrates: hand the memory back
    return params


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _words(rng, n_tokens: int, cost: dict) -> str:
    """' w1 w2 ...' of about n_tokens tokens (byte-level BPE splits at spaces, so the token
    count of the text is the sum of its words')."""
    out, total = [], 0
    while total < n_tokens:
        word = rng.choice(WORDS)
        out.append(word)
        total += cost[word]
    return " " + " ".join(out)


def _trim(tokenizer, text: str, limit: int) -> str:
    while _n_tokens(tokenizer, text) > limit and " " in text.strip():
        text = text.rsplit(" ", 1)[0]
    return text


def in_splits(next_row, n_train: int) -> list[dict]:
    """Rows from next_row() until exactly n_train land in the train split (the loaders' hash
    split of the prompt) and at least one in the test split; extra train rows are dropped."""
    from harness.data.sources import in_test_split
    rows, n_in_train, n_in_test = [], 0, 0
    while n_in_train < n_train or n_in_test < 1:
        row = next_row()
        if in_test_split(row["prompt"]):
            n_in_test += 1
        elif n_in_train < n_train:
            n_in_train += 1
        else:
            continue
        rows.append(row)
    return rows


def make_rows(tokenizer, n_train: int, max_length: int, max_prompt_length: int, seed: int = 0):
    """HH-like {prompt, chosen, rejected} rows: 1-3 turn "\\n\\nHuman: ... \\n\\nAssistant:"
    prompts, responses starting with a space, lognormal (right-skewed) lengths capped so that
    prompt + response + EOS <= max_length (no truncation in either trainer). Exactly n_train
    rows land in the train split (the loaders' hash split) and at least one in test."""
    rng = random.Random(seed)
    cost = {w: _n_tokens(tokenizer, " " + w) for w in WORDS}

    def next_row():
        turns = rng.choices([1, 2, 3], weights=[0.6, 0.3, 0.1])[0]
        budget = min(max_prompt_length, max(8, int(rng.lognormvariate(
            math.log(0.18 * max_length), 0.7))))
        per_turn = max(2, budget // (2 * turns - 1) - 4)  # -4: the "Human:"/"Assistant:" tags
        while True:
            prompt = "".join(f"\n\nHuman:{_words(rng, per_turn, cost)}\n\nAssistant:" +
                             (_words(rng, per_turn, cost) if t < turns - 1 else "")
                             for t in range(turns))
            if _n_tokens(tokenizer, prompt) <= max_prompt_length or per_turn == 1:
                break
            per_turn = max(1, per_turn * 3 // 4)
        room = max_length - _n_tokens(tokenizer, prompt) - 1  # -1: the EOS both trainers append
        chosen, rejected = (_trim(tokenizer, _words(rng, min(room, max(1, int(
            rng.lognormvariate(math.log(0.2 * max_length), 0.8)))), cost), room)
            for _ in range(2))
        return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    return in_splits(next_row, n_train)


def make_fixed_rows(tokenizer, n_train: int, max_length: int, seed: int = 0):
    """Rows of one shape: every prompt max_length // 4 tokens, every response the rest, so that
    prompt + response + EOS is exactly max_length and every batch is [batch, max_length] (the
    fixed shapes of a compiled step). Made of words that are one token each."""
    rng = random.Random(seed)
    single = sorted({w for w in WORDS if _n_tokens(tokenizer, " " + w) == 1})
    if len(single) < 2:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has too few one-token words for "
                         "fixed-length rows")
    words = lambda n: "".join(" " + rng.choice(single) for _ in range(n))  # noqa: E731
    n_prompt = max_length // 4
    n_tags = _n_tokens(tokenizer, "\n\nHuman:\n\nAssistant:")

    def next_row():
        row = {"prompt": f"\n\nHuman:{words(n_prompt - n_tags)}\n\nAssistant:",
               "chosen": words(max_length - n_prompt - 1),
               "rejected": words(max_length - n_prompt - 1)}
        lengths = [_n_tokens(tokenizer, row[k]) for k in ("prompt", "chosen", "rejected")]
        if lengths != [n_prompt, max_length - n_prompt - 1, max_length - n_prompt - 1]:
            raise ValueError(f"fixed-length rows came out {lengths} tokens long with tokenizer "
                             f"{tokenizer.name_or_path!r} (it merges across words)")
        return row
    return in_splits(next_row, n_train)


def host_info() -> dict:
    cpu = platform.processor()
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "machine": platform.machine()}


def add_model_args(parser):
    parser.add_argument("--device", choices=["cpu", "cuda"], help="run the preset on this "
                        "device instead (e.g. check a GPU preset's code path on a CPU)")
    parser.add_argument("--model", choices=sorted(MODELS), help="build this preset's model "
                        "shape instead: --preset h100-1b --device cpu --model cpu-tiny runs the "
                        "GPU workload (bf16, its sizes) on the tiny model")


def apply_model_args(preset: dict, args) -> dict:
    """The preset with --model's shape and --device (its dtype stays)."""
    if args.model:
        preset.update({k: v for k, v in MODELS[args.model].items() if k not in ("device", "dtype")})
    if args.device:
        preset["device"] = args.device
    return preset


def setup(args, presets: dict, sizes: dict, prefix: str):
    """(preset, work dir, tokenizer) of a benchmark's main: the preset with --model / --device and
    the size flags given (sizes: argument name -> preset key), checked for its device."""
    preset = apply_model_args(dict(presets[args.preset]), args)
    for arg, key in sizes.items():
        if getattr(args, arg) is not None:
            preset[key] = getattr(args, arg)
    check_device(args.preset, preset["device"])
    from harness.models.modeling import load_tokenizer
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix=prefix))
    workdir.mkdir(parents=True, exist_ok=True)
    return preset, workdir, load_tokenizer(args.tokenizer)


def check_device(preset: str, device: str):
    """A CUDA preset on a machine without CUDA ends with a message, before any work."""
    if device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit(f"--preset {preset} runs on a CUDA GPU (bf16); none is visible here "
                             "(torch.cuda.is_available() is False). Use a cpu-* preset, or "
                             "--device cpu --model cpu-tiny to check its code path.")


def run_worker(script: str, spec: dict, workdir: Path, label: str) -> dict:
    """Run `script --worker SPEC` in a fresh process (its peak memory is its own); the worker
    writes its result to spec["result"]. Returns the result with the load average around it,
    or {"error": ...}."""
    tmp = Path(tempfile.mkdtemp(prefix=label.replace(" ", "_") + "_", dir=workdir))
    spec = dict(spec, tmp=str(tmp), result=str(tmp / "result.json"))
    load = os.getloadavg()[0]
    log(f"{label}: running (load average {load:.2f})")
    if load > 0.5 * (os.cpu_count() or 1) and spec["device"] == "cpu":
        log("warning: other processes are using the CPUs; timings will be noisy")
    start = time.time()
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)],
                          stdout=sys.stderr, stderr=sys.stderr, cwd=REPO)
    if proc.returncode or not Path(spec["result"]).exists():
        return {"error": f"worker exited with code {proc.returncode} (its log is on stderr)"}
    result = json.loads(Path(spec["result"]).read_text())
    result["load_average"] = [round(load, 2), round(os.getloadavg()[0], 2)]  # before, after
    result["wall_with_startup_s"] = round(time.time() - start, 2)
    return result


def emit(line: dict, out: str | None):
    """One JSON line to stdout, and appended to `out` when given."""
    text = json.dumps(line)
    print(text, flush=True)
    if out:
        with open(out, "a") as f:
            f.write(text + "\n")


def ratio(a, b):
    return round(a / b, 3) if a is not None and b else None
