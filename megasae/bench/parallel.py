"""`megasae bench parallel`: one SAE training step on a tiny random Llama as one process, as two data-parallel
CPU ranks and as two tensor-parallel CPU ranks (gloo): step time, and the bytes each rank hands to
collectives per step.

Every configuration trains the same SAE on the same global batch: one process reads all of it, DP = 2
ranks read half each (the host replicated, gradients summed), TP = 2 ranks read all of it with the host's
heads and MLP and the SAE's latents split (two all-reduces per decoder layer, the top-k candidates
gathered, the partial reconstructions summed). Collective traffic is counted by wrapping
torch.distributed's all_reduce / all_gather / broadcast during the timed steps: the payload in bytes
(all_reduce: the tensor; all_gather: the gathered result), not the bytes a ring algorithm puts on a wire.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

MODES = {"1 process": (1, 1), "DP = 2": (2, 1), "TP = 2": (2, 2)}  # name -> (ranks, tp)


def _tiny_llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512,
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=4,
    )
    return LlamaForCausalLM(config).eval().requires_grad_(False)


class _Traffic:
    """Counts calls and payload bytes of torch.distributed collectives while installed."""

    NAMES = ("all_reduce", "all_gather", "broadcast")

    def __init__(self):
        self.calls, self.bytes = 0, 0
        self.originals = {name: getattr(dist, name) for name in self.NAMES}

    def __enter__(self):
        for name, fn in self.originals.items():
            setattr(dist, name, self._counting(name, fn))
        return self

    def __exit__(self, *exc):
        for name, fn in self.originals.items():
            setattr(dist, name, fn)

    def _counting(self, name, fn):
        def wrapped(first, *args, **kwargs):
            tensors = first if name == "all_gather" else [first]
            self.calls += 1
            self.bytes += sum(t.numel() * t.element_size() for t in tensors)
            return fn(first, *args, **kwargs)

        return wrapped


def _rank_main(rank: int, world_size: int, tp: int, port: int, args, result_file: str) -> None:
    from megasae import TopKSaeConfig, get_peft_sae_model
    from megasae.parallel import init_distributed, shard_model
    from megasae.peft.shard import shard_saes
    from megasae.train import sae_step

    torch.set_num_threads(args.threads)
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    par = init_distributed("cpu", tp=tp)
    host = _tiny_llama(args)
    shard_model(host, par.tp_group, par.tp_rank, par.tp_size)
    target = f"model.layers.{args.layers - 1}"
    model = get_peft_sae_model(
        host, TopKSaeConfig(k=args.k, expansion_factor=args.expansion_factor, target_modules=[target])
    )
    shard_saes(model, par.tp_group)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    ids = torch.randint(0, 512, (args.batch, args.ctx_len), generator=torch.Generator().manual_seed(0))
    ids = ids[par.dp_rank :: par.dp_size]

    def step():
        with model.stop_after_targets(group=par.dp_group) as outputs:
            model(input_ids=ids)
        outputs[target].loss.backward()
        sae_step(model, optimizer, par, grad_clip=1.0)  # the trainer's step

    for _ in range(args.warmup):
        step()
    times = []
    with _Traffic() as traffic:
        for _ in range(args.steps):
            if world_size > 1:
                dist.barrier()
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    if rank == 0:
        Path(result_file).write_text(
            json.dumps(
                {
                    "step_s": statistics.median(times),
                    "collective_calls": traffic.calls / args.steps,
                    "collective_mib": traffic.bytes / args.steps / 2**20,
                }
            )
        )
    if world_size > 1:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args) -> dict[str, dict]:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (ranks, tp) in MODES.items():
            result_file = str(Path(tmp) / "result.json")
            mp.spawn(_rank_main, args=(ranks, tp, _free_port(), args, result_file), nprocs=ranks, join=True)
            results[name] = json.loads(Path(result_file).read_text())
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="megasae bench parallel",
        description="One SAE training step on a tiny random Llama: one process vs DP = 2 vs TP = 2 "
        "CPU ranks.",
    )
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4, help="decoder layers; the SAE reads the last one")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step over all ranks")
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--expansion-factor", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", default=None, metavar="OUT", help="write the results to this JSON file")
    args = parser.parse_args(argv)
    results = run(args)
    print(f"{'':<10} {'step (s)':>9} {'collectives/step':>17} {'MiB/step/rank':>14}")
    for name, r in results.items():
        print(f"{name:<10} {r['step_s']:>9.3f} {r['collective_calls']:>17.0f} {r['collective_mib']:>14.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
