"""The cheap part of `megasae eval` during training (`--eval-every`): FVU, L0 and dead latents on held-out rows."""

from __future__ import annotations

import torch

from megasae.eval.batches import held_out_batches
from megasae.eval.metrics import ReconstructionStats
from megasae.eval.splice import adapter_settings
from megasae.peft import PeftSaeModel, sae_layers


class HeldOutEval:
    """Reads the same held-out batches (the data's first `max_tokens` tokens) at every call, so successive
    numbers compare; the forward stops after the last target, as in training."""

    def __init__(self, data: str, processor, device: torch.device, outlier_factor: float | None, **batch_args):
        self.data, self.processor, self.device, self.outlier_factor = data, processor, device, outlier_factor
        self.batch_args = batch_args
        next(self._batches())  # bad data fails now, not after the first N training steps

    def _batches(self):
        return held_out_batches(self.data, self.processor, **self.batch_args)

    @torch.no_grad()
    def __call__(self, model: PeftSaeModel) -> dict[str, float]:
        """eval/fvu, eval/l0 and eval/dead_pct (dead: never fired on these tokens), averaged over the targets,
        and per target as eval/fvu/<module> etc. when there are several."""
        layers = sae_layers(model)
        stats = {layer.module_path: ReconstructionStats(*adapter_settings(layer)) for layer in layers}
        was_training = model.training
        model.eval()  # reading must not initialise b_dec or touch the dead-latent counters
        try:
            for batch in self._batches():
                inputs = {k: v.to(self.device) for k, v in batch.inputs.items()}
                with model.stop_after_targets(token_mask=batch.token_mask.to(self.device),
                                              outlier_factor=self.outlier_factor) as outputs:
                    model(**inputs)
                for path, out in outputs.items():
                    stats[path].add(out.target, out.x_hat, out.values, out.indices)
        finally:
            model.train(was_training)
        record: dict[str, float] = {}
        for path, target_stats in stats.items():
            summary = target_stats.summary()
            values = {"eval/fvu": summary["fvu"], "eval/l0": summary["l0"],
                      "eval/dead_pct": 100 * summary["dead_fraction"]}
            for key, value in values.items():
                if len(stats) > 1:
                    record[f"{key}/{path}"] = value
                record[key] = record.get(key, 0.0) + value / len(stats)
        return record
