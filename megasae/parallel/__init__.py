"""Process groups and the collectives of data-parallel training."""

from megasae.parallel.distributed import ParallelState, barrier, init_distributed, sum_gradients, sum_over_ranks

__all__ = ["ParallelState", "barrier", "init_distributed", "sum_gradients", "sum_over_ranks"]
