"""The parts of a training loop that change when its models are sharded over several ranks.

Both loops (the offline BasicTrainer in trainers.py and PPO's rollout loop in harness/rl/ppo.py)
call small methods for everything rank-dependent: how a model is wrapped, how gradients are
clipped, how state dicts are gathered for policy.pt and sharded for exact resume. SingleProcess
holds their one-process versions; ShardedModels overrides them for FSDP2 / tensor parallelism
(listed first among a trainer's bases); DistributedMixin adds what only the offline loop needs
(which share of a batch a rank sees, the distributed reference pre-pass).

`self.trained` is the module whose parameters the optimizer updates: the policy for the offline
loop, actor and critic together (an nn.ModuleDict) for PPO.
"""

import shutil

import torch

from harness import checkpoints
from harness.parallel import distributed, parallelize
from harness.models import lora
from harness.training import reference_cache


class SingleProcess:
    """One process: this rank is rank 0 of one, models stay whole."""
    is_main = True      # this process logs and writes checkpoints
    dp_size, dp_rank = 1, 0  # data-parallel ranks: each sees 1/dp_size of every batch
    sharded_checkpoints = False

    def wrap(self, model, train: bool = True):
        """Apply parallelism to a loaded model (distributed trainers); here only activation
        checkpointing and compiling, in torchtitan's order."""
        if train and self.cfg.activation_checkpointing:
            parallelize.apply_ac(model)
        if train and self.cfg.compile:
            parallelize.apply_compile(model, self.cfg.model.block_name)
        return model

    def clip_gradients(self) -> float:
        return torch.nn.utils.clip_grad_norm_(self.trained.parameters(),
                                              self.cfg.max_grad_norm).item()

    def full_state(self, model) -> dict:
        """`model`'s whole state dict on the CPU (in rank 0; collective when sharded)."""
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def optimizer_state_dict(self) -> dict:
        return self.optimizer.state_dict()

    def save_shards(self, name: str):
        """Sharded checkpoint of the trained models and optimizer (distributed trainers)."""

    def load_training_state(self, resume: dict):
        """Policy weights (a LoRA run: its adapters on the freshly loaded base) and optimizer."""
        if checkpoints.ADAPTER in resume:
            lora.load_adapter(self.policy, resume[checkpoints.ADAPTER])
        else:
            self.policy.load_state_dict(resume["policy"]["state"])
        self.optimizer.load_state_dict(resume["optimizer"]["state"])


class ShardedModels:
    """FSDP2 and tensor parallelism (the mesh of trainer=FSDPTrainer / TensorParallelTrainer):
    models wrapped by parallelize.parallelize, clipping of sharded gradients, gathered and sharded
    checkpoints. Every rank calls these methods; the gathered states exist in rank 0 only."""
    sharded_checkpoints = True

    def __init__(self, policy, tokenizer, config, *args, **kwargs):
        world, rank = distributed.world_size(), distributed.rank()
        tp = distributed.tensor_parallel_size(config, world)
        self.mesh = parallelize.build_mesh(world // tp, tp)
        self.is_main, self.dp_size, self.dp_rank = rank == 0, world // tp, rank // tp
        super().__init__(policy, tokenizer, config, *args, **kwargs)

    def wrap(self, model, train: bool = True):
        """Shard the model (rank 0 holds its weights; the other ranks built it on meta)."""
        full_state = model.state_dict() if self.is_main else {}  # references, not copies
        buffers = {k: b.clone() for k, b in model.named_buffers()} if self.is_main else {}
        # every rank shards an empty model alike: sharding real tensors (TP) communicates
        model = model.to("meta")
        lora.causal_lm(model).tie_weights()  # moving rank 0's real tensors to meta untied them
        model = parallelize.parallelize(model, self.mesh, self.cfg, train)
        return parallelize.load_from_rank0(model, full_state, buffers)

    def clip_gradients(self) -> float:
        return parallelize.clip_grad_norm(list(self.trained.parameters()), self.cfg.max_grad_norm)

    def full_state(self, model) -> dict:
        return parallelize.full_state_dict(model)

    def optimizer_state_dict(self) -> dict:
        return parallelize.full_optimizer_state_dict(self.trained, self.optimizer)

    def save_shards(self, name: str):
        staged = checkpoints.staging_dir(self.run_dir, name)
        if self.is_main:
            shutil.rmtree(staged, ignore_errors=True)
        distributed.barrier()
        checkpoints.save_sharded(parallelize.sharded_state(self.trained, self.optimizer), staged)

    def load_training_state(self, resume: dict):
        state = parallelize.sharded_state(self.trained, self.optimizer)
        checkpoints.load_sharded(state, resume[checkpoints.SHARDED])
        parallelize.load_sharded_state(self.trained, self.optimizer, state)


class DistributedMixin(ShardedModels):
    """What FSDPTrainer and TensorParallelTrainer add to the offline BasicTrainer besides the
    sharded models: FSDP's gathered log-prob head, gradient sync once per optimizer step, a
    distributed reference pre-pass."""

    def logps(self, model, fn, *args):
        if hasattr(model, "call_logps"):  # FSDP gathers the root's parameters around it
            return model.call_logps(fn, *args, self.cfg.logits_chunk_size)
        return super().logps(model, fn, *args)

    def sync_gradients(self, now: bool):
        if parallelize.is_fsdp(self.policy):  # no data-parallel reduction in pure TP
            self.policy.set_requires_gradient_sync(now)

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
