"""Host-model knowledge: loading (Hugging Face directory or GGUF)."""

from megasae.models.loading import default_model_path, load_host_model

__all__ = ["default_model_path", "load_host_model"]
