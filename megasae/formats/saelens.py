"""SAELens (sae-lens 6): a folder per SAE, `cfg.json` + `sae_weights.safetensors` (+ `sparsity.safetensors`).

Tensors W_enc [d_in, d_sae] (transposed from megasae's), b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
Its TopK SAE: pre = (x - b_dec * apply_b_dec_to_input) W_enc + b_enc, times the decoder row norms when
`rescale_acts_by_decoder_norm`; codes relu(topk_k(pre)) (divided by those norms again before decoding);
x_hat = codes W_dec + b_dec. SAELens has no TopK transcoder.

A BatchTopK SAE is SAELens's JumpReLU SAE (as SAELens itself saves its BatchTopK SAEs): architecture
"jumprelu", one more tensor `threshold` [d_sae], codes relu(pre) where pre > threshold. megasae writes its
single threshold for every latent (and `k`, which SAELens ignores), and reads JumpReLU SAEs of that kind.
SAELens's `normalize_activations` "layer_norm" is megasae's setting of that name, the same formula.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from megasae.formats.saes import SaeSet, SaeWeights, check_k, load_tensors, take
from megasae.peft.config import NORMALIZATIONS, TopKSaeConfig

CONFIG_FILE, WEIGHTS_FILE, SPARSITY_FILE = "cfg.json", "sae_weights.safetensors", "sparsity.safetensors"
# SAELens's own log10 of firing frequencies adds this, so that dead latents get -10 rather than -inf.
SPARSITY_EPS = 1e-10


def is_saelens(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def check(saes: SaeSet) -> None:
    """Refuse, in one sentence, an SAE that SAELens's TopK SAE cannot express."""
    for path in saes.saes:
        if saes.config.transcode:
            raise ValueError(
                f"The SAE on {path!r} is a transcoder and SAELens has no TopK transcoder; "
                "export it to sparsify instead."
            )
        if not saes.config.relu_codes:
            raise ValueError(
                f"The SAE on {path!r} keeps its raw top-k values without ReLU, which SAELens's TopK SAE "
                "(ReLU after top-k) cannot express."
            )
        threshold = saes.saes[path].threshold
        if threshold is not None and threshold <= 0:
            raise ValueError(
                f"The BatchTopK SAE on {path!r} has no inference threshold yet (it was never trained), so it "
                "has no SAELens JumpReLU form."
            )


def _metadata(config: TopKSaeConfig, hook_name: str) -> dict:
    """SAELens's metadata block from what the adapter recorded of its training (None where it did not)."""
    policy = config.token_policy or {}
    seqpos = [1, None] if policy.get("mask_position_0") else [None] if policy else None
    return {
        "model_name": config.base_model_name_or_path,
        "hook_name": hook_name,
        "context_size": config.ctx_len,
        "dataset_path": config.dataset,
        "seqpos_slice": seqpos,
        "exclude_special_tokens": policy.get("exclude_special_tokens"),
        "prepend_bos": False,  # megasae tokenizes without added special tokens
    }


def write(saes: SaeSet, directory: Path, frequencies: dict, base_model_prefix: str) -> None:
    """One SAELens folder per SAE, named by its module path, under `directory`."""
    for path, sae in saes.saes.items():
        folder = directory / path
        folder.mkdir()
        dtype = str(sae.W_enc.dtype).removeprefix("torch.")
        cfg = {
            "architecture": "topk" if sae.threshold is None else "jumprelu",
            "d_in": sae.d_in, "d_sae": sae.num_latents, "k": saes.config.k,
            "dtype": dtype, "device": "cpu", "apply_b_dec_to_input": True,
            "normalize_activations": saes.config.normalize_activations,
            "reshape_activations": "none", "rescale_acts_by_decoder_norm": False,
            "metadata": _metadata(saes.config, path),
        }
        (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        tensors = {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
        if sae.threshold is not None:
            tensors["threshold"] = sae.threshold.to(sae.b_enc.dtype).expand(sae.num_latents)
        save_file({name: t.contiguous() for name, t in tensors.items()}, folder / WEIGHTS_FILE)
        if path in frequencies:
            sparsity = torch.tensor(frequencies[path], dtype=torch.float32).add(SPARSITY_EPS).log10()
            save_file({"sparsity": sparsity}, folder / SPARSITY_FILE)


def _token_policy(metadata: dict) -> dict | None:
    if "seqpos_slice" not in metadata:
        return None
    start = (metadata["seqpos_slice"] or [None])[0]
    return {"mask_position_0": bool(start and start >= 1),
            "exclude_special_tokens": bool(metadata.get("exclude_special_tokens")),
            "outlier_factor": None, "tokens": "all"}


def read(path: Path) -> SaeSet:
    """A SAELens TopK SAE folder, or a JumpReLU one with one threshold (a BatchTopK SAE's), as a megasae SAE:
    the same codes and reconstruction."""
    config_file, file = path / CONFIG_FILE, path / WEIGHTS_FILE
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}).") from None
    metadata = cfg.get("metadata") or {}
    architecture = cfg.get("architecture", "topk")
    if architecture not in ("topk", "jumprelu"):
        raise ValueError(f"{config_file} has architecture {architecture!r}; megasae reads SAELens SAEs with "
                         "architecture 'topk' or 'jumprelu' (with one threshold for all latents).")
    normalization = cfg.get("normalize_activations", "none")
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"{config_file} has normalize_activations {normalization!r}; megasae reads SAELens "
                         f"SAEs with normalize_activations {' or '.join(map(repr, NORMALIZATIONS))}.")
    if cfg.get("reshape_activations", "none") != "none":
        raise ValueError(f"{config_file} has reshape_activations {cfg['reshape_activations']!r}; megasae "
                         "reads SAELens SAEs with reshape_activations 'none'.")
    hook_name = metadata.get("hook_name") or cfg.get("hook_name")
    if not hook_name:
        raise ValueError(f"{config_file} names no hook_name: megasae cannot tell which module the SAE reads.")
    tensors = load_tensors(file)
    names = {"W_enc", "b_enc", "W_dec", "b_dec"} | ({"threshold"} if architecture == "jumprelu" else set())
    unknown = sorted(set(tensors) - names)
    if unknown:
        raise ValueError(f"{file} has tensors {unknown} that a SAELens {architecture} SAE does not have.")
    W_enc = take(tensors, file, "W_enc", (cfg.get("d_in"), cfg.get("d_sae"))).float()
    d_in, d_sae = W_enc.shape
    b_enc = take(tensors, file, "b_enc", (d_sae,)).float()
    W_dec = take(tensors, file, "W_dec", (d_sae, d_in)).float()
    b_dec = take(tensors, file, "b_dec", (d_in,)).float()
    check_k(cfg.get("k"), d_sae, str(config_file))
    threshold = _one_threshold(take(tensors, file, "threshold", (d_sae,)), file) \
        if architecture == "jumprelu" else None
    if not cfg.get("apply_b_dec_to_input", True):  # megasae always subtracts b_dec: add it back in b_enc
        b_enc = b_enc + b_dec @ W_enc
    W_enc = W_enc.T
    # Fold the decoder row norms into encoder and decoder (a TopK option: SAELens's JumpReLU SAE has none).
    if architecture == "topk" and cfg.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=-1)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    config = TopKSaeConfig(
        k=cfg["k"], num_latents=d_sae, target_modules=[hook_name], base_model_name_or_path=metadata.get(
            "model_name"), architecture="topk" if threshold is None else "batchtopk",
        normalize_activations=normalization, token_policy=_token_policy(metadata),
        ctx_len=metadata.get("context_size"), dataset=metadata.get("dataset_path"),
    )
    weights = SaeWeights(W_enc.contiguous(), b_enc, W_dec, b_dec, threshold)
    return SaeSet(config, {hook_name: weights}, path, "saelens")


def _one_threshold(threshold: Tensor, file: Path) -> Tensor:
    """The one threshold of all latents (0-dim float32), or one sentence saying megasae has none such."""
    if not (threshold == threshold[0]).all() or threshold[0] <= 0:
        raise ValueError(f"{file} has per-latent or non-positive JumpReLU thresholds; megasae reads JumpReLU "
                         "SAEs with one positive threshold for all latents, as a BatchTopK SAE exports.")
    return threshold[0].float()
