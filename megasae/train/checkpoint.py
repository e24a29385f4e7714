"""Checkpoints that a crash cannot corrupt.

Layout under the output directory:

    checkpoints/step-000120/         one complete checkpoint
        adapter_config.json          the whole PEFT adapter (written by one rank)
        adapter_model.safetensors
        trainer-rank0.pt             optimizer, schedule, data position, RNG, dead-latent counters
    checkpoints/latest               the name of the newest complete checkpoint

A checkpoint is written under a temporary name and renamed when every rank has finished; only then
does `latest` move to it (itself replaced atomically), and only then are older ones deleted. So
`latest` always names a complete checkpoint, whenever the process dies.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from megasae.parallel import ParallelState, barrier

LATEST = "latest"


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def latest_checkpoint(output_dir: Path) -> Path | None:
    pointer = checkpoint_root(output_dir) / LATEST
    if not pointer.is_file():
        return None
    path = checkpoint_root(output_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(
    output_dir: Path,
    step: int,
    par: ParallelState,
    save_adapter: Callable[[Path], None],
    trainer_state: dict,
) -> Path:
    """Write one checkpoint from every rank; returns its directory."""
    root = checkpoint_root(output_dir)
    name = f"step-{step:08d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if par.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while writing
        tmp.mkdir(parents=True)
    barrier(par.world_group)
    save_adapter(tmp)  # every rank: SAE shards and pipeline stages are gathered, one rank writes
    torch.save(trainer_state, tmp / f"trainer-rank{par.rank}.pt")
    barrier(par.world_group)
    if par.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_text_atomically(root / LATEST, name)
        for old in root.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    barrier(par.world_group)
    return final


def load_trainer_state(checkpoint: Path, par: ParallelState) -> dict:
    path = checkpoint / f"trainer-rank{par.rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"Checkpoint {checkpoint} has no state for rank {par.rank}: it was written by a run with another "
            "number of ranks; resume with the same world size."
        )
    return torch.load(path, weights_only=False)
