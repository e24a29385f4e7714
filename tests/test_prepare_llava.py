"""LLaVA conversation data to megasae's chat Parquet, and back through the batch stream."""

import json
import runpy
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megasae.data import build_batches, prepare_llava

from data_fixtures import png_bytes, tiny_qwen25vl_processor, write_parquet

LAUNCHER = Path(__file__).parent.parent / "launch" / "prepare_llava.py"


@pytest.fixture
def llava_json(tmp_path):
    (tmp_path / "images").mkdir()
    for name, seed in (("a.png", 0), ("b.png", 1)):
        (tmp_path / "images" / name).write_bytes(png_bytes(56, 56, seed))
    records = [
        {
            "id": "1",
            "image": "images/a.png",
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": "Noise."},
            ],
        },
        {
            "id": "2",
            "image": "images/b.png",
            "conversations": [  # no placeholder: the image goes first
                {"from": "human", "value": "Describe it."},
                {"from": "gpt", "value": "Grey."},
            ],
        },
        {"id": "3", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(records))
    return path


def image_part():
    return {"type": "image", "text": None}


def test_json_to_parquet_to_batches(llava_json, tmp_path):
    out = tmp_path / "out" / "chat.parquet"
    assert prepare_llava(llava_json, out, rows_per_group=2) == 3
    table = pq.read_table(out)
    assert pq.ParquetFile(out).metadata.num_row_groups == 2
    first = table.slice(0, 1).to_pylist()[0]
    assert first["messages"] == [
        {"role": "user", "content": [image_part(), {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Noise."}]},
    ]
    assert first["images"] == [(tmp_path / "images" / "a.png").read_bytes()]
    assert table.column("messages")[1].as_py()[0]["content"][0] == image_part()
    assert table.column("images")[2].as_py() == []

    processor = tiny_qwen25vl_processor()
    batch = next(build_batches(out, processor, ctx_len=64, batch_size=3, rank=0, world_size=1, seed=0))
    assert (batch.inputs["input_ids"] == processor.image_token_id).sum() == 8
    assert batch.inputs["image_grid_thw"].shape == (2, 3)


def test_parquet_source_with_image_structs(tmp_path):
    conversations = [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello"}]
    src = write_parquet(
        tmp_path / "src.parquet",
        [
            {
                "id": "x",
                "conversations": conversations,
                "image": {"bytes": png_bytes(56, 56), "path": "x.png"},
            },
        ],
    )
    assert prepare_llava(src, tmp_path / "dst.parquet") == 1
    row = pq.read_table(tmp_path / "dst.parquet").to_pylist()[0]
    assert row["id"] == "x" and row["images"] == [png_bytes(56, 56)]


def test_command_line(llava_json, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["prepare_llava.py", str(llava_json), str(tmp_path / "cli.parquet")])
    runpy.run_path(str(LAUNCHER), run_name="__main__")
    assert "wrote 3 rows" in capsys.readouterr().out
    assert pq.read_metadata(tmp_path / "cli.parquet").num_rows == 3


def test_missing_image_leaves_nothing_behind(llava_json, tmp_path):
    (tmp_path / "images" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"record 1 \(id 2\): its image .*b\.png does not exist"):
        prepare_llava(llava_json, tmp_path / "out.parquet", rows_per_group=1)
    assert [p.name for p in tmp_path.iterdir() if "out" in p.name] == []


def test_bad_records(tmp_path):
    (tmp_path / "x.png").write_bytes(b"not a png")
    cases = [
        (
            {"image": "x.png", "conversations": [{"from": "human", "value": "<image>"}]},
            "is not a valid image",
        ),
        ({"conversations": [{"from": "human", "value": "<image>"}]}, "1 '<image>' placeholders but 0 images"),
        ({"conversations": [{"from": "robot", "value": "hi"}]}, "unknown speaker 'robot'"),
    ]
    for record, message in cases:
        (tmp_path / "bad.json").write_text(json.dumps([record]))
        with pytest.raises(ValueError, match=message):
            prepare_llava(tmp_path / "bad.json", tmp_path / "bad.parquet")


def test_parquet_source_without_conversations(tmp_path):
    pq.write_table(pa.table({"text": ["hi"]}), tmp_path / "plain.parquet")
    with pytest.raises(
        ValueError, match="plain.parquet has no 'conversations' column; its columns are: text"
    ):
        prepare_llava(tmp_path / "plain.parquet", tmp_path / "out.parquet")
