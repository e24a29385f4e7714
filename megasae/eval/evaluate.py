"""`megasae eval`: every target's reconstruction, sparsity and host behaviour on held-out data."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from megasae import sae
from megasae.data import DataColumns
from megasae.data.masks import image_token_ids
from megasae.eval.batches import held_out_batches
from megasae.eval.config import EvalConfig, HeldOutData
from megasae.eval.metrics import NextTokenStats, ReconstructionStats, next_token_log_probs, token_groups
from megasae.eval.plots import density_png, l0_png
from megasae.eval.report import report_markdown
from megasae.eval.splice import EvalHost, adapter_settings
from megasae.files import write_atomic
from megasae.parallel import ParallelState, init_distributed
from megasae.parallel.distributed import merge_over_stages


def init_eval_ranks(cfg: HeldOutData, command: str) -> ParallelState:
    """One process, or under torchrun tp x pp ranks: the host's layers split over pp stages and each stage's
    over tp ranks, with no data parallelism (every rank reads the same batches). Checked before joining;
    `command` names the one refused."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != cfg.tp * cfg.pp and min(cfg.tp, cfg.pp) >= 1:  # sizes below 1: init_distributed says so
        raise ValueError(
            f"{command} splits the host over --tp x --pp ranks, without data parallelism: run it on "
            f"{cfg.tp} x {cfg.pp} = {cfg.tp * cfg.pp} ranks (torchrun --nproc-per-node {cfg.tp * cfg.pp}), "
            f"not {world_size}."
        )
    return init_distributed(cfg.device, tp=cfg.tp, pp=cfg.pp)


@torch.no_grad()
def evaluate(cfg: EvalConfig, par: ParallelState | None = None) -> dict:
    """The numbers of eval.json: per target and token group, reconstruction and sparsity on the clean host's
    activations, and the next-token loss at the positions the SAE replaces, with that target alone spliced.
    Under --pp each stage measures the SAEs on its layers and the last stage the next-token loss; every rank
    returns the merged numbers."""
    par = par or init_eval_ranks(cfg, "megasae eval")
    host = EvalHost(cfg, par)
    cfg = cfg.following(host.saes.config)
    device = par.device
    image_ids = torch.tensor(image_token_ids(host.processor), dtype=torch.long)
    multimodal = image_ids.numel() > 0
    groups = ("all", "text", "image") if multimodal else ("all",)
    settings = {path: adapter_settings(layer) for path, layer in host.layers.items()}
    reconstruction = {path: {g: ReconstructionStats(*settings[path]) for g in groups} for path in host.layers}
    # Only the last stage computes the logits, so it alone scores predictions, for every target.
    scores = par.is_last_stage
    next_token = {path: {g: NextTokenStats() for g in groups} for path in host.targets} if scores else {}
    tokens = sequences = 0
    for batch in held_out_batches(cfg.data, host.processor, max_tokens=cfg.max_tokens, ctx_len=cfg.ctx_len,
                                  batch_size=cfg.batch_size, seed=cfg.seed, columns=DataColumns.of(cfg)):
        inputs = {k: v.to(device) for k, v in batch.inputs.items()}
        mask = batch.token_mask.to(device)
        input_ids = inputs["input_ids"]
        where = token_groups(input_ids, image_ids, multimodal)
        # The prediction made at position t is scored against token t + 1, when that is a real token.
        labels = input_ids.roll(-1, dims=1)
        has_next = torch.zeros_like(mask)
        has_next[:, :-1] = inputs["attention_mask"][:, 1:].bool()
        clean_logits, outputs = host.logits(inputs, mask, cfg.outlier_factor)
        for path in host.targets:  # on every rank, in the same order: a pipeline runs each forward together
            kept = host.rows_read(path, outputs, mask.numel())
            if path in outputs:
                _add_reconstruction(reconstruction[path], outputs[path], where, kept)
            logits = {"clean": clean_logits}
            for name, replacement in (("spliced", "sae"), ("ablated", "zero")):
                logits[name], _ = host.logits(inputs, mask, cfg.outlier_factor, {path: replacement})
            if scores:
                _add_predictions(next_token[path], labels, where, kept.view_as(mask) & has_next, logits)
        tokens += batch.num_tokens
        sequences += input_ids.shape[0]
    targets = _merged_targets(host, settings, reconstruction, next_token)
    return {
        "model": cfg.model or "SmolLM2-135M-Instruct (built-in)",
        "adapter": str(cfg.adapter),
        "data": cfg.data,
        "tokens": tokens,
        "sequences": sequences,
        "settings": {"max_tokens": cfg.max_tokens, "batch_size": cfg.batch_size, "ctx_len": cfg.ctx_len,
                     "seed": cfg.seed, "tokens": cfg.tokens, "outlier_factor": cfg.outlier_factor,
                     "dtype": cfg.dtype},
        "targets": targets,
    }


def _add_reconstruction(stats: dict[str, ReconstructionStats], out: sae.SaeOutput, where: dict[str, Tensor],
                        kept: Tensor) -> None:
    """One batch of an SAE's output (`out`, on the `kept` positions) into its stats per token group."""
    for group, group_stats in stats.items():
        rows = where[group][kept]
        group_stats.add(out.target[rows], out.x_hat[rows], out.values[rows], out.indices[rows],
                        {m: prefix_rows[rows] for m, prefix_rows in out.prefix_x_hat.items()})


def _add_predictions(stats: dict[str, NextTokenStats], labels: Tensor, where: dict[str, Tensor],
                     scored: Tensor, logits: dict[str, Tensor]) -> None:
    """One batch's predictions at the `scored` positions ([batch, seq] bool), clean, spliced and ablated,
    into a target's stats per token group."""
    log_probs = [next_token_log_probs(logits[name], scored) for name in ("clean", "spliced", "ablated")]
    scored_labels = labels[scored]
    for group, group_stats in stats.items():
        rows = where[group].view_as(scored)[scored]
        group_stats.add(scored_labels[rows], *(p[rows] for p in log_probs))


def _merged_targets(host: EvalHost, settings: dict, reconstruction: dict, next_token: dict) -> dict:
    """eval.json's "targets": each SAE's numbers from the rank holding it, joined by the next-token numbers
    from the rank computing the logits (the same rank without a pipeline)."""
    targets = merge_over_stages({path: {"num_latents": num_latents, "k": k, "groups": {
        group: stats.summary() for group, stats in reconstruction[path].items()
    }} for path, (num_latents, k) in settings.items()}, host.par)
    predictions = merge_over_stages({path: {group: stats.summary() for group, stats in by_group.items()}
                                     for path, by_group in next_token.items()}, host.par)
    for path, target in targets.items():
        for group, summary in target["groups"].items():
            summary.update(predictions[path][group])
    return targets


def run_eval(cfg: EvalConfig) -> Path:
    """Evaluate and write eval.json, report.md, density.png and l0.png into cfg.output_dir (rank 0 writes)."""
    par = init_eval_ranks(cfg, "megasae eval")
    result = evaluate(cfg, par)
    out = cfg.output_dir
    if not par.is_main:
        return out
    write_atomic(out / "eval.json", json.dumps(result, indent=1))
    write_atomic(out / "density.png", density_png(result))
    write_atomic(out / "l0.png", l0_png(result))
    write_atomic(out / "report.md", report_markdown(result))
    return out
