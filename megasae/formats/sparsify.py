"""EleutherAI sparsify (eai-sparsify 1.3): one folder per hookpoint, `cfg.json` + `sae.safetensors`; a run
directory holds several. Hookpoints are module paths relative to the host's base model (`layers.15` for
`model.layers.15` of a Llama).

Tensors encoder.weight [M, d_in], encoder.bias [M], W_dec [M, d_in], b_dec [d_in]: a transcoder writes the
width it reads. Its codes are topk_k(relu(pre)) where megasae's are relu(topk_k(pre)); the nonzero codes are
the same: ReLU keeps the order of positive values, so both keep the positive ones among the k largest.
Only the indices of zero codes (fewer than k positive values) may differ, and they decode to nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from megasae.formats.saes import SaeSet, SaeWeights, check_k, load_tensors, shared_num_latents, take
from megasae.peft.config import TopKSaeConfig

CONFIG_FILE, WEIGHTS_FILE = "cfg.json", "sae.safetensors"


def is_hookpoint(path: Path) -> bool:
    return (path / CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()


def hookpoint(module_path: str, base_model_prefix: str) -> str:
    """sparsify's name of a module: its path relative to the base model."""
    return module_path.removeprefix(f"{base_model_prefix}.") if base_model_prefix else module_path


def check(saes: SaeSet) -> None:
    """Refuse, in one sentence, an SAE that sparsify's SparseCoder cannot express."""
    for path, sae in saes.saes.items():
        if not saes.config.relu_codes:
            raise ValueError(
                f"The SAE on {path!r} keeps its raw top-k values without ReLU, which sparsify's SparseCoder "
                "(ReLU before top-k) cannot express."
            )
        if sae.threshold is not None:
            raise ValueError(
                f"The SAE on {path!r} is a BatchTopK SAE, whose inference threshold sparsify's TopK "
                "SparseCoder cannot express; export it to SAELens (a JumpReLU SAE) instead."
            )
        if saes.config.normalize_activations != "none":
            raise ValueError(
                f"The SAE on {path!r} reads each token standardised ({saes.config.normalize_activations}), "
                "which sparsify's SparseCoder cannot express; export it to SAELens instead."
            )
        if sae.d_in != sae.d_out:
            raise ValueError(
                f"The transcoder on {path!r} reads width {sae.d_in} and writes width {sae.d_out}; sparsify's "
                "transcoders write the width they read."
            )


def write(saes: SaeSet, directory: Path, frequencies: dict, base_model_prefix: str) -> None:
    """A sparsify run directory: one hookpoint folder per SAE under `directory` (no sparsity: sparsify
    stores none)."""
    config = saes.config
    for path, sae in saes.saes.items():
        folder = directory / hookpoint(path, base_model_prefix)
        folder.mkdir()
        cfg = {
            "activation": "topk", "expansion_factor": config.expansion_factor, "normalize_decoder": True,
            "num_latents": sae.num_latents, "k": config.k, "multi_topk": False, "skip_connection": False,
            "transcode": config.transcode, "d_in": sae.d_in,
        }
        (folder / CONFIG_FILE).write_text(json.dumps(cfg, indent=2))
        tensors = {"encoder.weight": sae.W_enc, "encoder.bias": sae.b_enc, "W_dec": sae.W_dec,
                   "b_dec": sae.b_dec}
        save_file({name: t.contiguous() for name, t in tensors.items()}, folder / WEIGHTS_FILE)


def _read_hookpoint(folder: Path) -> tuple[dict, SaeWeights]:
    config_file, file = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    try:
        cfg = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file} is not valid JSON ({e}).") from None
    if cfg.get("activation", "topk") != "topk":
        raise ValueError(f"{config_file} has activation {cfg['activation']!r}; megasae reads 'topk' SAEs.")
    if cfg.get("skip_connection"):
        raise ValueError(f"{config_file} has a skip connection (W_skip), which a megasae SAE does not have.")
    tensors = load_tensors(file)
    unknown = sorted(set(tensors) - {"encoder.weight", "encoder.bias", "W_dec", "b_dec"})
    if unknown:
        raise ValueError(f"{file} has tensors {unknown} that a sparsify TopK SAE without W_skip lacks.")
    W_enc = take(tensors, file, "encoder.weight", (None, cfg.get("d_in"))).float()
    num_latents, d_in = W_enc.shape
    weights = SaeWeights(W_enc, take(tensors, file, "encoder.bias", (num_latents,)).float(),
                         take(tensors, file, "W_dec", (num_latents, d_in)).float(),
                         take(tensors, file, "b_dec", (d_in,)).float())
    check_k(cfg.get("k"), num_latents, str(config_file))
    return cfg, weights


def read(path: Path, base_model_prefix: str) -> SaeSet:
    """A sparsify hookpoint folder, or a run directory of them, as megasae SAEs."""
    folders = [path] if is_hookpoint(path) else sorted(sub for sub in path.iterdir() if is_hookpoint(sub))
    cfgs, saes = {}, {}
    for folder in folders:
        module = f"{base_model_prefix}.{folder.name}" if base_model_prefix else folder.name
        cfgs[module], saes[module] = _read_hookpoint(folder)
    settings = {module: (cfg["k"], bool(cfg.get("transcode"))) for module, cfg in cfgs.items()}
    if len(set(settings.values())) > 1:
        raise ValueError(
            f"{path} holds hookpoints with different (k, transcode) settings {settings}; a megasae adapter "
            "has one: read the hookpoint folders one at a time."
        )
    k, transcode = next(iter(settings.values()))
    config = TopKSaeConfig(k=k, num_latents=shared_num_latents(saes, path), target_modules=list(saes),
                           transcode=transcode)
    return SaeSet(config, saes, path, "sparsify")
