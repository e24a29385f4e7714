"""`megasae bench sweep`: a sweep of SAEs trained from one host forward, against one run per SAE.

Builds `megasae train`'s trainer for the built-in default (or --model/--data/--target) as a sweep over
`--k` (one SAE per value) and once per value alone (each loading its own host, as a run does), runs their
optimizer steps in turns, the order rotating every step, and reports what each costs (set-up plus steps),
the ratio of the runs to the sweep, and how far each sweep SAE is from the SAE of its own run (the largest
absolute difference of any weight, and the last step's FVU of each).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import torch

from megasae.bench.output import report
from megasae.peft import sae_layers
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


def run(args: argparse.Namespace, work: Path) -> dict:
    """Builds the sweep's trainer and one trainer per swept SAE, then runs their steps in turns, the order
    rotating every step, so that load from elsewhere on the machine hits all of them alike."""
    torch.set_num_threads(args.threads)
    base = dict(model=args.model, data=args.data, target_modules=(args.target,), max_tokens=args.max_tokens,
                micro_batch_size=args.batch_size, ctx_len=args.ctx_len,
                batch_tokens=args.batch_size * args.ctx_len, wandb_mode="disabled", device=args.device)
    sweep_cfg = TrainConfig(**base, k=args.k, output_dir=work / "sweep")
    settings = sweep_cfg.saes()
    configs = {"sweep": sweep_cfg, **{s.name: TrainConfig(**base, k=s.k, output_dir=work / s.name)
                                      for s in settings}}
    trainers, setup_s, step_s, last_fvu = {}, {}, {name: [] for name in configs}, {}
    for name, cfg in configs.items():
        start = time.perf_counter()
        trainers[name] = Trainer(cfg)  # loads the host: part of what each run costs
        setup_s[name] = time.perf_counter() - start
    names = list(trainers)
    for step in range(trainers["sweep"].steps):
        for name in names[step % len(names):] + names[:step % len(names)]:
            start = time.perf_counter()
            metrics, _ = trainers[name].train_step()
            step_s[name].append(time.perf_counter() - start)
            last_fvu[name] = {key: sums["fvu"] / metrics.micro_batches for key, sums in metrics.sums.items()}
    sweep_layer = sae_layers(trainers["sweep"].model)[0]
    saes = []
    for setting in settings:
        own_layer = sae_layers(trainers[setting.name].model)[0]
        difference = max((getattr(sweep_layer, name)[setting.name] - getattr(own_layer, name)["default"])
                         .abs().max().item() for name in own_layer.adapter_layer_names)
        saes.append({"name": setting.name, "k": setting.k, "setup_s": setup_s[setting.name],
                     "steps_s": sum(step_s[setting.name]), "max_abs_weight_difference": difference,
                     "final_fvu_alone": last_fvu[setting.name][own_layer.module_path],
                     "final_fvu_sweep": last_fvu["sweep"][f"{setting.name}/{own_layer.module_path}"]})
    sweep_s = setup_s["sweep"] + sum(step_s["sweep"])
    alone_s = sum(s["setup_s"] + s["steps_s"] for s in saes)
    steps_ratio = sum(s["steps_s"] for s in saes) / sum(step_s["sweep"])
    return {"sweep_s": sweep_s, "sweep_setup_s": setup_s["sweep"], "alone_s": alone_s,
            "speedup": alone_s / sweep_s, "steps_speedup": steps_ratio, "steps": trainers["sweep"].steps,
            "saes": saes, "settings": {**base, "k": list(args.k)},
            "machine": f"{platform.processor() or platform.machine()}, {args.threads} torch threads"}


def format_table(result: dict) -> str:
    lines = ["| SAE | its own run (s) | final FVU alone | final FVU in the sweep | max weight difference |",
             "|---|---:|---:|---:|---:|"]
    for s in result["saes"]:
        lines.append(f"| {s['name']} | {s['setup_s'] + s['steps_s']:.0f} | {s['final_fvu_alone']:.4f} | "
                     f"{s['final_fvu_sweep']:.4f} | {s['max_abs_weight_difference']:.1e} |")
    lines.append(f"\n{len(result['saes'])} runs, set-up and {result['steps']} steps each: "
                 f"{result['alone_s']:.0f} s; one sweep: {result['sweep_s']:.0f} s; "
                 f"**{result['speedup']:.2f}x** ({result['steps_speedup']:.2f}x counting the steps alone)")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="megasae-bench-sweep-") as tmp:
        result = run(args, Path(tmp))
    report(format_table(result), result, args.json)
