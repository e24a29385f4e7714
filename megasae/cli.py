"""`megasae <command>`: the command line. `megasae train --help` lists every flag of training."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import tyro


def _config_file(args: list[str]) -> Path | None:
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return Path(args[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return None


def train_command(args: list[str]) -> None:
    """Train TopK SAEs (the built-in default with no flags)."""
    from megasae.train import TrainConfig, train
    from megasae.train.config import load_config_file

    config_file = _config_file(args)
    default = TrainConfig(**load_config_file(config_file)) if config_file else TrainConfig()
    cfg = tyro.cli(TrainConfig, args=args, default=default, prog="megasae train")
    train(cfg)


def eval_command(args: list[str]) -> None:
    """Evaluate an SAE adapter on held-out data: eval.json, report.md and plots."""
    from megasae.eval import EvalConfig, run_eval

    out = run_eval(tyro.cli(EvalConfig, args=args, prog="megasae eval"))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {out / 'report.md'} and {out / 'eval.json'}")


def inspect_command(args: list[str]) -> None:
    """Write an HTML page of chosen latents' top-activating contexts."""
    from megasae.eval import InspectConfig, run_inspect

    page = run_inspect(tyro.cli(InspectConfig, args=args, prog="megasae inspect"))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {page}")


def plan_command(args: list[str]) -> None:
    """Per-rank memory of a tensor/pipeline-parallel run, from the host's config.json alone."""
    from megasae.plan import main

    main(args)


def export_command(args: list[str]) -> None:
    """Write an adapter's SAEs in SAELens's or sparsify's own layout."""
    from megasae.formats import export
    from megasae.formats.commands import ExportConfig

    cfg = tyro.cli(ExportConfig, args=args, prog="megasae export")
    notes = export(cfg.adapter, cfg.format, cfg.output_dir, cfg.target, cfg.eval_json, cfg.base_model_prefix)
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {cfg.output_dir}")


def import_command(args: list[str]) -> None:
    """Convert a SAELens, sparsify or original-project SAE into a megasae adapter."""
    from megasae.formats import import_sae
    from megasae.formats.commands import ImportConfig

    cfg = tyro.cli(ImportConfig, args=args, prog="megasae import")
    saes = import_sae(cfg.source, cfg.output_dir, cfg.base_model_prefix)
    print(f"wrote {cfg.output_dir} ({saes.format} SAEs on {', '.join(saes.saes)})")


def bench_command(args: list[str]) -> None:
    """Benchmarks: `megasae bench <name> --help` (kernels, train, parallel, interop)."""
    from megasae.bench import BENCHMARKS

    if not args or args[0] not in BENCHMARKS:
        sys.exit(f"usage: megasae bench <name> [flags]; valid names: {', '.join(BENCHMARKS)}.")
    BENCHMARKS[args[0]](args[1:])


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "train": train_command, "eval": eval_command, "inspect": inspect_command, "plan": plan_command,
    "bench": bench_command, "export": export_command, "import": import_command,
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8}{fn.__doc__}" for name, fn in COMMANDS.items()]
        print("usage: megasae <command> [flags]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            sys.exit(f"megasae: unknown command {argv[0]!r}; valid commands: {', '.join(COMMANDS)}.")
        return
    COMMANDS[argv[0]](argv[1:])
