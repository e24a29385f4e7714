"""How each supported architecture is split over the TP ranks: a table of module-name patterns -> style.

Styles (modules no pattern names stay replicated):
- "column":    output features split evenly (q_proj, gate_proj, up_proj);
- "column_kv": output features split by KV head; with fewer KV heads than ranks, each rank holds the
               one KV head its query heads attend with (replicated over tp / kv_heads ranks);
- "row":       input features split evenly, partial outputs all-reduced (o_proj, down_proj);
- "vocab":     embedding rows split over the ranks (VocabParallelEmbedding);
- "heads":     the attention module itself: its head counts become this rank's.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from transformers import PretrainedConfig

_DECODER = (
    (r"embed_tokens", "vocab"),
    (r"layers\.\d+\.self_attn", "heads"),
    (r"layers\.\d+\.self_attn\.q_proj", "column"),
    (r"layers\.\d+\.self_attn\.[kv]_proj", "column_kv"),
    (r"layers\.\d+\.self_attn\.o_proj", "row"),
    (r"layers\.\d+\.mlp\.(gate|up)_proj", "column"),
    (r"layers\.\d+\.mlp\.down_proj", "row"),
)


def _under(prefix: str, rules) -> tuple[tuple[str, str], ...]:
    return tuple((re.escape(prefix) + pattern, style) for pattern, style in rules)


# model_type -> rules, matched against full module names of the *ForCausalLM / *ForConditionalGeneration
# model. Qwen2.5-VL's vision tower (model.visual) matches nothing and stays replicated.
PLANS: dict[str, tuple[tuple[str, str], ...]] = {
    "llama": _under("model.", _DECODER),
    "qwen2": _under("model.", _DECODER),
    "qwen2_5_vl": _under("model.language_model.", _DECODER),
}


# model_type -> the ModuleList of decoder layers (split over pipeline stages).
DECODER_LAYERS = {
    "llama": "model.layers",
    "qwen2": "model.layers",
    "qwen2_5_vl": "model.language_model.layers",
}


def plan_for(config: PretrainedConfig) -> tuple[tuple[str, str], ...]:
    plan = PLANS.get(config.model_type)
    if plan is None:
        raise ValueError(
            f"No tensor-parallel plan for model type {config.model_type!r}; supported: {sorted(PLANS)}."
        )
    return plan


def style_of(plan: tuple[tuple[str, str], ...], module_name: str) -> str | None:
    for pattern, style in plan:
        if re.fullmatch(pattern, module_name):
            return style
    return None


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


def target_layer(module_name: str) -> int:
    """The decoder layer a target module sits in (`...layers.<i>...`), or a clear error."""
    found = re.findall(r"(?:^|\.)layers\.(\d+)(?:\.|$)", module_name)
    if not found:
        raise ValueError(
            f"Target module {module_name!r} is not inside a decoder layer (no 'layers.<i>' in its name); "
            "tensor and pipeline parallel runs target decoder layers or modules inside them."
        )
    return int(found[-1])
