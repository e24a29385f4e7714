"""Parquet training data: which files, which schema, and reading one row group's rows.

Only metadata (footers) is read up front; rows are read one row group at a time, so a file is never
held in memory whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass(frozen=True)
class RowGroup:
    """One row group of one file: the unit the epoch order shuffles."""

    path: Path
    index: int
    first_row: int  # its first row's index in the file, for error messages
    num_rows: int


# Pre-tokenized rows: a list of token ids per row, used as they are.
TOKENS_COLUMN = "input_ids"


@dataclass(frozen=True)
class Schema:
    """What the files hold: "chat" (a messages column, images optional), "text" or "tokens" (token ids)."""

    kind: str
    columns: dict[Path, list[str]]  # the columns to read from each file


def parquet_files(data: str | Path) -> list[Path]:
    """The Parquet file ``data`` names, or a directory's ``*.parquet`` files sorted by name."""
    path = Path(data)
    if path.is_dir():
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"The data directory {path} holds no .parquet files.")
        return files
    if not path.is_file():
        raise FileNotFoundError(
            f"The data path {path} does not exist: give a Parquet file, a directory of them, or 'builtin'."
        )
    return [path]


def open_parquet(path: Path) -> pq.ParquetFile:
    """The file's footer, or one sentence saying it is not Parquet."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise ValueError(f"{path} is not a readable Parquet file ({str(err).splitlines()[0]}).") from None


def row_groups(files: list[Path]) -> list[RowGroup]:
    groups = []
    for path in files:
        meta = open_parquet(path).metadata
        first = 0
        for i in range(meta.num_row_groups):
            rows = meta.row_group(i).num_rows
            groups.append(RowGroup(path, i, first, rows))
            first += rows
    return groups


def _holds_token_ids(kind_of: pa.DataType) -> bool:
    return (pa.types.is_list(kind_of) or pa.types.is_large_list(kind_of)) and pa.types.is_integer(
        kind_of.value_type)


def detect_schema(files: list[Path], text_column: str, messages_column: str, images_column: str) -> Schema:
    """Chat when the first file has ``messages_column``, else text (``text_column``), else token ids (an
    ``input_ids`` column); every file must have that column."""
    schemas = {path: open_parquet(path).schema_arrow for path in files}
    names = {path: schema.names for path, schema in schemas.items()}
    first = files[0]
    if messages_column in names[first]:
        kind, needed = "chat", messages_column
    elif text_column in names[first]:
        kind, needed = "text", text_column
    elif TOKENS_COLUMN in names[first]:
        kind, needed = "tokens", TOKENS_COLUMN
    else:
        raise ValueError(
            f"{first} has no '{messages_column}' column (chat rows), '{text_column}' column (plain text) or "
            f"'{TOKENS_COLUMN}' column (token ids); its columns are: {', '.join(names[first])}."
        )
    columns = {}
    for path, have in names.items():
        if needed not in have:
            raise ValueError(f"{path} has no '{needed}' column; its columns are: {', '.join(have)}.")
        kind_of = schemas[path].field(needed).type
        if kind == "text" and not (pa.types.is_string(kind_of) or pa.types.is_large_string(kind_of)):
            raise ValueError(f"{path} column '{needed}' holds {kind_of}, not strings of text.")
        if kind == "tokens" and not _holds_token_ids(kind_of):
            raise ValueError(f"{path} column '{needed}' holds {kind_of}, not lists of integer token ids.")
        # Images are optional per file: a chat file without them is text-only chat.
        columns[path] = [needed] + ([images_column] if kind == "chat" and images_column in have else [])
    return Schema(kind, columns)


def read_rows(group: RowGroup, columns: list[str], rows: list[int]) -> Iterator[dict]:
    """Yield the given rows of one row group (indices within it, in that order) as dicts of ``columns``."""
    table = pq.ParquetFile(group.path).read_row_group(group.index, columns=columns)
    for i in rows:
        # One row at a time: converting a row group of images to Python objects at once doubles its memory.
        yield {name: table.column(name)[i].as_py() for name in columns}
