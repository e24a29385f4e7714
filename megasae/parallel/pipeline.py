"""Forward-only pipeline parallelism over a host's decoder layers.

Stage s of P owns decoder layers `stage_layers(last_target + 1, P)[s]`; the other stages' layers are
dropped from its rank. Stage 0 runs the host's own forward (embeddings, vision tower, attention mask,
rotary and multimodal-rope positions) through its layers, and on through the later stages' layers (empty
there) to record the keyword arguments the host passes to each of them: they differ by layer where an
architecture mixes attention kinds (Gemma 2's sliding-window and global layers get different masks).
Each stage then hands the next one the hidden state together with those of every later layer, so each
stage calls its own layers exactly as the host would. The host is frozen and runs forward only: a stream
of micro-batches needs no schedule, each stage sending as soon as it has computed (bubble (P-1)/(m+P-1)).

An SAE lives on the stage that owns its target: attach SAEs to `stage_targets(...)` only.

Evaluation runs the host to its logits: the stages then cover every decoder layer, and the last one also
runs what the host runs after them (`tail_modules`: the final norm and the LM head, then the logits' cap
of an architecture that has one), see `logits`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_unflatten, treespec_dumps, treespec_loads

from megasae.parallel.architectures import Architecture, architecture, stage_layers
from megasae.parallel.distributed import ParallelState
from megasae.peft import PeftSaeModel
from megasae.peft.layer import StopForward


class _Elsewhere(nn.Module):
    """A decoder layer another stage runs: passes the hidden state on, whatever the keyword arguments."""

    def forward(self, hidden: Tensor, *args, **kwargs) -> Tensor:
        return hidden


class _StageDone(Exception):
    """Raised after stage 0's last layer: the rest of the host's forward belongs to later stages."""


@dataclass(frozen=True)
class _Slot:
    """Where a tensor goes in the structure sent ahead of the tensors themselves."""

    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class _Again:
    """A tensor sent earlier in the same structure (one mask or rotary table shared by every layer)."""

    leaf: int


def stage_targets(
    arch: Architecture, target_modules: list[str], last_layer: int, par: ParallelState
) -> list[str]:
    """The targets inside this rank's stage (the SAEs it trains); every target must be in some stage."""
    for name in target_modules:
        if arch.layer_of(name) > last_layer:
            raise ValueError(
                f"Target {name!r} is in decoder layer {arch.layer_of(name)}, which no pipeline stage owns: "
                f"the stages cover layers 0-{last_layer}; build them up to the last target's layer."
            )
    mine = stage_layers(last_layer + 1, par.pp_size)[par.pp_rank]
    return [name for name in target_modules if arch.layer_of(name) in mine]


def tail_modules(host: nn.Module) -> tuple[nn.Module, nn.Module]:
    """What the host runs after its decoder layers: the final norm and the LM head."""
    return host.get_submodule(architecture(host.config).final_norm), host.get_output_embeddings()


def run_to_targets(model: nn.Module, stage: PipelineStage | None, inputs: dict, **options) -> dict:
    """One forward for the SAE outputs of `model`'s targets, `options` going to `capture`. Without a pipeline
    it stops after the last target; a stage runs all its layers, since it hands its hidden state on, and a
    stage without SAEs (`model` the bare host) only relays."""
    if stage is None:
        with model.stop_after_targets(**options) as outputs:
            model(**inputs)
        return dict(outputs)
    if not isinstance(model, PeftSaeModel):
        stage.forward(model, **inputs)
        return {}
    with model.capture(**options) as outputs:
        stage.forward(model, **inputs)
    return dict(outputs)


def _hidden(output) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


class PipelineStage:
    """This rank's stage of a host whose decoder layers are split over the pipeline group."""

    def __init__(self, host: nn.Module, par: ParallelState, last_layer: int):
        self.arch = architecture(host.config)  # a clear error for unsupported architectures
        self.host = host
        self.layers: nn.ModuleList = host.get_submodule(self.arch.decoder)
        self.par = par
        self.stages = stage_layers(last_layer + 1, par.pp_size)
        self.mine = self.stages[par.pp_rank]
        for i in range(len(self.layers)):
            if i not in self.mine:
                self.layers[i] = _Elsewhere()  # frees the other stages' weights

    def owner(self, module_path: str) -> int:
        """The rank in the stage owning target `module_path` at this rank's place there (the same TP rank)."""
        stage = next(s for s, layers in enumerate(self.stages) if self.arch.layer_of(module_path) in layers)
        return self.par.stage_rank(stage)

    def forward(self, model: nn.Module, **inputs) -> Tensor | None:
        """Run one micro-batch through this stage's layers; returns the hidden state after them, or None
        when an SAE session stopped the forward after the last target. `model` is the host or the PEFT
        model around it; every rank of the pipeline gets the same inputs."""
        if self.par.is_first_stage:
            return self._first(model, inputs)
        hidden, kwargs = self._receive()
        try:
            for i in self.mine:
                hidden = _hidden(self.layers[i](hidden, **kwargs[i]))
        except StopForward:
            return None
        if not self.par.is_last_stage:
            self._send(hidden, {i: kwargs[i] for i in kwargs if i >= self.mine.stop})
        return hidden

    def logits(self, model: nn.Module, **inputs) -> Tensor | None:
        """`forward` through a host split over all its decoder layers, then, on the last stage, its final norm
        and LM head: the host's logits there, None on the other stages. The host must have been loaded to
        its logits (`load_host_tensor_parallel(path, None, par)`: the last stage holds the tail)."""
        hidden = self.forward(model, **inputs)
        if not self.par.is_last_stage:
            return None
        norm, head = tail_modules(self.host)
        return self.arch.cap_logits(self.host.config, head(norm(hidden)))

    def _first(self, model: nn.Module, inputs: dict) -> Tensor:
        later, layer_kwargs, result = range(self.mine.stop, self.stages[-1].stop), {}, []

        def keep_kwargs(i):
            return lambda module, args, kwargs: layer_kwargs.__setitem__(i, kwargs)

        def keep_hidden(module, args, output):
            result.append(_hidden(output))

        def hand_over(module, args, output):
            self._send(result[0], layer_kwargs)
            raise _StageDone

        hooks = [self.layers[i].register_forward_pre_hook(keep_kwargs(i), with_kwargs=True) for i in later]
        hooks.append(self.layers[self.mine.stop - 1].register_forward_hook(keep_hidden))
        hooks.append(self.layers[later[-1]].register_forward_hook(hand_over))
        try:
            model(**inputs, use_cache=False)
        except _StageDone:
            return result[0]
        finally:
            for hook in hooks:
                hook.remove()
        raise RuntimeError(
            "Pipeline stage 0 stopped before its last layer, so later stages would wait forever: "
            "capture with "
            "stop_after_targets=False (each stage stops after its own layers)."
        )

    # -- point to point ----------------------------------------------------------------------------

    def _send(self, hidden: Tensor, kwargs: dict[int, dict]) -> None:
        """The hidden state and the keyword arguments of each later layer; a tensor they share goes once."""
        leaves, spec = tree_flatten((hidden, kwargs))
        header, tensors, first = [], [], {}
        for i, leaf in enumerate(leaves):
            if not isinstance(leaf, Tensor):
                header.append(leaf)
            elif id(leaf) in first:
                header.append(_Again(first[id(leaf)]))
            else:
                first[id(leaf)] = i
                header.append(_Slot(tuple(leaf.shape), leaf.dtype))
                tensors.append(leaf.contiguous())
        dst = self.par.next_stage_rank
        dist.send_object_list([header, treespec_dumps(spec)], dst=dst, device=self.par.device)
        for tensor in tensors:
            dist.send(tensor, dst=dst)

    def _receive(self) -> tuple[Tensor, dict[int, dict]]:
        holder = [None, None]
        src = self.par.prev_stage_rank
        dist.recv_object_list(holder, src=src, device=self.par.device)
        header, spec = holder[0], treespec_loads(holder[1])
        leaves = []
        for leaf in header:
            if isinstance(leaf, _Slot):
                leaf = torch.empty(leaf.shape, dtype=leaf.dtype, device=self.par.device)
                dist.recv(leaf, src=src)
            elif isinstance(leaf, _Again):
                leaf = leaves[leaf.leaf]
            leaves.append(leaf)
        return tree_unflatten(leaves, spec)
