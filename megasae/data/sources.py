"""Endless, seeded row orders with exact resume positions.

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


def check_order_of(state: dict) -> None:
    """Refuse a data state saved by megasae before 2026-12 on several ranks, to which it dealt rows out; a
    single rank's order was already today's."""
    if state.get("world_size", 1) != 1:
        raise ValueError(
            f"The data state was saved by an older megasae, whose data order depended on its "
            f"{state['world_size']} data-parallel ranks; it cannot be continued by this one."
        )


class ParquetRows:
    """The rows of some Parquet row groups, reshuffled every epoch.

    Epoch e's order is a pure function of (seed, e): the row groups in a seeded permutation, and within
    each the rows in a permutation seeded by (seed, e, row group). It does not depend on the number of
    data-parallel ranks: each takes its share of every batch (megasae.data.batches), so a run may resume
    on another number of them.
    """

    def __init__(self, groups: list[RowGroup], schema: Schema, seed: int, name: str):
        total = sum(g.num_rows for g in groups)
        if total == 0:
            raise ValueError(f"{name} holds no rows.")
        self.groups, self.schema, self.seed = groups, schema, seed
        self.rows_per_epoch = total
        # A position: (epoch, index in the epoch's row group order, rows read of that row group).
        self.start = (0, 0, 0)

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's row group order."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))

    def iterate(self, position: tuple[int, int, int]) -> Iterator[tuple[dict, str, tuple[int, int, int]]]:
        epoch, start, skip = position
        while True:
            order = self._order(epoch)
            for k in range(start, len(order)):
                unit = int(order[k])
                group = self.groups[unit]
                rows = np.random.default_rng([self.seed, epoch, unit]).permutation(group.num_rows)
                rows, taken, skip = rows[skip:].tolist(), skip, 0
                columns = self.schema.columns[group.path]
                for n, (i, row) in enumerate(zip(rows, read_rows(group, columns, rows)), taken + 1):
                    yield row, f"{group.path} row {group.first_row + i}", (epoch, k, n)
            epoch, start = epoch + 1, 0


class BuiltinDocuments:
    """The built-in corpus as a source: epoch e is ``builtin_documents(seed + e)``."""

    def __init__(self, seed: int):
        self.seed = seed
        self.rows_per_epoch = len(builtin_paths())  # at most: builtin_documents skips files it cannot read
        self.start = (0, 0)  # (epoch, index of the next document in the epoch's order)

    def iterate(self, position: tuple[int, int]) -> Iterator[tuple[str, str, tuple[int, int]]]:
        epoch, i = position
        while True:
            # Skipping to a position reads the skipped files again but tokenizes none of them.
            for n, doc in enumerate(islice(builtin_documents(self.seed + epoch), i, None), i):
                yield doc, f"built-in document {n} of epoch {epoch}", (epoch, n + 1)
            epoch, i = epoch + 1, 0
