"""`megasae inspect`: the top-activating contexts of chosen latents, as one static HTML page."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from megasae.data import DataColumns
from megasae.data.masks import image_token_ids, tokenizer_of
from megasae.eval.batches import held_out_batches
from megasae.eval.config import InspectConfig
from megasae.eval.evaluate import init_eval_ranks
from megasae.eval.images import heatmap_png, image_runs, token_grid, unpatchify_qwen
from megasae.eval.splice import EvalHost
from megasae.files import write_atomic
from megasae.parallel import ParallelState
from megasae.sae import SaeOutput

CONTEXT_BEFORE, CONTEXT_AFTER = 24, 8


@dataclass
class Example:
    """One sequence's strongest activation of a latent, and the context around it."""

    score: float
    tokens: list[tuple[str, float]]  # (text, activation); the tokens of one image collapse into one entry
    image: np.ndarray | None = None  # the image holding the strongest token, when that is an image token
    image_activations: Tensor | None = None  # the latent's activation on each of that image's tokens
    grid: tuple[int, int] | None = None  # (rows, columns) of that image's tokens


@dataclass
class LatentExamples:
    latent: int
    fired: int = 0  # tokens it fired on
    examples: list[Example] = field(default_factory=list)

    def offer(self, example: Example, keep: int) -> None:
        self.examples.append(example)
        self.examples.sort(key=lambda e: -e.score)
        del self.examples[keep:]


def parse_latents(text: str) -> list[int]:
    try:
        return list(dict.fromkeys(int(part) for part in text.split(",") if part.strip()))
    except ValueError:
        raise ValueError(
            f"--latents must be comma-separated latent ids such as 0,17,42, got {text!r}."
        ) from None


def check_latents(latents: list[int], num_latents: int, path: str) -> None:
    bad = [i for i in latents if not 0 <= i < num_latents]
    if bad:
        raise ValueError(
            f"Latent ids {bad} do not exist: the SAE on {path!r} has {num_latents} latents, "
            f"ids 0 to {num_latents - 1}."
        )


def latent_activations(out: SaeOutput, latents: Tensor, shape: torch.Size, num_latents: int) -> Tensor:
    """[*shape, len(latents)]: each chosen latent's activation at every position (0 where the SAE read
    nothing)."""
    column = torch.full((num_latents,), -1, dtype=torch.long, device=out.indices.device)
    column[latents] = torch.arange(latents.numel(), device=column.device)
    cols = column[out.indices]
    hit = (cols >= 0) & (out.values > 0)
    rows = torch.arange(out.indices.shape[0], device=cols.device)[:, None].expand_as(cols)
    read = torch.zeros(out.indices.shape[0], latents.numel(), device=cols.device)
    read[rows[hit], cols[hit]] = out.values[hit].float()
    acts = torch.zeros(shape.numel(), latents.numel(), device=cols.device)
    acts[slice(None) if out.kept is None else out.kept] = read
    return acts.view(*shape, latents.numel())


class Collector:
    """Runs the SAE of one target over held-out batches and keeps each latent's top examples. Every rank runs
    every forward; under --pp only the stage owning the target collects."""

    def __init__(self, cfg: InspectConfig, par: ParallelState):
        self.host = EvalHost(cfg, par)
        self.cfg = cfg = cfg.following(self.host.saes.config)
        self.device = par.device
        self.processor = self.host.processor
        self.tokenizer = tokenizer_of(self.processor)
        self.image_ids = torch.tensor(image_token_ids(self.processor), dtype=torch.long)
        targets = self.host.targets
        if cfg.target is None and len(targets) > 1:
            raise ValueError(
                f"The adapter {cfg.adapter} has SAEs on {sorted(targets)}; choose one with --target."
            )
        self.path = cfg.target or targets[0]
        if self.path not in targets:
            raise ValueError(
                f"The adapter {cfg.adapter} has no SAE on {self.path!r}; its targets are {sorted(targets)}."
            )
        layer = self.host.layers.get(self.path)  # None off the stage owning it
        num_latents = None if layer is None else layer.num_latents("default")
        self.num_latents = self.host.from_owner(self.path, num_latents)
        self.tokens = 0  # tokens the SAE read

    def _outputs(self):
        """(batch, the target's SaeOutput, None off the stage owning it) for each held-out batch."""
        cfg = self.cfg
        batches = held_out_batches(
            cfg.data,
            self.processor,
            max_tokens=cfg.max_tokens,
            ctx_len=cfg.ctx_len,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            columns=DataColumns.of(cfg),
        )
        for batch in batches:
            inputs = {k: v.to(self.device) for k, v in batch.inputs.items()}
            outputs = self.host.sae_outputs(inputs, batch.token_mask.to(self.device), cfg.outlier_factor)
            yield batch, outputs.get(self.path)

    def most_frequent(self, n: int) -> list[int]:
        """The n latents that fire on the most tokens (of those that fire at all); none off the stage owning
        the target, which alone collects."""
        fired = torch.zeros(self.num_latents, dtype=torch.long)
        for _, out in self._outputs():
            if out is None:
                continue
            fired += torch.bincount(out.indices[out.values > 0].cpu(), minlength=self.num_latents)
        order = torch.argsort(fired, descending=True, stable=True)[:n]
        return [int(i) for i in order if fired[i] > 0]

    def collect(self, latents: list[int]) -> list[LatentExamples]:
        found = [LatentExamples(i) for i in latents]
        chosen = torch.tensor(latents, dtype=torch.long, device=self.device)
        self.tokens = 0
        for batch, out in self._outputs():
            if out is None:
                continue
            input_ids = batch.inputs["input_ids"]
            acts = latent_activations(out, chosen, input_ids.shape, self.num_latents).cpu()
            self.tokens += out.num_tokens
            is_image = torch.isin(input_ids, self.image_ids)
            runs = image_runs(is_image)
            images = None
            scores, positions = acts.max(dim=1)  # [batch, latents]: each sequence's strongest token
            for j, entry in enumerate(found):
                entry.fired += int((acts[..., j] > 0).sum())
                for b in range(input_ids.shape[0]):
                    score = float(scores[b, j])
                    full = len(entry.examples) == self.cfg.examples
                    if score <= 0 or (full and score <= entry.examples[-1].score):
                        continue
                    example = self._example(batch, b, int(positions[b, j]), acts[b, :, j], runs[b])
                    image = int(runs[b, positions[b, j]])
                    if image >= 0 and "image_grid_thw" in batch.inputs:
                        if images is None:
                            images = unpatchify_qwen(
                                batch.inputs["pixel_values"],
                                batch.inputs["image_grid_thw"],
                                self.processor.image_processor,
                            )
                        example.image = images[image]
                        example.image_activations = acts[b, runs[b] == image, j]
                        example.grid = token_grid(batch.inputs["image_grid_thw"][image],
                                                  self.processor.image_processor)
                    entry.offer(example, self.cfg.examples)
        return found

    def _example(self, batch, b: int, position: int, acts: Tensor, runs: Tensor) -> Example:
        length = int(batch.inputs["attention_mask"][b].sum())  # padding is on the right
        start, stop = max(0, position - CONTEXT_BEFORE), min(length, position + CONTEXT_AFTER + 1)
        ids = batch.inputs["input_ids"][b]
        tokens: list[tuple[str, float]] = []
        i = start
        while i < stop:
            if runs[i] >= 0:  # one entry for an image's tokens, as strong as its strongest patch
                run = runs == runs[i]
                tokens.append(("[image]", float(acts[run].max())))
                i = int(run.nonzero().max()) + 1
                continue
            tokens.append((self.tokenizer.decode([int(ids[i])]), float(acts[i])))
            i += 1
        return Example(float(acts[position]), tokens)


def _token_html(text: str, activation: float, vmax: float) -> str:
    shown = html.escape(text.replace("\n", "↵\n") or "∅")
    if activation <= 0 or vmax <= 0:
        return f"<span>{shown}</span>"
    alpha = min(activation / vmax, 1.0)
    return f'<span style="background:rgba(255,90,0,{alpha:.3f})" title="{activation:.3f}">{shown}</span>'


def _example_html(example: Example, vmax: float) -> str:
    spans = [_token_html(text, activation, vmax) for text, activation in example.tokens]
    parts = [f'<div class="ctx">{"".join(spans)}</div>']
    if example.image is not None:
        png = heatmap_png(example.image, example.image_activations, example.grid, vmax)
        data = base64.b64encode(png).decode()
        parts.append(f'<img alt="image patches" src="data:image/png;base64,{data}">')
    return f'<li><span class="score">{example.score:.3f}</span>{"".join(parts)}</li>'


STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em; color: #222; }
section.latent { border-top: 1px solid #ccc; padding-top: .5em; margin-top: 1em; }
ol { padding-left: 1.5em; } li { margin: .4em 0; }
.ctx { display: inline; font: 13px/1.9 ui-monospace, monospace; white-space: pre-wrap; }
.ctx span { border-radius: 2px; padding: 1px 0; }
.score { display: inline-block; min-width: 5em; color: #666; font-size: 12px; }
img { display: block; margin: .3em 0 .3em 5em; image-rendering: pixelated; }
.meta { color: #555; }
"""


def page_html(cfg: InspectConfig, path: str, tokens: int, latents: list[LatentExamples]) -> str:
    sections = []
    for entry in latents:
        vmax = entry.examples[0].score if entry.examples else 0.0
        items = "".join(_example_html(e, vmax) for e in entry.examples) or "<li>never fired on this data</li>"
        frequency = entry.fired / max(tokens, 1)
        sections.append(
            f'<section class="latent" id="latent-{entry.latent}"><h2>Latent {entry.latent}</h2>'
            f'<p class="meta">fires on {frequency:.3%} of {tokens} tokens; max activation {vmax:.3f}</p>'
            f"<ol>{items}</ol></section>"
        )
    model = html.escape(cfg.model or "SmolLM2-135M-Instruct (built-in)")
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>megasae inspect: '
        f"{html.escape(path)}</title><style>{STYLE}</style></head><body>"
        f"<h1>Top-activating contexts: <code>{html.escape(path)}</code></h1>"
        f'<p class="meta">model <code>{model}</code>, adapter <code>{html.escape(str(cfg.adapter))}</code>, '
        f"data <code>{html.escape(cfg.data)}</code>. Each line is one sequence's strongest activation with "
        f"{CONTEXT_BEFORE} tokens before it; a token's shade is its activation over the latent's strongest "
        "(hover for the value); an image's patches are shaded the same way.</p>"
        + "".join(sections) + "</body></html>\n"
    )


def run_inspect(cfg: InspectConfig) -> Path:
    """Write the page (atomically; rank 0 under torchrun) and return its path."""
    if bool(cfg.latents.strip()) == (cfg.top > 0):
        raise ValueError("Pass exactly one of --latents (comma-separated ids) and --top N (N > 0).")
    if cfg.examples < 1:
        raise ValueError(f"--examples must be at least 1, got {cfg.examples}.")
    latents = parse_latents(cfg.latents)  # before the host loads: a typo should not cost a model load
    par = init_eval_ranks(cfg, "megasae inspect")
    collector = Collector(cfg, par)
    if cfg.top > 0:
        latents = collector.most_frequent(cfg.top)
    else:
        check_latents(latents, collector.num_latents, collector.path)
    found = collector.collect(latents)
    found, tokens = collector.host.from_owner(collector.path, (found, collector.tokens))
    if not par.is_main:
        return cfg.page_path()
    return write_atomic(cfg.page_path(), page_html(cfg, collector.path, tokens, found))
