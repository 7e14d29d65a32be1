"""Processes: launch, the process group, which rank sees which examples, cross-rank reductions.

    python train.py trainer=FSDPTrainer ...                      # spawns nproc_per_node processes
    torchrun --nproc_per_node N [--nnodes M --rdzv-endpoint H:P] train.py trainer=FSDPTrainer ...

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; a plain `python`
launch of a distributed trainer starts the local processes itself (one per visible GPU, or
`nproc_per_node`) with the same variables, so both paths meet in `init_process_group`.
NCCL on GPU, gloo on CPU. A run in one process (BasicTrainer) never creates a process group.
"""

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TrainerLayout:
    """How a `trainer=NAME` runs: in one process or several, with tensor parallelism or not.
    (The loop itself is chosen by the loss; harness/training/strategy.py maps a layout to the
    object the loop holds.)"""
    processes: bool        # several ranks in a process group, models sharded over them
    tensor_parallel: bool  # DTensor tensor parallelism in groups of trainer.tp_size ranks


# THE table of trainer= names; nothing else compares trainer names
TRAINERS = {
    "BasicTrainer": TrainerLayout(processes=False, tensor_parallel=False),
    "FSDPTrainer": TrainerLayout(processes=True, tensor_parallel=False),
    "TensorParallelTrainer": TrainerLayout(processes=True, tensor_parallel=True),
}


def trainer_layout(cfg) -> TrainerLayout:
    name = cfg.trainer.name
    if name not in TRAINERS:
        raise ValueError(f"unknown trainer={name!r}; choose one of {sorted(TRAINERS)}")
    return TRAINERS[name]


def under_torchrun() -> bool:
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def processes_to_spawn(cfg) -> int:
    """How many local processes a plain `python train.py` should start (0: run in this one)."""
    if under_torchrun() or not trainer_layout(cfg).processes:
        return 0
    n = cfg.nproc_per_node or (torch.cuda.device_count() if torch.cuda.is_available() else 1)
    return n if n > 1 else 0


def planned_world_size(cfg) -> int:
    """The number of ranks this command will run with, known before any process starts."""
    if under_torchrun():
        return int(os.environ["WORLD_SIZE"])
    return max(1, processes_to_spawn(cfg))


def tensor_parallel_size(cfg, world: int) -> int:
    """Ranks per tensor-parallel group: trainer.tp_size (null = all ranks) with
    trainer=TensorParallelTrainer, else 1. The data-parallel ranks are world // this."""
    if not trainer_layout(cfg).tensor_parallel:
        return 1
    tp = cfg.trainer.get("tp_size") or world
    if world % tp:
        raise ValueError(f"trainer.tp_size={tp} does not divide the {world} ranks")
    return tp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned_entry(local_rank: int, fn, nprocs: int, port: int, args):
    os.environ.update(RANK=str(local_rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(nprocs),
                      LOCAL_WORLD_SIZE=str(nprocs), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    exit_with_parent()
    fn(*args)


def exit_with_parent(poll_secs: float = 1.0):
    """End this worker when the process that started it (torchrun's agent, or the plain
    `python train.py` that spawned the ranks) is gone, even after a SIGKILL, so a killed launch
    never leaves ranks training into a run dir that a resume then races."""
    import signal
    import threading
    import time
    parent = os.getppid()

    def watch():
        while True:
            time.sleep(poll_secs)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def quiet_unless_main(debug: bool = False):
    """Ranks other than 0 print nothing to stdout and log only errors: a run prints its lines
    once (errors still reach stderr from every rank). debug=true keeps every rank's output."""
    if is_main() or debug:
        return
    import logging
    import sys
    sys.stdout = open(os.devnull, "w")
    logging.getLogger().setLevel(logging.ERROR)
    logging.getLogger("harness.data").setLevel(logging.ERROR)


def spawn(fn, nprocs: int, port: int | None, *args):
    """Run fn(*args) in `nprocs` fresh local processes, as torchrun would on one node."""
    import torch.multiprocessing as mp
    port = port or free_port()
    print(f"starting {nprocs} processes (rendezvous on 127.0.0.1:{port})")
    mp.start_processes(_spawned_entry, args=(fn, nprocs, port, args), nprocs=nprocs,
                       start_method="spawn")


def init(cfg) -> bool:
    """Join (or, for a lone process, create) the process group; True if this call created it."""
    if dist.is_initialized():
        return False
    if not trainer_layout(cfg).processes:
        if under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
            raise ValueError("trainer=BasicTrainer runs in one process; under torchrun use "
                             "trainer=FSDPTrainer or trainer=TensorParallelTrainer")
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if under_torchrun():
        exit_with_parent()  # SIGKILL of the torchrun agent takes its workers down
        dist.init_process_group(backend)
    else:  # a distributed trainer in one process (no torchrun, one device): a group of one,
        # set up without touching os.environ, which child processes would inherit
        dist.init_process_group(backend, rank=0, world_size=1, init_method=(
            f"tcp://127.0.0.1:{cfg.fsdp_port or free_port()}"))
    return True


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def broadcast_object(obj, src: int = 0):
    """Rank src's obj on every rank (identity in one process)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_objects(obj) -> list:
    """Every rank's obj, on every rank."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier():
    if dist.is_initialized():
        dist.barrier()


def sum_across_ranks(values: list[torch.Tensor]) -> list[float]:
    """Element-wise sums over ranks of scalar tensors, in ONE collective."""
    if not values:
        return []
    stacked = torch.stack([torch.as_tensor(v).detach().float().reshape(()).cpu() for v in values])
    if dist.is_initialized():
        stacked = stacked.to(device())
        dist.all_reduce(stacked)
    return stacked.tolist()


def max_across_ranks(value: torch.Tensor) -> float:
    """The maximum of a scalar over ranks (itself in one process)."""
    value = torch.as_tensor(value).detach().float().reshape(()).to(device())
    if dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return value.item()


def even_share(n: int, part: int, n_parts: int) -> tuple[list[int], int]:
    """This part's contiguous share of n items: (indices, how many of them are real).

    Every part gets ceil(n / n_parts) indices, its real ones first, then stand-ins (index 0)
    whose results the caller drops: ranks sampling and scoring with sharded models must run the
    same forward passes, hence equal shares (PPO's rollouts)."""
    size = -(-n // n_parts)
    start = min(part * size, n)
    stop = min(start + size, n)
    return list(range(start, stop)) + [0] * (size - (stop - start)), stop - start


def shard_batch(batch: dict, part: int, n_parts: int) -> tuple[dict, int]:
    """(this part's contiguous slice of the batch, its number of real examples).

    Parts differ in size by at most one. A part that would be empty (a final batch smaller than
    the number of data-parallel ranks) gets the batch's first example with weight 0 instead,
    because every rank must run the same forward and backward passes (FSDP gathers parameters
    collectively in each)."""
    size = len(batch["uid"])
    share, extra = divmod(size, n_parts)  # the first `extra` parts get one more
    start = part * share + min(part, extra)
    stop = start + share + (part < extra)
    if stop == start:
        return {k: v[0:1] for k, v in batch.items()}, 0
    return {k: v[start:stop] for k, v in batch.items()}, stop - start
