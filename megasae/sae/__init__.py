"""The SAE math: pure functions of the weights, used by the PEFT layer and the trainer."""

from megasae.sae.batchtopk import batchtopk_encode, candidates_per_row, update_threshold_
from megasae.sae.functional import (
    RowNorm,
    SaeOutput,
    auxk_loss,
    decode,
    encode,
    fraction_of_variance_unexplained,
    init_weights,
    least_squares_scale,
    mean_and_count,
    normalize_rows_,
    prefix_reconstructions,
    remove_parallel_grad_,
    total_variance,
    update_dead_counters,
)

__all__ = [
    "RowNorm",
    "SaeOutput",
    "auxk_loss",
    "batchtopk_encode",
    "decode",
    "candidates_per_row",
    "encode",
    "fraction_of_variance_unexplained",
    "init_weights",
    "least_squares_scale",
    "mean_and_count",
    "normalize_rows_",
    "prefix_reconstructions",
    "remove_parallel_grad_",
    "total_variance",
    "update_dead_counters",
    "update_threshold_",
]
