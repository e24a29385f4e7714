"""Process groups from the torchrun environment, and the collectives the data-parallel trainer needs."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelState:
    """Where this process stands. A single process has world_size 1 and no group."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    dp_group: dist.ProcessGroup | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> ParallelState:
    """Join the torchrun job if there is one (NCCL on GPU, gloo on CPU); otherwise a single process.

    Every rank is a data-parallel replica for now; tensor and pipeline groups come with the
    Megatron-style host sharding.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return ParallelState(device=torch.device(device))
    rank = int(os.environ["RANK"])
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return ParallelState(rank=rank, world_size=world_size, device=torch_device, dp_group=dist.group.WORLD)


def sum_gradients(params: list[torch.Tensor], group: dist.ProcessGroup | None) -> None:
    """Sum the gradients over the data-parallel ranks, one flat buffer per dtype.

    A sum, not a mean: each rank's loss is already divided by the variance of all ranks' tokens,
    so the summed gradient is the gradient of the global FVU.
    """
    if group is None:
        return
    grads = [p.grad for p in params if p.grad is not None]
    for dtype in {g.dtype for g in grads}:
        same = [g for g in grads if g.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in same])
        dist.all_reduce(flat, group=group)
        for g, reduced in zip(same, flat.split([g.numel() for g in same])):
            g.copy_(reduced.view_as(g))


def sum_over_ranks(values: list[float], group: dist.ProcessGroup | None, device: torch.device) -> list[float]:
    """Sum a few Python numbers (metrics, flags) over the ranks; `device` is where the backend reduces."""
    if group is None:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()


def barrier(group: dist.ProcessGroup | None) -> None:
    if group is not None:
        dist.barrier(group=group)
