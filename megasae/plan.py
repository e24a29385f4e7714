"""`megasae plan`: per-rank memory of a tensor/pipeline-parallel run, from the host's config.json alone.

Per pipeline stage (every TP rank of a stage holds the same amount):
- host weights: the stage's decoder layers, each module counted by its tensor-parallel style
  (megasae.parallel.architectures: q/o and MLP split over tp; k/v split, or one KV head per rank when
  kv_heads < tp; norms replicated) on the modules transformers builds from the config on the meta device
  (no memory); stage 0 adds the vocab-parallel embedding and whatever else precedes the layers (a
  replicated vision tower). Layers after the last target, the final norm and the LM head are not loaded.
- host activations: the tensors alive at once inside one decoder layer with a fused attention kernel
  (no L x L scores): N (3 d + 2 (q_local + kv_local) head_dim + 3 I / tp) elements, N = micro-batch x ctx-len.
- SAE weights (fp32): each target's W_enc, W_dec (M/tp x d), b_enc (M/tp), b_dec (d), plus its int64
  dead-latent counters (M); gradients the same less the counters; Adam two states per weight.
- SAE activations (fp32): x, x_hat, residual and their gradient (4 N d) plus the gathered top-k
  candidates of the main and AuxK encoders (12 bytes each: value and index, N tp (c + k_aux), c = k, or
  BatchTopK's k_max candidates per token).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PretrainedConfig

from megasae.checks import check_at_least
from megasae.dtypes import DTYPES, Dtype
from megasae.models.loading import _is_image_text
from megasae.parallel.architectures import Architecture, Layout, architecture, stage_layers
from megasae.sae import candidates_per_row
from megasae.train.config import SaeSize, TrainConfig
from megasae.train.sweep import combinations, comma_lists

GiB = 1024**3
# The swept settings that change an SAE's size.
SIZE_SWEPT = ("k", "num_latents", "expansion_factor")


@dataclass
class PlanConfig(SaeSize):
    """Per-rank GPU memory of `megasae train --tp T --pp P` on a host, read from its config.json only (the
    SAE and batch settings are megasae train's flags, with its defaults; comma lists plan every SAE of the
    sweep)."""

    model: Path
    """A Hugging Face model directory (or its config.json)."""
    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    target_modules: tuple[str, ...] = TrainConfig.target_modules
    """Target modules (inside decoder layers)."""
    micro_batch_size: int = TrainConfig.micro_batch_size
    """Sequences per forward on each rank."""
    ctx_len: int = TrainConfig.ctx_len
    """Tokens per sequence."""
    dtype: Dtype = "bfloat16"
    """The host's dtype (megasae train's default is float32, for CPUs; GPUs run bfloat16 hosts)."""
    gpu_memory_gb: float = 80.0
    """Memory of one GPU in GiB; stages that need more are flagged."""

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 1, "tp", "pp", "micro_batch_size", "ctx_len")

    def sae_sizes(self, width: int) -> list[tuple[int, int]]:
        """(k, num_latents) of each SAE a target of `width` gets: one, or each combination of comma lists."""
        sizes = []
        for entry in combinations(comma_lists(self, SIZE_SWEPT)):
            sae = {name: getattr(self, name) for name in SIZE_SWEPT} | entry
            self.check_sae(sae["k"], sae["num_latents"])
            sizes.append((sae["k"], sae["num_latents"] or sae["expansion_factor"] * width))
        return sizes



@dataclass(frozen=True)
class StageMemory:
    stage: int
    layers: range
    targets: tuple[str, ...]
    host_weights: int
    host_activations: int
    sae_weights: int
    sae_grads: int
    optimizer: int
    sae_activations: int

    @property
    def total(self) -> int:
        return (
            self.host_weights
            + self.host_activations
            + self.sae_weights
            + self.sae_grads
            + self.optimizer
            + self.sae_activations
        )


def host_params(config: PretrainedConfig, arch: Architecture, layout: Layout) -> tuple[list[int], int]:
    """Parameters one TP rank holds of each decoder layer of `config`, and of what precedes the layers."""
    with torch.device("meta"):  # shapes only: nothing allocated, not even briefly
        auto_cls = AutoModelForImageTextToText if _is_image_text(config) else AutoModelForCausalLM
        model = auto_cls.from_config(config)
    tail = {arch.final_norm, next(n for n, m in model.named_modules() if m is model.get_output_embeddings())}
    per_layer, before = [0] * config.get_text_config().num_hidden_layers, 0
    for name, module in model.named_modules():
        style = arch.style_of(name)
        params = style.count(module, layout) if style else sum(p.numel() for p in module.parameters(False))
        if (layer := arch.decoder_layer(name)) is not None:
            per_layer[layer] += params
        elif name not in tail:
            before += params
    return per_layer, before


def estimate(cfg: PlanConfig, config: PretrainedConfig) -> list[StageMemory]:
    config = copy.deepcopy(config)  # truncated below
    text, arch = config.get_text_config(), architecture(config)
    layout = Layout.from_config(config, cfg.tp)
    layout.check(config.model_type)
    by_layer: dict[int, list[str]] = {}
    for name in cfg.target_modules:
        by_layer.setdefault(arch.layer_of(name), []).append(name)
    last = max(by_layer)
    if last >= text.num_hidden_layers:
        raise ValueError(
            f"Target layer {last} does not exist: the host has {text.num_hidden_layers} decoder layers."
        )
    text.num_hidden_layers = last + 1  # as the loader: later layers are never built
    per_layer, before = host_params(config, arch, layout)
    d, host_bytes = text.hidden_size, DTYPES[cfg.dtype].itemsize
    tokens = cfg.micro_batch_size * cfg.ctx_len
    local_heads = layout.local_q_heads + layout.local_kv_heads
    activations = tokens * (
        3 * d + 2 * local_heads * layout.head_dim + 3 * layout.intermediate_size // cfg.tp
    )
    # Per target, summed over its SAEs: parameters, dead-latent counters and activations.
    sae_params = counters = sae_activations = 0
    for k, num_latents in cfg.sae_sizes(d):
        if num_latents % cfg.tp:
            raise ValueError(
                f"{num_latents} latents cannot be split over --tp {cfg.tp}; choose a multiple of {cfg.tp}."
            )
        sae_params += 2 * num_latents // cfg.tp * d + num_latents // cfg.tp + d
        counters += num_latents
        candidates = k if cfg.architecture == "topk" else candidates_per_row(k, num_latents, cfg.k_max)
        sae_activations += tokens * (16 * d + 12 * cfg.tp * (candidates + (cfg.k_aux or max(d // 2, 1))))
    stages = []
    for stage, layers in enumerate(stage_layers(last + 1, cfg.pp)):
        params = sum(per_layer[i] for i in layers) + (before if stage == 0 else 0)
        targets = tuple(name for i in layers for name in by_layer.get(i, []))
        n = len(targets)
        stages.append(
            StageMemory(
                stage,
                layers,
                targets,
                params * host_bytes,
                activations * host_bytes,
                n * (4 * sae_params + 8 * counters),
                n * 4 * sae_params,
                n * 8 * sae_params,
                n * sae_activations,
            )
        )
    return stages


def render(cfg: PlanConfig, config: PretrainedConfig, stages: list[StageMemory]) -> str:
    text = config.get_text_config()
    sizes = cfg.sae_sizes(text.hidden_size)
    saes = (("SAEs " if len(sizes) > 1 else "SAE ") + " + ".join(f"{m} latents (k {k})" for k, m in sizes)
            + ", " + " + ".join(str(m // cfg.tp) for _, m in sizes) + " per rank")

    def gib(size: int) -> str:
        return f"{size / GiB:.2f}"

    lines = [
        (
            f"{config.model_type}: {text.num_hidden_layers} layers, hidden {text.hidden_size}, "
            f"{text.num_attention_heads} query / {text.num_key_value_heads} KV heads, "
            f"MLP {text.intermediate_size}, vocab {text.vocab_size}; {cfg.dtype} host"
        ),
        (
            f"tp {cfg.tp} x pp {cfg.pp}: {cfg.tp * cfg.pp} GPUs per data-parallel replica; "
            f"{saes}; "
            f"micro-batch {cfg.micro_batch_size} x {cfg.ctx_len} tokens"
        ),
        "",
        (
            "GiB per rank  layers   host weights  host act.  SAE weights  "
            "SAE grads  Adam state  SAE act.  total"
            f"  fits {cfg.gpu_memory_gb:g} GiB"
        ),
    ]
    for s in stages:
        fits = s.total <= cfg.gpu_memory_gb * GiB
        lines.append(
            f"stage {s.stage:<6} {s.layers.start:>2}-{s.layers.stop - 1:<4} {gib(s.host_weights):>12} "
            f"{gib(s.host_activations):>10} {gib(s.sae_weights):>12} {gib(s.sae_grads):>10} "
            f"{gib(s.optimizer):>11} {gib(s.sae_activations):>9} {gib(s.total):>6}  {'yes' if fits else 'NO'}"
        )
    lines.append("")
    for s in stages:
        if s.targets:
            lines.append(f"stage {s.stage} trains the SAEs on {', '.join(s.targets)}")
        if s.total > cfg.gpu_memory_gb * GiB:
            lines.append(
                f"stage {s.stage} needs {gib(s.total)} GiB, more than {cfg.gpu_memory_gb:g} GiB: "
                "raise --tp or --pp, or lower --micro-batch-size or --num-latents."
            )
    return "\n".join(lines)


def plan(cfg: PlanConfig) -> str:
    """The table `megasae plan` prints."""
    path = cfg.model.parent if cfg.model.name == "config.json" else cfg.model
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--model {path} has no config.json; pass a Hugging Face model directory.")
    config = AutoConfig.from_pretrained(path)
    return render(cfg, config, estimate(cfg, config))
