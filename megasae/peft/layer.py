"""TopKSaeLayer: the PEFT tuner layer that wraps a host module with one SAE per adapter.

Modes (DESIGN.md, "Host semantics of an attached SAE"):
- capture: the module's output passes on unchanged; the SAE reads it (or, for a transcoder,
  the module's input) and records an `SaeOutput` with its losses for the training loop;
- splice: the module's output is replaced by the SAE's reconstruction.
`sae_mode = "auto"` follows the host: `model.train()` captures, `model.eval()` splices.
A capture session (`megasae.capture`) always captures. In either mode a forward called with
`with_cache=True` also records what the SAE read and produced (`HiddenRecord`).
"""

from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from megasae import sae
from megasae.peft.config import TopKSaeConfig, check_prefixes

SaeMode = Literal["auto", "capture", "splice"]
Replacement = Literal["sae", "zero"]


class StopForward(Exception):
    """Raised by the last target module of a truncated forward; the capture session catches it."""


@dataclass
class CaptureSession:
    """Shared by the SAE layers of one model while `megasae.capture` is open."""

    token_mask: Tensor | None
    stop_after_targets: bool
    num_targets: int
    # Drop tokens whose activation norm exceeds this multiple of the median (attention sinks).
    outlier_factor: float | None = None
    # Data-parallel group: b_dec init, FVU's denominator and dead-latent counters span its ranks.
    group: dist.ProcessGroup | None = None
    # Target module path -> "sae" (reconstruction) or "zero" (ablation): what replaces that module's output
    # on the rows its SAE read, for evaluation; every other row keeps the host's own value.
    replace: dict[str, Replacement] = field(default_factory=dict)
    # Several adapters active at once (a sweep): outputs are keyed "<adapter>/<module path>", not by path.
    by_adapter: bool = False
    outputs: dict[str, sae.SaeOutput] = field(default_factory=dict)
    captured_this_forward: set[str] = field(default_factory=set)

    def record(self, module_path: str, outputs: dict[str, sae.SaeOutput]) -> None:
        """The outputs of the SAEs (by adapter) on `module_path`."""
        for adapter, output in outputs.items():
            self.outputs[sae_key(module_path, adapter, self.by_adapter)] = output
        self.captured_this_forward.add(module_path)
        if self.stop_after_targets and len(self.captured_this_forward) == self.num_targets:
            raise StopForward


def sae_key(module_path: str, adapter: str, by_adapter: bool) -> str:
    """Where a capture puts an SAE's output: under its module path, or with several adapters active (a sweep)
    under "<adapter>/<module path>", the adapter's directory in a sweep's output."""
    return f"{adapter}/{module_path}" if by_adapter else module_path


@dataclass(frozen=True)
class HiddenRecord:
    """Where a layer puts, during a forward called with `with_cache=True`, what its SAE read and produced."""

    key: str
    inputs: dict[str, Tensor]
    outputs: dict[str, Tensor]


@dataclass(frozen=True)
class SaeSpec:
    """The per-adapter settings a layer needs at run time (the rest of the config is for injection)."""

    k: int
    k_aux: int
    auxk_alpha: float
    dead_tokens_threshold: int
    transcode: bool
    compute_dtype: torch.dtype
    relu: bool
    layer_norm: bool = False  # the SAE reads each token standardised (sae.RowNorm)
    architecture: str = "topk"
    k_max: int = 0  # BatchTopK's candidates per token
    prefixes: tuple[int, ...] = ()  # Matryoshka prefix sizes, the last one all latents; () for one size
    prefix_weights: tuple[float, ...] = ()


def module_widths(module: nn.Module, module_path: str) -> tuple[int, int]:
    """(input width, output width) of a module an SAE can read, or a clear TypeError."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    for attr in ("hidden_size", "embed_dim"):
        width = getattr(module, attr, None)
        if isinstance(width, int):
            return width, width
    raise TypeError(
        f"Cannot attach a TopK SAE to {module_path!r} ({type(module).__name__}): a target must be an "
        "nn.Linear or a module that returns the hidden state and names its width in a `hidden_size` "
        "attribute (such as a Hugging Face decoder layer)."
    )


def module_input(module_path: str, args: tuple, kwargs: dict) -> Tensor:
    """The first input of a module call: what a transcoder reads."""
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input"))
    if not isinstance(x, Tensor):
        raise TypeError(f"The transcoder on {module_path!r} needs a tensor as the module's first input.")
    return x


def hidden_state(module_path: str, result: Any) -> Tensor:
    """The hidden state a module call returned: the tensor, or the first element of a tuple."""
    hidden = result[0] if isinstance(result, tuple) else result
    if not isinstance(hidden, Tensor):
        raise TypeError(
            f"The SAE on {module_path!r} needs the module to return a tensor or a tuple whose first element "
            f"is the hidden state; it returned {type(result).__name__}."
        )
    return hidden


def _rows_to_read(rows: Tensor, module_path: str, leading_shape: torch.Size,
                  session: CaptureSession | None) -> Tensor | None:
    """Which rows the SAE trains on: the session's token mask, less norm outliers; None means all."""
    if session is None:
        return None
    keep = None
    if session.token_mask is not None:
        if session.token_mask.shape != leading_shape:
            raise ValueError(
                f"token_mask has shape {tuple(session.token_mask.shape)} but the activations of "
                f"{module_path!r} have leading shape {tuple(leading_shape)}; pass a bool mask of that shape."
            )
        keep = session.token_mask.reshape(-1).to(rows.device, torch.bool)
    if session.outlier_factor is not None:
        norms = rows.float().norm(dim=-1)
        kept_norms = norms if keep is None else norms[keep]
        if kept_norms.numel():
            inlier = norms <= session.outlier_factor * kept_norms.median()
            keep = inlier if keep is None else keep & inlier
    return keep


def _replace_rows(hidden: Tensor, kept: Tensor | None, new_rows: Tensor | int) -> Tensor:
    """`hidden` with the rows an SAE read (`kept`; all when None) replaced by `new_rows`."""
    rows = hidden.flatten(0, -2).clone()
    rows[slice(None) if kept is None else kept] = new_rows
    return rows.view_as(hidden)


class TopKSaeLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names = ("sae_W_enc", "sae_b_enc", "sae_W_dec", "sae_b_dec")
    # sae_threshold: a BatchTopK SAE's inference threshold, saved with the adapter but never trained by the
    # optimizer (a buffer, so peft's set_adapter does not make it a trainable parameter).
    other_param_names = ("sae_spec", "sae_tokens_since_fired", "sae_needs_init", "sae_threshold")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: TopKSaeConfig, module_path: str):
        super().__init__()
        self.base_layer = base_layer
        self.module_path = module_path
        self.d_in, self.d_out = module_widths(base_layer, module_path)
        self.sae_W_enc = nn.ParameterDict()
        self.sae_b_enc = nn.ParameterDict()
        self.sae_W_dec = nn.ParameterDict()
        self.sae_b_dec = nn.ParameterDict()
        self.sae_spec: dict[str, SaeSpec] = {}
        # Statistics, not weights: kept out of the saved adapter.
        self.sae_tokens_since_fired = BufferDict(persistent=False)
        self.sae_threshold = BufferDict(persistent=True)
        # b_dec starts as the mean of the first training batch unless it was loaded.
        self.sae_needs_init: dict[str, bool] = {}
        self.sae_mode: SaeMode = "auto"
        self.sae_output: sae.SaeOutput | None = None
        self.capture_session: CaptureSession | None = None
        self.hidden_record: HiddenRecord | None = None
        # Set by megasae.parallel.shard_saes: this rank then holds one block of latents of the group's.
        self.latent_group: dist.ProcessGroup | None = None
        self._disable_adapters = False
        self.merged_adapters = []
        self._active_adapter = adapter_name
        self.register_load_state_dict_pre_hook(TopKSaeLayer._check_loaded_state)
        self.update_layer(adapter_name, config)

    def update_layer(self, adapter_name: str, config: TopKSaeConfig, **kwargs) -> None:
        width_read = self.d_in if config.transcode else self.d_out
        num_latents = config.num_latents or config.expansion_factor * width_read
        if config.k > num_latents:
            raise ValueError(
                f"k ({config.k}) must be at most the number of latents ({num_latents}) of the SAE on "
                f"{self.module_path!r}."
            )
        if config.k_max is not None and config.k_max > num_latents:
            raise ValueError(f"k_max ({config.k_max}) must be at most the number of latents ({num_latents}) "
                             f"of the SAE on {self.module_path!r}.")
        check_prefixes(config.matryoshka_prefixes, num_latents, ValueError,
                       f"matryoshka_prefixes of the SAE on {self.module_path!r}")
        device = next(self.base_layer.parameters(), torch.empty(0)).device
        if config.init_sae_weights:
            # Drawn on the CPU from a generator seeded by the global seed and the module path: the same SAE on
            # every device (CUDA's generator differs), whatever other targets exist and whichever rank
            # (pipeline stage) builds it. Not by the adapter name: the SAEs of a sweep start where a run of
            # each alone would, so they differ only in what the sweep varies.
            seed = torch.initial_seed() + zlib.crc32(self.module_path.encode())
            generator = torch.Generator().manual_seed(seed % 2**63)
            weights = sae.init_weights(width_read, self.d_out, num_latents, dtype=config.torch_dtype,
                                       generator=generator)
            weights = {name: tensor.to(device) for name, tensor in weights.items()}
        else:
            shapes = {"W_enc": (num_latents, width_read), "b_enc": (num_latents,),
                      "W_dec": (num_latents, self.d_out), "b_dec": (self.d_out,)}
            weights = {n: torch.zeros(s, dtype=config.torch_dtype, device=device) for n, s in shapes.items()}
        for name, tensor in weights.items():
            getattr(self, f"sae_{name}")[adapter_name] = nn.Parameter(tensor)
        self.sae_spec[adapter_name] = SaeSpec(
            k=config.k,
            k_aux=config.k_aux or max(self.d_out // 2, 1),
            auxk_alpha=config.auxk_alpha,
            dead_tokens_threshold=config.dead_tokens_threshold,
            transcode=config.transcode,
            compute_dtype=config.torch_compute_dtype,
            relu=config.relu_codes,
            layer_norm=config.normalize_activations == "layer_norm",
            architecture=config.architecture,
            k_max=sae.candidates_per_row(config.k, num_latents, config.k_max),
            prefixes=tuple(config.matryoshka_prefixes or ()),
            prefix_weights=config.prefix_weights(),
        )
        if config.architecture == "batchtopk":  # 0: not estimated yet (the first training batch sets it)
            self.sae_threshold[adapter_name] = torch.zeros((), dtype=torch.float32, device=device)
        self.sae_tokens_since_fired[adapter_name] = torch.zeros(num_latents, dtype=torch.long, device=device)
        self.sae_needs_init[adapter_name] = config.init_sae_weights
        self.set_adapter(self.active_adapters)

    def num_latents(self, adapter_name: str) -> int:
        """All of the SAE's latents, also when this rank holds only a block of them (the counters cover
        all)."""
        return self.sae_tokens_since_fired[adapter_name].numel()

    def enable_adapters(self, enabled: bool) -> None:
        # peft's re-enable makes every active adapter trainable, frozen ones too (peft issue #3447):
        # remember the flags when disabling and put them back when enabling.
        adapter_params = [p for name, p in self.named_parameters() if name.startswith("sae_")]
        if not enabled and not self.disable_adapters:
            self._requires_grad_when_enabled = [p.requires_grad for p in adapter_params]
        super().enable_adapters(enabled)
        if enabled and hasattr(self, "_requires_grad_when_enabled"):
            for param, requires_grad in zip(adapter_params, self._requires_grad_when_enabled):
                param.requires_grad_(requires_grad)
            del self._requires_grad_when_enabled

    def merge(self, *args, **kwargs) -> None:
        raise NotImplementedError(
            "A TopK SAE cannot be merged into its host's weights; use unload() instead."
        )

    def unmerge(self, *args, **kwargs) -> None:
        raise NotImplementedError("A TopK SAE is never merged, so there is nothing to unmerge.")

    # -- forward --------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        result = self.base_layer(*args, **kwargs)
        if self.disable_adapters or not self.active_saes:
            return result
        hidden = hidden_state(self.module_path, result)
        session = self.capture_session
        replaces = session is not None and self.module_path in session.replace
        if self._splicing() or self.hidden_record is not None or replaces:
            adapters = [self._the_active_adapter()]  # one SAE produces this module's output
        else:
            adapters = self.active_saes  # several capture side by side on the same input (a sweep)
        transcode = {self.sae_spec[adapter].transcode for adapter in adapters}
        if len(transcode) > 1:
            raise ValueError(f"The SAEs {adapters} on {self.module_path!r} read different inputs (some are "
                             "transcoders); activate SAEs or transcoders only.")
        transcode = transcode.pop()
        sae_in = module_input(self.module_path, args, kwargs) if transcode else hidden
        if self._splicing():
            x_hat = self._splice(adapters[0], sae_in).to(hidden.dtype)
            if self.hidden_record is not None:
                self._record_hidden(sae_in, x_hat)
            return (x_hat, *result[1:]) if isinstance(result, tuple) else x_hat
        # The rows read, once for every SAE of the layer: the token mask and outlier filter are shared.
        x, target, keep = self._rows_read(sae_in, hidden, transcode)
        outputs = {adapter: self._capture(adapter, x, target, keep) for adapter in adapters}
        out = outputs[adapters[-1]]
        if self.hidden_record is not None:
            self._record_hidden(sae_in, _replace_rows(hidden, out.kept, out.x_hat.to(hidden.dtype)))
        if session is None:
            return result
        session.record(self.module_path, outputs)  # the last target of a truncated forward stops it here
        replacement = session.replace.get(self.module_path)
        if replacement is None:
            return result
        # Only the rows the SAE read change: splicing or ablating position 0, special tokens or outliers,
        # which it never trained on, would measure those rows rather than the SAE.
        rows = _replace_rows(hidden, out.kept, 0 if replacement == "zero" else out.x_hat.to(hidden.dtype))
        return (rows, *result[1:]) if isinstance(result, tuple) else rows

    def _record_hidden(self, read: Tensor, produced: Tensor) -> None:
        """What the SAE read and what it produced, each as [tokens, width] (autograd graph kept)."""
        record = self.hidden_record
        record.inputs[record.key] = read.flatten(0, -2)
        record.outputs[record.key] = produced.flatten(0, -2)

    @property
    def active_saes(self) -> list[str]:
        """The active adapters this layer holds: peft activates an adapter model-wide, also on the layers
        of modules it does not target, which then pass their module's output on unchanged."""
        return [adapter for adapter in self.active_adapters if adapter in self.sae_spec]

    def _the_active_adapter(self) -> str:
        if len(self.active_saes) > 1:
            raise ValueError(
                f"The SAE layer {self.module_path!r} splices, caches or replaces with one adapter at a time, "
                f"but {self.active_saes} are active; choose one with set_adapter(name) (several capture side "
                "by side)."
            )
        return self.active_saes[0]

    def _splicing(self) -> bool:
        if self.capture_session is not None or self.sae_mode == "capture":
            return False
        return self.sae_mode == "splice" or not self.training

    def _weights(self, adapter: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        """(W_enc, b_enc, W_dec, b_dec, the encoder's pre-bias) in the compute dtype: casts that autograd
        carries back to the stored weights (no copy when the dtypes agree)."""
        dtype = self.sae_spec[adapter].compute_dtype
        W_enc, b_enc, W_dec, b_dec = (
            getattr(self, name)[adapter].to(dtype)
            for name in ("sae_W_enc", "sae_b_enc", "sae_W_dec", "sae_b_dec")
        )
        return W_enc, b_enc, W_dec, b_dec, None if self.sae_spec[adapter].transcode else b_dec

    def _splice(self, adapter: str, sae_in: Tensor) -> Tensor:
        """The SAE's reconstruction of what the module produced, from what it reads."""
        rows = sae_in.flatten(0, -2).to(self.sae_spec[adapter].compute_dtype)
        norm = self._row_norm(adapter, rows)
        x_hat = self._reconstruct(adapter, rows if norm is None else norm.apply(rows))
        x_hat = x_hat if norm is None else norm.undo(x_hat)
        return x_hat.reshape(*sae_in.shape[:-1], self.d_out)

    def _row_norm(self, adapter: str, rows: Tensor) -> sae.RowNorm | None:
        """The rows' standardisation, for an SAE that reads them standardised."""
        return sae.RowNorm.of(rows) if self.sae_spec[adapter].layer_norm else None

    def _reconstruct(self, adapter: str, rows: Tensor) -> Tensor:
        """The reconstruction of `rows` as the SAE reads them (standardised, if it does)."""
        W_enc, b_enc, W_dec, b_dec, pre_bias = self._weights(adapter)
        values, indices = self._encode(adapter, rows, W_enc, b_enc, pre_bias)
        return sae.decode(values, indices, W_dec, b_dec, self.latent_group)

    def _encode(self, adapter: str, rows: Tensor, W_enc: Tensor, b_enc: Tensor,
                pre_bias: Tensor | None) -> tuple[Tensor, Tensor]:
        """The codes of `rows`: each token's top k, or BatchTopK's selection over the batch while training and
        its threshold rule otherwise (splicing, evaluating), which does not depend on the batch."""
        spec = self.sae_spec[adapter]
        if spec.architecture == "topk":
            return sae.encode(rows, W_enc, b_enc, pre_bias, spec.k, None, self.latent_group, spec.relu)
        threshold = None if self.training and not self._splicing() else self._inference_threshold(adapter)
        return sae.batchtopk_encode(rows, W_enc, b_enc, pre_bias, spec.k, spec.k_max, threshold,
                                    self.latent_group)

    def _inference_threshold(self, adapter: str) -> Tensor:
        threshold = self.sae_threshold[adapter]
        if threshold <= 0:
            raise ValueError(
                f"The BatchTopK SAE on {self.module_path!r} has no inference threshold yet: train it for at "
                "least one step before splicing or evaluating it."
            )
        return threshold

    def _rows_read(self, sae_in: Tensor, hidden: Tensor,
                   transcode: bool) -> tuple[Tensor, Tensor, Tensor | None]:
        """(the rows the SAEs read, the rows they reconstruct, which rows: None for all)."""
        # The host is data: no gradient flows back into it while capturing.
        x = sae_in.detach().flatten(0, -2)
        keep = _rows_to_read(x, self.module_path, sae_in.shape[:-1], self.capture_session)
        target = hidden.detach().flatten(0, -2) if transcode else x
        if keep is not None:
            x, target = x[keep], target[keep]
        return x, target, keep

    def _capture(self, adapter: str, x: Tensor, target: Tensor, keep: Tensor | None) -> sae.SaeOutput:
        session = self.capture_session
        group = session.group if session is not None else None
        dtype = self.sae_spec[adapter].compute_dtype
        x, target = x.to(dtype), target.to(dtype)
        # The SAE trains on what it reads: standardised rows, if it reads them so (a transcoder's target
        # by its input's statistics, which are all it has at inference). Its output is in the host's units.
        read, wanted, norm = x, target, self._row_norm(adapter, x)
        if norm is not None:
            x, target = norm.apply(x), norm.apply(target)
        if self.training and self.sae_needs_init[adapter]:
            mean, count = sae.mean_and_count(target, group)
            if count > 0:
                self.sae_b_dec[adapter].data.copy_(mean)
                if not self.sae_spec[adapter].transcode:
                    self._fit_encoder_scale(adapter, x, group)
                self.sae_needs_init[adapter] = False
        output = self._losses(adapter, x, target, group)
        if norm is not None:
            output = dataclasses.replace(
                output, x=read, target=wanted, x_hat=norm.undo(output.x_hat),
                prefix_x_hat={m: norm.undo(rows) for m, rows in output.prefix_x_hat.items()})
        output.kept = keep
        if self.training:
            sae.update_dead_counters(
                self.sae_tokens_since_fired[adapter], output.indices, output.values, group
            )
            if adapter in self.sae_threshold:
                sae.update_threshold_(self.sae_threshold[adapter], output.values, group)
        self.sae_output = output
        return output

    @torch.no_grad()
    def _fit_encoder_scale(self, adapter: str, x: Tensor, group: dist.ProcessGroup | None) -> None:
        """Scale the fresh encoder so that the first batch's reconstruction is least-squares optimal."""
        b_dec = self.sae_b_dec[adapter]
        x_hat = self._reconstruct(adapter, x)
        self.sae_W_enc[adapter].mul_(sae.least_squares_scale(x - b_dec, x_hat - b_dec, group))

    def _losses(
        self, adapter: str, x: Tensor, target: Tensor, group: dist.ProcessGroup | None
    ) -> sae.SaeOutput:
        spec = self.sae_spec[adapter]
        W_enc, b_enc, W_dec, b_dec, pre_bias = self._weights(adapter)
        values, indices = self._encode(adapter, x, W_enc, b_enc, pre_bias)
        x_hat = sae.decode(values, indices, W_dec, b_dec, self.latent_group)
        total_var = sae.total_variance(target, group)
        fvu = sae.fraction_of_variance_unexplained(target, x_hat, total_var)
        prefix_x_hat, prefix_fvu, reconstruction = {}, {}, fvu
        if spec.prefixes:  # the last prefix holds every latent: its reconstruction is x_hat
            prefix_x_hat = sae.prefix_reconstructions(values, indices, W_dec, b_dec, spec.prefixes[:-1],
                                                      self.latent_group) | {spec.prefixes[-1]: x_hat}
            prefix_fvu = {m: sae.fraction_of_variance_unexplained(target, rows, total_var)
                          for m, rows in prefix_x_hat.items()}
            reconstruction = sum(w * f for w, f in zip(spec.prefix_weights, prefix_fvu.values()))
        dead_mask = self.sae_tokens_since_fired[adapter] >= spec.dead_tokens_threshold
        auxk = torch.zeros_like(fvu)
        if spec.auxk_alpha > 0 and torch.is_grad_enabled():
            auxk = sae.auxk_loss(
                x, target - x_hat, W_enc, b_enc, pre_bias, W_dec, dead_mask, spec.k_aux, total_var,
                self.latent_group, spec.relu,
            )
        return sae.SaeOutput(
            x=x, target=target, x_hat=x_hat, values=values, indices=indices, fvu=fvu, auxk=auxk,
            loss=reconstruction + spec.auxk_alpha * auxk, num_dead=int(dead_mask.sum()),
            prefix_x_hat=prefix_x_hat, prefix_fvu=prefix_fvu,
        )

    # -- decoder constraints ----------------------------------------------------------------------

    def trainable_decoders(self) -> list[Tensor]:
        return [W for W in self.sae_W_dec.values() if W.requires_grad]

    # -- loading ----------------------------------------------------------------------------------

    @staticmethod
    def _check_loaded_state(module: TopKSaeLayer, state_dict: dict, prefix: str, *args) -> None:
        """Name the key and both shapes when an adapter does not fit; keep loaded b_dec from being
        re-initialised."""
        for name in (*module.adapter_layer_names, "sae_threshold"):
            for adapter, param in getattr(module, name).items():
                loaded = state_dict.get(f"{prefix}{name}.{adapter}")
                if loaded is None:
                    continue
                if loaded.shape != param.shape:
                    raise ValueError(
                        f"Adapter weight {prefix}{name} has shape {tuple(loaded.shape)} in the checkpoint "
                        f"but {tuple(param.shape)} in the model: the adapter was trained on a module of "
                        "another width or with another number of latents."
                    )
                module.sae_needs_init[adapter] = False

    def __repr__(self) -> str:
        return "sae." + super().__repr__()
