"""The PEFT tuner: config, layer, tuner model, PeftSaeModel and the registration with peft."""

from megasae.peft.config import PEFT_TYPE, TopKSaeConfig
from megasae.peft.control import (
    capture,
    normalize_decoders,
    remove_parallel_decoder_grads,
    sae_layers,
    sae_outputs,
    set_sae_mode,
    stop_after_targets,
)
from megasae.peft.layer import TopKSaeLayer
from megasae.peft.model import PeftSaeModel, get_peft_sae_model
from megasae.peft.register import register
from megasae.peft.tuner import TopKSaeModel

__all__ = [
    "PEFT_TYPE",
    "PeftSaeModel",
    "TopKSaeConfig",
    "TopKSaeLayer",
    "TopKSaeModel",
    "capture",
    "get_peft_sae_model",
    "normalize_decoders",
    "register",
    "remove_parallel_decoder_grads",
    "sae_layers",
    "sae_outputs",
    "set_sae_mode",
    "stop_after_targets",
]
