"""Training-step benchmark: our BasicTrainer step against TRL's DPOTrainer, same weights and data.

    python scripts/bench.py --preset cpu-tiny                  # about a minute on 2 CPU cores
    python scripts/bench.py --preset cpu-100m --out bench.jsonl
    python scripts/bench.py --preset h100-1b                   # needs a CUDA GPU
    python scripts/bench.py --preset cpu-tiny --only ours --steps 2 --warmup 1

One JSON line per configuration goes to stdout (and is appended to --out); progress to stderr.
Configurations: SFT (a bare HF step as the peer; ours; ours packed); DPO with the reference
model in memory (TRL, ours); DPO with reference log-probs precomputed in a pre-pass (TRL, ours;
ours with packing + prefix sharing). Every configuration runs in a fresh
subprocess, so its peak memory is its own, over the same random-init Llama-style model (saved
with save_pretrained and loaded through our config, `model=blank_model`, as train.py does) and
the same generated HH-like preference file, visited in the same order with the same batches.
TRL's steps are timed by a TrainerCallback (on_step_begin -> on_step_end), ours around
`BasicTrainer.train_step`: both spans are forward + backward + clip + optimizer step, without
data loading. docs/performance.md explains the fields and holds measured figures.
"""

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import platform
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

_COMMON = dict(num_key_value_heads=None, tie_word_embeddings=True, lr=1e-6, beta=0.1)
PRESETS = {
    "cpu-tiny": dict(_COMMON, device="cpu", dtype="float32", hidden_size=64, intermediate_size=176,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=768, batch_size=4, max_length=128, steps=10, warmup=2),
    "cpu-100m": dict(_COMMON, device="cpu", dtype="float32", hidden_size=768,
                     intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                     vocab_size=32000, batch_size=2, max_length=256, steps=3, warmup=1),
    "h100-1b": dict(_COMMON, device="cuda", dtype="bfloat16", hidden_size=2048,
                    intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=32000, batch_size=8, max_length=1024,
                    steps=20, warmup=3),
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
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0}  # dense
WORDS = ("the a to and of you it is that in for this with my can what how your be have not "
         "are on do if but so about would like just they there one could some more when good "
         "time think help know want make need people really way also well here because any "
         "very then them which should much other get than been way thing find work feel sure "
         "great idea place try give take going question answer tell right different best "
         "music movie hotel book review park friend family weekend dinner recipe garden travel "
         "city summer winter coffee water computer phone program python data problem reason "
         "example important possible usually probably actually maybe definitely recommend "
         "understand explain describe suggest consider remember happen change start stop").split()


# ---------------------------------------------------------------------------- shared pieces
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

    def start_steps(self):
        """Remember the peak of loading + reference pre-pass, then measure the steps alone."""
        self.setup_peak = self.peak()
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass  # no reset here: the step peak then includes loading

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


# ---------------------------------------------------------------------------- assets
def build_model_dir(out: Path, preset: dict, tokenizer, seed: int = 0) -> int:
    """A random-init Llama-style model + tokenizer saved like any HF model dir; returns #params."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "tie_word_embeddings")
    config = LlamaConfig(**{k: preset[k] for k in keys},
                         vocab_size=max(preset["vocab_size"], len(tokenizer)),
                         max_position_embeddings=max(preset["max_length"], 512),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(getattr(torch, preset["dtype"]))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return n_params(model)


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


def make_rows(tokenizer, n_train: int, max_length: int, max_prompt_length: int, seed: int = 0):
    """HH-like {prompt, chosen, rejected} rows: 1-3 turn "\\n\\nHuman: ... \\n\\nAssistant:"
    prompts, responses starting with a space, lognormal (right-skewed) lengths capped so that
    prompt + response + EOS <= max_length (no truncation in either trainer). Exactly n_train
    rows land in the train split (the loaders' hash split) and at least one in test."""
    from harness.loaders import in_test_split
    rng = random.Random(seed)
    cost = {w: _n_tokens(tokenizer, " " + w) for w in WORDS}
    rows, n_in_train, n_in_test = [], 0, 0
    while n_in_train < n_train or n_in_test < 1:
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
        responses = [_trim(tokenizer, _words(rng, min(room, max(1, int(
            rng.lognormvariate(math.log(0.2 * max_length), 0.8)))), cost), room) for _ in range(2)]
        if in_test_split(prompt):
            n_in_test += 1
        elif n_in_train < n_train:
            n_in_train += 1
        else:
            continue
        rows.append({"prompt": prompt, "chosen": responses[0], "rejected": responses[1]})
    return rows


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
        *spec.get("levers", ()), *(["compile=true"] if spec.get("compile") else [])]
    if spec["loss"] == "dpo":
        overrides.append(f"loss.beta={spec['beta']}")
    with initialize_config_dir(config_dir=str(REPO / "config"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    train.check_config(cfg)
    return cfg


def run_ours(spec: dict) -> dict:
    import torch
    import train
    from harness.modeling import load_model, load_tokenizer
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
    packed = trainer.packed(batch)
    if packed is not None:
        return packed.input_ids.numel()
    masks = [k for k in ("chosen_attention_mask", "rejected_attention_mask") if k in batch]
    return len(masks) * len(batch["uid"]) * max(batch[k].shape[1] for k in masks)


def our_order_rows(spec: dict, tokenizer) -> list[dict]:
    """Our train examples in our epoch-0 order, so TRL's step i sees exactly our batch i."""
    from preference_datasets import BatchIterator, load_examples
    examples = load_examples([f"json:{spec['data']}"], "train", sft_mode=False, seed=0)
    order = BatchIterator(examples, tokenizer, batch_size=spec["batch_size"], shuffle=True, seed=0,
                          max_length=spec["max_length"], max_prompt_length=spec["max_length"] // 2
                          ).epoch_order(0)
    return [{"prompt": examples[i].prompt, "chosen": examples[i].chosen,
             "rejected": examples[i].rejected} for i in order]


def trl_classes(mem: Memory, device: str):
    """A step timer callback, and DPOTrainer reading data in order and timing its pre-pass."""
    import trl
    from torch.utils.data import SequentialSampler
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.started = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            if self.started is None:
                mem.start_steps()
            synchronize(device)
            self.started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            synchronize(device)
            self.times.append(time.perf_counter() - self.started)

    class InOrderDPOTrainer(trl.DPOTrainer):
        masks, prepass_s = [], 0.0  # class-level: the pre-pass runs inside __init__

        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(self.train_dataset if train_dataset is None else train_dataset)

        def _precompute_ref_logps(self, *args, **kwargs):
            start = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            InOrderDPOTrainer.prepass_s += time.perf_counter() - start
            return out

        def training_step(self, model, inputs, *args, **kwargs):
            self.masks.append(inputs["attention_mask"].detach())
            return super().training_step(model, inputs, *args, **kwargs)

    return StepTimer, InOrderDPOTrainer


def run_trl(spec: dict) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from harness.modeling import load_model, load_tokenizer
    device, bs = spec["device"], spec["batch_size"]
    mem = Memory(device)
    tokenizer = load_tokenizer(spec["model_dir"])
    policy = load_model(spec["model_dir"], spec["dtype"]).to(device)
    rows = our_order_rows(spec, tokenizer)
    precompute = spec["reference"] == "precomputed"
    # DPOConfig defaults to bf16 autocast and gradient checkpointing: off, to match ours
    args = trl.DPOConfig(
        output_dir=os.path.join(spec["tmp"], "trl"), per_device_train_batch_size=bs,
        max_length=spec["max_length"], learning_rate=spec["lr"], beta=spec["beta"],
        max_steps=len(rows) // bs, max_grad_norm=10.0, gradient_checkpointing=False,
        bf16=spec["dtype"] == "bfloat16", fp16=False, use_cpu=device == "cpu",
        precompute_ref_log_probs=precompute, precompute_ref_batch_size=bs, report_to=[],
        eval_strategy="no", save_strategy="no", logging_steps=10**6, disable_tqdm=True,
        dataloader_num_workers=0, seed=0)
    optimizer = getattr(torch.optim, spec["optimizer"])(policy.parameters(), lr=spec["lr"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    StepTimer, Trainer = trl_classes(mem, device)
    timer = StepTimer()
    trainer = Trainer(model=policy, args=args, train_dataset=Dataset.from_list(rows),
                      processing_class=tokenizer, callbacks=[timer],
                      optimizers=(optimizer, scheduler))
    trainer.train()
    return dict(times=timer.times, tokens=[int(m.sum()) for m in Trainer.masks],
                padded=[m.numel() for m in Trainer.masks], prepass_s=Trainer.prepass_s,
                prepass_pairs=len(rows) if precompute else 0, params=n_params(policy), mem=mem,
                examples=[m.shape[0] // 2 for m in Trainer.masks],
                versions={"torch": torch.__version__, "trl": trl.__version__})


def run_bare(spec: dict) -> dict:
    """The peer for SFT: a bare training step (HF forward with labels, backward, fused AdamW
    where the device has it) over exactly our SFT batches, nothing else."""
    import torch
    from harness.modeling import load_model, load_tokenizer
    from preference_datasets import BatchIterator, load_examples
    device = spec["device"]
    mem = Memory(device)
    tokenizer = load_tokenizer(spec["model_dir"])
    policy = load_model(spec["model_dir"], spec["dtype"]).to(device).train()
    examples = load_examples([f"json:{spec['data']}"], "train", sft_mode=True, seed=0)
    batches = list(BatchIterator(examples, tokenizer, batch_size=spec["batch_size"], shuffle=True,
                                 seed=0, max_length=spec["max_length"],
                                 max_prompt_length=spec["max_length"] // 2).epoch_batches(0))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=spec["lr"], fused=True)

    def step(batch):
        ids, mask, labels = (batch[f"chosen_{k}"].to(device) for k in
                             ("input_ids", "attention_mask", "labels"))
        policy(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    mem.start_steps()
    times = [timed(lambda b=b: step(b), device) for b in batches]
    return dict(times=times, tokens=[int(b["chosen_attention_mask"].sum()) for b in batches],
                padded=[b["chosen_input_ids"].numel() for b in batches], prepass_s=0.0,
                prepass_pairs=0, params=n_params(policy), mem=mem,
                examples=[len(b["uid"]) for b in batches], versions={"torch": torch.__version__})


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
        name = torch.cuda.get_device_name()
        peak = spec.get("peak_tflops") or next(
            (v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        if peak:  # training FLOPs only (6 N T); a reference forward in the step is not counted
            out["mfu"] = 6 * raw["params"] * out["tokens_per_s"] / (peak * 1e12)
        out["gpu"] = name
    return out


def worker(spec: dict):
    import torch
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    if spec["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("this preset needs a CUDA GPU, and torch.cuda.is_available() is False")
    raw = {"trl": run_trl, "bare": run_bare, "ours": run_ours}[spec["impl"]](spec)
    result = summarize(spec, raw)
    Path(spec["result"]).write_text(json.dumps(result))


# ---------------------------------------------------------------------------- driver
def host_info() -> dict:
    cpu = platform.processor()
    try:
        cpu = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    return {"cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "machine": platform.machine()}


def ratios(ours: dict, trl: dict) -> dict:
    div = lambda a, b: round(a / b, 3) if a is not None and b else None  # noqa: E731
    return {"step_time_ratio": div(ours["step_time_s"], trl["step_time_s"]),
            "tokens_per_s_ratio": div(ours["tokens_per_s"], trl["tokens_per_s"]),
            "peak_memory_delta_ratio": div(ours["peak_memory_delta_mib"],
                                           trl["peak_memory_delta_mib"]),
            "e2e_s_ratio": div(ours["e2e_s"], trl["e2e_s"])}


def run_config(base: dict, config, impl, loss, reference, levers, workdir: Path) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"{impl}_{config}_", dir=workdir))
    spec = dict(base, impl=impl, loss=loss, reference=reference, levers=list(levers),
                tmp=str(tmp), result=str(tmp / "result.json"))
    load = os.getloadavg()[0]
    log(f"{impl} {config}: running (load average {load:.2f})")
    if load > 0.5 * (os.cpu_count() or 1) and base["device"] == "cpu":
        log("warning: other processes are using the CPUs; timings will be noisy")
    start = time.time()
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)],
                          stdout=sys.stderr, stderr=sys.stderr, cwd=REPO)
    if proc.returncode or not Path(spec["result"]).exists():
        return {"error": f"worker exited with code {proc.returncode} (its log is on stderr)"}
    result = json.loads(Path(spec["result"]).read_text())
    result["load_average"] = [round(load, 2), round(os.getloadavg()[0], 2)]  # before, after
    log(f"{impl} {config}: median step {result['step_time_s']:.4f}s, "
        f"{result['tokens_per_s']:.0f} tok/s, peak +{result['peak_memory_delta_mib']:.0f} MiB "
        f"({time.time() - start:.0f}s with start-up)")
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    p.add_argument("--steps", type=int, help="timed steps (after warmup)")
    p.add_argument("--warmup", type=int, help="untimed steps first")
    p.add_argument("--batch-size", type=int, help="pairs (DPO) or examples (SFT) per step")
    p.add_argument("--max-length", type=int, help="prompt + response tokens at most")
    p.add_argument("--only", nargs="+", choices=["ours", "trl", "bare"],
                   help="run only these implementations")
    p.add_argument("--optimizer", default="RMSprop", help="torch.optim class for both trainers")
    p.add_argument("--configs", nargs="+", help="run only these configurations "
                   f"({', '.join(dict.fromkeys(c[0] for c in CONFIGS))})")
    p.add_argument("--compile", action="store_true", help="our runs with compile=true")
    p.add_argument("--threads", type=int, help="torch threads per worker (default: torch's)")
    p.add_argument("--tokenizer", default="assets/tiny_model", help="tokenizer dir")
    p.add_argument("--peak-tflops", type=float, help="accelerator peak for MFU (default: by name)")
    p.add_argument("--out", help="also append the JSON lines to this file")
    p.add_argument("--workdir", help="keep model, data and run dirs here (default: a temp dir)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker(json.loads(args.worker))
    preset = dict(PRESETS[args.preset])
    for key in ("steps", "warmup", "batch_size", "max_length"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
    if preset["device"] == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise SystemExit(f"--preset {args.preset} runs on a CUDA GPU (bf16); none is visible "
                             "here (torch.cuda.is_available() is False). Use a cpu-* preset.")
    from harness.modeling import load_tokenizer
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(args.tokenizer)
    n_steps = preset["warmup"] + preset["steps"]
    log(f"preset {args.preset}: building the model and {n_steps * preset['batch_size']} "
        f"train rows in {workdir}")
    params = build_model_dir(workdir / "model", preset, tokenizer)
    rows = make_rows(tokenizer, n_steps * preset["batch_size"], preset["max_length"],
                     preset["max_length"] // 2)
    data = workdir / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    log(f"model: {params / 1e6:.1f}M params ({preset['dtype']}, {preset['device']})")
    base = dict(preset, model_dir=str(workdir / "model"), data=str(data),
                optimizer=args.optimizer, peak_tflops=args.peak_tflops, threads=args.threads,
                compile=args.compile)
    header = dict(preset=args.preset, device=preset["device"], dtype=preset["dtype"],
                  batch_size=preset["batch_size"], max_length=preset["max_length"],
                  steps=preset["steps"], warmup=preset["warmup"], optimizer=args.optimizer,
                  date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                  host=host_info())
    have_trl = importlib.util.find_spec("trl") is not None
    done, failed = {}, False
    for config, impl, loss, reference, levers, compare in CONFIGS:
        if (args.only and impl not in args.only) or (args.configs and config not in args.configs):
            continue
        line = dict(header, config=config, impl=impl, loss=loss, reference=reference,
                    levers=list(levers) + (["compile=true"] if args.compile else []))
        if impl == "trl" and not have_trl:
            line["skipped"] = "trl is not installed (pip install trl)"
        else:
            result = run_config(base, config, impl, loss, reference, levers, workdir)
            line.update(result)
            failed |= "error" in result
            peer = "bare" if loss == "sft" else "trl"  # SFT's peer is the bare step
            for peer_config in compare:
                other = done.get((peer_config, peer))
                if "error" not in result and other and "step_time_s" in other:
                    key = f"vs_{peer}" + ("" if peer_config == config else f"_{peer_config}")
                    line[key] = ratios(line, other)
        done[(config, impl)] = line
        text = json.dumps(line)
        print(text, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(text + "\n")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
