"""What `megasae export` and `megasae import` take."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import tyro


@dataclass
class ExportConfig:
    """Write every SAE of an adapter (or the one on --target) in SAELens's or sparsify's own layout."""

    adapter: str
    """The SAEs: any source megasae reads (adapter directory, SAELens or sparsify folder, Hub id)."""
    format: Literal["saelens", "sparsify"]
    """saelens: one folder per SAE named by its module path; sparsify: one hookpoint folder per SAE."""
    output_dir: Path
    """A new (or empty) directory; it appears whole or not at all."""
    target: str | None = None
    """Export only the SAE on this module path."""
    eval_json: Path | None = None
    """eval.json of `megasae eval` whose firing frequencies become SAELens's sparsity.safetensors; none means
    ADAPTER/eval.json when it exists."""
    base_model_prefix: str = "model"
    """Where the host keeps its base model, relative to which sparsify names hookpoints ('model' for Llama,
    Qwen2 and Qwen2.5-VL hosts: model.layers.15 becomes layers.15)."""


@dataclass
class ImportConfig:
    """Convert an SAE of any format megasae reads into a megasae adapter directory."""

    source: Annotated[str, tyro.conf.Positional, tyro.conf.arg(metavar="SOURCE")]
    """An original-project adapter, a SAELens SAE folder, a sparsify hookpoint or run directory, a megasae
    adapter, or a Hugging Face Hub id org/name[:subfolder] of one."""
    output_dir: Path
    """A new (or empty) directory for the adapter; it appears whole or not at all."""
    base_model_prefix: str = "model"
    """Where the host keeps its base model: sparsify's hookpoint layers.15 becomes model.layers.15."""
