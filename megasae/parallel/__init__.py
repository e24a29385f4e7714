"""Process groups, data-parallel collectives, and Megatron-style tensor parallelism of hosts and SAEs.

Latent-parallel SAE adapters (shard_saes, save_adapter) live in megasae.peft.shard, which needs
megasae.peft, itself importing this package.
"""

from megasae.parallel.distributed import (
    ParallelState,
    barrier,
    check_parallel_sizes,
    init_distributed,
    sum_gradients,
    sum_over_ranks,
)
from megasae.parallel.shard import shard_model

__all__ = [
    "ParallelState",
    "barrier",
    "check_parallel_sizes",
    "init_distributed",
    "shard_model",
    "sum_gradients",
    "sum_over_ranks",
]
