"""Training metrics: one JSON line per log step, a progress bar and wandb, all on rank 0."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from tqdm import tqdm

from megasae.sae import SaeOutput


class StepMetrics:
    """Sums over the micro-batches of one optimizer step, per target module.

    Each rank's FVU already has the variance of all ranks' tokens as its denominator, so summing
    over ranks (done by the trainer) gives the global FVU; L0 is weighted by tokens.
    """

    def __init__(self):
        self.sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.micro_batches = 0

    def add(self, outputs: dict[str, SaeOutput], num_latents: dict[str, int]) -> None:
        self.micro_batches += 1
        for path, out in outputs.items():
            s = self.sums[path]
            s["fvu"] += out.fvu.item()
            s["auxk"] += out.auxk.item()
            s["loss"] += out.loss.item()
            for m, fvu in out.prefix_fvu.items():  # a Matryoshka SAE's
                s[f"fvu_prefix_{m}"] += fvu.item()
            s["l0_tokens"] += out.l0.item() * out.num_tokens
            s["tokens"] += out.num_tokens
            s["dead_pct"] = 100 * out.num_dead / num_latents[path]

    def flat(self) -> tuple[list[str], list[float]]:
        """Names and values, in a fixed order, for one all-reduce."""
        names = [f"{path}/{key}" for path in sorted(self.sums) for key in sorted(self.sums[path])]
        return names, [self.sums[n.rsplit("/", 1)[0]][n.rsplit("/", 1)[1]] for n in names]

    def summarise(self, summed: dict[str, float], world_size: int) -> dict[str, float]:
        """Per-target and overall metrics from values summed over ranks; `summed` may also hold the targets
        of other pipeline stages (same names, same number of micro-batches)."""
        record: dict[str, float] = {}
        paths = sorted({name.rsplit("/", 1)[0] for name in summed})
        for path in paths:
            tokens = summed[f"{path}/tokens"]
            per_target = {
                "fvu": summed[f"{path}/fvu"] / self.micro_batches,
                "auxk": summed[f"{path}/auxk"] / self.micro_batches,
                "loss": summed[f"{path}/loss"] / self.micro_batches,
                "l0": summed[f"{path}/l0_tokens"] / max(tokens, 1),
                "dead_pct": summed[f"{path}/dead_pct"] / world_size,  # the same on every rank
                "trained_tokens": tokens,
            }
            prefixes = [name.rsplit("/", 1)[1] for name in summed if name.startswith(f"{path}/fvu_prefix_")]
            per_target.update({key: summed[f"{path}/{key}"] / self.micro_batches for key in prefixes})
            for key, value in per_target.items():
                if len(paths) > 1:
                    record[f"{key}/{path}"] = value
                share = 1 if key in ("loss", "trained_tokens") else len(paths)
                record[key] = record.get(key, 0.0) + value / share
        return record


class MetricsLog:
    """metrics.jsonl (appended, so a resumed run continues it), a tqdm bar and optional wandb."""

    def __init__(self, output_dir: Path, total_tokens: int, done_tokens: int, enabled: bool, wandb_mode: str,
                 wandb_project: str, config: dict):
        self.enabled = enabled
        if not enabled:
            return
        self.file = open(output_dir / "metrics.jsonl", "a")
        self.bar = tqdm(total=total_tokens, initial=done_tokens, unit="tok", unit_scale=True,
                        dynamic_ncols=True, desc="train")
        self.wandb = None
        if wandb_mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            if wandb_mode == "offline":
                # wandb's error reporting (Sentry) looks its server up in DNS even offline.
                os.environ["WANDB_ERROR_REPORTING"] = "false"
            import wandb

            self.wandb = wandb.init(project=wandb_project, mode=wandb_mode, dir=str(output_dir),
                                    config=config, resume="allow")

    def advance(self, tokens: int) -> None:
        if self.enabled:
            self.bar.update(tokens)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.bar.set_postfix(fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}",
                             dead=f"{record['dead_pct']:.1f}%", tok_s=f"{record['tokens_per_s']:.0f}")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()
