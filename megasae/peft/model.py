"""PeftSaeModel: a PeftModel with the SAE controls on it, and get_peft_sae_model to build one."""

from __future__ import annotations

import json
import os
from pathlib import Path

from peft import PeftConfig, PeftModel
from torch import nn

from megasae.peft import control
from megasae.peft.config import PEFT_TYPE, TopKSaeConfig
from megasae.peft.layer import SaeMode


def check_sae_adapter(model_id: str | os.PathLike) -> None:
    config_file = Path(model_id) / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(
            f"{model_id} is not a megasae adapter directory: it has no adapter_config.json "
            "(save one with PeftSaeModel.save_pretrained)."
        )
    peft_type = json.loads(config_file.read_text()).get("peft_type")
    if peft_type != PEFT_TYPE:
        raise ValueError(
            f"{model_id} is not a megasae adapter directory: its adapter_config.json has peft_type "
            f"{peft_type!r}, expected {PEFT_TYPE!r}."
        )


class PeftSaeModel(PeftModel):
    """A host model with TopK SAEs attached; saves and loads as a standard PEFT adapter."""

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str | os.PathLike,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PeftConfig | None = None,
        **kwargs,
    ) -> PeftSaeModel:
        if config is None:
            check_sae_adapter(model_id)
            config = TopKSaeConfig.from_pretrained(model_id)
        config.init_sae_weights = False  # the weights come from the file
        return super().from_pretrained(model, model_id, adapter_name, is_trainable, config, **kwargs)

    def forward(self, *args, with_cache: bool = False, **kwargs):
        """`with_cache=True` also fills `self.base_model.input_hidden_dict` and `output_hidden_dict` with what
        each SAE read and produced; the host's own forward never sees the flag (README, "Python API")."""
        recording = control.start_hidden_cache(self.base_model, with_cache)
        try:
            return super().forward(*args, **kwargs)
        finally:
            control.stop_hidden_cache(recording)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, *args, **kwargs):
        if os.path.isdir(model_id):
            check_sae_adapter(model_id)
        return super().load_adapter(model_id, adapter_name, *args, **kwargs)

    def capture(self, **options):
        """See `megasae.capture`."""
        return control.capture(self, **options)

    def stop_after_targets(self, **options):
        """See `megasae.stop_after_targets`."""
        return control.stop_after_targets(self, **options)

    def set_sae_mode(self, mode: SaeMode) -> None:
        """See `megasae.set_sae_mode`."""
        control.set_sae_mode(self, mode)

    def sae_outputs(self):
        """See `megasae.sae_outputs`."""
        return control.sae_outputs(self)

    def remove_parallel_decoder_grads(self) -> None:
        """See `megasae.remove_parallel_decoder_grads`."""
        control.remove_parallel_decoder_grads(self)

    def normalize_decoders(self) -> None:
        """See `megasae.normalize_decoders`."""
        control.normalize_decoders(self)


def get_peft_sae_model(
    model: nn.Module,
    config: TopKSaeConfig,
    adapter_name: str = "default",
    low_cpu_mem_usage: bool = False,
) -> PeftSaeModel:
    """Attach a TopK SAE to each target module of `model` (frozen); only the SAEs train."""
    return PeftSaeModel(model, config, adapter_name=adapter_name, low_cpu_mem_usage=low_cpu_mem_usage)
