"""`megasae cache`: run the host once over the data and keep what the token mask keeps of each target's
activations (megasae.data.activations has the layout). Resumable: the manifest is rewritten after every
shard with the data position after it, so an interrupted cache continues where it stopped."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from megasae.checks import check_at_least, check_types
from megasae.data import build_batches
from megasae.data.activations import FORMAT, MANIFEST, sha256, shard_name, tensor_names
from megasae.files import fix_modes, write_atomic
from megasae.models import load_host_model
from megasae.models.loading import DEFAULT_MODEL_NAME
from megasae.parallel.distributed import resolve_device
from megasae.peft.config import DEFAULT_TOKEN_POLICY
from megasae.peft.layer import module_widths

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class CacheConfig:
    """Run the host once and store the activations that SAEs on its target modules read, for `megasae train
    --activations` (no host at all). Interrupted, the same command continues where it stopped."""

    output_dir: Path
    """The cache directory: manifest.json and shard-*.safetensors."""
    model: str | None = None
    """Host model: a Hugging Face model directory or a .gguf file; none means SmolLM2-135M-Instruct."""
    data: str = "builtin"
    """Data, as for megasae train: Parquet (text, chat or input_ids rows), a datasets directory, hf:NAME, or
    'builtin'."""
    target_modules: tuple[str, ...] = ("model.layers.15",)
    """Modules whose activations to store: names or name suffixes."""
    transcode: bool = False
    """Store each target's input beside its output, for transcoders."""
    max_tokens: int = 409_600
    """Activations (token positions the mask keeps) to store."""
    cache_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    """dtype of the stored activations; training reads them as float32."""
    shard_tokens: int = 65_536
    """Activations per shard, about: a shard ends after the batch that reaches it."""
    ctx_len: int = 256
    """Tokens per sequence."""
    micro_batch_size: int = 8
    """Sequences per forward."""
    tokens: Literal["all", "text", "image"] = DEFAULT_TOKEN_POLICY["tokens"]
    """Which positions to store, by modality; padding, position 0 and special tokens never."""
    text_column: str = "text"
    """Parquet column of plain text."""
    messages_column: str = "messages"
    """Parquet column of chat messages."""
    images_column: str = "images"
    """Parquet column of encoded image bytes for chat rows."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """dtype of the host model."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the host runs; auto picks CUDA when available."""
    seed: int = 0
    """Seed of the data order."""

    def __post_init__(self):
        check_types(self)
        check_at_least(self, 1, "max_tokens", "shard_tokens", "ctx_len", "micro_batch_size")

    def settings(self) -> dict:
        """What a continued cache must share with the one it continues (and a run with its host)."""
        data = self.data
        if data != "builtin" and Path(data).exists():
            data = str(Path(data).resolve())
        model = self.model
        if model is not None and Path(model).exists():
            model = str(Path(model).resolve())
        return {
            "model": model or DEFAULT_MODEL_NAME, "data": data, "seed": self.seed, "ctx_len": self.ctx_len,
            "micro_batch_size": self.micro_batch_size, "tokens": self.tokens, "dtype": self.cache_dtype,
            "transcode": self.transcode, "text_column": self.text_column,
            "messages_column": self.messages_column, "images_column": self.images_column,
        }


class _Recorder:
    """Forward hooks that keep, per target, the rows the token mask keeps; the last target ends the
    forward."""

    class Done(Exception):
        pass

    def __init__(self, host: nn.Module, paths: list[str], transcode: bool):
        self.rows: dict[str, list[Tensor]] = {}
        self.mask: Tensor | None = None
        self.transcode = transcode
        for path in paths:
            host.get_submodule(path).register_forward_hook(
                self._hook(path, path == paths[-1]), with_kwargs=True
            )

    def _hook(self, path: str, last: bool):
        def hook(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            module_input = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
            read = [module_input, hidden] if self.transcode else [hidden]
            for name, tensor in zip(tensor_names(path, self.transcode), read):
                self.rows.setdefault(name, []).append(tensor[self.mask].detach())
            if last:
                raise self.Done

        return hook


def resolve_targets(host: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """The full module paths that `targets` (names or suffixes) name, in the host's module order."""
    names = [name for name, _ in host.named_modules() if name]
    found = [n for n in names if any(n == t or n.endswith(f".{t}") for t in targets)]
    missing = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
    if missing:
        raise ValueError(f"Target module {missing[0]!r} not found in {type(host).__name__}.")
    return found


def write_cache(cfg: CacheConfig) -> Path:
    out = cfg.output_dir
    manifest_path = out / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    settings = cfg.settings()
    if manifest is not None:
        changed = [f"{key} {manifest['settings'].get(key)!r} -> {value!r}" for key, value in settings.items()
                   if manifest["settings"].get(key) != value]
        if changed:
            raise ValueError(
                f"--output-dir {out} holds a cache made with other settings ({'; '.join(changed)}): "
                "continue it with the same ones or choose another directory."
            )
        if manifest["complete"]:
            raise FileExistsError(f"--output-dir {out} holds a complete cache of {manifest['tokens']:,} "
                                  "activations; choose another directory.")
    out.mkdir(parents=True, exist_ok=True)
    host, processor = load_host_model(cfg.model, dtype=DTYPES[cfg.dtype], device=resolve_device(cfg.device))
    paths = resolve_targets(host, cfg.target_modules)
    batches = build_batches(cfg.data, processor, ctx_len=cfg.ctx_len, batch_size=cfg.micro_batch_size, rank=0,
                            world_size=1, seed=cfg.seed, text_column=cfg.text_column,
                            messages_column=cfg.messages_column, images_column=cfg.images_column,
                            tokens=cfg.tokens)
    if manifest is None:
        widths = {path: module_widths(host.get_submodule(path), path)[1] for path in paths}
        manifest = {"format": FORMAT, "settings": settings, "complete": False, "tokens": 0, "shards": [],
                    "targets": {p: {"width": widths[p], "transcode": cfg.transcode} for p in paths},
                    "token_policy": {**DEFAULT_TOKEN_POLICY, "tokens": cfg.tokens, "outlier_factor": None},
                    "data_state": None}
    elif manifest["data_state"] is not None:
        batches.load_state_dict(manifest["data_state"])
    recorder = _Recorder(host, list(manifest["targets"]), cfg.transcode)
    device = resolve_device(cfg.device)
    with torch.inference_mode():
        while manifest["tokens"] < cfg.max_tokens:
            kept = 0
            while kept < min(cfg.shard_tokens, cfg.max_tokens - manifest["tokens"]):
                batch = next(batches)
                recorder.mask = batch.token_mask.to(device)
                try:
                    host(**{k: v.to(device) for k, v in batch.inputs.items()})
                except _Recorder.Done:
                    pass
                kept += int(batch.token_mask.sum())
            _write_shard(out, manifest, recorder, DTYPES[cfg.cache_dtype], batches.state_dict())
    manifest["complete"] = True
    write_atomic(manifest_path, json.dumps(manifest, indent=1))
    return out


def _write_shard(
    out: Path, manifest: dict, recorder: _Recorder, dtype: torch.dtype, data_state: dict
) -> None:
    """The recorded rows as the next shard, then the manifest that lists it (both atomic: a crash between
    them leaves a shard the manifest does not list, which the next run overwrites)."""
    tensors = {name: torch.cat(parts).to(dtype).cpu().contiguous() for name, parts in recorder.rows.items()}
    recorder.rows.clear()
    name = shard_name(len(manifest["shards"]))
    tmp = out / f".{name}.tmp"
    save_file(tensors, tmp)
    fix_modes(out)
    tmp.replace(out / name)
    rows = next(iter(tensors.values())).shape[0]
    manifest["shards"].append({"file": name, "tokens": rows, "sha256": sha256(out / name)})
    manifest["tokens"] += rows
    manifest["data_state"] = data_state
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
