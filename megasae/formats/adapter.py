"""megasae's adapter (DESIGN.md, "Formats") and the original project's (EvolvingLMMs-Lab/sae): both are PEFT
directories of peft_type "TOPK_SAE", told apart by their tensor names.

- megasae: `base_model.model.<path>.sae_W_enc` [M, d_in], `sae_b_enc` [M], `sae_W_dec` [M, d_out],
  `sae_b_dec` [d_out], and for `architecture: batchtopk` `sae_threshold` [] (the inference threshold);
  codes relu(topk(pre)) unless the config says `relu_codes: false`.
- the original project: `base_model.model.<path>.sae_encoder.weight` [M, d] (no encoder bias), `sae_W_dec`
  [M, d], `sae_b_dec` [d]; its forward is x_hat = W_dec^T topk(W_enc (x - b_dec)) + b_dec with the raw top-k
  values (no ReLU); its targets are nn.Linear modules, whose output it reconstructs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from megasae.formats.saes import (
    WEIGHT_NAMES,
    WEIGHT_PREFIX,
    SaeSet,
    SaeWeights,
    check_k,
    load_tensors,
    shared_num_latents,
    take,
    tensor_names,
)
from megasae.peft.config import DEFAULT_ADAPTER, PEFT_TYPE, TopKSaeConfig

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
ORIGINAL_ENCODER = ".sae_encoder.weight"


def peft_config(path: Path) -> dict:
    """The adapter_config.json of a TopK SAE adapter, or one sentence saying why it is not one."""
    config_file = path / CONFIG_FILE
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}).") from None
    peft_type = config.get("peft_type") if isinstance(config, dict) else None
    if peft_type != PEFT_TYPE:
        raise ValueError(
            f"{path} is not a TopK SAE adapter: its {CONFIG_FILE} has peft_type {peft_type!r}, "
            f"expected {PEFT_TYPE!r}."
        )
    if not (path / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{path} has an {CONFIG_FILE} but no {WEIGHTS_FILE}: its weights are gone.")
    return config


def is_original(path: Path) -> bool:
    """Whether the adapter in `path` was saved by the original project (its encoder is an nn.Linear)."""
    return any(key.endswith(ORIGINAL_ENCODER) for key in tensor_names(path / WEIGHTS_FILE))


def _module_paths(tensors: dict, file: Path, suffixes: tuple[str, ...]) -> list[str]:
    """The module paths named by the keys `base_model.model.<path><suffix>`; any other key is an error."""
    paths = []
    for key in tensors:
        suffix = next((s for s in suffixes if key.startswith(WEIGHT_PREFIX) and key.endswith(s)), None)
        if suffix is None:
            raise ValueError(
                f"{file} has a tensor {key!r} that is not an SAE weight; expected keys "
                f"'{WEIGHT_PREFIX}<module path>' followed by one of {list(suffixes)}."
            )
        paths.append(key[len(WEIGHT_PREFIX):-len(suffix)])
    if not paths:
        raise ValueError(f"{file} holds no tensors.")
    return sorted(set(paths))


def read(path: Path) -> SaeSet:
    """A megasae adapter directory, every tensor checked."""
    peft_config(path)
    config = TopKSaeConfig.from_pretrained(str(path))
    file = path / WEIGHTS_FILE
    tensors = load_tensors(file)
    batchtopk = config.architecture == "batchtopk"
    names = (*WEIGHT_NAMES, "threshold") if batchtopk else WEIGHT_NAMES
    saes = {}
    for module in _module_paths(tensors, file, tuple(f".sae_{name}" for name in names)):
        key = f"{WEIGHT_PREFIX}{module}.sae_"
        W_enc = take(tensors, file, key + "W_enc", (None, None))
        W_dec = take(tensors, file, key + "W_dec", (W_enc.shape[0], None))
        saes[module] = SaeWeights(W_enc, take(tensors, file, key + "b_enc", (W_enc.shape[0],)), W_dec,
                                  take(tensors, file, key + "b_dec", (W_dec.shape[1],)),
                                  take(tensors, file, key + "threshold", ()) if batchtopk else None)
        check_k(config.k, W_enc.shape[0], f"{path / CONFIG_FILE} (SAE on {module!r})")
    return SaeSet(config, saes, path, "megasae")


def read_original(path: Path) -> SaeSet:
    """An adapter saved by the original project, as a megasae SAE without ReLU and with b_enc = 0."""
    original = peft_config(path)
    file = path / WEIGHTS_FILE
    tensors = load_tensors(file)
    saes = {}
    for module in _module_paths(tensors, file, (ORIGINAL_ENCODER, ".sae_W_dec", ".sae_b_dec")):
        key = f"{WEIGHT_PREFIX}{module}"
        W_enc = take(tensors, file, key + ORIGINAL_ENCODER, (None, None))
        W_dec = take(tensors, file, key + ".sae_W_dec", W_enc.shape)
        b_dec = take(tensors, file, key + ".sae_b_dec", (W_enc.shape[1],))
        saes[module] = SaeWeights(W_enc, torch.zeros_like(W_enc[:, 0]), W_dec, b_dec)
        check_k(original.get("k"), W_enc.shape[0], f"{path / CONFIG_FILE} (SAE on {module!r})")
    config = TopKSaeConfig(
        k=original["k"], num_latents=shared_num_latents(saes, file), target_modules=list(saes),
        relu_codes=False,
        dead_tokens_threshold=original.get("dead_tokens_threshold") or 10_000_000,
        base_model_name_or_path=original.get("base_model_name_or_path"),
    )
    return SaeSet(config, saes, path, "original")


def write(saes: SaeSet, directory: Path) -> None:
    """Write `saes` as a megasae adapter (CONFIG_FILE + WEIGHTS_FILE) into `directory`."""
    saes.config.save_pretrained(str(directory))
    save_file(saes.state_dict(), directory / WEIGHTS_FILE, metadata={"format": "pt"})


def adapter_path(directory: str | Path, adapter: str) -> Path:
    """Where peft saves the adapter named `adapter` of a model saved in `directory`."""
    return Path(directory) if adapter == DEFAULT_ADAPTER else Path(directory, adapter)


def add_stage_saes(directory: Path, state: dict[str, Tensor], target_modules: list[str],
                   adapter: str = DEFAULT_ADAPTER) -> None:
    """Complete the adapter `adapter` that one pipeline stage's model saved in `directory` with the other
    stages' SAE tensors in `state` (keyed as in model.state_dict()) and list every target in its config: one
    standard adapter for the whole pipeline, as one process would have saved it."""
    weights_file = Path(directory, WEIGHTS_FILE)
    tensors = load_file(weights_file)
    for key, tensor in state.items():
        if key.endswith(f".{adapter}"):
            tensors.setdefault(key.removesuffix(f".{adapter}"), tensor.contiguous())
    save_file(tensors, weights_file, metadata={"format": "pt"})
    config_file = Path(directory, CONFIG_FILE)
    config = json.loads(config_file.read_text())
    config["target_modules"] = list(target_modules)
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True))
