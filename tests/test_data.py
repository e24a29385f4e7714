"""The training data pipeline: text and chat rows, sharding, shuffling, resume, token masks, errors."""

import io
import itertools

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from megasae.data import DataColumns, build_batches, token_batches

from data_fixtures import (
    decode_chars,
    png_bytes,
    qwen25vl_token_ids,
    tiny_qwen25vl_processor,
    tiny_text_tokenizer,
    write_parquet,
)

DOCS = [f"doc{i};" for i in range(31)]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_text_tokenizer()


@pytest.fixture(scope="module")
def processor():
    return tiny_qwen25vl_processor()


@pytest.fixture
def text_dir(tmp_path):
    """31 documents over three files and several row groups of different sizes."""
    rows = [{"text": doc} for doc in DOCS]
    write_parquet(tmp_path / "a.parquet", rows[:10], row_group_size=3)
    write_parquet(tmp_path / "b.parquet", rows[10:25], row_group_size=4)
    write_parquet(tmp_path / "c.parquet", rows[25:])
    return tmp_path


def user(*parts):
    return {"role": "user", "content": list(parts)}


def text(value):
    return {"type": "text", "text": value}


IMAGE = {"type": "image"}
ASSISTANT = {"role": "assistant", "content": [text("ok")]}


@pytest.fixture
def chat_file(tmp_path):
    rows = [
        {"messages": [user(IMAGE, text("what is it?")), ASSISTANT], "images": [png_bytes(56, 56, 0)]},
        {"messages": [user(text("hi")), ASSISTANT], "images": []},
        {
            "messages": [user(IMAGE, text("and")), user(IMAGE), ASSISTANT],
            "images": [png_bytes(56, 56, 1), png_bytes(30, 90, 2)],
        },
        {"messages": [user(text("bye")), ASSISTANT], "images": []},
    ]
    return write_parquet(tmp_path / "chat.parquet", rows, row_group_size=2)


def stream(data, processor, **kwargs):
    args = {"ctx_len": 8, "batch_size": 2, "rank": 0, "world_size": 1, "seed": 0} | kwargs
    return build_batches(data, processor, **args)


def documents(tokenizer, data, count, **kwargs):
    """The first ``count`` documents the stream packs, read back from its tokens."""
    batches = stream(data, tokenizer, **kwargs)
    chars = ""
    while chars.count(tokenizer.eos_token) < count:
        chars += decode_chars(tokenizer, next(batches).inputs["input_ids"].flatten())
    return chars.split(tokenizer.eos_token)[:count]


def test_every_document_once_per_epoch(tokenizer, text_dir):
    epochs = documents(tokenizer, text_dir, 2 * len(DOCS))
    for epoch in range(2):
        assert sorted(epochs[epoch * len(DOCS) : (epoch + 1) * len(DOCS)]) == sorted(DOCS)
    assert epochs[: len(DOCS)] != epochs[len(DOCS) :], "each epoch is reshuffled"


def test_order_depends_on_the_seed(tokenizer, text_dir):
    assert documents(tokenizer, text_dir, 16, seed=0) != documents(tokenizer, text_dir, 16, seed=1)
    assert documents(tokenizer, text_dir, 16, seed=3) == documents(tokenizer, text_dir, 16, seed=3)


def share_of_one_stream(make, world_size, batches):
    """Each of ``world_size`` ranks' streams (batch_size b) gives its b sequences of the one-rank stream's
    batches of world_size x b, in rank order, and all end at that stream's position."""
    ranks = [make(rank=r, world_size=world_size) for r in range(world_size)]
    one = make(rank=0, world_size=1, batch_size=world_size * ranks[0].batch_size)
    def sequences(batch):  # chat rows are padded to the longest of their batch
        ids, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"].bool()
        return [(row[keep].tolist(), trained[keep].tolist())
                for row, keep, trained in zip(ids, mask, batch.token_mask, strict=True)]

    for _ in range(batches):
        whole, parts = next(one), [next(r) for r in ranks]
        assert [seq for p in parts for seq in sequences(p)] == sequences(whole)
        for key in whole.inputs.keys() & {"pixel_values", "image_grid_thw"}:  # per image, in order
            torch.testing.assert_close(torch.cat([p.inputs[key] for p in parts if key in p.inputs]),
                                       whole.inputs[key], rtol=0, atol=0)
        assert sum(p.num_tokens for p in parts) == whole.num_tokens
    assert all(r.state_dict() == one.state_dict() for r in ranks)


def test_ranks_share_every_batch_of_the_one_rank_order(tokenizer, text_dir):
    """So the data order does not depend on the number of ranks, and a run resumes on another number."""
    share_of_one_stream(lambda **kw: stream(text_dir, tokenizer, **{"batch_size": 2} | kw), 2, batches=12)
    share_of_one_stream(lambda **kw: stream(text_dir, tokenizer, **{"batch_size": 1} | kw), 3, batches=9)
    share_of_one_stream(lambda **kw: stream("builtin", tokenizer, **{"ctx_len": 64} | kw), 2, batches=3)


def test_ranks_share_every_chat_batch(processor, tokenizer, tmp_path):
    """Only the rank that takes a row processes its images."""
    rows = [{"messages": [user(text("hi")), ASSISTANT], "images": []},
            {"messages": [user(IMAGE, text("what?")), ASSISTANT], "images": [png_bytes(56, 56, 0)]},
            {"messages": [user(IMAGE), user(IMAGE)], "images": [png_bytes(56, 56, 1), png_bytes(30, 90, 2)]},
            {"messages": [user(text("bye")), ASSISTANT], "images": []}] * 2
    images = write_parquet(tmp_path / "images.parquet", rows, row_group_size=3)
    share_of_one_stream(lambda **kw: stream(images, processor, **{"ctx_len": 64, "batch_size": 1} | kw), 2,
                        batches=6)
    plain = [{"messages": [user(text(f"row {i}"))]} for i in range(12)]
    chats = write_parquet(tmp_path / "chats.parquet", plain, row_group_size=5)
    share_of_one_stream(lambda **kw: stream(chats, tokenizer, **{"ctx_len": 64, "batch_size": 2} | kw), 2,
                        batches=4)


def test_text_batches_are_full_packed_sequences(tokenizer, text_dir):
    batch = next(stream(text_dir, tokenizer, ctx_len=8, batch_size=3))
    assert batch.inputs["input_ids"].shape == (3, 8)
    assert batch.inputs["attention_mask"].all() and batch.num_tokens == 24
    ids, mask = batch.inputs["input_ids"], batch.token_mask
    assert not mask[:, 0].any()
    assert torch.equal(mask[:, 1:], ids[:, 1:] != tokenizer.eos_token_id)


def same_batches(ours, theirs):
    return all(
        x.inputs.keys() == y.inputs.keys()
        and all(torch.equal(x.inputs[k], y.inputs[k]) for k in x.inputs)
        and torch.equal(x.token_mask, y.token_mask)
        and x.num_tokens == y.num_tokens
        for x, y in zip(ours, theirs, strict=True)
    )


def check_resume(make, taken, then):
    """A fresh stream loaded with the state after ``taken`` batches continues as the uninterrupted one."""
    running = make()
    for _ in range(taken):
        next(running)
    saved = io.BytesIO()
    torch.save(running.state_dict(), saved)
    resumed = make()
    resumed.load_state_dict(torch.load(io.BytesIO(saved.getvalue())))
    assert same_batches([next(resumed) for _ in range(then)], [next(running) for _ in range(then)])


def test_resume_text_across_epochs(tokenizer, text_dir):
    # About 13 global batches per epoch on 2 ranks: this resumes mid-epoch and crosses into epoch 2.
    check_resume(lambda: stream(text_dir, tokenizer, rank=1, world_size=2, batch_size=1), taken=10, then=20)


def test_a_state_saved_on_one_rank_continues_on_two(tokenizer, text_dir):
    one = stream(text_dir, tokenizer, batch_size=4)
    for _ in range(5):
        next(one)
    ranks = [stream(text_dir, tokenizer, rank=r, world_size=2) for r in range(2)]
    for r in ranks:
        r.load_state_dict(one.state_dict())
    whole = next(one).inputs["input_ids"]
    assert torch.equal(torch.cat([next(r).inputs["input_ids"] for r in ranks]), whole)


def test_shuffled_windows_hold_the_streams_sequences_in_another_order(tokenizer, text_dir):
    """Each window of 5 sequences is the next 5 of the stream's own order, permuted; batches of 2 cross
    the windows' edges."""
    def windows(seed, count):
        shuffled = stream(text_dir, tokenizer, batch_size=2, shuffle_sequences=5, seed=seed)
        drawn = torch.cat([next(shuffled).inputs["input_ids"] for _ in range(count * 5 // 2)])
        return [drawn[5 * w : 5 * w + 5].tolist() for w in range(count)]

    plain = stream(text_dir, tokenizer, batch_size=5)
    ours = windows(seed=0, count=8)  # 40 sequences: the windows run over an epoch's end
    in_order = [next(plain).inputs["input_ids"].tolist() for _ in ours]
    assert [sorted(w) for w in ours] == [sorted(w) for w in in_order]
    assert sum(w != o for w, o in zip(ours, in_order)) >= 6, "nearly every window's order changes"
    assert ours == windows(seed=0, count=8)
    other_seed = stream(text_dir, tokenizer, batch_size=5, seed=1)
    assert [sorted(w) for w in windows(seed=1, count=2)] == [
        sorted(next(other_seed).inputs["input_ids"].tolist()) for _ in range(2)]


def test_resume_inside_a_shuffled_window(tokenizer, text_dir):
    # Windows of 7 sequences, 2 a global batch: resumes mid-window, then crosses windows and an epoch.
    check_resume(lambda: stream(text_dir, tokenizer, rank=1, world_size=2, batch_size=1, shuffle_sequences=7),
                 taken=10, then=20)
    check_resume(lambda: stream("builtin", tokenizer, ctx_len=64, shuffle_sequences=3), taken=2, then=3)


def test_ranks_share_every_shuffled_batch(tokenizer, text_dir):
    shuffled = {"shuffle_sequences": 5}
    share_of_one_stream(lambda **kw: stream(text_dir, tokenizer, **shuffled | kw), 2, batches=12)


def test_a_state_saved_before_shuffling_resumes_only_unshuffled(tokenizer, text_dir):
    old = stream(text_dir, tokenizer).state_dict()
    del old["shuffle_sequences"]
    stream(text_dir, tokenizer).load_state_dict(old)
    with pytest.raises(ValueError, match="with shuffle_sequences=1, but this stream has shuffle_sequences=4"):
        stream(text_dir, tokenizer, shuffle_sequences=4).load_state_dict(old)


def test_resume_chat(processor, chat_file):
    check_resume(lambda: stream(chat_file, processor, ctx_len=64, batch_size=3), taken=1, then=3)


def test_resume_builtin(tokenizer):
    check_resume(lambda: stream("builtin", tokenizer, ctx_len=64, rank=1, world_size=2), taken=3, then=2)


def test_builtin_on_one_rank_is_the_packed_corpus(tokenizer):
    ours = stream("builtin", tokenizer, ctx_len=32, batch_size=2)
    for theirs in itertools.islice(token_batches(tokenizer, ctx_len=32, batch_size=2, seed=0), 3):
        assert torch.equal(next(ours).inputs["input_ids"], theirs)


def image_positions(processor, ids):
    return ids == processor.image_token_id


def test_chat_batch_with_images(processor, chat_file):
    batch = next(stream(chat_file, processor, ctx_len=128, batch_size=4))
    ids, attention, mask = batch.inputs["input_ids"], batch.inputs["attention_mask"].bool(), batch.token_mask
    is_image = image_positions(processor, ids)
    assert is_image.sum() == 16  # 16, 16 and 32 patches, merged 2x2
    assert batch.inputs["pixel_values"].shape == (64, 1176)
    assert batch.inputs["image_grid_thw"].shape == (3, 3)
    assert (~attention).any(), "rows of different lengths are padded"
    assert batch.num_tokens == int(attention.sum())
    assert not mask[~attention].any() and not mask[:, 0].any()
    special = torch.tensor(
        processor.tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|vision_start|>"])
    )
    assert not mask[torch.isin(ids, special)].any()
    assert mask[is_image].all()
    assert mask[attention & ~is_image].any()

    text_mask, image_mask = (
        next(stream(chat_file, processor, ctx_len=128, batch_size=4, columns=DataColumns(tokens=tokens)))
        .token_mask for tokens in ("text", "image")
    )
    assert torch.equal(text_mask, mask & ~is_image)
    assert torch.equal(image_mask, is_image)


def test_truncation_keeps_whole_images_only(processor, tmp_path):
    row = {
        "messages": [user(text("ab"), IMAGE, text("cd"), IMAGE)],
        "images": [png_bytes(56, 56, 0), png_bytes(56, 56, 1)],
    }
    path = write_parquet(tmp_path / "one.parquet", [row])
    # Image pads at positions 9-12 and 17-20; a cut inside a run moves before that image.
    for ctx_len, pads in ((11, 0), (13, 4), (19, 4), (21, 8)):
        batch = next(stream(path, processor, ctx_len=ctx_len, batch_size=1))
        ids = batch.inputs["input_ids"]
        assert ids.shape[1] <= ctx_len and image_positions(processor, ids).sum() == pads
        assert ("pixel_values" in batch.inputs) == (pads > 0)
        if pads:
            assert batch.inputs["pixel_values"].shape[0] == 4 * pads


def test_text_chat_through_a_tokenizer(tokenizer, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]}
    ]
    batch = next(stream(write_parquet(tmp_path / "t.parquet", rows), tokenizer, ctx_len=64, batch_size=1))
    assert decode_chars(tokenizer, batch.inputs["input_ids"][0]) == (
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nhi there<|im_end|>\n"
    )


# Bad input: one clear error, before any batch where the files allow it.


def test_missing_path(tokenizer, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.parquet does not exist"):
        stream(tmp_path / "nope.parquet", tokenizer)


def test_directory_without_parquet_files(tokenizer, tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(FileNotFoundError, match="holds no .parquet files"):
        stream(tmp_path, tokenizer)


def test_file_without_the_column(tokenizer, tmp_path):
    write_parquet(tmp_path / "a.parquet", [{"text": "fine"}])
    write_parquet(tmp_path / "b.parquet", [{"body": "wrong"}])
    with pytest.raises(ValueError, match=r"b\.parquet has no 'text' column; its columns are: body"):
        stream(tmp_path, tokenizer)
    with pytest.raises(
        ValueError,
        match=r"b\.parquet has no 'msgs' column .*, 'body2' column .* or 'input_ids' "
        r"column \(token ids\); its columns are: body",
    ):
        stream(tmp_path / "b.parquet", tokenizer,
               columns=DataColumns(messages_column="msgs", text_column="body2"))


def test_text_column_of_numbers(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="column 'text' holds int64, not strings"):
        stream(write_parquet(tmp_path / "n.parquet", [{"text": 1}]), tokenizer)


def test_image_that_does_not_decode(processor, tmp_path):
    rows = [{"messages": [user(IMAGE)], "images": [b"not a png"]}]
    batches = stream(write_parquet(tmp_path / "bad.parquet", rows), processor, batch_size=1)
    with pytest.raises(
        ValueError, match=r"bad\.parquet row 0: image 0 of column 'images' is not a valid image"
    ):
        next(batches)


def test_image_parts_without_images(processor, tmp_path):
    rows = [{"messages": [user(IMAGE, IMAGE)], "images": [png_bytes(56, 56)]}]
    batches = stream(write_parquet(tmp_path / "few.parquet", rows), processor, batch_size=1)
    with pytest.raises(ValueError, match="row 0 has 2 image parts in 'messages' but 1 images in 'images'"):
        next(batches)


def test_empty_data(tokenizer, tmp_path):
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    with pytest.raises(ValueError, match="empty.parquet holds no rows"):
        stream(tmp_path / "empty.parquet", tokenizer)
    short = stream(
        write_parquet(tmp_path / "short.parquet", [{"text": "ab"}, {"text": None}]), tokenizer, ctx_len=100
    )
    with pytest.raises(ValueError, match="yields less than one 100-token sequence per epoch"):
        next(short)


def test_bad_arguments(tokenizer, text_dir, chat_file):
    with pytest.raises(ValueError, match="tokens must be one of all, text, image"):
        stream(text_dir, tokenizer, columns=DataColumns(tokens="images"))
    with pytest.raises(ValueError, match="tokens='image' needs a processor with an image token"):
        stream(chat_file, tokenizer, columns=DataColumns(tokens="image"))
    with pytest.raises(ValueError, match="rank must be in"):
        stream(text_dir, tokenizer, rank=2, world_size=2)
    with pytest.raises(ValueError, match="shuffle_sequences must be an integer >= 1, got 0"):
        stream(text_dir, tokenizer, shuffle_sequences=0)


def test_image_tokens_of_plain_text(processor, text_dir):
    with pytest.raises(ValueError, match="tokens='image' needs chat data with images"):
        stream(text_dir, processor, columns=DataColumns(tokens="image"))


def test_a_state_of_the_older_per_rank_order_is_refused(tokenizer, text_dir):
    state = stream(text_dir, tokenizer).state_dict() | {"rank": 1, "world_size": 2}
    with pytest.raises(ValueError, match="whose data order depended on its 2 data-parallel ranks"):
        stream(text_dir, tokenizer, rank=0, world_size=2).load_state_dict(state)


def test_chat_batch_feeds_a_tiny_qwen25vl(processor, chat_file):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(processor.tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 32,
            "fullatt_block_indexes": [0],
        },
        **qwen25vl_token_ids(processor),
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    batch = next(stream(chat_file, processor, ctx_len=128, batch_size=4))
    with torch.no_grad():
        logits = model(**batch.inputs).logits
    assert logits.shape[:2] == batch.inputs["input_ids"].shape and torch.isfinite(logits).all()


def _token_rows(tokenizer, texts):
    return [{"input_ids": tokenizer.encode(text, add_special_tokens=False)} for text in texts]


def test_token_ids_give_the_text_paths_own_batches(tokenizer, text_dir, tmp_path):
    """Rows of token ids that hold the text path's own tokens, in the same files and row groups, give
    bit-identical batches on every rank, across epochs, and resume the same way."""
    for name, size in (("a", 3), ("b", 4), ("c", None)):
        texts = pq.read_table(text_dir / f"{name}.parquet").column("text").to_pylist()
        kwargs = {"row_group_size": size} if size else {}
        write_parquet(tmp_path / f"{name}.parquet", _token_rows(tokenizer, texts), **kwargs)
    for rank in (0, 1):
        def texts():
            return stream(text_dir, tokenizer, rank=rank, world_size=2, batch_size=1)

        def ids():
            return stream(tmp_path, tokenizer, rank=rank, world_size=2, batch_size=1)

        assert same_batches(list(itertools.islice(ids(), 30)), list(itertools.islice(texts(), 30)))
    check_resume(lambda: stream(tmp_path, tokenizer, rank=1, world_size=2, batch_size=1), taken=10, then=20)


def test_long_token_rows_are_cut_into_sequences(tokenizer, tmp_path):
    ids = list(range(3, 3 + 20))  # one row of 20 ids, ctx_len 8: 21 tokens with the EOS
    data = write_parquet(tmp_path / "ids.parquet", [{"input_ids": ids}])
    batch = next(stream(data, tokenizer, ctx_len=8, batch_size=2))
    assert batch.inputs["input_ids"].flatten().tolist() == ids[:16]


@pytest.mark.parametrize("rows, message", [
    ([{"input_ids": [1, 2, 10_000]}], r"ids\.parquet row 0 holds token id 10000, outside the tokenizer's "
                                       r"vocabulary \(ids 0 to \d+\)"),
    ([{"input_ids": [1, -3]}], "holds token id -3"),
    ([{"input_ids": ["a", "b"]}], "column 'input_ids' holds list<.*>, not lists of integer token ids"),
])
def test_bad_token_ids_are_refused_in_one_sentence(tokenizer, tmp_path, rows, message):
    data = write_parquet(tmp_path / "ids.parquet", rows)
    with pytest.raises(ValueError, match=message):
        next(stream(data, tokenizer))


def test_a_datasets_directory_gives_the_batches_of_the_same_parquet(
    tokenizer, processor, chat_file, tmp_path
):
    """`Dataset.save_to_disk` directories (text, token ids, chat with Image features; a DatasetDict's train
    split) stream the same batches as Parquet files with the same rows in one row group."""
    datasets = pytest.importorskip("datasets")
    texts = [{"text": doc} for doc in DOCS]
    write_parquet(tmp_path / "text.parquet", texts)
    datasets.Dataset.from_list(texts).save_to_disk(tmp_path / "text-ds")
    datasets.DatasetDict({"train": datasets.Dataset.from_list(texts)}).save_to_disk(tmp_path / "dict-ds")
    for data in ("text-ds", "dict-ds"):
        for rank in (0, 1):
            ours = itertools.islice(stream(tmp_path / data, tokenizer, rank=rank, world_size=2), 12)
            parquet = itertools.islice(
                stream(tmp_path / "text.parquet", tokenizer, rank=rank, world_size=2), 12
            )
            assert same_batches(list(ours), list(parquet))
    check_resume(lambda: stream(tmp_path / "text-ds", tokenizer, rank=1, world_size=2, batch_size=1),
                 taken=10, then=20)

    ids = _token_rows(tokenizer, DOCS)
    write_parquet(tmp_path / "ids.parquet", ids)
    datasets.Dataset.from_list(ids).save_to_disk(tmp_path / "ids-ds")
    assert same_batches(list(itertools.islice(stream(tmp_path / "ids-ds", tokenizer), 8)),
                        list(itertools.islice(stream(tmp_path / "ids.parquet", tokenizer), 8)))

    rows = pq.read_table(chat_file).to_pylist()
    features = datasets.Features({
        "messages": datasets.List({"role": datasets.Value("string"),
                                   "content": datasets.List({"type": datasets.Value("string"),
                                                             "text": datasets.Value("string")})}),
        "images": datasets.List(datasets.Image()),
    })
    datasets.Dataset.from_list(rows, features=features).save_to_disk(tmp_path / "chat-ds")
    write_parquet(tmp_path / "chat.parquet", rows)
    ours = stream(tmp_path / "chat-ds", processor, ctx_len=64, batch_size=3)
    assert same_batches([next(ours) for _ in range(3)],
                        list(itertools.islice(stream(tmp_path / "chat.parquet", processor, ctx_len=64,
                                                     batch_size=3), 3)))


def test_a_datasets_dict_without_a_train_split_names_its_splits(tokenizer, tmp_path):
    datasets = pytest.importorskip("datasets")
    split = datasets.Dataset.from_list([{"text": doc} for doc in DOCS])
    datasets.DatasetDict({"validation": split}).save_to_disk(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"has no 'train' split; name one: .*ds/<split>, with <split> one of "
                                         r"validation"):
        stream(tmp_path / "ds", tokenizer)
    assert next(stream(tmp_path / "ds" / "validation", tokenizer)).num_tokens == 16


def test_a_hub_dataset_that_is_not_cached_fails_offline_in_one_sentence(tokenizer, monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub

    # What HF_HUB_OFFLINE=1 sets when given before these packages are imported.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    with pytest.raises(ValueError, match=r"--data hf:nobody/nothing:default:test: the dataset could not be "
                                         r"loaded from the hub or the local cache \(.*\); offline, only"):
        stream("hf:nobody/nothing:default:test", tokenizer)
