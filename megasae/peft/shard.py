"""Latent-parallel SAEs in a PEFT model: split each SAE's latents over the TP group, gather them to save.

The saved adapter is always the standard, whole one; loading it and calling `shard_saes` reshards it
to any TP size.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megasae.collectives import latents
from megasae.peft.layer import TopKSaeLayer

# Per-latent weights; b_dec (per output feature) is replicated.
SHARDED = ("sae_W_enc", "sae_b_enc", "sae_W_dec")


def shard_saes(model: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Keep this rank's block of latents of every SAE; call before building the optimizer."""
    if group is None:
        return
    size = dist.get_world_size(group)
    for layer in (m for m in model.modules() if isinstance(m, TopKSaeLayer)):
        for adapter in layer.sae_W_enc:
            num_latents = layer.num_latents(adapter)
            if num_latents % size:
                raise ValueError(
                    f"The SAE on {layer.module_path!r} has {num_latents} latents, which cannot be split over "
                    f"{size} tensor-parallel ranks; choose a number of latents divisible by {size}."
                )
            for name in SHARDED:
                full = getattr(layer, name)[adapter]
                shard = latents.shard_rows(full.detach(), group).clone()
                getattr(layer, name)[adapter] = nn.Parameter(shard, requires_grad=full.requires_grad)
        layer.latent_group = group


def load_whole_sae(layer: TopKSaeLayer, adapter: str, weights) -> None:
    """Copy a whole SAE (a megasae.formats.SaeWeights: W_enc, b_enc, W_dec, b_dec and a BatchTopK SAE's
    threshold) into `adapter` of `layer`, a latent-parallel rank keeping its block of latents."""
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            whole = getattr(weights, name)
            if layer.latent_group is not None and f"sae_{name}" in SHARDED:
                whole = latents.shard_rows(whole, layer.latent_group)
            getattr(layer, f"sae_{name}")[adapter].copy_(whole)
        if weights.threshold is not None:  # replicated on every rank
            layer.sae_threshold[adapter].copy_(weights.threshold)


def sharded_parameters(model: nn.Module) -> set[int]:
    """id() of every latent-sharded SAE parameter (for a gradient norm over the whole model)."""
    return {
        id(p)
        for layer in model.modules()
        if isinstance(layer, TopKSaeLayer) and layer.latent_group is not None
        for name in SHARDED
        for p in getattr(layer, name).values()
    }


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """model.state_dict() with every latent-sharded SAE tensor gathered whole.

    A collective over each TP group: every rank calls it.
    """
    state = model.state_dict()
    for path, layer in model.named_modules():
        if isinstance(layer, TopKSaeLayer) and layer.latent_group is not None:
            for name in SHARDED:
                for adapter, shard in getattr(layer, name).items():
                    state[f"{path}.{name}.{adapter}"] = latents.gather_rows(
                        shard.detach(), layer.latent_group
                    )
    return state


def save_adapter(model, directory: str | os.PathLike, is_main: bool) -> None:
    """Write the whole adapter from the main rank; every rank must call it (the gather is a collective)."""
    state = full_state_dict(model)
    if is_main:
        model.save_pretrained(directory, state_dict=state)
