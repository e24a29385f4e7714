"""`megasae bench sweep`: a sweep of SAEs trained from one host forward, against one run per SAE.

Trains the built-in default (or --model/--data/--target) once as a sweep over `--k` (one SAE per value)
and then once per value alone, each a whole `megasae train` run in this process (loading the host
included), and reports the wall times, their ratio, and how far each sweep SAE is from the SAE of its
own run (the largest absolute difference of any weight, and the final FVU of each).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from megasae.formats.adapter import WEIGHTS_FILE, adapter_path
from megasae.train import TrainConfig, Trainer


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megasae bench sweep", description=__doc__.splitlines()[0])
    p.add_argument("--k", default="16,32,64,128", help="the swept k, comma-separated (default 16,32,64,128)")
    p.add_argument("--max-tokens", type=int, default=65_536, help="tokens each run trains on (default 65536)")
    p.add_argument("--model", default=None, help="host model (default SmolLM2-135M-Instruct)")
    p.add_argument("--data", default="builtin", help="training data (default builtin)")
    p.add_argument("--target", default="model.layers.15", help="target module (default model.layers.15)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--ctx-len", type=int, default=256, help="tokens per sequence (default 256)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    try:
        args.k = tuple(int(k) for k in args.k.split(","))
    except ValueError:
        p.error(f"--k must be comma-separated integers, got {args.k!r}.")
    if len(args.k) < 2:
        p.error("--k must list at least two values: a sweep of one SAE is a plain run.")
    return args


def _timed_run(cfg: TrainConfig) -> float:
    start = time.perf_counter()
    Trainer(cfg).fit()
    return time.perf_counter() - start


def _final_fvu(output_dir: Path, key: str) -> float:
    last = json.loads((output_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return last[key]


def run(args: argparse.Namespace, work: Path) -> dict:
    torch.set_num_threads(args.threads)
    base = dict(model=args.model, data=args.data, target_modules=(args.target,), max_tokens=args.max_tokens,
                micro_batch_size=args.batch_size, ctx_len=args.ctx_len,
                batch_tokens=args.batch_size * args.ctx_len, wandb_mode="disabled", device=args.device,
                log_every=1)
    sweep_dir = work / "sweep"
    sweep_cfg = TrainConfig(**base, k=args.k, output_dir=sweep_dir)
    sweep_wall = _timed_run(sweep_cfg)
    saes = []
    for setting in sweep_cfg.saes():
        alone = work / setting.name
        wall = _timed_run(TrainConfig(**base, k=setting.k, output_dir=alone))
        swept = load_file(adapter_path(sweep_dir, setting.name) / WEIGHTS_FILE)
        own = load_file(alone / WEIGHTS_FILE)
        difference = max((swept[key] - own[key]).abs().max().item() for key in own)
        saes.append({"name": setting.name, "k": setting.k, "alone_wall_s": wall,
                     "max_abs_weight_difference": difference,
                     "final_fvu_sweep": _final_fvu(sweep_dir, f"fvu/{setting.name}/{args.target}"),
                     "final_fvu_alone": _final_fvu(alone, "fvu")})
    alone_wall = sum(s["alone_wall_s"] for s in saes)
    return {"sweep_wall_s": sweep_wall, "alone_wall_s": alone_wall, "speedup": alone_wall / sweep_wall,
            "saes": saes, "settings": {**base, "k": list(args.k)},
            "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch threads"}


def format_table(result: dict) -> str:
    lines = ["| SAE | wall alone (s) | final FVU alone | final FVU in the sweep | max weight difference |",
             "|---|---:|---:|---:|---:|"]
    for s in result["saes"]:
        lines.append(f"| {s['name']} | {s['alone_wall_s']:.0f} | {s['final_fvu_alone']:.4f} | "
                     f"{s['final_fvu_sweep']:.4f} | {s['max_abs_weight_difference']:.1e} |")
    lines.append(f"\n{len(result['saes'])} runs one after another: {result['alone_wall_s']:.0f} s; one "
                 f"sweep: {result['sweep_wall_s']:.0f} s; **{result['speedup']:.2f}x**")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="megasae-bench-sweep-") as tmp:
        result = run(args, Path(tmp))
    print(format_table(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
