"""`megasae cache`: run the host once over the data and keep what the token mask keeps of each target's
activations (megasae.data.activations has the layout). Resumable: the manifest is rewritten after every
shard with the data position after it, so an interrupted cache continues where it stopped.

Under --tp/--pp (torchrun with tp x pp ranks) the host is split as for training: every rank reads the same
batches, the first TP rank of each pipeline stage hands the rows of its targets to rank 0, which writes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor, nn

from megasae.checks import check_at_least, check_types
from megasae.data import DataColumns, build_batches
from megasae.data.activations import FORMAT, MANIFEST, sha256, shard_name, tensor_names
from megasae.dtypes import DTYPES, CacheDtype, Dtype
from megasae.files import fix_modes, write_atomic
from megasae.models.loading import DEFAULT_MODEL_NAME
from megasae.parallel import ParallelState, init_distributed
from megasae.parallel.distributed import Device
from megasae.parallel.host import build_host
from megasae.peft.layer import hidden_state, module_input, module_widths
from megasae.peft.tuner import target_paths
from megasae.token_policy import DEFAULT_TOKEN_POLICY, Modality


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
    cache_dtype: CacheDtype = "float16"
    """dtype of the stored activations; training reads them as float32."""
    shard_tokens: int = 65_536
    """Activations per shard, about: a shard ends after the batch that reaches it."""
    ctx_len: int = 256
    """Tokens per sequence."""
    micro_batch_size: int = 8
    """Sequences per forward."""
    tokens: Modality = DEFAULT_TOKEN_POLICY["tokens"]
    """Which positions to store, by modality; padding, position 0 and special tokens never."""
    text_column: str = DataColumns.text_column
    """Parquet column of plain text."""
    messages_column: str = DataColumns.messages_column
    """Parquet column of chat messages."""
    images_column: str = DataColumns.images_column
    """Parquet column of encoded image bytes for chat rows."""
    dtype: Dtype = "float32"
    """dtype of the host model."""
    device: Device = "auto"
    """Where the host runs; auto picks CUDA when available."""
    seed: int = 0
    """Seed of the data order."""
    tp: int = 1
    """Tensor-parallel size: the host's layers split over this many ranks (torchrun with tp x pp ranks)."""
    pp: int = 1
    """Pipeline-parallel size: the host's decoder layers up to the last target split into this many stages."""

    def __post_init__(self):
        check_types(self)
        check_at_least(self, 1, "max_tokens", "shard_tokens", "ctx_len", "micro_batch_size", "tp", "pp")

    def settings(self) -> dict:
        """What a continued cache must share with the one it continues (and a run with its host); not --tp
        or --pp, which do not change the activations."""
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
    """Forward hooks that keep, per target of this rank, the rows the token mask keeps. Without a pipeline
    the last target ends the forward; a pipeline stage runs all its layers, since it hands its hidden state
    on."""

    class Done(Exception):
        pass

    def __init__(self, host: nn.Module, paths: list[str], transcode: bool, stop_after_last: bool):
        self.rows: dict[str, list[Tensor]] = {}
        self.mask: Tensor | None = None
        self.transcode = transcode
        for path in paths:
            host.get_submodule(path).register_forward_hook(
                self._hook(path, stop_after_last and path == paths[-1]), with_kwargs=True
            )

    def _hook(self, path: str, last: bool):
        def hook(module, args, kwargs, output):
            hidden = hidden_state(path, output)
            read = [module_input(path, args, kwargs), hidden] if self.transcode else [hidden]
            for name, tensor in zip(tensor_names(path, self.transcode), read):
                self.rows.setdefault(name, []).append(tensor[self.mask].detach())
            if last:
                raise self.Done

        return hook

    def take(self) -> dict[str, Tensor]:
        """The rows recorded since the last call, per tensor name, on the CPU."""
        rows = {name: torch.cat(parts).cpu() for name, parts in self.rows.items()}
        self.rows.clear()
        return rows


class _CacheHost:
    """The host as this rank runs it: whole, split over the TP group, or this rank's pipeline stage of it,
    with the targets of its layers (`paths`, full module paths in the host's order)."""

    def __init__(self, cfg: CacheConfig, par: ParallelState):
        self.par = par
        built = build_host(cfg.model, list(cfg.target_modules), par, DTYPES[cfg.dtype])
        self.host, self.processor, self.stage = built.host, built.processor, built.stage
        self.paths = target_paths(self.host, built.targets) if built.targets else []
        self.widths = {path: module_widths(self.host.get_submodule(path), path)[1] for path in self.paths}

    def forward(self, inputs: dict[str, Tensor]) -> None:
        if self.stage is not None:
            self.stage.forward(self.host, **inputs)
            return
        try:
            self.host(**inputs)
        except _Recorder.Done:
            pass

    @property
    def records(self) -> bool:
        """Whether this rank hands its rows to the writer: the one that leads its stage (the TP ranks of a
        stage hold the same activations)."""
        return self.par.leads_stage

    def gather(self, mine: dict) -> dict | None:
        """Every stage's `mine` (a dict keyed by target tensor) merged on rank 0, in stage order; None
        elsewhere."""
        if self.par.pp_group is None:
            return mine if self.par.is_main else None
        if not self.records:
            return None
        parts = [None] * self.par.pp_size if self.par.is_main else None
        dist.gather_object(mine, parts, dst=0, group=self.par.pp_group)
        return {key: value for part in parts for key, value in part.items()} if parts is not None else None


def _continued_manifest(cfg: CacheConfig) -> dict | None:
    """The manifest of the interrupted cache `cfg` continues (None for a new one), refused when its settings
    differ or it is complete."""
    out, settings = cfg.output_dir, cfg.settings()
    manifest_path = out / MANIFEST
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
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
    return manifest


def write_cache(cfg: CacheConfig) -> Path:
    par = init_distributed(cfg.device, tp=cfg.tp, pp=cfg.pp)
    if par.dp_size > 1:
        raise ValueError(f"megasae cache runs one copy of the host: launch --tp x --pp = {cfg.tp * cfg.pp} "
                         f"ranks, not {par.world_size}.")
    out = cfg.output_dir
    manifest = _continued_manifest(cfg)
    if par.is_main:
        out.mkdir(parents=True, exist_ok=True)
    host = _CacheHost(cfg, par)
    batches = build_batches(cfg.data, host.processor, ctx_len=cfg.ctx_len, batch_size=cfg.micro_batch_size,
                            rank=0, world_size=1, seed=cfg.seed, columns=DataColumns.of(cfg))
    widths = host.gather(host.widths if host.records else {})
    if manifest is None and par.is_main:
        targets = {path: {"width": width, "transcode": cfg.transcode} for path, width in widths.items()}
        manifest = {"format": FORMAT, "settings": cfg.settings(), "complete": False, "tokens": 0,
                    "shards": [], "targets": targets,
                    "token_policy": {**DEFAULT_TOKEN_POLICY, "tokens": cfg.tokens, "outlier_factor": None},
                    "data_state": None}
    if manifest is not None and manifest["data_state"] is not None:
        batches.load_state_dict(manifest["data_state"])
    recorder = _Recorder(host.host, host.paths, cfg.transcode, stop_after_last=host.stage is None)
    done = manifest["tokens"] if manifest is not None else 0
    with torch.inference_mode():
        while done < cfg.max_tokens:
            kept = 0
            while kept < min(cfg.shard_tokens, cfg.max_tokens - done):
                batch = next(batches)
                recorder.mask = batch.token_mask.to(par.device)
                host.forward({k: v.to(par.device) for k, v in batch.inputs.items()})
                kept += int(batch.token_mask.sum())
            done += kept
            rows = host.gather(recorder.take() if host.records else {})
            if rows is not None:
                _write_shard(out, manifest, rows, DTYPES[cfg.cache_dtype], batches.state_dict())
    if par.is_main:
        manifest["complete"] = True
        write_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
    return out


def _write_shard(out: Path, manifest: dict, rows: dict[str, Tensor], dtype: torch.dtype,
                 data_state: dict) -> None:
    """`rows` as the next shard, then the manifest that lists it (both atomic: a crash between them leaves a
    shard the manifest does not list, which the next run overwrites)."""
    tensors = {name: tensor.to(dtype).contiguous() for name, tensor in rows.items()}
    name = shard_name(len(manifest["shards"]))
    tmp = out / f".{name}.tmp"
    save_file(tensors, tmp)
    fix_modes(out)
    tmp.replace(out / name)
    manifest["shards"].append({"file": name, "tokens": next(iter(tensors.values())).shape[0],
                               "sha256": sha256(out / name)})
    manifest["tokens"] += manifest["shards"][-1]["tokens"]
    manifest["data_state"] = data_state
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1))
