"""Parallelism applied to a finished model, in torchtitan's order: apply_tp -> apply_ac -> apply_fsdp.

The model code and the loss code know nothing of this module. FSDP2 (`fully_shard`) shards every
transformer block (the unit named by `model.block_name`, or the model's `_no_split_modules`) and
then the root (embeddings, final norm, output head) over the data-parallel mesh dimension; tensor
parallelism follows the model's own transformers plan (`config.base_model_tp_plan`) through
DTensor's `parallelize_module` over the tensor mesh dimension.
"""

import fnmatch
import math
from types import MethodType

import torch
from torch import nn

from harness.parallel import distributed
from harness.models.lora import causal_lm, is_lora


# ---- which modules are transformer blocks -------------------------------------------------------
def block_classes_found(model: nn.Module) -> list[str]:
    """Class names of modules that sit in a ModuleList: the repeated blocks of any architecture."""
    names = set()
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            names.update(type(child).__name__ for child in module)
    return sorted(names)


def find_blocks(model: nn.Module, block_name: str | None) -> list[nn.Module]:
    """All modules of class `block_name` (default: the model's `_no_split_modules`); a name that
    is not in the model is an error listing the block classes that are."""
    names = [block_name] if block_name else list(getattr(causal_lm(model), "_no_split_modules",
                                                         None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"model.block_name={block_name!r}: no module of that class in "
                         f"{type(causal_lm(model)).__name__}; block classes found: "
                         f"{block_classes_found(model)} (set model.block_name to one of them)")
    return blocks


# ---- tensor parallelism -------------------------------------------------------------------------
def check_tp_degree(config, tp: int):
    """Attention heads (and key/value heads) must split evenly over the tensor-parallel ranks."""
    for key in ("num_attention_heads", "num_key_value_heads"):
        heads = getattr(config, key, None)
        if heads and heads % tp:
            divisors = [d for d in range(1, heads + 1) if heads % d == 0]
            raise ValueError(f"trainer.tp_size={tp} does not divide the model's {key}={heads}; "
                             f"use a tensor-parallel degree among {divisors}")


def tp_plan(model) -> dict[str, nn.Module]:
    """The model's own transformers TP plan as DTensor styles, keyed by module path patterns."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    hf = causal_lm(model)
    plan = getattr(hf.config, "base_model_tp_plan", None) or {}
    if not plan:
        raise ValueError(f"{type(hf).__name__} has no tensor-parallel plan "
                         "(config.base_model_tp_plan); use trainer=FSDPTrainer")
    unsupported = sorted({s for s in plan.values() if s not in styles})
    if unsupported:
        raise ValueError(f"{type(hf).__name__}'s TP plan uses styles {unsupported}; only "
                         f"{sorted(styles)} are supported here, use trainer=FSDPTrainer")
    prefix = hf.base_model_prefix
    return {f"{prefix}.{pattern}": styles[style]() for pattern, style in plan.items()}


def apply_tp(model: nn.Module, tp_mesh):
    """Shard the attention and MLP projections column-/row-wise over `tp_mesh`; everything else
    (embeddings, norms, output head) stays replicated, so the log-prob head is unchanged."""
    from torch.distributed.tensor.parallel import parallelize_module
    hf = causal_lm(model)
    check_tp_degree(hf.config, tp_mesh.size())
    plan = {}
    names = [name for name, _ in hf.named_modules()]
    for pattern, style in tp_plan(model).items():
        # parallelize_module matches one path level per pattern segment; expand `*` ourselves
        plan.update({name: style for name in names if fnmatch.fnmatchcase(name, pattern)})
    if not plan:
        raise ValueError(f"the TP plan of {type(hf).__name__} matched no module")
    parallelize_module(hf, tp_mesh, plan)
    return model


# ---- activation checkpointing -------------------------------------------------------------------
def apply_compile(model: nn.Module, block_name: str | None):
    """torch.compile each transformer block in place (torchtitan style): parameter names and the
    module tree stay as they are, FSDP2 then shards the compiled blocks, and varying sequence
    lengths recompile one small graph (dynamic shapes)."""
    for block in find_blocks(model, block_name):
        block.compile(dynamic=True)
    return model


def apply_ac(model: nn.Module):
    """Recompute each block's activations in backward (non-reentrant: works under FSDP2/DTensor)."""
    causal_lm(model).gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


# ---- FSDP2 --------------------------------------------------------------------------------------
def apply_fsdp(model: nn.Module, dp_mesh, block_name: str | None, mp_dtype: str | None = None,
               cpu_offload: bool = False):
    """fully_shard every block, then the root. Mixed precision computes in `mp_dtype` and reduces
    gradients in float32; CPU offload keeps sharded parameters and optimizer state on the CPU."""
    from torch.distributed.fsdp import (CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard,
                                        register_fsdp_forward_method)
    kwargs = {"mesh": dp_mesh}
    if mp_dtype:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=getattr(torch, mp_dtype),
                                                   reduce_dtype=torch.float32)
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    for block in find_blocks(model, block_name):
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    # The log-prob head reads the root's own parameters (embeddings, norm, output head) outside
    # model.forward, peft's generate bypasses it too, and a reward model's per-token head
    # (`values`, PPO's critic) is a method of its own: register them as forward methods so FSDP
    # gathers the root's parameters around them.
    model.call_logps = MethodType(lambda self, fn, *a: fn(causal_lm(self), *a), model)
    for method in ("call_logps", "generate", "values"):
        if hasattr(model, method):
            register_fsdp_forward_method(model, method)
    return model


def parallelize(model: nn.Module, mesh, cfg, train: bool = True) -> nn.Module:
    """apply_tp -> apply_ac -> apply_compile -> apply_fsdp, in torchtitan's order, as far as the
    mesh and config ask: tensor
    parallelism over a "tp" dimension if the mesh has one, FSDP over "dp" unless that is a
    single rank beside tensor parallelism. Reference models (train=False) skip checkpointing."""
    tensor_parallel = "tp" in (mesh.mesh_dim_names or ())
    if tensor_parallel:
        if is_lora(model):
            raise ValueError("model.lora with trainer=TensorParallelTrainer is not supported; "
                             "use trainer=FSDPTrainer (or BasicTrainer) for LoRA")
        apply_tp(model, mesh["tp"])
    if train and cfg.activation_checkpointing:
        apply_ac(model)
    if cfg.get("compile", False):
        apply_compile(model, cfg.model.block_name)
    if not tensor_parallel or mesh["dp"].size() > 1:
        apply_fsdp(model, mesh["dp"], cfg.model.block_name, cfg.model.fsdp_policy_mp,
                   cfg.trainer.get("cpu_offload", False))
    return model


def load_from_rank0(model: nn.Module, full_state: dict, buffers: dict):
    """After parallelize on the meta device: real (uninitialised) storage on every rank, then
    rank 0, which read the weights, sends each rank its shards of `full_state` and a copy of
    every buffer (e.g. rotary tables, which no state dict holds). Both are empty elsewhere."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    model.to_empty(device=distributed.device())
    causal_lm(model).tie_weights()  # to_empty gives tied parameters separate storage
    set_model_state_dict(model, full_state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))
    for name, buffer in model.named_buffers():
        if name in buffers:
            buffer.copy_(buffers[name])
        dist.broadcast(buffer, src=0)
    return model


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def single_process_device_map():
    """Where BasicTrainer puts a model: the one GPU, or over several GPUs the reference code's
    naive layer split (consecutive blocks per GPU, one GPU busy at a time); None on CPU."""
    n = torch.cuda.device_count()
    return None if n == 0 else {"": 0} if n == 1 else "balanced"


def build_mesh(dp: int, tp: int):
    from torch.distributed.device_mesh import init_device_mesh
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if tp == 1:
        return init_device_mesh(device_type, (dp,), mesh_dim_names=("dp",))
    return init_device_mesh(device_type, (dp, tp), mesh_dim_names=("dp", "tp"))


# ---- gradients and state dicts ------------------------------------------------------------------
def clip_grad_norm(parameters, max_norm: float) -> float:
    """Total 2-norm of all gradients (sharded DTensor, replicated DTensor or plain tensors mixed)
    and scale them to at most max_norm. Returns the norm before clipping."""
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in parameters if p.grad is not None]
    groups: dict = {}
    for g in grads:  # one reduction per (mesh, placements) group, not one per parameter
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        groups.setdefault(key, []).append(g)
    total_sq = 0.0
    for key, group in groups.items():
        norm = torch.nn.utils.get_total_norm(group, 2.0)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        total_sq += norm.float().item() ** 2
    total = math.sqrt(total_sq)
    coef = max_norm / (total + 1e-6)
    if coef < 1:
        for g in grads:
            g.mul_(coef)
    return total


def full_state_dict(model: nn.Module) -> dict:
    """The whole model's state on CPU in rank 0 (an empty dict elsewhere); collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                cpu_offload=True))


def full_optimizer_state_dict(model, optimizer) -> dict:
    """The optimizer state keyed by parameter name, on CPU in rank 0; collective."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                         get_optimizer_state_dict)
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def sharded_state(model, optimizer) -> dict:
    """Each rank's shards of model and optimizer, for torch.distributed.checkpoint."""
    from torch.distributed.checkpoint.state_dict import get_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optimizer": optim_state}


def load_sharded_state(model, optimizer, state: dict):
    from torch.distributed.checkpoint.state_dict import set_state_dict
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optimizer"])


def load_full_model_state(model, state: dict):
    """Every rank holds the full state (e.g. policy.pt); each keeps its own shards of it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
