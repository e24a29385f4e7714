"""One architecture spec per model_type: all that megasae knows about a host family, in one place.

A spec says where the text model's decoder layers and final norm are, which tensor-parallel style each
module gets (module-name patterns -> style objects; modules no pattern names stay replicated), how the
logits are capped, which older names a checkpoint may use, and in which decoder layer a module sits.
Adding a family is adding one `Architecture` to ARCHITECTURES (and its tests).

Each style both splits a module over the TP ranks (`shard`) and counts the parameters a rank keeps of it
(`count`, for `megasae plan`), both from the one slice map `slices`:
- Column:   output features split evenly (q_proj, gate_proj, up_proj);
- ColumnKV: output features split by KV head; with fewer KV heads than ranks, each rank holds the one KV
            head its query heads attend with (replicated over tp / kv_heads ranks);
- Row:      input features split evenly, partial outputs all-reduced (o_proj, down_proj);
- Vocab:    embedding rows split over the ranks (VocabParallelEmbedding);
- Heads:    the attention module itself: its head counts become this rank's.
Biases follow the modules transformers builds from the config (a split bias goes with its rows).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor, nn
from transformers import PretrainedConfig

from megasae.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding


@dataclass(frozen=True)
class Slice:
    """Indices [start, stop) along `dim` of a full parameter; None in a slice map means the whole tensor."""

    dim: int
    start: int
    stop: int

    def of(self, full: Tensor) -> Tensor:
        return full.narrow(self.dim, self.start, self.stop - self.start)


@dataclass(frozen=True)
class Layout:
    """The shapes that decide a TP split, from the text model's config."""

    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tp: int

    @classmethod
    def from_config(cls, config: PretrainedConfig, tp: int) -> Layout:
        text = config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        return cls(
            text.num_attention_heads,
            text.num_key_value_heads,
            head_dim,
            text.intermediate_size,
            text.vocab_size,
            tp,
        )

    def fits(self, tp: int) -> bool:
        kv_ok = self.kv_heads % tp == 0 or tp % self.kv_heads == 0
        return self.q_heads % tp == 0 and kv_ok and self.intermediate_size % tp == 0

    def check(self, model_name: str) -> None:
        """One clear sentence when the heads or the MLP cannot be divided over tp ranks."""
        if not self.fits(self.tp):
            valid = [t for t in range(1, self.q_heads + 1) if self.fits(t)]
            raise ValueError(
                f"{model_name} cannot be split over --tp {self.tp}: it has {self.q_heads} query heads, "
                f"{self.kv_heads} KV heads and MLP width {self.intermediate_size}, so the tensor-parallel "
                f"size must divide the query heads and the MLP width, and divide or be a multiple of the KV "
                f"heads: one of {valid}."
            )

    @property
    def local_q_heads(self) -> int:
        return self.q_heads // self.tp

    @property
    def local_kv_heads(self) -> int:
        return max(self.kv_heads // self.tp, 1)

    def even(self, size: int, rank: int) -> tuple[int, int]:
        """Rows [start, stop) of an evenly split dimension (divisibility was checked up front)."""
        part = size // self.tp
        return rank * part, (rank + 1) * part

    def kv_rows(self, rank: int) -> tuple[int, int]:
        """Rows of k_proj / v_proj this rank holds: its share of the KV heads, or the one its queries use."""
        if self.kv_heads >= self.tp:
            return self.even(self.kv_heads * self.head_dim, rank)
        head = rank * self.kv_heads // self.tp
        return head * self.head_dim, (head + 1) * self.head_dim

    def vocab_rows(self, rank: int) -> tuple[int, int]:
        """Embedding rows of this rank; the last rank's share may be shorter (any vocab size works)."""
        part = -(-self.vocab_size // self.tp)
        return min(rank * part, self.vocab_size), min((rank + 1) * part, self.vocab_size)


# -- tensor-parallel styles ------------------------------------------------------------------------------


class Style:
    """How one module is split over the TP ranks."""

    def slices(self, module: nn.Module, layout: Layout, rank: int) -> dict[str, Slice | None]:
        """The slice of each of the module's own parameters that `rank` keeps (absent: the whole tensor)."""
        raise NotImplementedError

    def build(self, module: nn.Module, slices: dict[str, Slice | None], group) -> nn.Module:
        """The tensor-parallel replacement of `module` (uninitialised, on its device) holding `slices`."""
        raise NotImplementedError

    def shard(
        self, module: nn.Module, layout: Layout, rank: int, group: dist.ProcessGroup | None
    ) -> tuple[nn.Module, dict[str, Slice | None]]:
        slices = self.slices(module, layout, rank)
        return self.build(module, slices, group), slices

    def count(self, module: nn.Module, layout: Layout) -> int:
        """Parameters of the module itself (not its children) on rank 0, whose share is the largest."""
        slices = self.slices(module, layout, 0)
        total = 0
        for name, param in module.named_parameters(recurse=False):
            piece = slices.get(name)
            total += param.numel() if piece is None else param.numel() // param.shape[piece.dim] * (
                piece.stop - piece.start
            )
        return total


def _kw(module: nn.Module) -> dict:
    return {"device": module.weight.device, "dtype": module.weight.dtype}


def _has_bias(module: nn.Module) -> bool:
    return getattr(module, "bias", None) is not None


class Column(Style):
    def rows(self, module: nn.Module, layout: Layout, rank: int) -> tuple[int, int]:
        return layout.even(module.out_features, rank)

    def slices(self, module, layout, rank):
        rows = Slice(0, *self.rows(module, layout, rank))
        return {"weight": rows, **({"bias": rows} if _has_bias(module) else {})}

    def build(self, module, slices, group):
        rows = slices["weight"]
        return ColumnParallelLinear(module.in_features, rows.stop - rows.start, _has_bias(module), group,
                                    **_kw(module))


class ColumnKV(Column):
    def rows(self, module, layout, rank):
        return layout.kv_rows(rank)


class Row(Style):
    def slices(self, module, layout, rank):
        columns = Slice(1, *layout.even(module.in_features, rank))
        return {"weight": columns, **({"bias": None} if _has_bias(module) else {})}

    def build(self, module, slices, group):
        columns = slices["weight"]
        return RowParallelLinear(columns.stop - columns.start, module.out_features, _has_bias(module), group,
                                 **_kw(module))


@dataclass(frozen=True)
class Vocab(Style):
    scaled: bool = False
    """Whether the embedding multiplies its rows by its `embed_scale` buffer (Gemma: sqrt(hidden))."""

    def slices(self, module, layout, rank):
        return {"weight": Slice(0, *layout.vocab_rows(rank))}

    def build(self, module, slices, group):
        rows = slices["weight"]
        scale = module.embed_scale.clone() if self.scaled else None
        return VocabParallelEmbedding(rows.start, rows.stop - rows.start, module.embedding_dim, group,
                                      scale=scale, **_kw(module))


class Heads(Style):
    def slices(self, module, layout, rank):
        return {}

    def shard(self, module, layout, rank, group):
        """The attention module itself with this rank's head counts (HF reshapes by head_dim, but GQA reads
        these); its projections are split by their own styles."""
        if hasattr(module, "num_heads"):
            module.num_heads = layout.local_q_heads
        if hasattr(module, "num_key_value_heads"):
            module.num_key_value_heads = layout.local_kv_heads
        module.num_key_value_groups = layout.local_q_heads // layout.local_kv_heads
        return module, {}


def decoder_styles(embedding: Style = Vocab()) -> tuple[tuple[str, Style], ...]:
    """The Megatron split of a Llama-like text model, patterns relative to the text model."""
    return (
        (r"embed_tokens", embedding),
        (r"layers\.\d+\.self_attn", Heads()),
        (r"layers\.\d+\.self_attn\.q_proj", Column()),
        (r"layers\.\d+\.self_attn\.[kv]_proj", ColumnKV()),
        (r"layers\.\d+\.self_attn\.o_proj", Row()),
        (r"layers\.\d+\.mlp\.(gate|up)_proj", Column()),
        (r"layers\.\d+\.mlp\.down_proj", Row()),
    )


# -- the families ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    model_type: str
    text_model: str
    """Path of the text model (holding embed_tokens, layers, norm) in the *ForCausalLM /
    *ForConditionalGeneration model; anything else beside it (a vision tower) matches no style: replicated."""
    styles: tuple[tuple[str, Style], ...] = decoder_styles()
    """(pattern relative to the text model, style); the first match wins."""
    legacy_names: tuple[tuple[str, str], ...] = ()
    """(pattern of today's parameter name, its older spelling) tried when a checkpoint lacks today's name."""
    logit_softcap: str | None = None
    """Config field by which the host caps its logits, cap * tanh(logits / cap), after the LM head."""

    @property
    def decoder(self) -> str:
        """The ModuleList of decoder layers (split over pipeline stages)."""
        return f"{self.text_model}.layers"

    @property
    def final_norm(self) -> str:
        """The norm the host runs after its decoder layers, before the LM head."""
        return f"{self.text_model}.norm"

    def style_of(self, module_name: str) -> Style | None:
        prefix = re.escape(self.text_model + ".")
        return next((style for pattern, style in self.styles if re.fullmatch(prefix + pattern, module_name)),
                    None)

    def decoder_layer(self, module_name: str) -> int | None:
        """The decoder layer a module sits in (`...layers.<i>...`), None outside the decoder layers."""
        layers = self.decoder.rpartition(".")[2]
        found = re.findall(rf"(?:^|\.){layers}\.(\d+)(?:\.|$)", module_name)
        return int(found[-1]) if found else None

    def layer_of(self, module_name: str) -> int:
        """The decoder layer a target module sits in, or a clear error."""
        layer = self.decoder_layer(module_name)
        if layer is None:
            layers = self.decoder.rpartition(".")[2]
            raise ValueError(
                f"Target module {module_name!r} is not inside a decoder layer (no '{layers}.<i>' in its "
                "name); tensor and pipeline parallel runs target decoder layers or modules inside them."
            )
        return layer

    def cap_logits(self, config: PretrainedConfig, logits: Tensor) -> Tensor:
        cap = getattr(config.get_text_config(), self.logit_softcap) if self.logit_softcap else None
        return logits if cap is None else cap * (logits / cap).tanh()


ARCHITECTURES = {
    spec.model_type: spec
    for spec in (
        Architecture("llama", "model"),
        Architecture("qwen2", "model"),
        Architecture("qwen3", "model"),  # q_norm / k_norm (over head_dim) act per head: replicated
        Architecture("gemma2", "model", decoder_styles(Vocab(scaled=True)),
                     logit_softcap="final_logit_softcapping"),
        # Checkpoints written before transformers 5 name the text model "model." and the tower "visual.".
        Architecture(
            "qwen2_5_vl",
            "model.language_model",
            legacy_names=((r"^model\.language_model\.", "model."), (r"^model\.visual\.", "visual.")),
        ),
    )
}


def architecture(config: PretrainedConfig) -> Architecture:
    spec = ARCHITECTURES.get(config.model_type)
    if spec is None:
        raise ValueError(
            f"No tensor-parallel plan for model type {config.model_type!r}; "
            f"supported: {sorted(ARCHITECTURES)}."
        )
    return spec


def stage_layers(num_layers: int, pp: int) -> list[range]:
    """Decoder layers [0, num_layers) in `pp` contiguous stages whose sizes differ by at most one; the
    later stages take the extra layers, since stage 0 also holds the embeddings (and a vision tower)."""
    if pp > num_layers:
        raise ValueError(
            f"--pp {pp} needs at least {pp} decoder layers up to the last target, "
            f"but there are {num_layers}: "
            f"lower --pp or target a later layer."
        )
    base, extra = divmod(num_layers, pp)
    sizes = [base + (s >= pp - extra) for s in range(pp)]
    starts = [sum(sizes[:s]) for s in range(pp)]
    return [range(start, start + size) for start, size in zip(starts, sizes)]
