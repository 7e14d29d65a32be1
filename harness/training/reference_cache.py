"""Reference log-probs computed once, without autograd, and cached on disk.

DPO needs log pi_ref(y) for every chosen and rejected response, which never change during
training. Computing them in one pre-pass lets the reference model leave memory before the first
training step, and the cache file (keyed by reference model, tokenizer settings and data) makes
every later run on the same data (a beta sweep, a resumed run) skip even the pre-pass.
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from harness.models import lora


def cache_key(model_cfg, tokenizer_settings: dict, uids: list[str],
              amp_dtype: str | None = None) -> str:
    """The identity of a reference table: the weights (model, archive file), the precision they
    run in (a LoRA run's reference is the policy with adapters off, so the policy's dtype; the
    autocast dtype), the tokenization and the examples."""
    archive = model_cfg.get("archive")
    archive_id = None
    if archive and os.path.exists(archive):
        st = os.stat(archive)
        archive_id = [os.path.abspath(archive), st.st_size, st.st_mtime_ns]
    ident = {"model": model_cfg.name_or_path, "archive": archive_id,
             "dtype": model_cfg.policy_dtype if lora.enabled(model_cfg) else
             model_cfg.reference_dtype, "amp_dtype": amp_dtype, **tokenizer_settings,
             "uids": hashlib.sha256("\n".join(sorted(uids)).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def compute_reference_logps(forward, reference_model, batches, total: int) -> dict:
    """{uid: (chosen_logp, rejected_logp)} over `batches`; forward(model, batch) returns two
    [batch] tensors."""
    table = {}
    # no_grad, not inference_mode: with LoRA the reference IS the policy, and FSDP would keep
    # parameter buffers gathered here as inference tensors that training cannot backprop through
    with torch.no_grad():
        for batch in tqdm(batches, total=total, desc="reference log-probs", leave=False):
            chosen, rejected = forward(reference_model, batch)
            for uid, c, r in zip(batch["uid"], chosen.tolist(), rejected.tolist()):
                table[uid] = (c, r)
    return table


def cache_path(cache_dir, key: str) -> Path:
    return Path(cache_dir) / "reference_logps" / f"{key}.pt"


def load_table(path: Path) -> dict:
    print(f"reference log-probs: cached at {path}")
    return torch.load(path, weights_only=True)


def save_table(path: Path, table: dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    torch.save(table, tmp)
    os.replace(tmp, path)
    print(f"reference log-probs: {len(table)} examples cached at {path}")


def load_or_compute(cache_dir, key: str, compute) -> dict:
    path = cache_path(cache_dir, key)
    if path.exists():
        return load_table(path)
    table = compute()
    save_table(path, table)
    return table


def lookup(table: dict, uids: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    values = torch.tensor([table[u] for u in uids], dtype=torch.float32, device=device)
    return values[:, 0], values[:, 1]
