"""A built-in text corpus found on every machine: the Python standard library's own sources.

Enough for demos and smoke tests without a network (about 700 files, 14 MB, on CPython 3.11);
the order is fixed for a given Python installation and seed.
"""

from __future__ import annotations

import os
import random
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch

# Third-party code and the test suites (large, repetitive) are not the standard library proper.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
# Larger files are generated tables or data (pydoc's topics), not code.
_MAX_BYTES = 256 * 1024


def builtin_paths() -> list[Path]:
    """The standard library's .py files that the corpus reads, sorted."""
    paths = []
    for root, dirs, files in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]  # prune: never walk into site-packages or tests
        for name in files:
            path = Path(root, name)
            if name.endswith(".py") and path.is_file() and path.stat().st_size <= _MAX_BYTES:
                paths.append(path)
    return sorted(paths)


def builtin_documents(seed: int = 0) -> Iterator[str]:
    """Yield the standard library's Python sources, one document per file, in a seeded shuffled order."""
    paths = builtin_paths()
    random.Random(seed).shuffle(paths)
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):  # unreadable or not text: not part of the corpus
            continue
        if text.strip():
            yield text


def pack_tokens(documents: Iterable[str], tokenizer, ctx_len: int, eos_id: int) -> Iterator[torch.LongTensor]:
    """Tokenize documents, join them with ``eos_id`` between documents, and yield full ``ctx_len`` chunks.

    Streaming: holds at most one document plus one chunk of tokens; a partial last chunk is dropped.
    """
    if ctx_len < 1:
        raise ValueError(f"ctx_len must be a positive number of tokens, got {ctx_len}.")
    buffer: list[int] = []
    for i, doc in enumerate(documents):
        if i > 0:
            buffer.append(eos_id)
        buffer.extend(tokenizer.encode(doc, add_special_tokens=False))
        full = len(buffer) // ctx_len * ctx_len
        for start in range(0, full, ctx_len):
            yield torch.tensor(buffer[start : start + ctx_len], dtype=torch.long)
        del buffer[:full]


def token_batches(tokenizer, ctx_len: int, batch_size: int, seed: int = 0) -> Iterator[torch.LongTensor]:
    """Yield [batch_size, ctx_len] token batches packed from the built-in corpus, until it runs out."""
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no eos_token_id to separate documents; set tokenizer.eos_token.")
    batch = []
    for chunk in pack_tokens(builtin_documents(seed), tokenizer, ctx_len, tokenizer.eos_token_id):
        batch.append(chunk)
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
