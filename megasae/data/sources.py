"""Endless, sharded, seeded row orders with exact resume positions.

A source yields ``(item, where, position)``: a row (or document), where it came from (for error
messages), and the position just after it. ``iterate(position)`` starts again from any position it
yielded, so a stream resumes exactly from a saved position without replaying anything.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

import numpy as np

from megasae.data.builtin import builtin_documents, builtin_paths
from megasae.data.parquet import RowGroup, Schema, read_rows


class ParquetRows:
    """The rows of some Parquet row groups, reshuffled every epoch and dealt out to data-parallel ranks.

    Epoch e's order is a pure function of (seed, e): the row groups in a seeded permutation, and within
    each the rows in a permutation seeded by (seed, e, row group). Rank r takes the rows at positions
    p % world_size == r of that order, so the ranks together see every row exactly once per epoch;
    when the row count is not divisible by world_size, ranks below the remainder get one row more in
    that epoch and simply start the next epoch later (every rank streams forever). Each rank reads
    every row group but decodes only its own rows.
    """

    def __init__(
        self, groups: list[RowGroup], schema: Schema, seed: int, rank: int, world_size: int, name: str
    ):
        total = sum(g.num_rows for g in groups)
        if total == 0:
            raise ValueError(f"{name} holds no rows.")
        if total < world_size:
            raise ValueError(
                f"{name} has {total} rows, fewer than the {world_size} data-parallel ranks: each needs rows."
            )
        self.groups, self.schema = groups, schema
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.rows_per_epoch = (total - rank + world_size - 1) // world_size  # this rank's share
        # A position: (epoch, index in the epoch's row group order, index among this rank's rows there).
        self.start = (0, 0, 0)

    def _order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's row group order and each one's first position in the epoch's row order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
        sizes = np.array([self.groups[u].num_rows for u in order], dtype=np.int64)
        return order, np.cumsum(sizes) - sizes

    def _rank_rows(self, epoch: int, unit: int, offset: int) -> list[int]:
        """This rank's rows of one row group, in the epoch's order (computed per group, when reached)."""
        perm = np.random.default_rng([self.seed, epoch, unit]).permutation(self.groups[unit].num_rows)
        return perm[(self.rank - offset) % self.world_size :: self.world_size].tolist()

    def iterate(self, position: tuple[int, int, int]) -> Iterator[tuple[dict, str, tuple[int, int, int]]]:
        epoch, start, skip = position
        while True:
            order, offsets = self._order(epoch)
            for k in range(start, len(order)):
                unit = int(order[k])
                group = self.groups[unit]
                taken, skip = skip, 0
                rows = self._rank_rows(epoch, unit, int(offsets[k]))[taken:]
                if not rows:  # none of it left for this rank: do not read it
                    continue
                columns = self.schema.columns[group.path]
                for n, (i, row) in enumerate(zip(rows, read_rows(group, columns, rows)), taken + 1):
                    yield row, f"{group.path} row {group.first_row + i}", (epoch, k, n)
            epoch, start = epoch + 1, 0


class BuiltinDocuments:
    """The built-in corpus as a source: epoch e is ``builtin_documents(seed + e)``; rank r takes documents
    i % world_size == r, so each rank tokenizes only its own share."""

    def __init__(self, seed: int, rank: int, world_size: int):
        files = len(builtin_paths())
        if files < world_size:
            raise ValueError(
                f"The built-in corpus has {files} documents, fewer than the {world_size} data-parallel ranks."
            )
        self.seed, self.rank, self.world_size = seed, rank, world_size
        # At most: builtin_documents skips files it cannot read.
        self.rows_per_epoch = (files - rank + world_size - 1) // world_size
        self.start = (0, 0)  # (epoch, index of the next document in the epoch's order)

    def iterate(self, position: tuple[int, int]) -> Iterator[tuple[str, str, tuple[int, int]]]:
        epoch, i = position
        while True:
            # Skipping to a position reads the skipped files again but tokenizes none of them.
            for n, doc in enumerate(islice(builtin_documents(self.seed + epoch), i, None), i):
                if n % self.world_size == self.rank:
                    yield doc, f"built-in document {n} of epoch {epoch}", (epoch, n + 1)
            epoch, i = epoch + 1, 0
