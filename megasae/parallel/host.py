"""The host as one rank runs it, built the same way for training, caching and evaluation: whole in one
process, split over the TP group, or this rank's pipeline stage of it with the targets of its layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from megasae.models import load_host_model
from megasae.parallel.architectures import architecture
from megasae.parallel.distributed import ParallelState
from megasae.parallel.loading import load_host_tensor_parallel
from megasae.parallel.pipeline import PipelineStage, stage_targets


@dataclass
class RankHost:
    host: nn.Module
    processor: Any
    # This rank's pipeline stage (None without a pipeline) and the targets in its layers (all without one).
    stage: PipelineStage | None
    targets: list[str]


def build_host(model: str | None, targets: list[str], par: ParallelState, dtype: torch.dtype, *,
               to_logits: bool = False) -> RankHost:
    """`model` loaded for this rank. Training and caching stop after the last of `targets`; `to_logits`
    (evaluation) keeps every layer, the final norm and the LM head."""
    if par.tp_size > 1 or par.pp_size > 1:
        # each rank reads its slices of its stage's layers
        host, processor = load_host_tensor_parallel(model, None if to_logits else targets, par, dtype=dtype)
    else:
        host, processor = load_host_model(model, dtype=dtype, device=par.device)
    if par.pp_size == 1:
        return RankHost(host, processor, None, list(targets))
    arch = architecture(host.config)  # a clear error for unsupported architectures
    if to_logits:
        last_layer = host.config.get_text_config().num_hidden_layers - 1
    else:
        last_layer = max(arch.layer_of(name) for name in targets)
    stage = PipelineStage(host, par, last_layer)
    return RankHost(host, processor, stage, stage_targets(arch, list(targets), last_layer, par))
