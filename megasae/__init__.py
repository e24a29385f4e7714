"""megasae: train TopK sparse autoencoders on frozen host models, attached PEFT-style.

`import megasae` registers the "TOPK_SAE" method with peft, so saved adapters load with
`PeftSaeModel.from_pretrained` (or peft's own loaders) afterwards.
"""

import math

from megasae.peft import (
    PeftSaeModel,
    TopKSaeConfig,
    TopKSaeLayer,
    capture,
    get_peft_sae_model,
    normalize_decoders,
    register,
    remove_parallel_decoder_grads,
    sae_layers,
    sae_outputs,
    set_sae_mode,
    stop_after_targets,
)
from megasae.sae import SaeOutput

register()

__version__ = "0.1.0"


def default_lr(num_latents: int) -> float:
    """2e-4 / sqrt(M / 2^14): the learning rate that scales with the number of latents (sparsify)."""
    return 2e-4 / math.sqrt(num_latents / 2**14)


__all__ = [
    "PeftSaeModel",
    "SaeOutput",
    "TopKSaeConfig",
    "TopKSaeLayer",
    "capture",
    "default_lr",
    "get_peft_sae_model",
    "normalize_decoders",
    "remove_parallel_decoder_grads",
    "sae_layers",
    "sae_outputs",
    "set_sae_mode",
    "stop_after_targets",
]
