"""TopKSaeModel: the peft tuner that finds the target modules and wraps them in TopKSaeLayer."""

from __future__ import annotations

import difflib
import re

from peft.tuners.tuners_utils import BaseTuner
from torch import Tensor, nn

from megasae.peft import control
from megasae.peft.config import TopKSaeConfig
from megasae.peft.layer import TopKSaeLayer


def _names(name: str, target: str) -> bool:
    """Whether module `name` is what `target` names: itself, or a suffix of it at a dot (as in peft)."""
    return name == target or name.endswith(f".{target}")


def target_paths(model: nn.Module, targets: str | list[str] | set[str] | tuple[str, ...]) -> list[str]:
    """The paths of the modules `targets` (names or suffixes, or one regex) name, in the model's order; a
    target that names no module fails, showing the closest real module names.

    peft only complains when nothing matched; a list with one typo would silently train fewer SAEs.
    """
    names = [name for name, _ in model.named_modules() if name]
    if isinstance(targets, str):
        found = [name for name in names if re.fullmatch(targets, name)]
        missing = [] if found else [targets]
    else:
        found = [n for n in names if any(_names(n, t) for t in targets)]
        missing = [t for t in sorted(targets) if not any(_names(n, t) for n in names)]
    for target in missing:
        closest = difflib.get_close_matches(target, names, n=5, cutoff=0.0)
        raise ValueError(
            f"Target module {target!r} not found in {type(model).__name__}; closest module names: {closest}."
        )
    return found


def check_targets_exist(model: nn.Module, config: TopKSaeConfig) -> None:
    if not config.target_modules:
        raise ValueError("TopKSaeConfig.target_modules is empty: name the modules to attach SAEs to.")
    target_paths(model, config.target_modules)


class TopKSaeModel(BaseTuner):
    prefix: str = "sae_"
    tuner_layer_cls = TopKSaeLayer
    target_module_mapping: dict[str, list[str]] = {}

    def __init__(self, model: nn.Module, *args, **kwargs) -> None:
        super().__init__(model, *args, **kwargs)
        # Filled by PeftSaeModel's forward with `with_cache=True`, keyed relative to this tuner
        # ("model.<path>"), as the original project's tuner did.
        self.input_hidden_dict: dict[str, Tensor] = {}
        self.output_hidden_dict: dict[str, Tensor] = {}
        control.accept_with_cache(model)

    def _pre_injection_hook(self, model: nn.Module, config: TopKSaeConfig, adapter_name: str) -> None:
        check_targets_exist(model, config)

    def _create_and_replace(
        self,
        peft_config: TopKSaeConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        if isinstance(target, TopKSaeLayer):
            target.update_layer(adapter_name, peft_config)
            return
        new_module = TopKSaeLayer(target, adapter_name, peft_config, module_path=current_key)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # TopKSaeConfig.sae_dtype decides the SAE's dtype; peft's upcast would override a bf16 choice.
        return
