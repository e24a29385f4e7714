"""Loading a host with its adapter for evaluation, and host forwards with one target spliced or ablated."""

from __future__ import annotations

import torch
from torch import Tensor

from megasae.eval.config import HeldOutData
from megasae.models import load_host_model
from megasae.parallel import ParallelState
from megasae.parallel.adapter import shard_saes
from megasae.parallel.loading import load_host_tensor_parallel
from megasae.peft import PeftSaeModel, sae_layers
from megasae.peft.layer import Replacement, TopKSaeLayer
from megasae.peft.model import check_sae_adapter


def load_sae_model(cfg: HeldOutData, par: ParallelState | None = None):
    """The host with the adapter attached, in eval mode; (model, processor, {target path: layer}). Under
    tensor parallelism (`par`) the whole host and each SAE's latents are split over the TP group."""
    check_sae_adapter(cfg.adapter)  # before the host, which takes far longer to load
    if par is not None and par.tp_size > 1:
        host, processor = load_host_tensor_parallel(cfg.model, None, par, dtype=cfg.torch_dtype())
    else:
        host, processor = load_host_model(cfg.model, dtype=cfg.torch_dtype(), device=cfg.torch_device())
    model = PeftSaeModel.from_pretrained(host, cfg.adapter)
    if par is not None:
        shard_saes(model, par.tp_group)
    model.eval()  # no b_dec initialisation and no dead-latent counting while reading
    return model, processor, {layer.module_path: layer for layer in sae_layers(model)}


def adapter_settings(layer: TopKSaeLayer) -> tuple[int, int]:
    """(num_latents, k) of a layer's SAE."""
    return layer.num_latents("default"), layer.sae_spec["default"].k


@torch.no_grad()
def host_logits(model: PeftSaeModel, inputs: dict[str, Tensor], token_mask: Tensor, outlier_factor: float | None,
                replace: dict[str, Replacement] | None = None):
    """The host's logits with `replace` applied to the rows the SAEs read, and every SAE's output on those rows."""
    with model.capture(token_mask=token_mask, outlier_factor=outlier_factor, replace=replace) as outputs:
        logits = model(**inputs, use_cache=False).logits
    return logits, dict(outputs)
