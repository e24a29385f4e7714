"""`megasae bench quality`: TopK, BatchTopK and Matryoshka-BatchTopK SAEs side by side.

Each variant is a real `megasae train` run (its Trainer) with the same host, target, k, number of latents,
seed and data, so all three train on the same tokens at the same mean L0 in training (k per token, or k x N
per batch of N); each is then a real `megasae eval` (evaluate) on the same held-out tokens, where a
BatchTopK SAE runs as it does at inference: every latent above its learnt threshold fires, whatever the
batch. Reported per variant: held-out FVU on the token mask, L0 there (a BatchTopK SAE's is whatever its
threshold gives), loss recovered, dead latents, and each Matryoshka prefix's FVU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megasae.bench.output import report
from megasae.peft.config import NORMALIZATIONS
from megasae.token_policy import DEFAULT_TOKEN_POLICY

VARIANTS = ("topk", "batchtopk", "matryoshka-batchtopk")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="megasae bench quality",
        description="Train a TopK, a BatchTopK and a Matryoshka-BatchTopK SAE on the same tokens and compare "
        "them on the same held-out tokens.",
    )
    p.add_argument("--model", default=None, help="host model directory or .gguf (default SmolLM2-135M)")
    p.add_argument("--data", default="builtin", help="training data, as `megasae train --data`")
    p.add_argument("--eval-data", default="builtin", help="held-out data, as `megasae eval --data`")
    p.add_argument("--target", default="model.layers.15", help="target module (default model.layers.15)")
    p.add_argument("--k", type=int, default=32, help="mean L0 of every variant in training (default 32)")
    p.add_argument("--num-latents", type=int, default=18432,
                   help="latents (default 18432: the built-in default's 32 x 576)")
    p.add_argument("--matryoshka-prefixes", type=int, nargs="+", default=[1152, 4608, 18432],
                   help="the Matryoshka variant's nested sizes, the last = --num-latents")
    p.add_argument("--max-tokens", type=int, default=409_600, help="training tokens (default 409,600)")
    p.add_argument("--eval-tokens", type=int, default=65_536, help="held-out tokens (default 65,536)")
    p.add_argument("--ctx-len", type=int, default=256)
    p.add_argument("--micro-batch-size", type=int, default=8)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--outlier-factor", type=float, default=DEFAULT_TOKEN_POLICY["outlier_factor"],
                   help="every variant's outlier filter in training and so in eval, as `megasae train "
                   "--outlier-factor` (default 10)")
    p.add_argument("--normalize-activations", choices=("auto", *NORMALIZATIONS), default="auto",
                   help="every variant's, as `megasae train --normalize-activations` (default: each "
                   "architecture's own, layer_norm for BatchTopK and none for TopK)")
    p.add_argument("--shuffle-sequences", type=int, default=None,
                   help="as `megasae train --shuffle-sequences` (default: its own)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--output-dir", type=Path, default=Path("runs/bench-quality"),
                   help="one run directory per variant under it (default runs/bench-quality)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    return p.parse_args(argv)


def train_config(args: argparse.Namespace, variant: str):
    from megasae.train import TrainConfig

    prefixes = tuple(args.matryoshka_prefixes) if variant.startswith("matryoshka") else ()
    shuffle = {} if args.shuffle_sequences is None else {"shuffle_sequences": args.shuffle_sequences}
    return TrainConfig(
        model=args.model, data=args.data, target_modules=(args.target,), k=args.k,
        architecture="topk" if variant == "topk" else "batchtopk", matryoshka_prefixes=prefixes,
        num_latents=args.num_latents, max_tokens=args.max_tokens, batch_tokens=args.batch_tokens,
        micro_batch_size=args.micro_batch_size, outlier_factor=args.outlier_factor,
        normalize_activations=args.normalize_activations,
        ctx_len=args.ctx_len, seed=args.seed, device=args.device, wandb_mode="disabled",
        output_dir=args.output_dir / variant, overwrite=True, **shuffle,
    )


def held_out(args: argparse.Namespace, variant: str) -> dict:
    """The numbers `megasae eval` reports for one variant's SAE on the held-out tokens."""
    from megasae.eval import EvalConfig, evaluate

    cfg = EvalConfig(adapter=str(args.output_dir / variant), model=args.model, data=args.eval_data,
                     max_tokens=args.eval_tokens, ctx_len=args.ctx_len, batch_size=args.micro_batch_size,
                     device=args.device)
    stats = evaluate(cfg)["targets"][args.target]["groups"]["all"]
    return {"fvu": stats["fvu"], "l0": stats["l0"], "loss_recovered": stats["loss_recovered"],
            "dead_pct": 100 * stats["dead_fraction"], "tokens": stats["tokens"],
            "prefix_fvu": stats.get("prefix_fvu", {})}


def run(args: argparse.Namespace) -> dict:
    from megasae.train import Trainer

    results = {}
    for variant in args.variants:
        Trainer(train_config(args, variant)).fit()
        results[variant] = held_out(args, variant)
    settings = {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()}
    return {"settings": settings, "results": results}


def format_table(result: dict) -> str:
    lines = [f"{'variant':<22}{'FVU':>8}{'L0':>8}{'loss rec.':>11}{'dead %':>8}  prefix FVUs",
             "-" * 72]
    for variant, r in result["results"].items():
        prefixes = " ".join(f"{m}: {fvu:.4f}" for m, fvu in r["prefix_fvu"].items())
        recovered = "-" if r["loss_recovered"] is None else f"{r['loss_recovered']:.4f}"
        lines.append(f"{variant:<22}{r['fvu']:>8.4f}{r['l0']:>8.1f}{recovered:>11}{r['dead_pct']:>8.1f}  "
                     f"{prefixes}")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    result = run(args)
    report(format_table(result), result, args.json)
