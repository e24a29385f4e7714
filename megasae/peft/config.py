"""TopKSaeConfig: the PEFT config of a TopK sparse autoencoder (peft_type "TOPK_SAE")."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union, get_args

import torch
from peft.config import PeftConfig

from megasae.dtypes import DTYPES, Dtype
from megasae.token_policy import TOKEN_POLICY_KEYS

PEFT_TYPE = "TOPK_SAE"
DEFAULT_ADAPTER = "default"  # peft's name for an adapter nobody named; saved in the directory itself

# How codes are chosen in training: each token's k largest, or the batch's k x N largest (BatchTopK, whose
# inference keeps the latents above a threshold learnt in training).
Architecture = Literal["topk", "batchtopk"]
ARCHITECTURES = get_args(Architecture)
# What the SAE reads: the activations as they are, or each token standardised (SAELens's "layer_norm": the
# SAE works on (x - mean) / std per token and scales its reconstruction back).
Normalization = Literal["none", "layer_norm"]
NORMALIZATIONS = get_args(Normalization)

def check_prefixes(prefixes, num_latents: int | None, error: type[Exception],
                   name: str = "matryoshka_prefixes") -> None:
    """Refuse Matryoshka prefix sizes that are not positive and strictly increasing, or whose last one is not
    `num_latents` (None: not known yet), with `error` and one sentence naming the setting `name`."""
    if prefixes is None:
        return
    sizes = list(prefixes)
    if not sizes or any(not isinstance(m, int) or m < 1 for m in sizes) or sizes != sorted(set(sizes)):
        raise error(f"{name} must be positive integers in strictly increasing order, got {sizes}.")
    if num_latents is not None and sizes[-1] != num_latents:
        raise error(f"The last of {name} must be the number of latents ({num_latents}), got {sizes[-1]}.")


@dataclass
class TopKSaeConfig(PeftConfig):
    """A TopK SAE (or transcoder) on each target module.

    Args:
        k: Number of latents kept per token.
        num_latents: Number of latents M; 0 means `expansion_factor` x the width the SAE reads.
        expansion_factor: Used when `num_latents` is 0.
        target_modules: Module names, name suffixes (a list) or one regex (a string), as in peft.
            Targets are `nn.Linear` or modules that return the hidden state (a tensor, or a tuple
            whose first element is it), such as Hugging Face decoder layers (the residual stream).
        exclude_modules: Names, suffixes or a regex of modules never to target.
        transcode: Read the module's input and predict its output (a transcoder) instead of
            reconstructing its output.
        k_aux: Latents used by the AuxK loss; None means half the width the SAE writes.
        auxk_alpha: Weight of the AuxK loss (0 disables it).
        dead_tokens_threshold: A latent that has not fired for this many tokens is dead.
        sae_dtype: "float32" (default, even on a bf16 host) or "bfloat16".
        init_sae_weights: False skips the random init (the weights are about to be loaded).
        relu_codes: Codes are relu(topk(pre)) (megasae, OpenAI, SAELens, sparsify); False keeps the raw
            top-k values, negative ones included (the original project's SAEs).
        architecture: "topk" (k latents per token) or "batchtopk" (k x N per batch of N tokens in training,
            pre > a learnt threshold at inference: megasae.sae.batchtopk).
        k_max: BatchTopK's candidate latents per token; None means min(4 k, num_latents). Widened when a
            batch keeps all of a token's candidates.
        normalize_activations: "none", or "layer_norm": the SAE reads each token standardised, (x - mean) /
            (std + 1e-5) over its width, and scales its reconstruction back by std and mean (SAELens's
            layer_norm), so that a token's codes and its share of the loss do not grow with its norm.
        matryoshka_prefixes: Nested dictionary sizes m_1 < ... < num_latents: the loss is the weighted sum
            of the FVUs of the reconstructions from latents < m_i (Matryoshka SAE); None trains one size.
        matryoshka_weights: One weight per prefix; None means equal weights. They are normalised to sum to 1.
        token_policy: Which tokens the SAE was trained on (TOKEN_POLICY_KEYS); None when not recorded.
        ctx_len: Tokens per training sequence; None when not recorded.
        dataset: The training data as given to `megasae train`; None when not recorded.
    """

    k: int = field(default=32, metadata={"help": "Number of latents kept per token."})
    num_latents: int = field(
        default=0, metadata={"help": "Number of latents; 0 means expansion_factor x the width the SAE reads."}
    )
    expansion_factor: int = field(
        default=32, metadata={"help": "Latents per input dimension when num_latents is 0."}
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names or suffixes (list) or a regex (str) of the modules to attach to."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Module names or suffixes (list) or a regex (str) never to attach to."},
    )
    transcode: bool = field(
        default=False, metadata={"help": "Read the module's input and predict its output (a transcoder)."}
    )
    k_aux: Optional[int] = field(
        default=None, metadata={"help": "Latents used by the AuxK loss; None means half the output width."}
    )
    auxk_alpha: float = field(default=1 / 32, metadata={"help": "Weight of the AuxK loss; 0 disables it."})
    dead_tokens_threshold: int = field(
        default=10_000_000, metadata={"help": "A latent that has not fired for this many tokens is dead."}
    )
    sae_dtype: Dtype = field(
        default="float32", metadata={"help": "dtype of the SAE weights, independent of the host's."}
    )
    compute_dtype: Dtype | None = field(
        default=None,
        metadata={
            "help": "dtype the SAE computes in (None: sae_dtype's). bfloat16 over float32 weights is mixed "
            "precision: bf16 products on tensor cores, float32 weights, gradients and Adam state."
        },
    )
    init_sae_weights: bool = field(
        default=True, metadata={"help": "False skips the random init, for weights about to be loaded."}
    )

    relu_codes: bool = field(
        default=True, metadata={"help": "relu(topk(pre)) codes; False keeps the raw top-k values (no ReLU)."}
    )
    architecture: Architecture = field(
        default="topk", metadata={"help": "topk (k per token) or batchtopk (k x N per batch of N tokens)."}
    )
    k_max: Optional[int] = field(
        default=None, metadata={"help": "BatchTopK candidates per token; None means min(4 k, num_latents)."}
    )
    normalize_activations: Normalization = field(
        default="none", metadata={"help": "none, or layer_norm: the SAE reads each token standardised."}
    )
    matryoshka_prefixes: Optional[list[int]] = field(
        default=None, metadata={"help": "Nested dictionary sizes, increasing, the last = num_latents."}
    )
    matryoshka_weights: Optional[list[float]] = field(
        default=None, metadata={"help": "Loss weight of each Matryoshka prefix; None means equal."}
    )
    token_policy: Optional[dict] = field(
        default=None, metadata={"help": "The tokens trained on (TOKEN_POLICY_KEYS); None when not recorded."}
    )
    ctx_len: Optional[int] = field(default=None, metadata={"help": "Tokens per training sequence."})
    dataset: Optional[str] = field(default=None, metadata={"help": "The training data, if recorded."})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = PEFT_TYPE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}.")
        if self.num_latents < 0:
            raise ValueError(
                f"num_latents must be 0 (use expansion_factor) or positive, got {self.num_latents}."
            )
        if self.num_latents and self.k > self.num_latents:
            raise ValueError(f"k ({self.k}) must be at most num_latents ({self.num_latents}).")
        if self.num_latents == 0 and self.expansion_factor < 1:
            raise ValueError(
                f"expansion_factor must be at least 1 when num_latents is 0, got {self.expansion_factor}."
            )
        if self.k_aux is not None and self.k_aux < 1:
            raise ValueError(f"k_aux must be None (half the output width) or positive, got {self.k_aux}.")
        if self.auxk_alpha < 0:
            raise ValueError(f"auxk_alpha must be non-negative, got {self.auxk_alpha}.")
        if self.sae_dtype not in get_args(Dtype):
            raise ValueError(f"sae_dtype must be one of {sorted(get_args(Dtype))}, got {self.sae_dtype!r}.")
        if self.token_policy is not None and set(self.token_policy) != set(TOKEN_POLICY_KEYS):
            raise ValueError(
                f"token_policy must have the keys {list(TOKEN_POLICY_KEYS)}, got {sorted(self.token_policy)}."
            )
        if self.compute_dtype is not None and self.compute_dtype not in get_args(Dtype):
            raise ValueError(
                f"compute_dtype must be None or one of {sorted(get_args(Dtype))}, got {self.compute_dtype!r}."
            )
        self._check_architecture()

    def _check_architecture(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {list(ARCHITECTURES)}, got {self.architecture!r}.")
        if self.architecture == "batchtopk" and not self.relu_codes:
            raise ValueError("A batchtopk SAE selects the codes after ReLU, so relu_codes must be True.")
        if self.k_max is not None and not (isinstance(self.k_max, int) and self.k_max >= self.k):
            raise ValueError(f"k_max must be None or an integer of at least k ({self.k}), got {self.k_max}.")
        if self.normalize_activations not in NORMALIZATIONS:
            raise ValueError(f"normalize_activations must be one of {list(NORMALIZATIONS)}, got "
                             f"{self.normalize_activations!r}.")
        check_prefixes(self.matryoshka_prefixes, self.num_latents or None, ValueError)
        if self.matryoshka_weights is not None and (
            self.matryoshka_prefixes is None or len(self.matryoshka_weights) != len(self.matryoshka_prefixes)
            or min(self.matryoshka_weights) < 0 or sum(self.matryoshka_weights) <= 0
        ):
            raise ValueError(
                f"matryoshka_weights must give one non-negative weight per Matryoshka prefix "
                f"({self.matryoshka_prefixes}), not all 0, got {self.matryoshka_weights}."
            )

    def prefix_weights(self) -> tuple[float, ...]:
        """The Matryoshka prefixes' loss weights, summing to 1 (equal by default)."""
        weights = self.matryoshka_weights or [1.0] * len(self.matryoshka_prefixes or ())
        return tuple(w / sum(weights) for w in weights)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.sae_dtype]

    @property
    def torch_compute_dtype(self) -> torch.dtype:
        return DTYPES[self.compute_dtype or self.sae_dtype]
