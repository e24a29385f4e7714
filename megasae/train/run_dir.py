"""The output directory of a training run: never replaced without --overwrite, never written half-way.

It holds the adapter (adapter_config.json, adapter_model.safetensors; a sweep's, one in a subdirectory
per SAE), config.json, metrics.jsonl and checkpoints/. A directory holding any of them holds a run: a new
run there needs --resume (continue it) or --overwrite (delete it first).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from megasae.files import fix_modes, write_atomic
from megasae.formats.adapter import CONFIG_FILE, WEIGHTS_FILE, adapter_path
from megasae.peft.config import DEFAULT_ADAPTER
from megasae.train.checkpoint import checkpoint_root
from megasae.train.config import SAES_RECORD

ADAPTER_FILES = (WEIGHTS_FILE, CONFIG_FILE)  # the order they are replaced in
RUN_FILES = (*ADAPTER_FILES, "config.json", "metrics.jsonl")


def run_files(output_dir: Path) -> list[str]:
    """The names of what a previous run left in `output_dir`."""
    found = [name for name in RUN_FILES if (output_dir / name).exists()]
    return found + (["checkpoints/"] if checkpoint_root(output_dir).exists() else [])


def check_output_dir(output_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse, before anything loads, a directory that cannot be written or that holds a run this one would
    silently replace."""
    if output_dir.exists() and not output_dir.is_dir():
        raise NotADirectoryError(f"--output-dir {output_dir} is a file; name a directory.")
    found = run_files(output_dir) if output_dir.is_dir() else []
    if found and not (resume or overwrite):
        raise FileExistsError(
            f"--output-dir {output_dir} holds a run ({', '.join(found)}): continue it with --resume, "
            "or delete it and start afresh with --overwrite."
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=output_dir):
            pass
    except OSError as err:
        raise PermissionError(f"--output-dir {output_dir} cannot be written: {err.strerror}.") from None


def clear_run(output_dir: Path) -> None:
    """Delete what a previous run left (--overwrite); files of the user's own in the directory stay."""
    for adapter in _swept_adapters(output_dir):
        for name in ADAPTER_FILES:
            (adapter_path(output_dir, adapter) / name).unlink(missing_ok=True)
    for name in RUN_FILES:
        (output_dir / name).unlink(missing_ok=True)
    shutil.rmtree(checkpoint_root(output_dir), ignore_errors=True)


def _swept_adapters(output_dir: Path) -> list[str]:
    """The adapters a previous sweep saved in subdirectories of `output_dir`, as its config.json names
    them."""
    config = output_dir / "config.json"
    try:
        saes = json.loads(config.read_text()).get(SAES_RECORD, []) if config.is_file() else []
    except json.JSONDecodeError:
        return []
    return [sae["name"] for sae in saes if sae.get("name", DEFAULT_ADAPTER) != DEFAULT_ADAPTER]


def roll_back_metrics(output_dir: Path, step: int) -> None:
    """Drop the metrics a run logged after the checkpoint it is resumed from, so no step appears twice."""
    path = output_dir / "metrics.jsonl"
    if path.is_file():
        lines = path.read_text().splitlines(keepends=True)
        write_atomic(path, "".join(line for line in lines if json.loads(line)["step"] <= step))


def publish_adapter(staged: Path, output_dir: Path, adapters: list[str]) -> None:
    """Move the adapters written in `staged` into `output_dir` (a sweep's into subdirectories). Each one's
    config goes first and comes back last: a crash in between leaves no adapter_config.json (a directory that
    no loader mistakes for an adapter, and that --resume rewrites), never the weights of one run under the
    config of another."""
    fix_modes(staged)
    for adapter in adapters:
        source, target = adapter_path(staged, adapter), adapter_path(output_dir, adapter)
        target.mkdir(exist_ok=True)
        (target / CONFIG_FILE).unlink(missing_ok=True)
        for name in ADAPTER_FILES:
            os.replace(source / name, target / name)
