"""Model-wide control of the attached SAEs; works on a PeftSaeModel and on a model from
inject_adapter_in_model."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager

import torch.distributed as dist
from torch import Tensor, nn

from megasae import sae
from megasae.peft.layer import (
    CaptureSession,
    HiddenRecord,
    Replacement,
    SaeMode,
    StopForward,
    TopKSaeLayer,
    sae_key,
)


def sae_layers(model: nn.Module) -> list[TopKSaeLayer]:
    return [m for m in model.modules() if isinstance(m, TopKSaeLayer)]


def _active_sae_layers(model: nn.Module) -> list[TopKSaeLayer]:
    layers = [m for m in sae_layers(model) if m.active_saes and not m.disable_adapters]
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no active TopK SAE; attach one with get_peft_sae_model."
        )
    return layers


def _several_adapters(layers: list[TopKSaeLayer]) -> bool:
    return len({adapter for layer in layers for adapter in layer.active_saes}) > 1


def sae_keys(model: nn.Module) -> dict[str, tuple[TopKSaeLayer, str]]:
    """The keys under which `capture` puts the active SAEs' outputs, each with its layer and adapter."""
    layers = _active_sae_layers(model)
    by_adapter = _several_adapters(layers)
    return {sae_key(layer.module_path, adapter, by_adapter): (layer, adapter)
            for layer in layers for adapter in layer.active_saes}


def set_sae_mode(model: nn.Module, mode: SaeMode) -> None:
    """"capture", "splice", or "auto" (train() captures, eval() splices) for every SAE of the model."""
    if mode not in ("auto", "capture", "splice"):
        raise ValueError(f"SAE mode must be 'auto', 'capture' or 'splice', got {mode!r}.")
    for layer in sae_layers(model):
        layer.sae_mode = mode


@contextmanager
def capture(
    model: nn.Module,
    *,
    token_mask: Tensor | None = None,
    stop_after_targets: bool = False,
    outlier_factor: float | None = None,
    group: dist.ProcessGroup | None = None,
    replace: dict[str, Replacement] | None = None,
) -> Iterator[dict[str, sae.SaeOutput]]:
    """Within the block every forward of `model` captures, and the yielded dict fills with one
    `SaeOutput` per target module path; with several adapters active (a sweep), one per SAE, keyed
    "<adapter>/<module path>" (`sae_keys`).

    token_mask: bool, shaped like the activations without their last dimension (e.g. [batch, seq]);
        only True tokens are read by the SAEs and counted in their losses.
    stop_after_targets: the forward ends right after the last target module has captured, so later
        layers and the LM head never run; it then returns the captured outputs.
    outlier_factor: also drop tokens whose activation norm exceeds this multiple of the median norm
        of the kept tokens (attention sinks, whose norms reach 100x the rest).
    group: the data-parallel process group; b_dec's initial mean, FVU's denominator and the
        dead-latent counters then cover the tokens of all its ranks (every rank must run the forward).
    replace: target module path -> "sae" or "zero": that module's output, on the rows its SAE reads,
        is replaced by the reconstruction (splice) or by zeros (ablation); the other rows pass unchanged.
    """
    layers = _active_sae_layers(model)
    replace = dict(replace or {})
    unknown = sorted(set(replace) - {layer.module_path for layer in layers})
    if unknown or not set(replace.values()) <= {"sae", "zero"}:
        raise ValueError(
            f"replace must map target module paths {[layer.module_path for layer in layers]} to 'sae' or "
            f"'zero', got {replace!r}."
        )
    session = CaptureSession(token_mask, stop_after_targets, len(layers), outlier_factor, group, replace,
                             by_adapter=_several_adapters(layers))
    for layer in layers:
        layer.capture_session = session
    plain_forward = model.forward

    @functools.wraps(plain_forward)
    def forward(*args, **kwargs):
        session.captured_this_forward.clear()
        try:
            return plain_forward(*args, **kwargs)
        except StopForward:
            return session.outputs

    own_forward = model.__dict__.get("forward")  # e.g. an accelerate hook
    model.forward = forward
    try:
        yield session.outputs
    finally:
        if own_forward is None:
            del model.forward  # back to the class's forward
        else:
            model.forward = own_forward
        for layer in layers:
            layer.capture_session = None


def stop_after_targets(model: nn.Module, **options):
    """`capture(model, stop_after_targets=True, **options)`: the forward costs only what the SAEs need."""
    return capture(model, stop_after_targets=True, **options)


def start_hidden_cache(holder: nn.Module, with_cache: bool) -> list[TopKSaeLayer]:
    """Begin a forward of `holder` (a tuner model or a host with SAEs injected): empty its
    `input_hidden_dict` / `output_hidden_dict`, so that nothing of the previous forward stays alive, and with
    `with_cache` have every SAE layer under it record into them, keyed by the layer's name in `holder`.
    Returns the layers to pass to `stop_hidden_cache` when the forward ends."""
    holder.input_hidden_dict.clear()
    holder.output_hidden_dict.clear()
    if not with_cache:
        return []
    layers = [(name, m) for name, m in holder.named_modules() if isinstance(m, TopKSaeLayer)]
    for name, layer in layers:
        layer.hidden_record = HiddenRecord(name, holder.input_hidden_dict, holder.output_hidden_dict)
    return [layer for _, layer in layers]


def stop_hidden_cache(layers: list[TopKSaeLayer]) -> None:
    for layer in layers:
        layer.hidden_record = None


class _HostCacheHooks:
    """Forward hooks that let a host with SAEs injected take `with_cache`; its own forward never sees it."""

    def __init__(self) -> None:
        self.recording: list[TopKSaeLayer] = []

    def before(self, host: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        self.recording = start_hidden_cache(host, kwargs.pop("with_cache", False))
        return args, kwargs

    def after(self, host: nn.Module, args: tuple, output) -> None:
        stop_hidden_cache(self.recording)
        self.recording = []


def accept_with_cache(host: nn.Module) -> None:
    """Give `host` its `input_hidden_dict`, `output_hidden_dict` and a forward that takes `with_cache`:
    for a host from `inject_adapter_in_model`, whose tuner nobody holds. Once, though each adapter builds
    a tuner."""
    if hasattr(host, "input_hidden_dict"):
        return
    host.input_hidden_dict, host.output_hidden_dict = {}, {}
    hooks = _HostCacheHooks()
    host.register_forward_pre_hook(hooks.before, with_kwargs=True)
    host.register_forward_hook(hooks.after, always_call=True)


def sae_outputs(model: nn.Module) -> dict[str, sae.SaeOutput]:
    """The last captured output of every SAE layer, by target module path."""
    return {
        layer.module_path: layer.sae_output for layer in sae_layers(model) if layer.sae_output is not None
    }


def adapter_parameters(model: nn.Module, adapter: str) -> list[nn.Parameter]:
    """The trainable parameters of the SAEs of adapter `adapter`, in the model's order."""
    return [p for name, p in model.named_parameters() if p.requires_grad and name.endswith(f".{adapter}")]


def remove_parallel_decoder_grads(model: nn.Module) -> None:
    """Call between backward() and optimizer.step(): keeps decoder rows on the unit sphere."""
    for layer in sae_layers(model):
        for W_dec in layer.trainable_decoders():
            sae.remove_parallel_grad_(W_dec)


def normalize_decoders(model: nn.Module) -> None:
    """Call after optimizer.step(): every decoder row back to unit norm."""
    for layer in sae_layers(model):
        for W_dec in layer.trainable_decoders():
            sae.normalize_rows_(W_dec)
