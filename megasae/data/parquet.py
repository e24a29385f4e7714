"""Training data in files: which files, which schema, and reading one row group's rows.

Parquet files, and the Arrow files of a Hugging Face `datasets` directory (`Dataset.save_to_disk`: a
`state.json` naming Arrow IPC streams, whose record batches serve as row groups; memory-mapped, so read
without the `datasets` package). Only metadata is read up front; rows are read one row group at a time,
so a file is never held in memory whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from megasae.data.hub import hub_dataset_files, is_hub_dataset


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


def _datasets_files(directory: Path) -> list[Path]:
    """The Arrow files of a `save_to_disk` directory; a DatasetDict's 'train' split unless one is named."""
    splits_file = directory / "dataset_dict.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text())["splits"]
        if "train" not in splits:
            raise ValueError(f"The dataset {directory} has no 'train' split; name one: {directory}/<split>, "
                             f"with <split> one of {', '.join(splits)}.")
        directory = directory / "train"
    state = json.loads((directory / "state.json").read_text())
    return [directory / entry["filename"] for entry in state["_data_files"]]


def data_files(data: str | Path) -> list[Path]:
    """The Parquet file ``data`` names, a directory's ``*.parquet`` files sorted by name, or the Arrow files
    of a `datasets` directory or a hub dataset (`hf:NAME[:CONFIG][:SPLIT]`)."""
    if is_hub_dataset(data):
        return hub_dataset_files(str(data))
    path = Path(data)
    if path.is_dir():
        if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
            return _datasets_files(path)
        files = sorted(path.glob("*.parquet"))
        if not files:
            raise FileNotFoundError(
                f"The data directory {path} holds no .parquet files and is no `datasets` directory "
                "(save_to_disk)."
            )
        return files
    if not path.is_file():
        raise FileNotFoundError(
            f"The data path {path} does not exist: give a Parquet file, a directory of them, a `datasets` "
            "directory, or 'builtin'."
        )
    return [path]


def _is_arrow(path: Path) -> bool:
    return path.suffix == ".arrow"


def _arrow_batches(path: Path) -> Iterator[pa.RecordBatch]:
    return iter(pa.ipc.open_stream(pa.memory_map(str(path))))


def _readable(path: Path, read):
    """read(path), or one sentence saying the file cannot be read as what it claims to be."""
    try:
        return read(path)
    except (pa.ArrowException, OSError) as err:
        kind = "Arrow stream" if _is_arrow(path) else "Parquet file"
        raise ValueError(f"{path} is not a readable {kind} ({str(err).splitlines()[0]}).") from None


def _schema(path: Path) -> pa.Schema:
    if _is_arrow(path):
        return _readable(path, lambda p: pa.ipc.open_stream(pa.memory_map(str(p))).schema)
    return _readable(path, lambda p: pq.ParquetFile(p).schema_arrow)


def _group_sizes(path: Path) -> list[int]:
    if _is_arrow(path):
        return _readable(path, lambda p: [batch.num_rows for batch in _arrow_batches(p)])
    meta = _readable(path, lambda p: pq.ParquetFile(p).metadata)
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


def row_groups(files: list[Path]) -> list[RowGroup]:
    groups = []
    for path in files:
        first = 0
        for i, rows in enumerate(_group_sizes(path)):
            groups.append(RowGroup(path, i, first, rows))
            first += rows
    return groups


def _holds_token_ids(kind_of: pa.DataType) -> bool:
    return (pa.types.is_list(kind_of) or pa.types.is_large_list(kind_of)) and pa.types.is_integer(
        kind_of.value_type)


def detect_schema(files: list[Path], text_column: str, messages_column: str, images_column: str) -> Schema:
    """Chat when the first file has ``messages_column``, else text (``text_column``), else token ids (an
    ``input_ids`` column); every file must have that column."""
    schemas = {path: _schema(path) for path in files}
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
    if _is_arrow(group.path):
        table = next(islice(_arrow_batches(group.path), group.index, None)).select(columns)
    else:
        table = pq.ParquetFile(group.path).read_row_group(group.index, columns=columns)
    for i in rows:
        # One row at a time: converting a row group of images to Python objects at once doubles its memory.
        yield {name: table.column(name)[i].as_py() for name in columns}
