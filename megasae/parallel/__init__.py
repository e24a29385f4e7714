"""Process groups, data-parallel collectives, and Megatron-style tensor and pipeline parallelism of hosts.

The latent-parallel SAE math sits below peft in megasae.collectives; sharding an attached SAE is
megasae.peft.shard."""

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
