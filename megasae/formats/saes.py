"""The SAEs of one adapter in memory, whatever format they came from, and the checks every reader runs."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor

from megasae.peft.config import TopKSaeConfig

# The adapter file names a tensor `base_model.model.<target module path>.sae_<name>`.
WEIGHT_PREFIX = "base_model.model."
WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")


@dataclass
class SaeWeights:
    """One SAE in megasae's layout: W_enc [M, d_in], b_enc [M], W_dec [M, d_out], b_dec [d_out], and a
    BatchTopK SAE's inference threshold (a 0-dim tensor; None for TopK)."""

    W_enc: Tensor
    b_enc: Tensor
    W_dec: Tensor
    b_dec: Tensor
    threshold: Tensor | None = None

    @property
    def num_latents(self) -> int:
        return self.W_enc.shape[0]

    @property
    def d_in(self) -> int:
        return self.W_enc.shape[1]

    @property
    def d_out(self) -> int:
        return self.W_dec.shape[1]


@dataclass
class SaeSet:
    """The SAEs read from one source: one config for all, the weights per target module path."""

    config: TopKSaeConfig  # target_modules lists the module paths of `saes`
    saes: dict[str, SaeWeights]
    path: Path  # the local directory they were read from
    format: str

    def state_dict(self) -> dict[str, Tensor]:
        """The tensors under the keys of megasae's adapter_model.safetensors."""
        return {f"{WEIGHT_PREFIX}{path}.sae_{name}": getattr(weights, name).contiguous()
                for path, weights in self.saes.items() for name in (*WEIGHT_NAMES, "threshold")
                if getattr(weights, name) is not None}


def load_tensors(file: Path) -> dict[str, Tensor]:
    """Every tensor of a safetensors file, or one sentence naming the file."""
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: the SAE's weights file is missing.")
    try:
        return load_file(file)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e}).") from None


def tensor_names(file: Path) -> list[str]:
    """The keys of a safetensors file, without reading the tensors, or one sentence naming the file."""
    try:
        with safe_open(file, "pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a readable safetensors file ({e}).") from None


def take(tensors: dict[str, Tensor], file: Path, key: str, shape: tuple[int | None, ...]) -> Tensor:
    """tensors[key], checked: present, of `shape` (None: any size) and finite, else one sentence naming the
    file and key."""
    if key not in tensors:
        raise ValueError(f"{file} has no tensor {key!r}; its keys are {sorted(tensors)[:8]}.")
    tensor = tensors[key]
    if tensor.dim() != len(shape) or any(want not in (None, got) for want, got in zip(shape, tensor.shape)):
        expected = ", ".join("any" if want is None else str(want) for want in shape)
        expected += "," if len(shape) == 1 else ""
        raise ValueError(f"{file} key {key!r} has shape {tuple(tensor.shape)}, expected ({expected}).")
    if not tensor.dtype.is_floating_point:
        raise ValueError(f"{file} key {key!r} is {tensor.dtype}; SAE weights are floating point.")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{file} key {key!r} holds NaN or infinite values; the SAE cannot be used.")
    return tensor


def check_k(k: int, num_latents: int, where: str) -> None:
    if not isinstance(k, int) or not 1 <= k <= num_latents:
        raise ValueError(f"{where} has k = {k!r}; it must be an integer from 1 to the {num_latents} latents.")


def shared_num_latents(saes: dict[str, SaeWeights], source: Path) -> int:
    """The one number of latents of all `saes`: a megasae adapter has one config for all its SAEs."""
    counts = {path: sae.num_latents for path, sae in saes.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(
            f"{source} holds SAEs with different numbers of latents ({counts}); a megasae adapter holds SAEs "
            "of one size: read them one at a time."
        )
    return next(iter(counts.values()))


def write_directory(output_dir: Path, fill: Callable[[Path], None]) -> Path:
    """Run `fill` on a temporary directory beside `output_dir`, then rename it to `output_dir`: a reader (or a
    crash) never sees half of it. An existing non-empty `output_dir` is refused before anything is written."""
    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise FileExistsError(f"{output_dir} already exists and is not empty; choose a new output directory.")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir.parent, prefix=f".{output_dir.name}."))
    try:
        fill(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp's 0700 would stay on the renamed directory
        if output_dir.exists():
            output_dir.rmdir()
        tmp.rename(output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output_dir
