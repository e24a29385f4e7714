"""`megasae <command>`: the command line. `megasae train --help` lists every flag of training."""

from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import tyro

from megasae.errors import BAD_INPUT_EXIT, SettingError, exit_code


def _config_file(args: list[str]) -> Path | None:
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return Path(args[i + 1])
        if arg.startswith("--config="):
            return Path(arg.split("=", 1)[1])
    return None


def parse(config_type, args: list[str], prog: str, **kwargs):
    """tyro.cli, whose refusals (an unknown flag, a bad value or choice, a missing required flag) become one
    sentence like every other refusal instead of tyro's box; --help prints as tyro writes it."""
    box = io.StringIO()
    try:
        with contextlib.redirect_stderr(box):
            cfg = tyro.cli(config_type, args=args, prog=prog, **kwargs)
    except SystemExit as done:
        if done.code:
            raise SettingError(f"{_box_sentence(box.getvalue())} ({prog} --help lists every flag)") from None
        sys.stderr.write(box.getvalue())
        raise
    sys.stderr.write(box.getvalue())  # whatever else tyro said (a warning, say)
    return cfg


def _box_sentence(box: str) -> str:
    """The message of tyro's error in one line: its text between the title and the help pointer, a list of
    flags (the missing ones) by their names only. Rich draws it boxed, or plain with ASCII rules, as the
    stream allows."""
    lines = [line.strip(" │╭╮╰╯|+") for line in box.splitlines()]
    lines = [line for line in lines if line]  # the title first (in the top border when boxed)
    rules = [i for i, line in enumerate(lines) if set(line) <= {"─", "-"}]
    start = 2 if rules and rules[0] == 1 else 1  # the plain layout rules the title off
    body = lines[start:next((i for i in rules if i >= start), len(lines))]
    flags = [line.split()[0] for line in body if line.startswith("--")]
    text = f"{body[0]} {', '.join(flags)}" if body and flags else " ".join(body)
    return " ".join(text.split()) or box.strip()


def train_command(args: list[str]) -> None:
    """Train TopK SAEs (the built-in default with no flags)."""
    from megasae.formats.adapter import adapter_path
    from megasae.train import TrainConfig, train
    from megasae.train.config import load_config_file
    from megasae.train.report import summary

    config_file = _config_file(args)
    default = TrainConfig(**load_config_file(config_file)) if config_file else TrainConfig()
    cfg = parse(TrainConfig, args, "megasae train", default=default)
    train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        adapters = [adapter_path(cfg.output_dir, sae.name) for sae in cfg.saes()]
        print(summary(cfg.output_dir, cfg.target_modules[0], cfg.model, cfg.eval_data, adapters))


def cache_command(args: list[str]) -> None:
    """Run the host once and store its targets' activations, for `megasae train --activations`."""
    from megasae.data.activations import MANIFEST
    from megasae.train.cache import CacheConfig, write_cache

    out = write_cache(parse(CacheConfig, args, "megasae cache"))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {out / MANIFEST}")


def eval_command(args: list[str]) -> None:
    """Evaluate an SAE adapter on held-out data: eval.json, report.md and plots."""
    from megasae.eval import EvalConfig, run_eval

    out = run_eval(parse(EvalConfig, args, "megasae eval"))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {out / 'report.md'} and {out / 'eval.json'}")


def inspect_command(args: list[str]) -> None:
    """Write an HTML page of chosen latents' top-activating contexts."""
    from megasae.eval import InspectConfig, run_inspect

    page = run_inspect(parse(InspectConfig, args, "megasae inspect"))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {page}")


def plan_command(args: list[str]) -> None:
    """Per-rank memory of a tensor/pipeline-parallel run, from the host's config.json alone."""
    from megasae.plan import PlanConfig, plan

    print(plan(parse(PlanConfig, args, "megasae plan")))


def export_command(args: list[str]) -> None:
    """Write an adapter's SAEs in SAELens's or sparsify's own layout."""
    from megasae.formats import export
    from megasae.formats.commands import ExportConfig

    cfg = parse(ExportConfig, args, "megasae export")
    notes = export(cfg.adapter, cfg.format, cfg.output_dir, cfg.target, cfg.eval_json, cfg.base_model_prefix)
    for note in notes:
        print(f"note: {note}")
    print(f"wrote {cfg.output_dir}")


def import_command(args: list[str]) -> None:
    """Convert a SAELens, sparsify or original-project SAE into a megasae adapter."""
    from megasae.formats import import_sae
    from megasae.formats.commands import ImportConfig

    cfg = parse(ImportConfig, args, "megasae import")
    saes = import_sae(cfg.source, cfg.output_dir, cfg.base_model_prefix)
    print(f"wrote {cfg.output_dir} ({saes.format} SAEs on {', '.join(saes.saes)})")


def bench_command(args: list[str]) -> None:
    """Benchmarks: `megasae bench <name> --help` (kernels, train, parallel, interop, quality, sweep)."""
    from megasae.bench import BENCHMARKS

    if not args or args[0] not in BENCHMARKS:
        raise ValueError(
            f"name a benchmark: megasae bench <name> [flags]; valid names: {', '.join(BENCHMARKS)}."
        )
    BENCHMARKS[args[0]](args[1:])


def quiet_libraries() -> None:
    """Keep the libraries' notes to their own developers (deprecations, transformers' advice) off a user's
    screen; --debug shows them."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def leave_process_group() -> None:
    """A torchrun rank leaves its process group at the end of a command, finished or failed, as torch
    asks: never imports torch.distributed for a command that did not."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "train": train_command, "cache": cache_command, "eval": eval_command, "inspect": inspect_command,
    "plan": plan_command, "bench": bench_command, "export": export_command, "import": import_command,
}


def main(argv: list[str] | None = None) -> None:
    """Run one command; its refusals end in one line on stderr and a non-zero exit (see megasae.errors),
    with the traceback only under --debug or MEGASAE_DEBUG=1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("MEGASAE_DEBUG", "") not in ("", "0")
    argv = [arg for arg in argv if arg != "--debug"]
    if not debug:
        quiet_libraries()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8}{fn.__doc__}" for name, fn in COMMANDS.items()]
        print("usage: megasae <command> [flags] [--debug]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"megasae: error: unknown command {argv[0]!r}; valid commands: {', '.join(COMMANDS)}.",
                  file=sys.stderr)
            sys.exit(BAD_INPUT_EXIT)
        return
    try:
        COMMANDS[argv[0]](argv[1:])
    except Exception as err:
        code = exit_code(err)
        if debug or code is None:
            raise
        print(f"megasae {argv[0]}: error: {err}", file=sys.stderr)
        sys.exit(code)
    finally:
        leave_process_group()
