"""Model and tokenizer loading, and per-sequence log-probs without full [tokens, vocab] logits."""

import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from harness.checkpoints import resolve_checkpoint, resolve_path, run_config
from harness.data.chat import apply_option
from harness.data.validate import offline_unless_reachable
from harness.models.packaged import SCHEME, ensure_converted, is_packaged


def _looks_local(path: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else is meant as a local directory."""
    return path.startswith((".", "/", "~")) or path.count("/") > 1


def check_model_source(name_or_path: str, key: str = "model.name_or_path") -> str:
    """The dir or hub id to load from; fails early, naming the key, when a local model dir does
    not exist. `packaged:NAME` (harness/models/packaged.py) is converted on first use."""
    if is_packaged(name_or_path):
        return str(ensure_converted(name_or_path[len(SCHEME):]))
    path = resolve_path(name_or_path)
    if not os.path.exists(path) and _looks_local(path):
        raise FileNotFoundError(
            f"{key}={name_or_path!r}: no such model directory. Point {key} at a local "
            "Hugging Face model dir (config.json + weights) or a hub id like 'gpt2'.")
    return path


@contextmanager
def hub_errors(path: str, key: str = "model.name_or_path"):
    """Around a from_pretrained of `path`: a hub id that cannot be fetched fails in one line that
    names the key and the offline route (when the hub is unreachable, only the local cache is
    tried, so this takes seconds, not minutes of retries)."""
    if os.path.exists(path):
        yield
        return
    offline_unless_reachable()
    try:
        yield
    except OSError as err:
        reason = " ".join(str(err).split())[:200]
        raise ValueError(f"{key}={path!r}: could not load it from the Hugging Face hub ({reason})."
                         f" Offline: download it where the hub is reachable (huggingface-cli "
                         f"download {path} --local-dir DIR) and set {key}=DIR") from None


def load_tokenizer(name_or_path: str, chat_template: str = "auto",
                   key: str = "model.tokenizer_name_or_path"):
    """The tokenizer, with the chat template `chat_template` asks for (harness/data/chat.py:
    auto = its own if it has one, none = the reference dialogue format, or a Jinja file);
    `key` names the option it came from in errors."""
    from transformers import AutoTokenizer
    path = check_model_source(name_or_path, key)
    with hub_errors(path, key):
        tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:  # reference behaviour: pad with EOS when no pad exists
        tokenizer.pad_token_id = tokenizer.eos_token_id
    return apply_option(tokenizer, chat_template, name_or_path)


def run_chat_template(archive: str | None) -> str:
    """The chat_template option of the run that wrote `archive` (auto without one)."""
    cfg = run_config(archive) if archive else None
    return (cfg.get("chat_template") if cfg is not None else None) or "auto"


def load_model(name_or_path: str, dtype: str, archive: str | None = None, device_map=None,
               meta: bool = False):
    """A causal LM from a hub id or local dir; `archive` (a policy.pt) replaces its weights.
    device_map: where the weights go (transformers/accelerate syntax); None keeps them on CPU.
    meta=True: the architecture only, no weights in memory (ranks that get theirs from rank 0)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    path = check_model_source(name_or_path)
    if meta:
        with hub_errors(path), torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path),
                                                    dtype=getattr(torch, dtype))
    extra = {"device_map": device_map} if device_map is not None else {}
    with hub_errors(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype),
                                                     low_cpu_mem_usage=True, **extra)
    if archive:
        load_archive(model, archive)
    return model


def read_archive(archive: str, mmap: bool = False) -> dict:
    """A reference-format policy.pt ({"state": ...}); a missing, truncated or foreign file is a
    clear error naming it, never a pickle traceback."""
    if not os.path.exists(archive):
        raise FileNotFoundError(f"model.archive={archive!r} does not exist")
    if os.path.isdir(archive):
        raise IsADirectoryError(f"model.archive={archive!r} is a directory: give its policy.pt, "
                                "or pass the directory to train.py, which finds LATEST/policy.pt")
    try:
        ckpt = torch.load(archive, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as err:  # noqa: BLE001 (zip, pickle and unpickling errors all mean the same)
        reason = "not a torch.save zip file" if "_use_new_zipfile_serialization" in str(err) \
            else " ".join(str(err).split())[:160]
        raise ValueError(f"model.archive={archive!r} is not a readable policy.pt (truncated, or "
                         f"not a torch checkpoint: {reason})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state"), dict):
        raise ValueError(f"model.archive={archive!r} is not a policy.pt: it has no 'state' dict "
                         "(train.py writes {step_idx, state, metrics})")
    return ckpt


def check_archive(archive: str):
    """Fail before any model loads on an archive that cannot be read (mmap: no weights read)."""
    read_archive(archive, mmap=True)


def load_archive(model, archive: str) -> int:
    """Load `state` of a reference-format policy.pt into `model`; returns its step_idx. Weights
    that are not finite (a diverged run's) are refused."""
    ckpt = read_archive(archive)
    bad = [k for k, v in ckpt["state"].items()
           if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"model.archive={archive!r} holds NaN or inf weights ({len(bad)} tensors, "
                         f"e.g. {bad[0]}): it comes from a diverged run; use an earlier checkpoint")
    missing, unexpected = model.load_state_dict(ckpt["state"], strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} \
        if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"model.archive={archive!r} does not match the model "
                         f"{type(model).__name__}: missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    print(f"loaded {archive} (step {ckpt.get('step_idx')})")
    return ckpt.get("step_idx", 0)


def check_tokenizer_fits(model, tokenizer, where: str = "model"):
    """A tokenizer with ids beyond the model's embedding table belongs to another model."""
    n_embed = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > n_embed:
        raise ValueError(f"{where}: the tokenizer has {len(tokenizer)} tokens but the model embeds "
                         f"only {n_embed}; they do not belong together (pass the model's own "
                         "tokenizer)")


def load_checkpoint(path: str, base_model: str | None = None, tokenizer: str | None = None,
                    dtype: str = "float32", device: str | torch.device = "cpu"):
    """(model in eval mode on `device`, tokenizer) for any checkpoint `resolve_checkpoint` takes."""
    ref = resolve_checkpoint(path, base_model, tokenizer)
    model = load_model(ref.model, dtype)
    if ref.archive:
        try:
            load_archive(model, ref.archive)
        except RuntimeError as e:  # size mismatches: load_state_dict raises even when not strict
            raise ValueError(f"checkpoint {ref.archive!r} does not fit the base model "
                             f"{ref.model!r}: {str(e).splitlines()[-1].strip()} (name the "
                             "model it was trained from)") from e
    # the prompts are rendered as the checkpoint was trained: its run's chat_template
    tok = load_tokenizer(ref.tokenizer, run_chat_template(ref.archive))
    check_tokenizer_fits(model, tok, f"checkpoint {path!r} with tokenizer {ref.tokenizer!r}")
    return model.to(device).eval(), tok


def _chunk_logps(hidden, weight, bias, targets):
    """log p(target) for rows of hidden states; logits exist only for this chunk, in fp32."""
    logits = F.linear(hidden, weight, bias).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - logits.logsumexp(-1)


def uses_plain_head(model) -> bool:
    """Models whose logits are exactly lm_head(last hidden state); others use their own forward."""
    cfg = model.config
    return not (getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None)
                or getattr(cfg, "logits_scaling", None))


def head_logps(model, hidden_rows, targets, chunk_size: int, out_device) -> torch.Tensor:
    """log p(target) [n] float32 for rows of hidden states that predict each target.

    Only these rows go through the output head, `chunk_size` at a time, each chunk recomputed in
    backward (activation checkpointing), so peak memory holds one fp32 [chunk, vocab] block
    instead of [batch, seq, vocab]: 128k-vocabulary models fit."""
    head = model.get_output_embeddings()
    # with a layer split over GPUs (device_map) the last block and the head may sit elsewhere
    hidden_rows, targets = hidden_rows.to(head.weight.device), targets.to(head.weight.device)
    pieces = []
    for start in range(0, hidden_rows.shape[0], chunk_size):
        args = (hidden_rows[start:start + chunk_size], head.weight, head.bias,
                targets[start:start + chunk_size])
        pieces.append(checkpoint(_chunk_logps, *args, use_reentrant=False)
                      if torch.is_grad_enabled() else _chunk_logps(*args))
    row_logps = torch.cat(pieces) if pieces else hidden_rows.new_zeros(0, dtype=torch.float32)
    return row_logps.to(out_device)


def _scored_logps(model, hidden_rows, targets, sequence, n_sequences, chunk_size):
    """Sum log p(target) per output sequence (`sequence`: the sequence of each row)."""
    row_logps = head_logps(model, hidden_rows, targets, chunk_size, sequence.device)
    logps = torch.zeros(n_sequences, dtype=torch.float32, device=sequence.device)
    counts = torch.zeros(n_sequences, dtype=torch.long, device=sequence.device)
    return (logps.index_add(0, sequence, row_logps),
            counts.index_add(0, sequence, torch.ones_like(sequence)))


def labelled_token_logps(model, input_ids, attention_mask, labels, chunk_size: int = 4096):
    """log p of every labelled token (labels != -100), row by row: ([n] float32, row of each).
    Softcapped / scaled heads take their own forward, which gives the true logits."""
    targets = labels[:, 1:]
    mask = targets != -100
    rows = mask.nonzero()[:, 0]
    if not uses_plain_head(model):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
        return logits[mask].log_softmax(-1).gather(-1, targets[mask][:, None])[:, 0], rows
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return head_logps(model, hidden[:, :-1][mask.to(hidden.device)], targets[mask], chunk_size,
                      rows.device), rows


def sequence_logps(model, input_ids, attention_mask, labels, chunk_size: int = 4096):
    """Summed log-probs of the labelled tokens of each sequence.

    Args: input_ids, attention_mask, labels: [batch, seq]; labels are -100 where not scored
        (prompt, padding). Token t+1 is predicted from position t.
    Returns: (logps [batch] float32, n_tokens [batch]).
    """
    if not uses_plain_head(model):
        return plain_sequence_logps(model, input_ids, attention_mask, labels)
    targets = labels[:, 1:]
    mask = targets != -100
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return _scored_logps(model, hidden[:, :-1][mask.to(hidden.device)], targets[mask],
                         mask.nonzero()[:, 0], input_ids.shape[0], chunk_size)


def packed_sequence_logps(model, packed, chunk_size: int = 4096):
    """sequence_logps for a harness.data.packing.PackedBatch (padding-free rows, shared prompts):
    the same (logps, n_tokens), numbered as the padded path numbers its sequences."""
    from harness.data.packing import attention_mask
    mask = attention_mask(packed, model.config._attn_implementation, model.dtype)
    kwargs = dict(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids)
    if not uses_plain_head(model):
        logits = model(**kwargs).logits.float().flatten(0, 1)[packed.source]
        token_logps = logits.log_softmax(-1).gather(-1, packed.target[:, None])[:, 0]
        zeros = torch.zeros(packed.n_sequences, device=logits.device)
        return (zeros.index_add(0, packed.sequence, token_logps),
                zeros.long().index_add(0, packed.sequence, torch.ones_like(packed.sequence)))
    hidden = model.base_model(**kwargs).last_hidden_state.flatten(0, 1)
    return _scored_logps(model, hidden[packed.source], packed.target, packed.sequence,
                         packed.n_sequences, chunk_size)


def plain_sequence_logps(model, input_ids, attention_mask, labels):
    """The straightforward version (full logits), kept as the reference for equivalence tests."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    targets = labels[:, 1:]
    mask = targets != -100
    token_logps = logits.log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    return (token_logps * mask).sum(-1), mask.sum(-1)


def save_hf_model(config, state: dict, out_dir):
    """A Hugging Face model dir (save_pretrained) from a config and a full state dict, e.g. one
    gathered from shards or with LoRA adapters merged: the weights are built on the meta device
    and take the given tensors in place, so no second copy of the model is made."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise ValueError(f"state does not match {type(model).__name__}: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.save_pretrained(out_dir, safe_serialization=True)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-pad position of each row, for left or right padding: [B, L] -> [B]."""
    length = attention_mask.shape[1]
    return length - 1 - attention_mask.flip(-1).long().argmax(-1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so a left-padded row sees the same positions as an
    unpadded one (what generate() uses); padding gets position 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
