"""Load a host tensor-parallel from safetensors: each rank reads only its slices.

The model is built on the meta device (buffers such as rotary frequencies are real), its planned modules
are replaced by their tensor-parallel forms, and every remaining parameter is read from the checkpoint as
exactly the slice this rank holds (`safe_open(...).get_slice(name)[rows]`): no rank ever holds a full
weight it does not keep. For training, only the decoder layers up to the last target are built and the
LM head stays on the meta device, unread: the forward stops after the last target. For evaluation, which
runs the host to its logits, every layer is built and the LM head is read whole on every rank.

With pipeline parallelism a rank builds only its stage's decoder layers (the others are `nn.Identity()`
before any weight is read), so no rank ever holds the whole model. Stage 0 also reads what runs before the
layers (embedding, vision tower); later stages, which receive the hidden state from the stage before,
read nothing but their layers. For evaluation the stages split every layer, and the last stage alone
reads what runs after them (final norm, LM head).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

from megasae.models.loading import _attn_implementation, _is_image_text, hf_model_dir, load_processor
from megasae.parallel.architectures import Architecture, Slice, architecture, stage_layers
from megasae.parallel.distributed import ParallelState
from megasae.parallel.pipeline import tail_modules
from megasae.parallel.shard import shard_model

UNREAD = ("lm_head.",)


def _weight_files(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return {name: path / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path} holds neither model.safetensors nor model.safetensors.index.json.")
    with safe_open(single, "pt") as f:
        return dict.fromkeys(f.keys(), single)


def _checkpoint_name(name: str, files: dict[str, Path], arch: Architecture) -> str:
    if name in files:
        return name
    for pattern, old in arch.legacy_names:
        legacy = re.sub(pattern, old, name)
        if legacy in files:
            return legacy
    raise KeyError(f"The checkpoint has no tensor for parameter {name!r}.")


def _read(file: Path, name: str, piece: Slice | None) -> torch.Tensor:
    with safe_open(file, "pt") as f:
        sliced = f.get_slice(name)
        if piece is None:
            return sliced[:]
        rows = slice(piece.start, piece.stop)
        return sliced[rows] if piece.dim == 0 else sliced[:, rows]


def _keep_only(model: nn.Module, layers: range, to_logits: bool) -> None:
    """Replace every decoder layer outside `layers` by nn.Identity(); from a later stage (layers not
    starting at 0) also every module with parameters beside the path to the decoder layers: embedding,
    vision tower, final norm and LM head. With `to_logits` (the host runs to its logits) the final norm and
    LM head are kept by the last stage (layers ending with the decoder's) instead, and by no other.
    Replaced rather than left on the meta device, so that all the parameters such a stage has are real ones
    (`model.parameters()`, `.to()`, `model.device` stay sound)."""
    path = architecture(model.config).decoder
    decoder = model.get_submodule(path)
    tail = set(tail_modules(model)) if to_logits else set()
    first, last = layers.start == 0, layers.stop == len(decoder)
    for i in range(len(decoder)):
        if i not in layers:
            decoder[i] = nn.Identity()
    names = path.split(".")
    for depth, on_path in enumerate(names):
        parent = model.get_submodule(".".join(names[:depth]))
        for name, child in list(parent.named_children()):
            if name == on_path or next(child.parameters(), None) is None:
                continue
            if not (last if child in tail else first):
                setattr(parent, name, nn.Identity())


def load_sharded_host(
    path: str | Path,
    target_modules: list[str] | None,
    group: dist.ProcessGroup | None,
    rank: int,
    tp: int,
    *,
    layers: range | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """The host of `path` holding this TP rank's slices: truncated after the last target's decoder layer,
    or, with no `target_modules`, whole with a replicated LM head. With `layers` (a pipeline stage's
    decoder layers, `stage_layers(...)[pp_rank]`), only those layers are read, what precedes them only on
    the first stage and, with no `target_modules`, the final norm and LM head only on the last; the other
    modules are nn.Identity() (see `_keep_only`)."""
    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    text, arch = config.get_text_config(), architecture(config)
    if target_modules is not None:
        last = max(arch.layer_of(name) for name in target_modules)
        if last >= text.num_hidden_layers:
            raise ValueError(
                f"Target layer {last} does not exist: {path} has {text.num_hidden_layers} decoder layers."
            )
        text.num_hidden_layers = last + 1  # later layers are never built
    config.use_cache = text.use_cache = False  # as load_host_model: megasae never generates
    auto_cls = AutoModelForImageTextToText if _is_image_text(config) else AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        model = auto_cls.from_config(
            config, dtype=dtype, attn_implementation=_attn_implementation(torch.device(device))
        )
    embedding = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    split = shard_model(model, group, rank, tp)  # on the meta device: costs nothing for dropped modules
    if layers is not None:
        _keep_only(model, layers, to_logits=target_modules is None)
    files = _weight_files(path)
    for name, param in list(model.named_parameters()):
        if target_modules is not None and name.startswith(UNREAD):
            continue
        if name.startswith(UNREAD) and name not in files:
            # A tied head is stored once, as the embedding: read it whole (the embedding itself is split).
            source = _checkpoint_name(f"{embedding}.weight", files, arch)
        else:
            source = _checkpoint_name(name, files, arch)
        tensor = _read(files[source], source, split.get(name)).to(device=device, dtype=dtype)
        module_name, _, param_name = name.rpartition(".")
        model.get_submodule(module_name)._parameters[param_name] = nn.Parameter(tensor, requires_grad=False)
    for name, buffer in list(model.named_buffers()):  # built real (rotary frequencies), on the CPU
        module_name, _, buffer_name = name.rpartition(".")
        model.get_submodule(module_name)._buffers[buffer_name] = buffer.to(device)
    return model.eval().requires_grad_(False)


def _pipelined_layers(model_dir: Path, target_modules: list[str] | None) -> int:
    """How many decoder layers the pipeline splits: up to the last target, or all to reach the logits."""
    config = AutoConfig.from_pretrained(model_dir)
    if target_modules is None:
        return config.get_text_config().num_hidden_layers
    return max(architecture(config).layer_of(name) for name in target_modules) + 1


def load_host_tensor_parallel(
    path: str | Path | None,
    target_modules: list[str] | None,
    par: ParallelState,
    *,
    dtype: torch.dtype = torch.float32,
):
    """`megasae.models.load_host_model` for a TP rank: (this rank's sharded host, processor); truncated after
    the last of `target_modules`, or whole (LM head replicated) when they are None. With pp > 1 only this
    rank's pipeline stage is read (of the layers up to the last target, or of all of them): give the host
    to `PipelineStage`."""
    model_dir = hf_model_dir(path)
    layers = None
    if par.pp_size > 1:
        layers = stage_layers(_pipelined_layers(model_dir, target_modules), par.pp_size)[par.pp_rank]
    model = load_sharded_host(
        model_dir,
        target_modules,
        par.tp_group,
        par.tp_rank,
        par.tp_size,
        layers=layers,
        dtype=dtype,
        device=par.device,
    )
    return model, load_processor(model_dir, model.config)
