"""Run a function on several gloo ranks on loopback, as torchrun would."""

import os
import socket
import sys

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world_size: int, port: int, fn, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
        dist.barrier()  # no rank tears its groups down while another still talks to it
    finally:
        dist.destroy_process_group()
    # A finished rank skips the interpreter's teardown: gloo's threads, torn down there, now and then
    # abort a rank whose work is done (SIGABRT, "terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(fn, world_size: int, *args) -> None:
    """fn(rank, world_size, *args) on each rank; fn must be importable (module level). Raises if a rank
    fails."""
    mp.spawn(_rank_main, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True)
