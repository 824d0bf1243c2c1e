"""torchrun support for student training: process group, DDP wrapping, rank-0-only duties.

Under `torchrun --nproc_per_node=N -m trainer.train ...` each rank streams its own part of
every epoch (CacheStream splits blocks by rank and worker), DistributedDataParallel
averages gradients (Join handles ranks with a batch more or less), and rank 0 alone
evaluates, writes metrics and checkpoints; the others wait at a barrier.
"""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch
import torch.distributed as dist


def setup(device: torch.device) -> tuple[int, int, torch.device]:
    """(rank, world, device): initialises the process group when torchrun started several ranks."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def wrap(model: torch.nn.Module, world: int, device: torch.device):
    if world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # learned projections sit idle under logit-only losses: let DDP skip them
    unused = getattr(model, "projections", None) is not None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)


def join(model: torch.nn.Module):
    """Uneven batch counts across ranks: DDP's Join keeps the collectives matched."""
    return model.join() if hasattr(model, "join") else nullcontext()


def barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def broadcast_flag(flag: bool, world: int) -> bool:
    """Rank 0's decision (e.g. early stop) for everyone."""
    if world == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.broadcast(t, 0)
    return bool(t.item())


def cleanup() -> None:
    """Destroy the process group `setup` made, once every run is done (torch warns at exit otherwise)."""
    if dist.is_initialized():
        dist.destroy_process_group()
