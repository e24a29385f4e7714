"""What `megasae eval` and `megasae inspect` take: a host, an adapter, held-out data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from megasae.checks import check_at_least, check_outlier_factor, check_types
from megasae.data import DataColumns
from megasae.dtypes import DTYPES, Dtype
from megasae.parallel.distributed import Device, resolve_device
from megasae.peft.config import TopKSaeConfig
from megasae.token_policy import DEFAULT_TOKEN_POLICY, Modality

# A setting that follows what the adapter was trained with.
ADAPTER = "adapter"


@dataclass
class HeldOutData:
    """The host, the adapter and the held-out data both commands read, and how the host splits over ranks."""

    adapter: str
    """The SAEs: an adapter directory written by `megasae train`, an original-project adapter, a SAELens SAE
    folder, a sparsify hookpoint or run directory, or a Hugging Face Hub id org/name[:subfolder] of one."""
    model: str | None = None
    """Host model: a Hugging Face model directory or a .gguf file; none means SmolLM2-135M-Instruct."""
    data: str = "builtin"
    """Held-out data: a Parquet file, a directory of Parquet files, or 'builtin'."""
    max_tokens: int = 65_536
    """Read at most this many tokens (one pass over the data at most)."""
    batch_size: int = 8
    """Sequences per forward."""
    ctx_len: int = 256
    """Tokens per sequence: plain text is packed into chunks of this length, chat rows cut to it."""
    seed: int = 1
    """Seed of the data order; training's default is 0, so the built-in corpus starts elsewhere."""
    tokens: Literal["adapter"] | Modality = ADAPTER
    """Which positions the SAEs read and replace, by modality; 'adapter': those it was trained on (its
    adapter_config.json's token_policy; 'all' when it records none). Padding, position 0 and special tokens
    never."""
    outlier_factor: float | None | Literal["adapter"] = ADAPTER
    """Leave out tokens whose activation norm exceeds this multiple of the batch median (None: keep them);
    'adapter': the factor it was trained with (10 when it records none)."""
    dtype: Dtype = "float32"
    """dtype of the host model."""
    text_column: str = DataColumns.text_column
    """Parquet column of plain text."""
    messages_column: str = DataColumns.messages_column
    """Parquet column of chat messages (a list of {role, content})."""
    images_column: str = DataColumns.images_column
    """Parquet column of encoded image bytes for chat rows."""
    device: Device = "auto"
    """Where the host and SAEs run; auto picks CUDA when available."""
    tp: int = 1
    """Tensor-parallel size under torchrun, as in training: the host (LM head replicated) and each SAE's
    latents split over this many ranks; the world size must be tp x pp."""
    pp: int = 1
    """Pipeline stages under torchrun: all the host's decoder layers split over this many stages (the last
    also runs the final norm and LM head), each SAE run on the stage owning its target."""

    def __post_init__(self):
        check_types(self)
        check_at_least(self, 1, "max_tokens", "batch_size", "ctx_len", "tp", "pp")
        if self.outlier_factor != ADAPTER:
            check_outlier_factor(self.outlier_factor)

    def following(self, config: TopKSaeConfig) -> HeldOutData:
        """These settings with each 'adapter' replaced by the token policy the SAE was trained with, or the
        defaults of `megasae train` where it recorded none."""
        policy = config.token_policy or DEFAULT_TOKEN_POLICY
        tokens = policy["tokens"] if self.tokens == ADAPTER else self.tokens
        outlier_factor = policy["outlier_factor"] if self.outlier_factor == ADAPTER else self.outlier_factor
        return dataclasses.replace(self, tokens=tokens, outlier_factor=outlier_factor)

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass
class EvalConfig(HeldOutData):
    """Evaluate a trained SAE adapter on held-out data: reconstruction, sparsity, and the host's next-token
    loss with each target spliced in and zero-ablated. Writes eval.json, report.md, density.png, l0.png."""

    output_dir: Path = Path("runs/eval")
    """Where eval.json, report.md and the plots go."""


@dataclass
class InspectConfig(HeldOutData):
    """Write a static HTML page of the top-activating contexts (and image patches) of chosen latents."""

    latents: str = ""
    """Comma-separated latent ids, e.g. 0,17,42."""
    top: int = 0
    """Instead of --latents: the N latents that fire most often on the data."""
    target: str | None = None
    """The target module whose SAE to inspect; needed only when the adapter has several."""
    examples: int = 8
    """Top-activating contexts shown per latent (one per sequence)."""
    output_dir: Path = Path("runs/eval")
    """The page goes to OUTPUT_DIR/inspect.html unless --output names a file."""
    output: Path | None = None
    """The HTML file to write."""

    def page_path(self) -> Path:
        return self.output if self.output is not None else self.output_dir / "inspect.html"
