"""Convert LLaVA-style conversation data into megasae's chat Parquet schema.

Input: a JSON file (a list of {"id", "image": a path relative to the image folder, or a list of them,
"conversations": [{"from": "human"|"gpt"|"system", "value": "<image>\\n..."}]}), or a Parquet file with a
``conversations`` column and an image column (encoded bytes, or Hugging Face's {bytes, path} structs).
Output: ``messages`` (list of {role, content: [{type: text|image, text}]}; each "<image>" becomes an
image part), ``images`` (the encoded bytes, unchanged, in order) and ``id``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
PLACEHOLDER = "<image>"
PART = pa.struct([("type", pa.string()), ("text", pa.string())])
MESSAGE = pa.struct([("role", pa.string()), ("content", pa.list_(PART))])
SCHEMA = pa.schema([("id", pa.string()), ("messages", pa.list_(MESSAGE)), ("images", pa.list_(pa.binary()))])
IMAGE_PART = {"type": "image", "text": None}


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _content(value: str) -> list[dict]:
    parts = []
    for i, segment in enumerate(value.split(PLACEHOLDER)):
        if i:
            parts.append(dict(IMAGE_PART))
        if segment.strip():  # the newline after "<image>" only separated it from the text
            parts.append({"type": "text", "text": segment.strip()})
    return parts


def _checked_image(data: bytes, where: str, index: int) -> bytes:
    try:
        Image.open(io.BytesIO(data)).verify()  # a header and integrity check, without decoding pixels
    except (OSError, SyntaxError, ValueError) as err:  # what PIL raises for data it cannot read
        raise ValueError(f"{where}: its image {index} is not a valid image ({err}).") from None
    return data


def _record(record_id, conversations, images: list[bytes], where: str) -> dict:
    messages = []
    for turn in conversations:
        if turn["from"] not in ROLES:
            raise ValueError(
                f"{where}: unknown speaker {turn['from']!r}; expected one of {', '.join(ROLES)}."
            )
        messages.append({"role": ROLES[turn["from"]], "content": _content(turn["value"])})
    placeholders = sum(part["type"] == "image" for message in messages for part in message["content"])
    if placeholders == 0 and images and messages:  # no placeholder: the images open the first turn
        messages[0]["content"][:0] = [dict(IMAGE_PART) for _ in images]
    elif placeholders != len(images):
        raise ValueError(f"{where} has {placeholders} '{PLACEHOLDER}' placeholders but {len(images)} images.")
    return {
        "id": str(record_id),
        "messages": messages,
        "images": [_checked_image(data, where, i) for i, data in enumerate(images)],
    }


def _json_records(src: Path, image_dir: Path) -> Iterator[dict]:
    # LLaVA ships one JSON list; the json module can only read it whole.
    for n, record in enumerate(json.loads(src.read_text(encoding="utf-8"))):
        where = f"{src} record {n} (id {record.get('id', n)})"
        images = []
        for relative in _as_list(record.get("image")):
            path = image_dir / relative
            if not path.is_file():
                raise FileNotFoundError(
                    f"{where}: its image {path} does not exist; pass the image folder as image_dir."
                )
            images.append(path.read_bytes())
        yield _record(record.get("id", n), record["conversations"], images, where)


def _image_bytes(value, where: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, dict) and isinstance(value.get("bytes"), bytes):
        return value["bytes"]
    raise ValueError(f"{where}: an image is neither bytes nor a {{bytes, path}} struct with bytes.")


def _parquet_records(src: Path, image_column: str, rows_per_group: int) -> Iterator[dict]:
    parquet = pq.ParquetFile(src)
    names = parquet.schema_arrow.names
    if "conversations" not in names:
        raise ValueError(f"{src} has no 'conversations' column; its columns are: {', '.join(names)}.")
    columns = [c for c in ("id", "conversations", image_column) if c in names]
    n = 0
    for batch in parquet.iter_batches(batch_size=rows_per_group, columns=columns):
        for row in batch.to_pylist():
            where = f"{src} row {n}"
            images = [_image_bytes(value, where) for value in _as_list(row.get(image_column))]
            yield _record(row.get("id", n), row["conversations"], images, where)
            n += 1


def _chunks(records: Iterable[dict], size: int) -> Iterator[list[dict]]:
    records = iter(records)
    while chunk := list(islice(records, size)):
        yield chunk


def prepare_llava(
    src: str | Path,
    dst: str | Path,
    *,
    image_dir: str | Path | None = None,
    image_column: str = "image",
    rows_per_group: int = 256,
) -> int:
    """Convert ``src`` (LLaVA JSON or Parquet) to a chat Parquet file at ``dst``; returns the rows written.

    ``image_dir`` is where a JSON file's relative image paths start (default: the JSON file's folder);
    ``image_column`` is a Parquet source's image column. Rows are written ``rows_per_group`` at a time
    (one row group each) to a temporary file that replaces ``dst`` only when complete.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"The LLaVA data {src} does not exist: give a .json file or a .parquet file.")
    if src.suffix == ".parquet":
        records = _parquet_records(src, image_column, rows_per_group)
    else:
        records = _json_records(src, Path(image_dir) if image_dir is not None else src.parent)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    count = 0
    try:
        with pq.ParquetWriter(tmp, SCHEMA) as writer:
            for chunk in _chunks(records, rows_per_group):
                writer.write_table(pa.Table.from_pylist(chunk, schema=SCHEMA))
                count += len(chunk)
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)  # left only when the conversion failed
    return count
