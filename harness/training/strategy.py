"""What a training loop does differently when its models are sharded over several ranks.

Both loops (the offline BasicTrainer in trainers.py, the rollout loop in harness/rl/) hold one
of these objects as `self.dist` and call it for everything rank-dependent: how a model is
wrapped, which share of a batch this rank sees, how gradients are clipped, how state dicts are
gathered for policy.pt and sharded for exact resume, how the reference log-probs are scored.

    SingleProcess   trainer=BasicTrainer: one process, whole models (one GPU, a device_map
                    split over several, or the CPU)
    Sharded         trainer=FSDPTrainer / TensorParallelTrainer: FSDP2 and DTensor tensor
                    parallelism over the ranks (harness/parallel/parallelize.py)

`make_strategy(cfg)` picks one from the trainer= name (harness/parallel/distributed.py holds
the one table of names). A "trained" module is the one whose parameters the optimizer updates:
the policy for the offline loop, actor and critic together (an nn.ModuleDict) for PPO.
"""

import shutil

import torch

from harness import checkpoints
from harness.models import lora
from harness.parallel import distributed, parallelize
from harness.training import reference_cache


class SingleProcess:
    """One process: this rank is rank 0 of one, models stay whole."""
    is_main = True           # this process logs and writes checkpoints
    dp_size, dp_rank = 1, 0  # data-parallel ranks: each sees 1/dp_size of every batch
    tp_size = 1              # ranks holding the same rows (a tensor-parallel group)
    sharded_checkpoints = False
    READS = frozenset()      # top-level options only this strategy reads (training/options.py)

    def __init__(self, cfg):
        self.cfg = cfg

    def wrap(self, model, train: bool = True):
        """Activation checkpointing and compiling, in torchtitan's order (nothing to shard)."""
        if train and self.cfg.activation_checkpointing:
            parallelize.apply_ac(model)
        if train and self.cfg.compile:
            parallelize.apply_compile(model, self.cfg.model.block_name)
        return model

    def logps(self, model, fn, *args):
        """fn(causal LM, *args, chunk_size): sequence_logps or packed_sequence_logps."""
        return fn(lora.causal_lm(model), *args, self.cfg.logits_chunk_size)

    def shard(self, batch) -> tuple[dict, int]:
        """This rank's part of a batch and how many real examples it holds."""
        return distributed.shard_batch(batch, self.dp_rank, self.dp_size)

    def sync_gradients(self, model, now: bool):
        """Whether the coming backward reduces gradients across ranks (nothing to reduce)."""

    def clip(self, parameters, max_norm: float) -> float:
        return torch.nn.utils.clip_grad_norm_(list(parameters), max_norm).item()

    def full_state(self, model) -> dict:
        """`model`'s whole state dict on the CPU (in rank 0; collective when sharded)."""
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def optimizer_state(self, trained, optimizer) -> dict:
        return optimizer.state_dict()

    def save_shards(self, run_dir, name: str, trained, optimizer):
        """Sharded checkpoint of the trained module and optimizer (sharded runs only)."""

    def load_training_state(self, resume: dict, policy, trained, optimizer):
        """Policy weights (a LoRA run: its adapters on the freshly loaded base) and optimizer
        from the checkpoint's policy.pt / optimizer.pt. (PPO's critic: its own critic.pt.)"""
        if checkpoints.ADAPTER in resume:
            lora.load_adapter(policy, resume[checkpoints.ADAPTER])
        else:
            policy.load_state_dict(resume["policy"]["state"])
        optimizer.load_state_dict(resume["optimizer"]["state"])

    def reference_table(self, cache_dir, key: str, loader, forward, model) -> dict:
        """{uid: (chosen, rejected)} reference log-probs of every example of `loader`: cached
        on disk, or scored now with forward(model, batch)."""
        return reference_cache.load_or_compute(
            cache_dir, key, lambda: reference_cache.compute_reference_logps(
                forward, model, loader.epoch_batches(0), len(loader)))


class Sharded(SingleProcess):
    """FSDP2 and tensor parallelism over a (data x tensor) mesh of all ranks: models wrapped by
    parallelize.parallelize, clipping of sharded gradients, gathered and sharded checkpoints.
    Every rank calls these methods; the gathered states exist in rank 0 only."""
    sharded_checkpoints = True
    READS = frozenset({"fsdp_port", "nproc_per_node"})  # the launch of the ranks

    def __init__(self, cfg):
        super().__init__(cfg)
        world, rank = distributed.world_size(), distributed.rank()
        self.tp_size = distributed.tensor_parallel_size(cfg, world)
        self.mesh = parallelize.build_mesh(world // self.tp_size, self.tp_size)
        self.is_main, self.dp_size, self.dp_rank = rank == 0, world // self.tp_size, rank // self.tp_size

    def wrap(self, model, train: bool = True):
        """Shard the model (rank 0 holds its weights; the other ranks built it on meta)."""
        full_state = model.state_dict() if self.is_main else {}  # references, not copies
        buffers = {k: b.clone() for k, b in model.named_buffers()} if self.is_main else {}
        # every rank shards an empty model alike: sharding real tensors (TP) communicates
        model = model.to("meta")
        lora.causal_lm(model).tie_weights()  # moving rank 0's real tensors to meta untied them
        model = parallelize.parallelize(model, self.mesh, self.cfg, train)
        return parallelize.load_from_rank0(model, full_state, buffers)

    def logps(self, model, fn, *args):
        if hasattr(model, "call_logps"):  # FSDP gathers the root's parameters around it
            return model.call_logps(fn, *args, self.cfg.logits_chunk_size)
        return super().logps(model, fn, *args)

    def sync_gradients(self, model, now: bool):
        if parallelize.is_fsdp(model):  # no data-parallel reduction in pure TP
            model.set_requires_gradient_sync(now)

    def clip(self, parameters, max_norm: float) -> float:
        return parallelize.clip_grad_norm(list(parameters), max_norm)

    def full_state(self, model) -> dict:
        return parallelize.full_state_dict(model)

    def optimizer_state(self, trained, optimizer) -> dict:
        return parallelize.full_optimizer_state_dict(trained, optimizer)

    def save_shards(self, run_dir, name: str, trained, optimizer):
        staged = checkpoints.staging_dir(run_dir, name)
        if self.is_main:
            shutil.rmtree(staged, ignore_errors=True)
        distributed.barrier()
        checkpoints.save_sharded(parallelize.sharded_state(trained, optimizer), staged)

    def load_training_state(self, resume: dict, policy, trained, optimizer):
        """Everything the optimizer updates, and its state, from the shards (any rank count)."""
        state = parallelize.sharded_state(trained, optimizer)
        checkpoints.load_sharded(state, resume[checkpoints.SHARDED])
        parallelize.load_sharded_state(trained, optimizer, state)

    def reference_table(self, cache_dir, key: str, loader, forward, model) -> dict:
        """Rank 0's cached table, or one computed with each rank scoring its share of every
        batch; either way every rank ends up with the full table."""
        path = reference_cache.cache_path(cache_dir, key)
        if distributed.broadcast_object(path.exists()):
            return distributed.broadcast_object(
                reference_cache.load_table(path) if self.is_main else None)
        # uids cut to the real rows: zip() in compute_reference_logps then skips stand-in rows
        parts = ({**part, "uid": part["uid"][:n]} for part, n in map(
            self.shard, loader.epoch_batches(0)))
        local = reference_cache.compute_reference_logps(forward, model, parts, len(loader))
        table = {k: v for part in distributed.all_gather_objects(local) for k, v in part.items()}
        if self.is_main:
            reference_cache.save_table(path, table)
        return table


def strategy_class(cfg) -> type:
    """The strategy of trainer=NAME: sharded when the name runs several processes."""
    return Sharded if distributed.trainer_layout(cfg).processes else SingleProcess


def make_strategy(cfg) -> SingleProcess:
    return strategy_class(cfg)(cfg)
