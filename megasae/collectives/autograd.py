"""The three differentiable collectives of tensor parallelism (Megatron's f, g and gather).

Every rank of a TP group computes the same loss from the same replicated tensors, so:
- `copy_to_group`: identity forward; backward sums the partial gradients the ranks' shards produced.
- `reduce_from_group`: sums the ranks' partial results; backward is the identity (each rank already
  holds the full gradient of the replicated sum).
- `gather_from_group`: concatenates the ranks' pieces along the last dimension; backward keeps this
  rank's piece of the (replicated) gradient.
With `group=None` (one rank) all three are the identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


class _GatherFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.rank, ctx.width = dist.get_rank(group), x.shape[-1]
        pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(pieces, x.contiguous(), group=group)
        return torch.cat(pieces, dim=-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.narrow(-1, ctx.rank * ctx.width, ctx.width), None


def copy_to_group(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    return x if group is None else _CopyToGroup.apply(x, group)


def reduce_from_group(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    return x if group is None else _ReduceFromGroup.apply(x, group)


def gather_from_group(x: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    return x if group is None else _GatherFromGroup.apply(x, group)
