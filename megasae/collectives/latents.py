"""Latent parallelism of a TopK SAE over a tensor-parallel group.

Rank r of T holds latents [r M/T, (r+1) M/T): its rows of W_enc, b_enc and W_dec; b_dec is
replicated. The top-k over all M latents is exact: no rank can hold more than k of the global
winners, so each rank's local top-k, gathered, contains them all and a second top-k picks them.
Each rank decodes the winners it owns and the partial reconstructions are summed.

Gradients: the loss is replicated, so the gathered candidate values pass back only this rank's
piece (gather_from_group), the partial reconstructions' sum passes the full gradient to every rank
(reduce_from_group), and b_dec, read by every rank's encoder shard, sums their partial gradients
(copy_to_group); its decoder part, added once after the sum, is already whole on every rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from megasae import ops
from megasae.collectives.autograd import copy_to_group, gather_from_group, reduce_from_group


def _offset(group: dist.ProcessGroup, local_latents: int) -> int:
    return dist.get_rank(group) * local_latents


def topk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    k: int,
    group: dist.ProcessGroup,
    dead_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """ops.topk_encode over all ranks' latents: (values, global indices) [N, k], the same on every rank.

    W_enc and b_enc are this rank's rows; dead_mask covers all M latents.
    """
    local_latents = W_enc.shape[0]
    offset = _offset(group, local_latents)
    if dead_mask is not None:
        dead_mask = dead_mask[offset : offset + local_latents]
    if b_dec is not None:
        b_dec = copy_to_group(b_dec, group)
    values, indices = ops.topk_encode(x, W_enc, b_enc, b_dec, min(k, local_latents), dead_mask)
    candidates = gather_from_group(values, group)
    candidate_ids = gather_from_group(indices + offset, group)
    top, slots = candidates.topk(k, dim=-1)
    return top, candidate_ids.gather(-1, slots)


def sparse_decode(
    indices: Tensor, values: Tensor, W_dec: Tensor, b_dec: Tensor | None, group: dist.ProcessGroup
) -> Tensor:
    """ops.sparse_decode of global codes with W_dec split by latent: each rank decodes the winners it owns."""
    local_latents = W_dec.shape[0]
    local = indices - _offset(group, local_latents)
    # Zero codes add nothing and get no gradient through relu; leaving them out keeps that true here.
    mine = (local >= 0) & (local < local_latents) & (values != 0)
    partial = ops.sparse_decode(local.where(mine, 0), values.where(mine, 0), W_dec, None)
    x_hat = reduce_from_group(partial, group)
    return x_hat if b_dec is None else x_hat + b_dec


def shard_rows(full: Tensor, group: dist.ProcessGroup) -> Tensor:
    """This rank's block of rows of a per-latent tensor (M divisible by the group size: the caller checks)."""
    size = dist.get_world_size(group)
    part = full.shape[0] // size
    return full[dist.get_rank(group) * part : (dist.get_rank(group) + 1) * part]


def gather_rows(shard: Tensor, group: dist.ProcessGroup) -> Tensor:
    """All ranks' blocks of a per-latent tensor, in latent order (a collective)."""
    pieces = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, shard.contiguous(), group=group)
    return torch.cat(pieces)
