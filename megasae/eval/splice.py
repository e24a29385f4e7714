"""Loading a host with its adapter for evaluation, and host forwards with one target spliced or ablated."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from megasae import formats
from megasae.eval.config import HeldOutData
from megasae.parallel import ParallelState
from megasae.parallel.host import build_host
from megasae.parallel.pipeline import run_to_targets
from megasae.peft import PeftSaeModel, TopKSaeConfig, sae_layers
from megasae.peft.config import DEFAULT_ADAPTER
from megasae.peft.layer import Replacement, TopKSaeLayer
from megasae.peft.shard import shard_saes


def adapter_settings(layer: TopKSaeLayer, adapter: str = DEFAULT_ADAPTER) -> tuple[int, int]:
    """(num_latents, k) of a layer's SAE."""
    return layer.num_latents(adapter), layer.sae_spec[adapter].k


class EvalHost:
    """The host with the adapter attached, in eval mode, as this rank runs it to its logits: whole in one
    process; split over the TP group (each SAE's latents too); or under --pp this rank's pipeline stage of
    it, with the SAEs of the targets in its layers (a stage owning none holds the bare host and relays).

    Every rank of a pipeline runs every forward, in the same order: `targets` lists every target of the
    adapter, the same on each rank; `layers` only this rank's."""

    def __init__(self, cfg: HeldOutData, par: ParallelState):
        # Any format megasae reads, every tensor checked before the host, which takes far longer to load.
        self.saes = formats.read(cfg.adapter)
        self.par = par
        built = build_host(cfg.model, list(self.saes.saes), par, cfg.torch_dtype(), to_logits=True)
        self.processor, self.stage = built.processor, built.stage
        mine = built.targets if self.stage is not None else None
        self.model, self.layers = _attach_adapter(built.host, cfg.adapter, self.saes.config, par, mine)
        self.targets = list(self.layers) if self.stage is None else list(self.saes.saes)

    @torch.no_grad()
    def logits(self, inputs: dict[str, Tensor], token_mask: Tensor, outlier_factor: float | None,
               replace: dict[str, Replacement] | None = None) -> tuple[Tensor | None, dict]:
        """The host's logits (None off the last pipeline stage) with `replace` applied to the rows the SAEs
        read, and the output of each of this rank's SAEs on those rows."""
        if not self.layers:  # a pipeline stage that owns no target only relays
            return self._run(inputs), {}
        mine = {path: how for path, how in (replace or {}).items() if path in self.layers}
        options = dict(token_mask=token_mask, outlier_factor=outlier_factor, replace=mine)
        with self.model.capture(**options) as outputs:
            logits = self._run(inputs)
        return logits, dict(outputs)

    @torch.no_grad()
    def sae_outputs(self, inputs: dict[str, Tensor], token_mask: Tensor,
                    outlier_factor: float | None) -> dict:
        """The output of each of this rank's SAEs, without the logits. Without a pipeline the forward stops
        after the last target; a pipeline's stages each run all their layers, since each hands on its hidden
        state, but the last skips the final norm and LM head."""
        return run_to_targets(self.model, self.stage, inputs, token_mask=token_mask,
                              outlier_factor=outlier_factor)

    def _run(self, inputs: dict[str, Tensor]) -> Tensor | None:
        if self.stage is None:
            return self.model(**inputs, use_cache=False).logits
        return self.stage.logits(self.model, **inputs)

    def rows_read(self, path: str, outputs: dict, num_rows: int) -> Tensor:
        """The flattened positions `path`'s SAE read in this forward (bool [num_rows]), on every rank: under
        --pp the stage that owns the target sends them to the others."""
        out = outputs.get(path)
        kept = torch.ones(num_rows, dtype=torch.bool, device=self.par.device)
        if out is not None and out.kept is not None:
            kept = out.kept
        if self.stage is not None:  # overwrites `kept` except on the owner
            dist.broadcast(kept, src=self.stage.owner(path), group=self.par.pp_group)
        return kept

    def from_owner(self, path: str, mine):
        """`mine` as the stage owning target `path` has it, on every stage (a collective over them). Each TP
        rank of that stage holds the same, its SAE's top-k being global, and sends it to its own pipeline."""
        if self.stage is None:
            return mine
        holder = [mine]
        dist.broadcast_object_list(holder, src=self.stage.owner(path), group=self.par.pp_group)
        return holder[0]


def _attach_adapter(host: nn.Module, adapter: str | Path, config: TopKSaeConfig, par: ParallelState,
                    targets: list[str] | None):
    """(the host with the adapter's SAEs attached in eval mode, {target path: layer}); `targets` restricts
    them to those module paths (a pipeline stage's), and with none of them the host comes back bare."""
    if targets is not None:
        if not targets:
            return host, {}
        config = dataclasses.replace(config, target_modules=targets)
    model = PeftSaeModel.from_pretrained(host, adapter, config=config)
    shard_saes(model, par.tp_group)
    model.eval()  # no b_dec initialisation and no dead-latent counting while reading
    return model, {layer.module_path: layer for layer in sae_layers(model)}
