"""Checkpoints that a crash cannot corrupt and that cannot run code.

Layout under the output directory:

    checkpoints/step-000120/         one complete checkpoint
        adapter_config.json          the whole PEFT adapter (written by one rank)
        adapter_model.safetensors
        config.json                  the run's settings, which --resume compares with its own
        trainer-rank0.pt             optimizer, schedule, data position, RNG, dead-latent counters: one
                                     per pipeline stage, named after the stage's first rank
    checkpoints/latest               the name of the newest complete checkpoint

A checkpoint is written under a temporary name and renamed when every rank has finished, always to a
name that does not exist yet (saving step 120 again gives `step-000120.1`); only then does `latest`
move to it (itself replaced atomically), and only then are older ones deleted. So `latest` names a
complete checkpoint whenever the process dies, and the directory it names is never removed first.

Trainer state is read with `torch.load(weights_only=True)`: tensors and plain Python data only, so a
checkpoint someone hands you cannot execute code when it is resumed.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from megasae.files import fix_modes, write_atomic
from megasae.parallel import ParallelState, barrier

LATEST = "latest"
CONFIG = "config.json"
_TEMPORARY = ".step-*.tmp"


def checkpoint_root(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint, or None when the run has none; a `latest` that names a missing
    directory is a damaged run, not an empty one."""
    root = checkpoint_root(output_dir)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not path.is_dir():
        found = sorted(p.name for p in root.glob("step-*") if p.is_dir())
        raise FileNotFoundError(
            f"{pointer} names {path.name}, which does not exist; checkpoint directories present: "
            f"{found or 'none'} (write the one to resume from into {pointer})."
        )
    return path


def _free_name(root: Path, step: int) -> str:
    name = f"step-{step:08d}"
    generation = 0
    while (root / name).exists():
        generation += 1
        name = f"step-{step:08d}.{generation}"
    return name


def save_checkpoint(
    output_dir: Path,
    step: int,
    par: ParallelState,
    save_adapter: Callable[[Path], None],
    trainer_state: dict,
    config_json: str,
) -> Path:
    """Write one checkpoint from every rank; returns its directory."""
    root = checkpoint_root(output_dir)
    tmp = root / f".step-{step:08d}.tmp"
    if par.is_main:
        for leftover in root.glob(_TEMPORARY):  # left by a crash while writing
            shutil.rmtree(leftover, ignore_errors=True)
        tmp.mkdir(parents=True)
        (tmp / CONFIG).write_text(config_json)
    barrier(par.world_group)
    save_adapter(tmp)  # every rank: SAE shards and pipeline stages are gathered, one rank writes
    if par.leads_stage:  # the other ranks of a stage hold the same state
        torch.save(trainer_state, tmp / f"trainer-rank{par.rank}.pt")
    name = _free_name(root, step)  # before the barrier: no rank may see the rename
    barrier(par.world_group)
    if par.is_main:
        fix_modes(tmp)  # safetensors writes 0600
        os.replace(tmp, root / name)
        write_atomic(root / LATEST, name)
        for old in root.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)
    barrier(par.world_group)
    return root / name


def _stage_state(checkpoint: Path, par: ParallelState) -> Path:
    """The trainer state of this rank's pipeline stage. It holds whole SAEs, whole Adam moments and the one
    data position, so --tp and the number of data-parallel ranks may change; the stages must stay. Earlier
    checkpoints hold a state per rank, of which the stage's first is the same."""
    def rank(state: Path) -> int:
        return int(state.stem.removeprefix("trainer-rank"))

    files = sorted(checkpoint.glob("trainer-rank*.pt"), key=rank)
    if not files or len(files) % par.pp_size:
        raise ValueError(
            f"Checkpoint {checkpoint} holds {len(files)} trainer states, which do not divide into this run's "
            f"{par.pp_size} pipeline stages: resume with the --pp it was written with."
        )
    return files[par.pp_rank * (len(files) // par.pp_size)]


def load_trainer_state(checkpoint: Path, par: ParallelState) -> dict:
    path = _stage_state(checkpoint, par)
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path} holds more than tensors and plain data ({str(err).splitlines()[0]}); megasae never runs "
            "code from a checkpoint, so it will not load this one."
        ) from None


def saved_config(checkpoint: Path) -> dict | None:
    """The settings the checkpoint was trained with (None for checkpoints written before they were kept)."""
    path = checkpoint / CONFIG
    return json.loads(path.read_text()) if path.is_file() else None
