"""BatchTopK codes (Bussmann et al. 2024) on the fused per-row encoder.

Training keeps the k N largest of relu(pre) over a whole batch of N rows, so busy rows get more latents and
quiet ones fewer; inference keeps, in each row, the latents whose pre-activation exceeds a threshold theta
estimated during training (JumpReLU form), so a row's codes do not depend on its batch.

Neither forms the [N, M] pre-activations. The fused encoder gives each row's k_max largest codes, sorted;
both rules keep codes by value alone, so the codes a row keeps are a prefix of its sorted candidates, and
all of them are among the candidates unless a row keeps every one: such a row may have more above the cut,
so the rows that did are encoded again with twice as many candidates (a warning says so), which can only
raise the batch's cut, never lower it below a code the other rows left out. Under a latent-parallel group
the candidates are gathered as for the per-token top-k, so the selection is exact and the same on every
rank. Ties at the batch's cut are all kept.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from megasae.sae.functional import encode

# Candidates per row as a multiple of k (a row that keeps them all is encoded again with more).
CANDIDATES_PER_K = 4
# theta moves this fraction of the way to each batch's smallest kept code. That code is the batch's cut, a
# quantile of N x M pre-activations that varies little from batch to batch but drifts as the SAE trains, so
# theta follows the last ten or so batches. SAELens's 0.01 lags: after 10 steps of SmolLM2's layer 15 it
# still sat at 6.8 where the batch cut had reached 7.6, and the SAE fired 60 latents per token for k = 32.
THRESHOLD_RATE = 0.1


def candidates_per_row(k: int, num_latents: int, k_max: int | None = None) -> int:
    """k_max as set, or by default CANDIDATES_PER_K x k (at most every latent)."""
    return k_max or min(CANDIDATES_PER_K * k, num_latents)


def _kept(values: Tensor, k: int, threshold: Tensor | None) -> Tensor:
    """Which candidate codes survive: the batch's k N largest positive ones, or those above `threshold`."""
    if threshold is not None:
        return values > threshold
    positive = values > 0
    if values.shape[0] == 0:
        return positive
    cut = values.detach().flatten().topk(k * values.shape[0], sorted=False).values.min()
    return positive & (values >= cut)


def batchtopk_encode(
    x: Tensor,
    W_enc: Tensor,
    b_enc: Tensor,
    b_dec: Tensor | None,
    k: int,
    k_max: int,
    threshold: Tensor | None = None,
    latent_group: dist.ProcessGroup | None = None,
) -> tuple[Tensor, Tensor]:
    """(values, indices): BatchTopK codes of the rows `x` (threshold None: the batch selection of training;
    else the inference rule pre > threshold) from k_max candidates per row or more, each [N, w] with w the
    most codes any row keeps (the other slots hold 0)."""
    num_latents = W_enc.shape[0] * (1 if latent_group is None else dist.get_world_size(latent_group))
    values, indices = encode(x, W_enc, b_enc, b_dec, k_max, None, latent_group)
    while True:
        kept = _kept(values, k, threshold)
        full = kept[:, -1]
        if values.shape[1] == num_latents or not full.any():
            break
        warnings.warn("BatchTopK: some rows kept all of their candidate latents and may have more; those "
                      "rows are encoded again with twice as many (a larger k_max avoids it).", stacklevel=2)
        values, indices = _widen(x, full.nonzero()[:, 0], values, indices, W_enc, b_enc, b_dec,
                                 min(2 * values.shape[1], num_latents), latent_group)
    # Kept codes are a prefix of each row: the columns holding any are the first `width`. Contiguous, as the
    # decode's forward and backward would each copy them otherwise.
    width = max(int(kept.any(0).sum()), 1)
    return values[:, :width].where(kept[:, :width], 0), indices[:, :width].contiguous()


def _widen(x: Tensor, rows: Tensor, values: Tensor, indices: Tensor, W_enc: Tensor, b_enc: Tensor,
           b_dec: Tensor | None, width: int, latent_group: dist.ProcessGroup | None) -> tuple[Tensor, Tensor]:
    """The candidates [N, width]: `rows` encoded again with `width` candidates, the other rows' padded with
    zero codes (which no rule keeps)."""
    wider_values, wider_indices = encode(x[rows], W_enc, b_enc, b_dec, width, None, latent_group)
    pad = (0, width - values.shape[1])
    return (F.pad(values, pad).index_copy(0, rows, wider_values),
            F.pad(indices, pad).index_copy(0, rows, wider_indices))


@torch.no_grad()
def update_threshold_(threshold: Tensor, values: Tensor, group: dist.ProcessGroup | None = None) -> None:
    """Move theta (a 0-dim tensor, 0 before the first batch) towards the smallest code this batch kept,
    averaged over the ranks of `group` so that data-parallel replicas keep one theta: a running mean
    (exponential, rate THRESHOLD_RATE) that the first batch initialises."""
    positive = values[values > 0]
    stats = torch.stack([positive.min() if positive.numel() else values.new_zeros(()),
                         values.new_tensor(float(positive.numel() > 0))]).to(threshold)
    if group is not None:
        dist.all_reduce(stats, group=group)
    if stats[1] == 0:
        return
    smallest = stats[0] / stats[1]
    if threshold > 0:
        threshold.lerp_(smallest, THRESHOLD_RATE)
    else:
        threshold.copy_(smallest)
