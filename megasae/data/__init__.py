"""Training data: the built-in corpus, Parquet text and chat rows, packing, token masks, the batch stream."""

from megasae.data.batches import Batch, BatchStream, build_batches, open_source
from megasae.data.builtin import builtin_documents, builtin_paths, pack_tokens, token_batches
from megasae.data.columns import DataColumns
from megasae.data.llava import prepare_llava

__all__ = [
    "Batch",
    "BatchStream",
    "DataColumns",
    "build_batches",
    "open_source",
    "builtin_documents",
    "builtin_paths",
    "pack_tokens",
    "prepare_llava",
    "token_batches",
]
