"""Shard a Hugging Face host in place over a tensor-parallel group, following its architecture spec.

Each planned module is replaced by its style's tensor-parallel form (megasae.parallel.architectures),
filled from the full module of a loaded host; a host built on the meta device stays empty for the
slice-reading loader (megasae.parallel.loading) to fill from safetensors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from megasae.parallel.architectures import Layout, Slice, architecture


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
    arch = architecture(model.config)
    split: dict[str, Slice] = {}
    for name, module in list(model.named_modules()):
        style = arch.style_of(name)
        if style is None:
            continue
        new, slices = style.shard(module, layout, rank, group)
        if new is module:  # changed in place (attention heads)
            continue
        for param_name, piece in slices.items():
            full = getattr(module, param_name)
            getattr(new, param_name).copy_(full if piece is None else piece.of(full))
            if piece is not None:
                split[f"{name}.{param_name}"] = piece
        new.requires_grad_(False)
        model.set_submodule(name, new)
    return split
