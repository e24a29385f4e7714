"""The dtype names of configs and flags, and the torch dtypes they stand for."""

from __future__ import annotations

from typing import Literal

import torch

Dtype = Literal["float32", "bfloat16"]
"""What a host or an SAE computes in."""
CacheDtype = Literal["float16", "bfloat16", "float32"]
"""What an activation cache stores."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
