"""`megasae eval`: every target's reconstruction, sparsity and host behaviour on held-out data."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megasae.data.masks import image_token_ids
from megasae.eval.batches import held_out_batches
from megasae.eval.config import EvalConfig
from megasae.eval.files import write_atomic
from megasae.eval.metrics import NextTokenStats, ReconstructionStats, next_token_log_probs, token_groups
from megasae.eval.plots import density_png, l0_png
from megasae.eval.report import report_markdown
from megasae.eval.splice import adapter_settings, host_logits, load_sae_model
from megasae.parallel import ParallelState, init_distributed


def init_eval_ranks(cfg: EvalConfig) -> ParallelState:
    """One process, or under torchrun one tensor-parallel group: every rank reads the same batches."""
    par = init_distributed(cfg.device, tp=cfg.tp)
    if par.world_size != par.tp_size:
        raise ValueError(
            f"megasae eval splits the host over --tp ranks only: run it on --tp ({cfg.tp}) ranks, not {par.world_size}."
        )
    return par


@torch.no_grad()
def evaluate(cfg: EvalConfig, par: ParallelState | None = None) -> dict:
    """The numbers of eval.json: per target and token group, reconstruction and sparsity on the clean host's
    activations, and the next-token loss at the positions the SAE replaces, with that target alone spliced."""
    par = par or init_eval_ranks(cfg)
    model, processor, layers = load_sae_model(cfg, par)
    device = par.device
    image_ids = torch.tensor(image_token_ids(processor), dtype=torch.long)
    multimodal = image_ids.numel() > 0
    groups = ("all", "text", "image") if multimodal else ("all",)
    settings = {path: adapter_settings(layer) for path, layer in layers.items()}
    reconstruction = {path: {g: ReconstructionStats(*settings[path]) for g in groups} for path in layers}
    next_token = {path: {g: NextTokenStats() for g in groups} for path in layers}
    tokens = sequences = 0
    for batch in held_out_batches(cfg.data, processor, max_tokens=cfg.max_tokens, ctx_len=cfg.ctx_len,
                                  batch_size=cfg.batch_size, seed=cfg.seed, text_column=cfg.text_column,
                                  messages_column=cfg.messages_column, images_column=cfg.images_column,
                                  tokens=cfg.tokens):
        inputs = {k: v.to(device) for k, v in batch.inputs.items()}
        mask = batch.token_mask.to(device)
        input_ids = inputs["input_ids"]
        where = token_groups(input_ids, image_ids, multimodal)
        # The prediction made at position t is scored against token t + 1, when that is a real token.
        labels = input_ids.roll(-1, dims=1)
        has_next = torch.zeros_like(mask)
        has_next[:, :-1] = inputs["attention_mask"][:, 1:].bool()
        clean_logits, outputs = host_logits(model, inputs, mask, cfg.outlier_factor)
        for path, out in outputs.items():
            kept = out.kept if out.kept is not None else torch.ones_like(mask).view(-1)
            for group, stats in reconstruction[path].items():
                rows = where[group][kept]
                stats.add(out.target[rows], out.x_hat[rows], out.values[rows], out.indices[rows])
            scored = kept.view_as(mask) & has_next
            log_probs = {"clean": next_token_log_probs(clean_logits, scored)}
            for name, replacement in (("spliced", "sae"), ("ablated", "zero")):
                logits, _ = host_logits(model, inputs, mask, cfg.outlier_factor, {path: replacement})
                log_probs[name] = next_token_log_probs(logits, scored)
            scored_labels, scored_groups = labels[scored], {g: w.view_as(mask)[scored] for g, w in where.items()}
            for group, stats in next_token[path].items():
                rows = scored_groups[group]
                stats.add(scored_labels[rows], *(log_probs[n][rows] for n in ("clean", "spliced", "ablated")))
        tokens += batch.num_tokens
        sequences += input_ids.shape[0]
    targets = {}
    for path, (num_latents, k) in settings.items():
        targets[path] = {"num_latents": num_latents, "k": k, "groups": {
            g: {**reconstruction[path][g].summary(), **next_token[path][g].summary()} for g in groups
        }}
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


def run_eval(cfg: EvalConfig) -> Path:
    """Evaluate and write eval.json, report.md, density.png and l0.png into cfg.output_dir (rank 0 writes)."""
    par = init_eval_ranks(cfg)
    result = evaluate(cfg, par)
    out = cfg.output_dir
    if not par.is_main:
        return out
    write_atomic(out / "eval.json", json.dumps(result, indent=1))
    write_atomic(out / "density.png", density_png(result))
    write_atomic(out / "l0.png", l0_png(result))
    write_atomic(out / "report.md", report_markdown(result))
    return out
