"""Process groups from the torchrun environment, and the collectives the data-parallel trainer needs.

Ranks are laid out Megatron's way: tensor parallel innermost, then data parallel, then pipeline,

    rank = pp_rank * (dp_size * tp_size) + dp_rank * tp_size + tp_rank,

so the ranks of one TP group are neighbours (one node, the fastest links) and a pipeline stage is a
contiguous block of ranks. What a rank does for the run (write, count, hand on to the next stage) is a
property of its ParallelState.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist


def layout_rank(pp_rank: int, dp_rank: int, tp_rank: int, dp_size: int, tp_size: int) -> int:
    """The rank at this pipeline stage, data-parallel rank and tensor-parallel rank (the layout above)."""
    return (pp_rank * dp_size + dp_rank) * tp_size + tp_rank


@dataclass(frozen=True)
class ParallelState:
    """Where this process stands. A single process has world_size 1 and no groups."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    dp_group: dist.ProcessGroup | None = None
    tp_group: dist.ProcessGroup | None = None
    pp_group: dist.ProcessGroup | None = None
    world_group: dist.ProcessGroup | None = None
    tp_size: int = 1
    pp_size: int = 1

    @property
    def is_main(self) -> bool:
        """Rank 0: it writes the run's own files (config, metrics, checkpoint directory, cache)."""
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        return self.world_size // (self.tp_size * self.pp_size)

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size % self.dp_size

    @property
    def pp_rank(self) -> int:
        """This rank's pipeline stage."""
        return self.rank // (self.tp_size * self.dp_size)

    @property
    def is_first_stage(self) -> bool:
        """Whether this rank's stage is the first, which runs the embeddings on the batch."""
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        """Whether this rank's stage is the last, which holds the final norm and LM head (the logits)."""
        return self.pp_rank == self.pp_size - 1

    def stage_rank(self, stage: int) -> int:
        """The rank at this rank's place (same DP and TP rank) in pipeline stage `stage`."""
        return layout_rank(stage, self.dp_rank, self.tp_rank, self.dp_size, self.tp_size)

    @property
    def prev_stage_rank(self) -> int:
        """The rank this one receives the hidden state from."""
        return self.stage_rank(self.pp_rank - 1)

    @property
    def next_stage_rank(self) -> int:
        """The rank this one hands the hidden state to."""
        return self.stage_rank(self.pp_rank + 1)

    @property
    def leads_stage(self) -> bool:
        """Whether this rank speaks for its stage (first DP replica, first TP rank) to the writer."""
        return self.dp_rank == 0 and self.tp_rank == 0

    @property
    def writer_rank(self) -> int:
        """The rank that writes the adapter: the first of the last stage, which always holds an SAE."""
        return layout_rank(self.pp_size - 1, 0, 0, self.dp_size, self.tp_size)

    @property
    def is_writer(self) -> bool:
        """Whether this rank writes the adapter."""
        return self.rank == self.writer_rank

    @property
    def counts_tokens(self) -> bool:
        """Whether this rank counts its replica's tokens: its TP group and pipeline read the same batches."""
        return self.tp_rank == 0 and self.pp_rank == 0


def check_parallel_sizes(world_size: int, tp: int, pp: int) -> None:
    """One clear sentence when the world cannot be cut into tp x pp x dp."""
    if tp < 1 or pp < 1:
        raise ValueError(f"--tp ({tp}) and --pp ({pp}) must be at least 1.")
    if world_size % (tp * pp):
        raise ValueError(
            f"World size {world_size} is not tp x pp x dp for --tp {tp} --pp {pp}: launch a multiple of "
            f"{tp * pp} ranks (e.g. torchrun --nproc-per-node {tp * pp})."
        )


def _new_groups(
    world_size: int, tp: int, pp: int
) -> tuple[list[list[int]], list[list[int]], list[list[int]]]:
    """The rank lists of every TP, DP and PP group, in the rank layout of the module docstring."""
    dp = world_size // (tp * pp)

    def rank(p, d, t):
        return layout_rank(p, d, t, dp, tp)

    tp_groups = [[rank(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)]
    dp_groups = [[rank(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)]
    pp_groups = [[rank(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)]
    return tp_groups, dp_groups, pp_groups


# Where a command runs: 'auto' picks CUDA when available.
Device = Literal["auto", "cpu", "cuda"]


def resolve_device(device: Device) -> torch.device:
    """'auto' (CUDA when available), 'cpu' or 'cuda'; 'cuda' without a usable GPU is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch finds no usable CUDA GPU here; use --device cpu (or auto).")
    return torch.device(device)


def init_distributed(device: Device = "auto", tp: int = 1, pp: int = 1) -> ParallelState:
    """Join the torchrun job if there is one (NCCL on GPU, gloo on CPU); otherwise a single process.

    Every rank builds every group (torch.distributed requires it) and keeps the three it belongs to.
    """
    device = resolve_device(device).type
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_parallel_sizes(world_size, tp, pp)
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
    mine: dict[str, dist.ProcessGroup | None] = {}
    for kind, rank_lists in zip(("tp", "dp", "pp"), _new_groups(world_size, tp, pp)):
        for ranks in rank_lists:
            if len(ranks) == 1:  # alone: no group, no collective
                group = None
            else:
                group = dist.group.WORLD if len(ranks) == world_size else dist.new_group(ranks)
            if rank in ranks:
                mine[kind] = group
    return ParallelState(
        rank=rank,
        world_size=world_size,
        device=torch_device,
        dp_group=mine["dp"],
        tp_group=mine["tp"],
        pp_group=mine["pp"],
        world_group=dist.group.WORLD,
        tp_size=tp,
        pp_size=pp,
    )


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


def merge_over_stages(mine: dict, par: ParallelState) -> dict:
    """A dict keyed by target merged over the pipeline stages, in stage order (a collective over them)."""
    if par.pp_group is None:
        return mine
    parts = [None] * par.pp_size
    dist.all_gather_object(parts, mine, group=par.pp_group)
    return {key: value for part in parts for key, value in part.items()}


def barrier(group: dist.ProcessGroup | None) -> None:
    if group is not None:
        dist.barrier(group=group)


def clip_grad_norm_(
    params: list[torch.Tensor],
    max_norm: float,
    sharded: set[int],
    tp_group: dist.ProcessGroup | None,
    pp_group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ over the whole model when its parameters are spread over ranks: those
    whose id() is in `sharded` are split over `tp_group` (their squares summed over its ranks), the rest
    are replicated there (counted once), and each pipeline stage of `pp_group` holds its own (possibly
    none: `device` is where an empty stage's zero lives)."""
    if tp_group is None and pp_group is None:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    grads = [p.grad for p in params if p.grad is not None]
    zero = torch.zeros((), device=device)
    squares = [(id(p) in sharded, p.grad.float().pow(2).sum()) for p in params if p.grad is not None]
    split = sum((square for is_split, square in squares if is_split), zero)
    if tp_group is not None:
        dist.all_reduce(split, group=tp_group)
    square = split + sum((square for is_split, square in squares if not is_split), zero)
    if pp_group is not None:
        dist.all_reduce(square, group=pp_group)
    total = square.sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.to(g.dtype))
    return total
