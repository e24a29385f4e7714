"""Streaming reconstruction, sparsity and next-token statistics, per target and per token group.

Every statistic is a sum over tokens, so batches (and token groups: all, text, image) add up exactly;
`summary()` turns the sums into the numbers `megasae eval` reports.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from megasae import sae

# A latent that fires on more than this fraction of tokens is dense (it says little about any token).
DENSE_FREQUENCY = 0.1


def token_groups(input_ids: Tensor, image_ids: Tensor, multimodal: bool) -> dict[str, Tensor]:
    """Bool masks over the flattened positions of a batch: "all", and for multimodal hosts "text" and
    "image"."""
    flat = input_ids.reshape(-1)
    groups = {"all": torch.ones_like(flat, dtype=torch.bool)}
    if multimodal:
        is_image = torch.isin(flat, image_ids.to(flat.device))
        groups.update(text=~is_image, image=is_image)
    return groups


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


class ReconstructionStats:
    """Reconstruction and sparsity sums over the tokens one SAE read in one token group."""

    def __init__(self, num_latents: int, k: int):
        self.tokens = 0
        self.width = 0
        self.mean: Tensor | None = None  # running mean of the target (float64)
        self.total_variance = 0.0  # sum of squared deviations from that mean: FVU's denominator
        self.squared_error = 0.0
        self.cosine = 0.0
        self.norm_ratio = 0.0
        self.fired = torch.zeros(num_latents, dtype=torch.long)  # tokens each latent fired on
        # Tokens with each number of active latents: at most k for TopK, any for BatchTopK at inference.
        self.l0_counts = torch.zeros(k + 1, dtype=torch.long)
        self.prefix_squared_error: dict[int, float] = {}  # a Matryoshka SAE's, per prefix size

    @torch.no_grad()
    def add(self, target: Tensor, x_hat: Tensor, values: Tensor, indices: Tensor,
            prefix_x_hat: dict[int, Tensor] | None = None) -> None:
        """One batch; `prefix_x_hat`: a Matryoshka SAE's reconstruction from each prefix of its latents."""
        n = target.shape[0]
        if n == 0:
            return
        target, x_hat = target.float(), x_hat.float()
        # Chan et al.'s merge of per-batch (mean, squared deviations): stable where E[x^2] - E[x]^2 cancels.
        batch_mean = sae.mean_and_count(target)[0].double()
        batch_variance = sae.total_variance(target).item()
        if self.mean is None:
            self.mean, self.width = torch.zeros_like(batch_mean), target.shape[1]
        total = self.tokens + n
        delta = batch_mean - self.mean
        self.total_variance += batch_variance + delta.pow(2).sum().item() * self.tokens * n / total
        self.mean += delta * (n / total)
        self.tokens = total
        self.squared_error += (target - x_hat).double().pow(2).sum().item()
        for m, prefix_rows in (prefix_x_hat or {}).items():
            error = (target - prefix_rows.float()).double().pow(2).sum().item()
            self.prefix_squared_error[m] = self.prefix_squared_error.get(m, 0.0) + error
        self.cosine += F.cosine_similarity(x_hat, target, dim=-1).double().sum().item()
        target_norm = target.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
        self.norm_ratio += (x_hat.norm(dim=-1) / target_norm).double().sum().item()
        active = values != 0  # negative codes are active too in SAEs without ReLU
        self.fired += torch.bincount(indices[active].cpu(), minlength=self.fired.numel())
        counts = torch.bincount(active.sum(-1).cpu(), minlength=self.l0_counts.numel())
        self.l0_counts = F.pad(self.l0_counts, (0, counts.numel() - self.l0_counts.numel())) + counts

    def summary(self) -> dict:
        n = self.tokens
        frequency = (self.fired.double() / max(n, 1)).tolist()
        fvu = _ratio(self.squared_error, self.total_variance)
        l0 = (torch.arange(self.l0_counts.numel()) * self.l0_counts).sum().item()
        summary = {
            "tokens": n,
            "fvu": fvu,
            "explained_variance": None if fvu is None else 1 - fvu,
            "mse": _ratio(self.squared_error, n * self.width),
            "cosine_similarity": _ratio(self.cosine, n),
            "relative_norm": _ratio(self.norm_ratio, n),
            "l0": _ratio(l0, n),
            "dead_fraction": (self.fired == 0).double().mean().item() if n else None,
            "dense_fraction": (self.fired > DENSE_FREQUENCY * n).double().mean().item() if n else None,
            "l0_histogram": self.l0_counts.tolist(),
            "firing_frequency": frequency,
        }
        if self.prefix_squared_error:  # a Matryoshka SAE
            summary["prefix_fvu"] = {m: _ratio(error, self.total_variance)
                                     for m, error in self.prefix_squared_error.items()}
        return summary


def next_token_log_probs(logits: Tensor, positions: Tensor) -> Tensor:
    """log p(. | prefix) at the given positions ([batch, seq] bool), in float32: [num positions, vocab]."""
    return logits[positions].float().log_softmax(-1)


class NextTokenStats:
    """Next-token cross-entropy of the host clean, spliced and ablated, and KL(clean || spliced), summed over
    the predictions made at the positions one SAE replaced."""

    def __init__(self):
        self.predictions = 0
        self.ce = {"clean": 0.0, "spliced": 0.0, "ablated": 0.0}
        self.kl = 0.0

    @torch.no_grad()
    def add(self, labels: Tensor, clean: Tensor, spliced: Tensor, ablated: Tensor) -> None:
        """labels: [N] next tokens; clean/spliced/ablated: [N, vocab] log-probabilities at those positions."""
        self.predictions += labels.numel()
        for name, log_probs in (("clean", clean), ("spliced", spliced), ("ablated", ablated)):
            self.ce[name] += F.nll_loss(log_probs, labels, reduction="sum").item()
        self.kl += F.kl_div(spliced, clean, log_target=True, reduction="sum").item()

    def summary(self) -> dict:
        n = self.predictions
        ce = {name: _ratio(total, n) for name, total in self.ce.items()}
        recovered = None
        if n and not math.isclose(ce["ablated"], ce["clean"]):
            recovered = (ce["ablated"] - ce["spliced"]) / (ce["ablated"] - ce["clean"])
        return {
            "predictions": n,
            "ce_clean": ce["clean"],
            "ce_spliced": ce["spliced"],
            "ce_ablated": ce["ablated"],
            "loss_recovered": recovered,
            "kl_clean_spliced": _ratio(self.kl, n),
        }
