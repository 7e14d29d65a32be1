"""The parts of the training loop that change when a model is sharded over several ranks.

BasicTrainer (trainers.py) calls small methods for everything rank-dependent: which share of a
batch this rank sees, how gradients are clipped, how state dicts are gathered for policy.pt and
sharded for exact resume, how the reference pre-pass is split. DistributedMixin overrides them;
FSDPTrainer and TensorParallelTrainer then only say how the model is wrapped.
"""

import shutil

from harness import checkpoints, distributed, lora, parallel, reference_cache


class DistributedMixin:
    """What FSDPTrainer and TensorParallelTrainer add to BasicTrainer (listed first among their
    bases, so these methods override its single-process ones): the ranks' view of batches,
    clipping of sharded gradients, gathered and sharded checkpoints, a distributed reference
    pre-pass."""
    sharded_checkpoints = True

    def __init__(self, policy, tokenizer, config, *args, **kwargs):
        world, rank = distributed.world_size(), distributed.rank()
        tp = self.tensor_parallel_size(config, world)
        self.mesh = parallel.build_mesh(world // tp, tp)
        self.is_main, self.dp_size, self.dp_rank = rank == 0, world // tp, rank // tp
        super().__init__(policy, tokenizer, config, *args, **kwargs)

    @staticmethod
    def tensor_parallel_size(config, world: int) -> int:
        return 1

    def wrap(self, model, train: bool = True):
        """Shard the model (rank 0 holds its weights; the other ranks built it on meta)."""
        full_state = model.state_dict() if self.is_main else {}  # references, not copies
        buffers = {k: b.clone() for k, b in model.named_buffers()} if self.is_main else {}
        # every rank shards an empty model alike: sharding real tensors (TP) communicates
        model = model.to("meta")
        lora.causal_lm(model).tie_weights()  # moving rank 0's real tensors to meta untied them
        model = parallel.parallelize(model, self.mesh, self.cfg, train)
        return parallel.load_from_rank0(model, full_state, buffers)

    def logps(self, model, fn, *args):
        if hasattr(model, "call_logps"):  # FSDP gathers the root's parameters around it
            return model.call_logps(fn, *args, self.cfg.logits_chunk_size)
        return super().logps(model, fn, *args)

    def sync_gradients(self, now: bool):
        if parallel.is_fsdp(self.policy):  # no data-parallel reduction in pure TP
            self.policy.set_requires_gradient_sync(now)

    def clip_gradients(self) -> float:
        return parallel.clip_grad_norm(list(self.policy.parameters()), self.cfg.max_grad_norm)

    def policy_state_dict(self) -> dict:
        return parallel.full_state_dict(self.policy)

    def optimizer_state_dict(self) -> dict:
        return parallel.full_optimizer_state_dict(self.policy, self.optimizer)

    def save_shards(self, name: str):
        staged = checkpoints.staging_dir(self.run_dir, name)
        if self.is_main:
            shutil.rmtree(staged, ignore_errors=True)
        distributed.barrier()
        checkpoints.save_sharded(parallel.sharded_state(self.policy, self.optimizer), staged)

    def load_training_state(self, resume: dict):
        state = parallel.sharded_state(self.policy, self.optimizer)
        checkpoints.load_sharded(state, resume[checkpoints.SHARDED])
        parallel.load_sharded_state(self.policy, self.optimizer, state)

    def load_reference_table(self, key: str, loader) -> dict:
        """Rank 0's cached table, or one computed with each rank scoring its share of every
        batch; either way every rank ends up with the full table."""
        path = reference_cache.cache_path(self.cache_dir, key)
        if distributed.broadcast_object(path.exists()):
            return distributed.broadcast_object(
                reference_cache.load_table(path) if self.is_main else None)
        # uids cut to the real rows: zip() in compute_reference_logps then skips stand-in rows
        parts = ({**part, "uid": part["uid"][:n]} for part, n in map(
            self.shard, loader.epoch_batches(0)))
        local = reference_cache.compute_reference_logps(
            lambda m, b: self.reference_forward(b), self.reference_model, parts, len(loader))
        table = {k: v for part in distributed.all_gather_objects(local) for k, v in part.items()}
        if self.is_main:
            reference_cache.save_table(path, table)
        return table
