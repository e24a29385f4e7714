"""The token policy: which positions of a sequence an SAE reads (DESIGN.md, "Token mask").

Training records it in the adapter (TopKSaeConfig.token_policy) so that eval, inspect and the exports read
the tokens the SAE was trained on; the data layer's token mask applies it.
"""

from __future__ import annotations

from typing import Literal

# Which modality's positions to keep: every one, text only (not image) or image only.
Modality = Literal["all", "text", "image"]

# Whether position 0 of every sequence and the special tokens are left out, the activation-norm outlier
# factor (None: no outlier filter) and the modality kept.
TOKEN_POLICY_KEYS = ("mask_position_0", "exclude_special_tokens", "outlier_factor", "tokens")
# `megasae train`'s, assumed for adapters that record no policy.
DEFAULT_TOKEN_POLICY = {"mask_position_0": True, "exclude_special_tokens": True, "outlier_factor": 10.0,
                        "tokens": "all"}
