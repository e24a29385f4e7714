"""Host-model knowledge: loading (Hugging Face directory or GGUF) and compiling."""

from megasae.models.compile import compile_blocks
from megasae.models.loading import default_model_path, load_host_model

__all__ = ["compile_blocks", "default_model_path", "load_host_model"]
