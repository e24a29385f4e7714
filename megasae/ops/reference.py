"""Pure-PyTorch reference implementations of the megasae ops.

Obviously correct and differentiable by autograd: the oracle the kernels are tested against,
and the fallback when the extension is missing. They may form dense [N, M] tensors.
"""

import torch
import torch.nn.functional as F


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor | None,
    k: int,
    dead_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """relu(topk(W_enc (x - b_dec) + b_enc)), optionally over the latents where dead_mask is True."""
    pre = F.linear(x if b_dec is None else x - b_dec, W_enc, b_enc)
    if dead_mask is not None:
        # -inf never beats a selectable latent and becomes 0 (with zero gradient) under relu.
        pre = pre.masked_fill(~dead_mask, float("-inf"))
    values, indices = pre.topk(k, dim=-1)
    if dead_mask is not None:
        live = int(dead_mask.sum())
        if live < k:  # the padding slots name the first unselectable latents, as the kernels do
            fill = (~dead_mask).nonzero().flatten()[: k - live]
            indices = torch.cat([indices[:, :live], fill.expand(indices.shape[0], -1)], dim=1)
    return values.relu(), indices


def sparse_decode(
    indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None
) -> torch.Tensor:
    """x_hat[n] = sum_j values[n, j] * W_dec[indices[n, j]] + b_dec."""
    rows = W_dec[indices]  # [N, k, d]
    x_hat = torch.einsum("nk,nkd->nd", values, rows)
    return x_hat if b_dec is None else x_hat + b_dec
