"""The optimizer step of the SAEs, after the backward: the one the trainer, `megasae bench parallel` and a
loop of your own (launch/train_own_loop.py) all take."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from megasae.parallel import ParallelState, sum_gradients
from megasae.parallel.distributed import clip_grad_norm_
from megasae.peft.config import DEFAULT_ADAPTER
from megasae.peft.control import adapter_parameters
from megasae.peft.shard import sharded_parameters


def sae_step(model: nn.Module | None, optimizer: torch.optim.Optimizer | None,
             par: ParallelState | None = None, grad_clip: float = 0.0,
             adapters: Sequence[str] = (DEFAULT_ADAPTER,)) -> None:
    """Sum the SAE gradients over the data-parallel ranks, remove each decoder row's gradient component along
    the row, clip the gradient norm of each of the `adapters` over all its targets (every rank and stage;
    `grad_clip` 0: no clipping), step and zero the optimizer, and renormalise the decoder rows. On a pipeline
    stage that only relays, `model` and `optimizer` are None: it still joins the collectives."""
    par = par or ParallelState()
    params = [p for p in model.parameters() if p.requires_grad] if model is not None else []
    sum_gradients(params, par.dp_group)
    if model is not None:
        model.remove_parallel_decoder_grads()
    if grad_clip > 0:
        sharded = sharded_parameters(model) if model is not None else set()
        for adapter in adapters:  # the SAEs of a sweep train apart: none scales another's step
            own = adapter_parameters(model, adapter) if model is not None else []
            clip_grad_norm_(own, grad_clip, sharded, par.tp_group, par.pp_group, par.device)
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.normalize_decoders()
