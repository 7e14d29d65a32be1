"""LoRA adapters (peft) for any loss: `model.lora.r=16 model.lora.alpha=32 ...`.

The policy becomes a peft model whose base weights are frozen. For DPO the reference model is the
same object with its adapters switched off (`disable_adapter()`), so no second copy of the
weights is ever in memory. Checkpoints hold the adapters in peft's own format (`adapter/`,
loadable with `PeftModel.from_pretrained(base, dir)`) and a reference-compatible `policy.pt`
with the adapters merged into the base weights, so `model.archive=.../policy.pt` and the
Hugging Face export give a plain model.
"""

from contextlib import nullcontext


def enabled(model_cfg) -> bool:
    lora = model_cfg.get("lora")
    return bool(lora and lora.get("r"))


def apply_lora(model, lora_cfg, trained_head: str | None = None):
    """Wrap `model` in a peft LoRA model: only the adapters train.

    trained_head: for a model that is not a causal LM (PPO's critic, a reward model), the name of
    a module that trains in full beside the adapters (peft's modules_to_save: a trainable copy,
    the original kept), so that with adapters disabled the model is exactly the one given."""
    from peft import LoraConfig, get_peft_model
    if lora_cfg.r <= 0:
        raise ValueError(f"model.lora.r={lora_cfg.r} must be a positive rank (or null for no LoRA)")
    targets = list(lora_cfg.target_modules) if lora_cfg.target_modules else None
    config = LoraConfig(r=int(lora_cfg.r), lora_alpha=float(lora_cfg.alpha),
                        lora_dropout=float(lora_cfg.dropout), target_modules=targets,
                        task_type=None if trained_head else "CAUSAL_LM",
                        modules_to_save=[trained_head] if trained_head else None)
    try:
        model = get_peft_model(model, config)
    except ValueError as err:  # e.g. a target module name that is not in the model
        raise ValueError(f"model.lora.target_modules={targets}: {err}") from err
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"LoRA: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)")
    return model


def is_lora(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def causal_lm(model):
    """The transformers model inside a peft wrapper (LoRA layers in place), or the model itself."""
    return model.get_base_model() if is_lora(model) else model


def adapters_disabled(model):
    """Context in which a LoRA model computes as its frozen base model (the DPO and PPO reference;
    PPO's reward model is its LoRA critic with adapters disabled); for any other model, nothing."""
    return model.disable_adapter() if is_lora(model) else nullcontext()


def merged_state(state: dict, lora_cfg) -> dict:
    """A peft model's full state dict -> the plain model's state dict with W + (alpha/r) B A.

    Works on a gathered (full) state dict, so it needs neither the live model nor its shards."""
    scale = float(lora_cfg.alpha) / int(lora_cfg.r)
    prefix = "base_model.model."
    out = {}
    for key, value in state.items():
        if "lora_" in key:
            continue
        name = key[len(prefix):] if key.startswith(prefix) else key
        if ".base_layer." in name:
            stem = key.rsplit(".base_layer.", 1)[0]
            param = name.rsplit(".", 1)[1]
            name = name.replace(".base_layer.", ".")
            a, b = (state.get(f"{stem}.lora_{x}.default.weight") for x in ("A", "B"))
            if param == "weight" and a is not None:
                delta = (b.float() @ a.float()) * scale
                delta = delta if delta.shape == value.shape else delta.T  # Conv1D (GPT-2) layout
                value = (value.float() + delta).to(value.dtype)
        out[name] = value
    return out


def save_adapter(model, state: dict, out_dir):
    """peft's adapter format (adapter_config.json + adapter_model.safetensors) from a full state."""
    from peft import get_peft_model_state_dict
    model.peft_config["default"].save_pretrained(str(out_dir))
    from safetensors.torch import save_file
    adapters = get_peft_model_state_dict(model, state_dict=state)
    save_file({k: v.contiguous() for k, v in adapters.items()},
              str(out_dir / "adapter_model.safetensors"))


def load_adapter(model, adapter_dir):
    """Put a checkpoint's adapter/ weights into the live peft model (the base stays as loaded)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    result = set_peft_model_state_dict(model, load_file(str(adapter_dir / "adapter_model.safetensors")))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"{adapter_dir} does not match model.lora: missing {missing[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")
