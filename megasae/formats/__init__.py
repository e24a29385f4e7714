"""Adapter I/O: the one place that knows SAE files. It reads megasae's adapter, the original project's
(EvolvingLMMs-Lab/sae), SAELens SAE folders and sparsify hookpoint or run directories, from a local path or
a Hugging Face Hub id, every tensor checked; it writes megasae adapters (`megasae import`) and SAELens or
sparsify folders (`megasae export`), each output directory atomically.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from megasae.formats import adapter, saelens, sparsify
from megasae.formats.hub import local_path
from megasae.formats.saes import SaeSet, SaeWeights, write_directory

__all__ = ["EXPORT_FORMATS", "SaeSet", "SaeWeights", "adapter_directory", "detect", "export", "import_sae",
           "read"]

# Exporters: check(saes) refuses what the format cannot express; write(saes, directory, sparsity) writes.
EXPORT_FORMATS = {"saelens": saelens, "sparsify": sparsify}


def detect(path: Path) -> str:
    """Which format the local directory `path` holds, from its files."""
    if not path.is_dir():
        raise ValueError(f"{path} is a file; an SAE is a directory (adapter, SAELens or sparsify folder).")
    if (path / adapter.CONFIG_FILE).is_file():
        adapter.peft_config(path)
        return "original" if adapter.is_original(path) else "megasae"
    if saelens.is_saelens(path):
        return "saelens"
    if sparsify.is_hookpoint(path) or any(sparsify.is_hookpoint(sub) for sub in path.iterdir()):
        return "sparsify"
    named = sorted(sub.name for sub in path.iterdir() if (sub / adapter.CONFIG_FILE).is_file())
    if named:
        raise ValueError(f"{path} holds several adapters (a sweep's), one per subdirectory: name one of "
                         f"{', '.join(str(path / name) for name in named)}.")
    raise ValueError(
        f"{path} holds none of the SAE formats megasae reads: a megasae or original-project adapter "
        f"({adapter.CONFIG_FILE} + {adapter.WEIGHTS_FILE}), a SAELens SAE (cfg.json + "
        f"{saelens.WEIGHTS_FILE}), a sparsify hookpoint folder (cfg.json + {sparsify.WEIGHTS_FILE}) or a "
        "sparsify run directory of them."
    )


def read(source: str | Path, base_model_prefix: str = "model") -> SaeSet:
    """The SAEs of `source` (a local directory or a Hub id), in megasae's layout, every tensor checked.

    `base_model_prefix` places sparsify's hookpoints, which are named relative to the host's base model:
    `model` for Llama, Qwen2 and Qwen2.5-VL hosts (sparsify's `layers.15` is `model.layers.15`)."""
    path = local_path(source)
    kind = detect(path)
    if kind == "megasae":
        return adapter.read(path)
    if kind == "original":
        return adapter.read_original(path)
    if kind == "saelens":
        return saelens.read(path)
    return sparsify.read(path, base_model_prefix)


def _select(saes: SaeSet, target: str | None) -> SaeSet:
    if target is None:
        return saes
    if target not in saes.saes:
        raise ValueError(f"{saes.path} has no SAE on {target!r}; its targets are {sorted(saes.saes)}.")
    config = dataclasses.replace(saes.config, target_modules=[target])
    return SaeSet(config, {target: saes.saes[target]}, saes.path, saes.format)


def firing_frequencies(eval_json: Path, saes: SaeSet) -> tuple[dict, list[str]]:
    """({module path: per-latent firing frequency}, notes) from an eval.json written by `megasae eval`; a note
    says why an SAE has none."""
    if not eval_json.is_file():
        return {}, [f"no {eval_json}: no sparsity written (run `megasae eval` to measure firing frequencies)"]
    measured = json.loads(eval_json.read_text()).get("targets", {})
    frequencies, notes = {}, []
    for path, sae in saes.saes.items():
        frequency = measured.get(path, {}).get("groups", {}).get("all", {}).get("firing_frequency")
        if frequency is None or len(frequency) != sae.num_latents:
            notes.append(f"{eval_json} has no firing frequencies of the {sae.num_latents} latents of "
                         f"{path!r}: no sparsity written for it")
        else:
            frequencies[path] = frequency
    return frequencies, notes


def export(source: str | Path, fmt: str, output_dir: Path, target: str | None = None,
           eval_json: Path | None = None, base_model_prefix: str = "model") -> list[str]:
    """Write the SAEs of `source` (or the one on `target`) in `fmt`'s own layout under `output_dir`, one
    folder per SAE; return notes on what was left out. Nothing is written when the format cannot express
    an SAE."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {fmt!r}; valid formats: {', '.join(EXPORT_FORMATS)}.")
    saes = _select(read(source, base_model_prefix), target)
    writer = EXPORT_FORMATS[fmt]
    writer.check(saes)
    frequencies, notes = firing_frequencies(eval_json or saes.path / "eval.json", saes)
    write_directory(output_dir, lambda tmp: writer.write(saes, tmp, frequencies, base_model_prefix))
    return notes


def import_sae(source: str | Path, output_dir: Path, base_model_prefix: str = "model") -> SaeSet:
    """Convert any SAE megasae reads into a megasae adapter directory `output_dir`."""
    saes = read(source, base_model_prefix)
    write_directory(output_dir, lambda tmp: adapter.write(saes, tmp))
    return saes


@contextmanager
def adapter_directory(saes: SaeSet) -> Iterator[str]:
    """A megasae adapter directory holding `saes` for peft's loaders: theirs, or a temporary conversion."""
    if saes.format == "megasae":
        yield str(saes.path)
        return
    with tempfile.TemporaryDirectory(prefix="megasae-import-") as tmp:
        adapter.write(saes, Path(tmp))
        yield tmp
