"""Shard a Hugging Face host in place over a tensor-parallel group, following its plan.

`parallel_module` turns one module into its tensor-parallel form (empty, on the module's device) and
says which slice of each full parameter it holds; `shard_model` fills it from the full module of a
loaded host, and leaves a host built on the meta device empty for the slice-reading loader
(megasae.parallel.loading) to fill from safetensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megasae.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from megasae.parallel.plans import Layout, plan_for, style_of


@dataclass(frozen=True)
class Slice:
    """Indices [start, stop) along `dim` of a full parameter; None in a slice map means the whole tensor."""

    dim: int
    start: int
    stop: int

    def of(self, full: Tensor) -> Tensor:
        return full.narrow(self.dim, self.start, self.stop - self.start)


def parallel_module(
    style: str, module: nn.Module, layout: Layout, rank: int, group: dist.ProcessGroup | None
) -> tuple[nn.Module, dict[str, Slice | None]]:
    """The tensor-parallel replacement of `module` (uninitialised) and the slice of each parameter."""
    kw = {"device": module.weight.device, "dtype": module.weight.dtype}
    has_bias = getattr(module, "bias", None) is not None
    if style in ("column", "column_kv"):
        start, stop = layout.even(module.out_features, rank) if style == "column" else layout.kv_rows(rank)
        new = ColumnParallelLinear(module.in_features, stop - start, has_bias, group, **kw)
        rows = Slice(0, start, stop)
        return new, {"weight": rows, **({"bias": rows} if has_bias else {})}
    if style == "row":
        start, stop = layout.even(module.in_features, rank)
        new = RowParallelLinear(stop - start, module.out_features, has_bias, group, **kw)
        return new, {"weight": Slice(1, start, stop), **({"bias": None} if has_bias else {})}
    if style == "vocab":
        start, stop = layout.vocab_rows(rank)
        new = VocabParallelEmbedding(start, stop - start, module.embedding_dim, group, **kw)
        return new, {"weight": Slice(0, start, stop)}
    raise ValueError(f"Unknown tensor-parallel style {style!r}.")


def localise_heads(attention: nn.Module, layout: Layout) -> None:
    """Make an attention module's head counts this rank's (HF reshapes by head_dim, but GQA reads these)."""
    if hasattr(attention, "num_heads"):
        attention.num_heads = layout.local_q_heads
    if hasattr(attention, "num_key_value_heads"):
        attention.num_key_value_heads = layout.local_kv_heads
    attention.num_key_value_groups = layout.local_q_heads // layout.local_kv_heads


@torch.no_grad()
def shard_model(model: nn.Module, group: dist.ProcessGroup | None, rank: int, tp: int) -> dict[str, Slice]:
    """Replace the planned modules of a host by their tensor-parallel forms, in place (tp 1: as is).

    The new parameters are filled from the old ones (a model on the meta device stays empty). Returns
    the slice of the full parameter that each split parameter holds, by parameter name.
    """
    if tp == 1:
        return {}
    layout = Layout.from_config(model.config, tp)
    layout.check(type(model).__name__)
    plan = plan_for(model.config)
    split: dict[str, Slice] = {}
    for name, module in list(model.named_modules()):
        style = style_of(plan, name)
        if style is None:
            continue
        if style == "heads":
            localise_heads(module, layout)
            continue
        new, slices = parallel_module(style, module, layout, rank, group)
        for param_name, piece in slices.items():
            full = getattr(module, param_name)
            getattr(new, param_name).copy_(full if piece is None else piece.of(full))
            if piece is not None:
                split[f"{name}.{param_name}"] = piece
        new.requires_grad_(False)
        model.set_submodule(name, new)
    return split
