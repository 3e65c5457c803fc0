"""Process-group setup for the three ways a run starts.

* Under a launcher (``deepspeed --num_gpus N training/train.py``, torchrun, or test workers): RANK, WORLD_SIZE,
  MASTER_ADDR, MASTER_PORT and LOCAL_RANK are in the environment; ``deepspeed.init_distributed`` reads them.
* In one plain process (``moe-lora train``, ``run_training`` from Python): a world of one over an in-process
  HashStore (no port, no MPI discovery), created once and kept for later runs in the same process; RANK,
  LOCAL_RANK and WORLD_SIZE are set to 0 / 0 / 1 in os.environ because DeepSpeed's engine asserts they exist.
* Already initialised by the caller: used as it is.

The backend is the accelerator's (gloo on CPU with ``DS_ACCELERATOR=cpu``, nccl on CUDA). On CPU, DeepSpeed's
communication backend would JIT-compile its shared-memory all-reduce (C++ against the torch headers: minutes and
gigabytes of compiler memory) the first time it starts; that op serves only ``inference_all_reduce``, which training
never calls, so it is marked unavailable and gloo does every collective.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

LAUNCH_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed() -> DistInfo:
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    backend = accel.communication_backend_name()
    if accel.device_name() == "cpu":
        skip_shm_comm_build()
    if not dist.is_initialized() and not all(k in os.environ for k in LAUNCH_ENV):
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        # DeepSpeed's engine asserts that a launcher set these; a world of one sets them itself.
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    name = accel.device_name()
    device = torch.device(name, local_rank) if name != "cpu" else torch.device("cpu")
    if name != "cpu":
        accel.set_device(local_rank)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def finish_distributed() -> None:
    """End a launched run's process group in order: every rank reaches a barrier, then destroys the group. A rank
    that exits while a peer still holds the gloo connection can die in its communication threads at exit
    (``terminate called without an active exception``, exit -6) although its work is done. A world of one
    started in-process (no launcher environment) is kept for later runs in the same process."""
    if dist.is_initialized() and all(k in os.environ for k in LAUNCH_ENV):
        dist.barrier()
        dist.destroy_process_group()


def skip_shm_comm_build() -> None:
    """Mark DeepSpeed's CPU shared-memory collective op as unavailable, so that starting its communication backend
    compiles nothing. ``deepspeed.ops.__compatible_ops__`` is probed once per process and cached as one dict whose
    edits persist (DeepSpeed documents this); its backend builds the op only where that dict says it is compatible."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def ranks_on_this_node(world_size: int) -> int:
    """Ranks sharing this machine: LOCAL_SIZE (deepspeed launcher) or LOCAL_WORLD_SIZE (torchrun), else all."""
    for key in ("LOCAL_SIZE", "LOCAL_WORLD_SIZE"):
        if os.environ.get(key, "").isdigit():
            return max(1, int(os.environ[key]))
    return world_size


def set_cpu_threads(requested: int | None, world_size: int) -> int:
    """torch threads of this rank on a CPU run: ``requested``, else cores / ranks on this node (at least 1)."""
    n = requested if requested is not None else max(1, (os.cpu_count() or 1) // ranks_on_this_node(world_size))
    torch.set_num_threads(n)
    return n
