"""The cheap part of `megasae eval` during training (`--eval-every`): FVU, L0 and dead latents on
held-out rows."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from megasae.eval.batches import held_out_batches
from megasae.eval.metrics import ReconstructionStats
from megasae.eval.splice import adapter_settings
from megasae.peft import PeftSaeModel
from megasae.peft.control import sae_keys


class HeldOutEval:
    """Reads the same held-out batches (the data's first `max_tokens` tokens) at every call, so successive
    numbers compare; the trainer's forward runs them, stopping after the last target as in training."""

    def __init__(
        self, data: str, processor, device: torch.device, outlier_factor: float | None, **batch_args
    ):
        self.data, self.processor, self.device, self.outlier_factor = data, processor, device, outlier_factor
        self.batch_args = batch_args
        next(self._batches())  # bad data fails now, not after the first N training steps

    def _batches(self):
        return held_out_batches(self.data, self.processor, **self.batch_args)

    @torch.no_grad()
    def __call__(self, model: PeftSaeModel | None, forward: Callable[[dict, Tensor], dict]) -> dict:
        """eval/fvu, eval/l0 and eval/dead_pct (dead: never fired on these tokens) per SAE of `model`
        (None: a pipeline stage without SAEs). `forward(inputs, token_mask)` runs one batch through the
        host, or this rank's stage of it, and returns the SAE outputs of its targets."""
        saes = sae_keys(model) if model is not None else {}
        stats = {key: ReconstructionStats(*adapter_settings(layer, adapter))
                 for key, (layer, adapter) in saes.items()}
        was_training = model is not None and model.training
        if model is not None:
            model.eval()  # reading must not initialise b_dec or touch the dead-latent counters
        try:
            for batch in self._batches():
                inputs = {k: v.to(self.device) for k, v in batch.inputs.items()}
                for path, out in forward(inputs, batch.token_mask.to(self.device)).items():
                    stats[path].add(out.target, out.x_hat, out.values, out.indices, out.prefix_x_hat)
        finally:
            if model is not None:
                model.train(was_training)
        per_target = {}
        for path, target_stats in stats.items():
            summary = target_stats.summary()
            prefixes = {f"eval/fvu_prefix_{m}": fvu for m, fvu in summary.get("prefix_fvu", {}).items()}
            per_target[path] = {"eval/fvu": summary["fvu"], "eval/l0": summary["l0"],
                                "eval/dead_pct": 100 * summary["dead_fraction"], **prefixes}
        return per_target


def held_out_record(per_target: dict[str, dict]) -> dict[str, float]:
    """Every target's numbers averaged, and per target as eval/fvu/<module> etc. when there are several."""
    record: dict[str, float] = {}
    for path, values in sorted(per_target.items()):
        for key, value in values.items():
            if len(per_target) > 1:
                record[f"{key}/{path}"] = value
            record[key] = record.get(key, 0.0) + value / len(per_target)
    return record
