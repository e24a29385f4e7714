"""The TopK SAE math as pure functions over explicit tensors (DESIGN.md, "The SAE").

For an input row x (width d_in) and M latents:

    pre   = W_enc (x - b_dec) + b_enc        (no pre-bias for a transcoder: d_in may differ from d_out)
    z     = relu(topk_k(pre))                 (without relu for SAEs whose codes are the raw top-k values)
    x_hat = W_dec^T z + b_dec

Everything here is stateless; the PEFT layer owns the tensors and calls these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from megasae import ops
from megasae.collectives import latents


@dataclass
class SaeOutput:
    """What one SAE did on one forward: the rows it read, its reconstruction and its losses.

    `x` and `target` hold only the tokens the token mask kept (`num_tokens` rows);
    for a plain SAE they are the same tensor, for a transcoder `target` is the module's output. They and
    `x_hat` are in the host's units; the losses are of the rows as the SAE reads them (standardised ones
    for an SAE with normalize_activations "layer_norm").
    """

    x: Tensor
    target: Tensor
    x_hat: Tensor
    values: Tensor
    indices: Tensor
    fvu: Tensor
    auxk: Tensor
    loss: Tensor
    num_dead: int
    # bool over the flattened leading positions of the activations (e.g. batch x seq): the rows `x` holds,
    # in order; None when it holds all of them.
    kept: Tensor | None = None
    # A Matryoshka SAE's {prefix size m: reconstruction from the codes of latents below m} and its FVU, for
    # every prefix (the last, all latents, is x_hat); empty for other SAEs.
    prefix_x_hat: dict[int, Tensor] = field(default_factory=dict)
    prefix_fvu: dict[int, Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.x.shape[0]

    @property
    def l0(self) -> Tensor:
        """Mean number of active latents per token (TopK: at most k, ReLU may zero some of the top k)."""
        if self.num_tokens == 0:
            return self.values.new_zeros((), dtype=torch.float32)
        return (self.values != 0).sum(-1, dtype=torch.float32).mean()


# SAELens's "layer_norm" normalisation of an SAE's input, to the letter so that exports agree: each row is
# read as (x - mean) / (std + eps), std the unbiased one, and the reconstruction scaled back by std and mean.
LAYER_NORM_EPS = 1e-5


@dataclass(frozen=True)
class RowNorm:
    """Each row's mean and standard deviation: the SAE works on standardised rows, so that a token's codes
    and its share of the loss do not grow with its norm (Bussmann et al.'s BatchTopK SAEs train so)."""

    mean: Tensor
    std: Tensor

    @classmethod
    def of(cls, rows: Tensor) -> RowNorm:
        """The statistics in float32 at least: a bf16 mean would lose what a row varies by around it."""
        rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
        mean = rows.mean(-1, keepdim=True)
        return cls(mean, (rows - mean).std(-1, keepdim=True))

    def apply(self, rows: Tensor) -> Tensor:
        return ((rows - self.mean) / (self.std + LAYER_NORM_EPS)).to(rows.dtype)

    def undo(self, rows: Tensor) -> Tensor:
        return (rows * self.std + self.mean).to(rows.dtype)


def init_weights(
    d_in: int,
    d_out: int,
    num_latents: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Decoder rows are random unit vectors and the encoder starts as their copy (sparsify, OpenAI).

    A transcoder whose input and output widths differ gets its own random unit encoder rows.
    Biases start at zero. On the first batch the SAE layer sets b_dec to its mean (`mean_and_count`)
    and scales an autoencoder's W_enc by `least_squares_scale`.
    """

    def unit_rows(width: int) -> Tensor:
        w = torch.randn(num_latents, width, generator=generator, dtype=torch.float32, device=device)
        return w / w.norm(dim=-1, keepdim=True)

    W_dec = unit_rows(d_out)
    W_enc = W_dec.clone() if d_in == d_out else unit_rows(d_in)
    return {
        "W_enc": W_enc.to(dtype),
        "b_enc": torch.zeros(num_latents, dtype=dtype, device=device),
        "W_dec": W_dec.to(dtype),
        "b_dec": torch.zeros(d_out, dtype=dtype, device=device),
    }


def encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    k: int,
    dead_mask: Tensor | None = None,
    latent_group: dist.ProcessGroup | None = None,
    relu: bool = True,
):
    """(values, indices) of relu(topk_k(W_enc (x - b_dec) + b_enc)), each [N, k]; relu=False keeps the raw
    top-k values.

    With a latent group, W_enc and b_enc are this rank's block of latents (megasae.collectives.latents).
    """
    if not relu:
        return _raw_topk(x, W_enc, b_enc, b_dec, k, dead_mask, latent_group)
    if latent_group is not None:
        return latents.topk_encode(x, W_enc, b_enc, b_dec, k, latent_group, dead_mask)
    return ops.topk_encode(x, W_enc, b_enc, b_dec, k, dead_mask)


def _raw_topk(x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor | None, k: int, dead_mask: Tensor | None,
              latent_group: dist.ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """topk_k(pre) without relu. The kernels select the same latents (their top-k is taken before their relu);
    the values are then recomputed at those latents in plain PyTorch, O(N k d), so that autograd, not the
    kernels' relu-masked backward, gives their gradients."""
    if latent_group is not None:
        raise ValueError(
            "An SAE whose codes skip the ReLU (relu_codes=False) runs on one rank; its latents cannot be "
            "split over a tensor-parallel group (use --tp 1)."
        )
    with torch.no_grad():
        _, indices = ops.topk_encode(x, W_enc, b_enc, b_dec, k, dead_mask)
    rows = x if b_dec is None else x - b_dec
    values = torch.einsum("nd,nkd->nk", rows, W_enc[indices]) + b_enc[indices]
    if dead_mask is not None:  # slots past the selectable latents are padding, 0 as from the kernels
        values = values.masked_fill(~dead_mask[indices], 0)
    return values, indices


def decode(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None,
           latent_group: dist.ProcessGroup | None = None) -> Tensor:
    """W_dec^T z + b_dec for the sparse codes z given as (values, indices)."""
    if latent_group is not None:
        return latents.sparse_decode(indices, values, W_dec, b_dec, latent_group)
    return ops.sparse_decode(indices, values, W_dec, b_dec)


def _sum_over_ranks(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


@torch.no_grad()
def mean_and_count(rows: Tensor, group: dist.ProcessGroup | None = None) -> tuple[Tensor, int]:
    """Mean over the tokens of all ranks of `group` (fp32) and their number; the b_dec initialisation."""
    stats = torch.cat([rows.float().sum(0), rows.new_full((1,), rows.shape[0], dtype=torch.float32)])
    _sum_over_ranks(stats, group)
    count = int(stats[-1])
    return stats[:-1] / max(count, 1), count


@torch.no_grad()
def least_squares_scale(target: Tensor, prediction: Tensor, group: dist.ProcessGroup | None = None) -> float:
    """argmin_s sum ||target - s prediction||^2 over the tokens of all ranks of `group` (1 if prediction
    is 0).

    The encoder initialisation uses it: with b_enc = 0, scaling W_enc by s picks the same top-k latents
    with values times s, so a fresh encoder scaled this way starts at the best reconstruction along its
    own direction instead of overshooting (tied unit rows give s of about 0.7 on LLM residual streams).
    """
    stats = torch.stack([(target.float() * prediction.float()).sum(), prediction.float().pow(2).sum()])
    _sum_over_ranks(stats, group)
    return float(stats[0] / stats[1]) if stats[1] > 0 else 1.0


@torch.no_grad()
def total_variance(target: Tensor, group: dist.ProcessGroup | None = None) -> Tensor:
    """sum((x - mean_tokens(x))^2) in fp32 over the tokens of all ranks: the denominator of FVU and AuxK.

    Two passes (mean, then squared deviations) rather than E[x^2] - E[x]^2, which cancels badly on
    residual streams whose mean is large next to their spread.
    """
    mean, _ = mean_and_count(target, group)
    return _sum_over_ranks((target.float() - mean).pow(2).sum(), group)


def fraction_of_variance_unexplained(target: Tensor, x_hat: Tensor, total_var: Tensor) -> Tensor:
    """sum((x - x_hat)^2) / sum((x - mean)^2); 0 for an empty batch rather than NaN."""
    residual = (target.float() - x_hat.float()).pow(2).sum()
    return residual / total_var.clamp_min(torch.finfo(torch.float32).tiny)


def prefix_reconstructions(values: Tensor, indices: Tensor, W_dec: Tensor, b_dec: Tensor | None,
                           prefixes: tuple[int, ...], latent_group: dist.ProcessGroup | None = None
                           ) -> dict[int, Tensor]:
    """{m: the reconstruction from the codes of latents below m} for each Matryoshka prefix size m: the
    sparse decode of the same (values, indices) with the other codes zeroed, never an [N, M] tensor."""
    return {m: decode(values.where(indices < m, 0), indices, W_dec, b_dec, latent_group) for m in prefixes}


def auxk_loss(
    x: Tensor,
    residual: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    encoder_pre_bias: Tensor | None,
    W_dec: Tensor,
    dead_mask: Tensor,
    k_aux: int,
    total_var: Tensor,
    latent_group: dist.ProcessGroup | None = None,
    relu: bool = True,
) -> Tensor:
    """AuxK (Gao et al. 2024): the dead latents alone try to explain the detached residual.

    Takes the top-k_aux pre-activations over dead latents only, decodes them without b_dec,
    and scores the fit against the residual, normalised like FVU and scaled by
    min(num_dead / k_aux, 1). The gradient reaches W_enc and b_enc (sparsify's fused
    encoder drops it) as well as W_dec.
    """
    num_dead = int(dead_mask.sum())
    if num_dead == 0 or x.shape[0] == 0:
        return x.new_zeros((), dtype=torch.float32)
    values, indices = encode(x, W_enc, b_enc, encoder_pre_bias, min(k_aux, num_dead), dead_mask, latent_group,
                             relu)
    residual_hat = decode(values, indices, W_dec, None, latent_group)
    scale = min(num_dead / k_aux, 1.0)
    return scale * fraction_of_variance_unexplained(residual.detach(), residual_hat, total_var)


@torch.no_grad()
def update_dead_counters(
    tokens_since_fired: Tensor, indices: Tensor, values: Tensor, group: dist.ProcessGroup | None = None
) -> None:
    """Count tokens since each latent last fired (a nonzero value) on any rank of `group`, in place."""
    fired = torch.zeros_like(tokens_since_fired, dtype=torch.int32)
    fired[indices[values != 0]] = 1
    num_tokens = torch.tensor([indices.shape[0]], device=fired.device, dtype=torch.int64)
    if group is not None:
        dist.all_reduce(fired, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(num_tokens, group=group)
    tokens_since_fired += num_tokens
    tokens_since_fired[fired.bool()] = 0


@torch.no_grad()
def remove_parallel_grad_(W_dec: Tensor) -> None:
    """Drop the part of W_dec's gradient along each (unit) row, which renormalisation would undo anyway."""
    if W_dec.grad is None:
        return
    parallel = (W_dec.grad * W_dec).sum(-1, keepdim=True)
    W_dec.grad -= parallel * W_dec


@torch.no_grad()
def normalize_rows_(W_dec: Tensor) -> None:
    """Put every decoder row back on the unit sphere (after the optimizer step)."""
    W_dec /= W_dec.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(W_dec.dtype).eps)
