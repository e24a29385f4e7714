"""The batch stream `megasae train` consumes: endless, exactly resumable, split over data-parallel ranks.

The ranks read one sequence stream: each global micro-batch is the next world_size x batch_size sequences,
of which rank r takes the r-th batch_size. So the data order, and every optimizer step's tokens, do not
depend on the number of ranks (nor on the micro-batch size; packed text is shuffled in windows of
sequences), and a run may resume on another number of them. Each rank tokenizes every document to find
the sequence boundaries, which costs little next to the host's forward; chat rows' images are processed
only by the rank that takes them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megasae.data.chat import ChatEncoder, collate
from megasae.data.columns import DataColumns
from megasae.data.masks import TOKEN_CHOICES, TokenMasker, image_token_ids, tokenizer_of
from megasae.data.parquet import TOKENS_COLUMN, data_files, detect_schema, row_groups
from megasae.data.sources import BuiltinDocuments, ParquetRows, check_order_of


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]  # keyword arguments of the host forward
    token_mask: torch.Tensor  # bool [batch, seq]: the positions the SAEs train on
    num_tokens: int  # real (non-padding) tokens


class BatchStream:
    """An endless iterator of this rank's batches whose ``state_dict`` is the exact point to continue from.

    The state is the source position after the last row consumed (plus, for packed text, the tokens
    read but not yet batched), so nothing is replayed on resume; it is the same on every rank.
    """

    def __init__(self, source, name: str, masker: TokenMasker, batch_size: int, identity: dict,
                 rank: int = 0, world_size: int = 1):
        self._source, self.name, self._masker, self.batch_size = source, name, masker, batch_size
        self._identity = identity  # what a loaded state must have been saved with
        self._rank, self._world_size = rank, world_size
        self._position = source.start
        self._rows = None

    @property
    def _mine(self) -> slice:
        """This rank's sequences among a global micro-batch's world_size x batch_size."""
        return slice(self._rank * self.batch_size, (self._rank + 1) * self.batch_size)

    def __iter__(self):
        return self

    def _pull(self):
        """The next row or document and where it came from; the position moves past it."""
        if self._rows is None:
            self._rows = self._source.iterate(self._position)
        item, where, self._position = next(self._rows)
        return item, where

    def _check_progress(self, idle: int, unit: str) -> None:
        # Without this a stream whose rows never fill a sequence would loop forever.
        if idle >= self._source.rows_per_epoch:
            raise ValueError(f"{self.name} yields less than one {unit} per epoch.")

    def state_dict(self) -> dict:
        return {**self._identity, "position": list(self._position)}

    def load_state_dict(self, state: dict) -> None:
        check_order_of(state)
        for key, value in self._identity.items():
            if state.get(key) != value:
                raise ValueError(
                    f"The data state was saved with {key}={state.get(key)!r}, but this stream has "
                    f"{key}={value!r}; resume with the same data arguments."
                )
        self._position = tuple(state["position"])
        self._rows = None


class PackedTextStream(BatchStream):
    """Documents packed into full ctx_len sequences, an EOS after each document (the stream pack_tokens
    builds); no padding. A document is text to tokenize or, from a token-id column, its ids as they are:
    so token rows that hold the text path's own tokens give the very same batches.

    With ``shuffle_sequences`` > 1 the sequences are read ahead in windows of that many and drawn from each
    in a permutation seeded by (seed, window index), so one batch's sequences come from all over the window
    rather than from one long document. A state then names the window being drawn from (where its reading
    started, and how many were drawn), which a resumed stream reads again: still nothing is replayed.
    """

    def __init__(
        self,
        source,
        name,
        masker,
        batch_size,
        identity,
        tokenizer,
        ctx_len: int,
        column: str | None,
        *,
        shuffle_sequences: int,
        pretokenized: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ):
        identity = {**identity, "shuffle_sequences": shuffle_sequences}
        super().__init__(source, name, masker, batch_size, identity, rank, world_size)
        self._column = column  # a row's text or token-id column; None when the items are the texts
        if tokenizer.eos_token_id is None:
            raise ValueError(
                f"{type(tokenizer).__name__} has no eos_token_id to separate documents; set its eos_token."
            )
        self._tokenizer, self._eos_id, self._ctx_len = tokenizer, tokenizer.eos_token_id, ctx_len
        self._pretokenized, self._vocab_size = pretokenized, len(tokenizer)
        self._carry: list[int] = []  # tokens read but not yet batched
        self._shuffle = shuffle_sequences
        # Shuffled: the window of sequences read ahead, in the order they are drawn; how many of
        # them have been drawn; and the window's index and the point its reading started from (its state).
        self._window: torch.Tensor | None = None
        self._drawn = 0
        self._window_start: dict | None = None

    def _ids(self, item, where: str) -> list[int]:
        doc = item if self._column is None else item[self._column]
        if not self._pretokenized:
            return self._tokenizer.encode(doc, add_special_tokens=False) if doc else []
        ids = doc or []
        if ids and not 0 <= min(ids) <= max(ids) < self._vocab_size:
            bad = next(i for i in ids if not 0 <= i < self._vocab_size)
            raise ValueError(
                f"{where} holds token id {bad}, outside the tokenizer's vocabulary (ids 0 to "
                f"{self._vocab_size - 1}): were these ids made with another tokenizer?"
            )
        return ids

    def _read(self, count: int) -> torch.Tensor:
        """The next ``count`` sequences of the packed stream, [count, ctx_len]."""
        need, idle = count * self._ctx_len, 0
        while len(self._carry) < need:
            ids = self._ids(*self._pull())
            full = len(self._carry) // self._ctx_len
            if ids:
                self._carry += ids + [self._eos_id]
            idle = 0 if len(self._carry) // self._ctx_len > full else idle + 1
            self._check_progress(idle, f"{self._ctx_len}-token sequence")
        sequences = torch.tensor(self._carry[:need], dtype=torch.long).view(count, self._ctx_len)
        del self._carry[:need]
        return sequences

    def _read_window(self, index: int) -> None:
        """Read window ``index``: the next shuffle_sequences sequences, permuted as (seed, index) seeds."""
        self._window_start = {"index": index, "position": list(self._position), "carry": list(self._carry)}
        window = self._read(self._shuffle)
        order = np.random.default_rng([self._identity["seed"], index]).permutation(self._shuffle)
        self._window, self._drawn = window[torch.from_numpy(order)], 0

    def _draw(self, count: int) -> torch.Tensor:
        """The next ``count`` sequences in the shuffled order, which runs through window after window."""
        parts = []
        while count > 0:
            if self._window is None or self._drawn == len(self._window):
                self._read_window(0 if self._window_start is None else self._window_start["index"] + 1)
            take = min(count, len(self._window) - self._drawn)
            parts.append(self._window[self._drawn : self._drawn + take])
            self._drawn, count = self._drawn + take, count - take
        return torch.cat(parts)

    def __next__(self) -> Batch:
        count = self._world_size * self.batch_size
        sequences = self._read(count) if self._shuffle == 1 else self._draw(count)
        input_ids = sequences[self._mine]
        attention_mask = torch.ones_like(input_ids)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        return Batch(inputs, self._masker(input_ids, attention_mask), input_ids.numel())

    def state_dict(self) -> dict:
        state = {**super().state_dict(), "carry": list(self._carry)}
        if self._window_start is not None:  # a shuffled stream continues inside the window it is reading
            state["window"] = {**self._window_start, "drawn": self._drawn}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict({"shuffle_sequences": 1, **state})  # states saved before shuffling existed
        self._carry = list(state["carry"])
        self._window = self._window_start = None
        if "window" in state:  # read the window again from where it started, then skip what was drawn
            window = state["window"]
            self._position, self._carry = tuple(window["position"]), list(window["carry"])
            self._read_window(window["index"])
            self._drawn = window["drawn"]


class ChatStream(BatchStream):
    """One chat row per sequence, truncated to ctx_len and padded on the right to the longest in the batch."""

    def __init__(self, source, name, masker, batch_size, identity, encoder: ChatEncoder, pad_id: int,
                 rank: int = 0, world_size: int = 1):
        super().__init__(source, name, masker, batch_size, identity, rank, world_size)
        self._encoder, self._pad_id = encoder, pad_id

    def __next__(self) -> Batch:
        rows, taken, idle, mine = [], 0, 0, self._mine
        while taken < self._world_size * self.batch_size:  # every rank reads the whole global micro-batch
            text, images, where = self._encoder.render(*self._pull())
            if mine.start <= taken < mine.stop:  # this rank's rows: their images are processed
                encoded = self._encoder.encode(text, images, where)
                empty = encoded is None
                if not empty:
                    rows.append(encoded)
            else:  # every rank skips the same rows, those without tokens
                empty = not self._encoder.has_tokens(text)
            if empty:
                idle += 1
                self._check_progress(idle, "non-empty chat")
                continue
            taken += 1
        inputs = collate(rows, self._encoder.image_keys, self._pad_id)
        mask = self._masker(inputs["input_ids"], inputs["attention_mask"])
        return Batch(inputs, mask, int(inputs["attention_mask"].sum()))


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0  # any id will do: attention_mask hides padding


def open_source(
    data: str | Path,
    *,
    seed: int,
    columns: DataColumns = DataColumns(),
):
    """The row source of ``data``, its name for messages and its kind ("builtin", "text", "tokens" or
    "chat"). Reads only Parquet footers, so every error about files, columns, emptiness and
    ``columns.tokens`` comes out here at once, without a tokenizer."""
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}.")
    tokens = columns.tokens
    if tokens not in TOKEN_CHOICES:
        raise ValueError(f"tokens must be one of {', '.join(TOKEN_CHOICES)}, got {tokens!r}.")
    if str(data) == "builtin":
        return BuiltinDocuments(seed), "The built-in corpus", "builtin"
    files = data_files(data)
    schema = detect_schema(files, columns.text_column, columns.messages_column, columns.images_column)
    source = ParquetRows(row_groups(files), schema, seed, str(data))
    if tokens == "image" and schema.kind != "chat":
        raise ValueError(f"tokens='image' needs chat data with images, but {data} is plain text.")
    return source, str(data), schema.kind


def build_batches(
    data: str | Path,
    processor,
    *,
    ctx_len: int,
    batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    columns: DataColumns = DataColumns(),
    shuffle_sequences: int = 1,
) -> BatchStream:
    """The endless batch stream of data-parallel rank ``rank`` of ``world_size``.

    ``data`` is "builtin" (the standard library's sources), a Parquet file, or a directory of them
    (its ``*.parquet`` files, sorted by name). Files with ``columns.messages_column`` hold chat rows (with
    ``columns.images_column`` optional); others need ``columns.text_column``. ``processor`` is the host's
    tokenizer, or its processor for image-text models. ``columns.tokens`` picks the trained positions.
    ``shuffle_sequences`` is the window of packed sequences drawn in a shuffled order (1: the stream's
    own order); chat rows, one per sequence, come in the source's shuffled row order anyway.
    Bad files and columns are reported here, before any batch.
    """
    for label, value in (("ctx_len", ctx_len), ("batch_size", batch_size), ("world_size", world_size),
                         ("shuffle_sequences", shuffle_sequences)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be an integer >= 1, got {value!r}.")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}.")
    source, name, kind = open_source(data, seed=seed, columns=columns)
    masker = TokenMasker(processor, columns.tokens)
    identity = {"kind": kind, "seed": seed}
    share = dict(rank=rank, world_size=world_size)
    if kind == "chat":
        encoder = ChatEncoder(processor, ctx_len, columns.messages_column, columns.images_column,
                              image_token_ids(processor))
        pad_id = _pad_id(tokenizer_of(processor))
        return ChatStream(source, name, masker, batch_size, identity, encoder, pad_id, **share)
    column = {"builtin": None, "text": columns.text_column, "tokens": TOKENS_COLUMN}[kind]
    return PackedTextStream(
        source, name, masker, batch_size, identity, tokenizer_of(processor), ctx_len, column,
        shuffle_sequences=shuffle_sequences, pretokenized=kind == "tokens", **share,
    )
