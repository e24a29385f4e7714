"""PeftSaeModel: a PeftModel with the SAE controls on it, and get_peft_sae_model to build one."""

from __future__ import annotations

import os

from peft import PeftConfig, PeftModel
from torch import nn

from megasae import formats
from megasae.peft import control
from megasae.peft.config import TopKSaeConfig
from megasae.peft.layer import SaeMode


def _base_model_prefix(model: nn.Module) -> str:
    """Where a host keeps its base model ("model" in a Llama), relative to which sparsify names hookpoints;
    "" when the host is its own base model."""
    prefix = getattr(model, "base_model_prefix", "")
    return prefix if prefix and isinstance(getattr(model, prefix, None), nn.Module) else ""


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
        """`model_id`: a megasae adapter, or any SAE that megasae.formats reads (an original-project adapter,
        a SAELens SAE folder, a sparsify hookpoint or run directory), as a local path or a Hub id."""
        saes = formats.read(model_id, _base_model_prefix(model))
        config = config or saes.config
        config.init_sae_weights = False  # the weights come from the file
        with formats.adapter_directory(saes) as directory:
            loaded = super().from_pretrained(model, directory, adapter_name, is_trainable, config, **kwargs)
        attached = [layer.module_path for layer in control.sae_layers(loaded)]
        unloaded = [path for path in attached if path not in saes.saes]
        if unloaded:
            raise ValueError(
                f"{saes.path} holds no SAE weights for {unloaded}, which its target_modules attach to; the "
                "adapter is incomplete."
            )
        return loaded

    def forward(self, *args, with_cache: bool = False, **kwargs):
        """`with_cache=True` also fills `self.base_model.input_hidden_dict` and `output_hidden_dict` with what
        each SAE read and produced; the host's own forward never sees the flag (README, "Python API")."""
        recording = control.start_hidden_cache(self.base_model, with_cache)
        try:
            return super().forward(*args, **kwargs)
        finally:
            control.stop_hidden_cache(recording)

    def load_adapter(self, model_id: str | os.PathLike, adapter_name: str, *args, **kwargs):
        saes = formats.read(model_id, _base_model_prefix(self.get_base_model()))
        with formats.adapter_directory(saes) as directory:
            return super().load_adapter(directory, adapter_name, *args, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, save_embedding_layers=False,
                        **kwargs):
        # An SAE adapter holds no embedding weights; peft's "auto" would look base_model_name_or_path (a Hub
        # id such as HuggingFaceTB/SmolLM2-135M-Instruct) up on the Hub at every save.
        super().save_pretrained(save_directory, *args, save_embedding_layers=save_embedding_layers, **kwargs)

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
