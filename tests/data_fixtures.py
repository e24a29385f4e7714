"""Tiny tokenizers, a tiny Qwen2.5-VL processor and Parquet/PNG writers, built locally (no model hub).

The tokenizers are character-level: one token per ASCII character, so any text tokenizes and ids map
back to text exactly (``decode_chars``). For a tiny random Qwen2.5-VL model that matches the processor,
build its config with ``vocab_size=len(processor.tokenizer)`` and ``**qwen25vl_token_ids(processor)``;
the image processor uses Qwen2.5-VL's patch_size 14, temporal_patch_size 2 and merge_size 2, and makes
every image 56x56 pixels in area: 16 patches, 4 `<|image_pad|>` tokens.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

CHATML = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VISION = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
CHARS = [chr(i) for i in range(32, 127)] + ["\n", "\t"]

# ChatML, as Qwen writes it; an image part becomes the placeholder the processor expands per patch group.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
)


def _char_tokenizer(specials: list[str]) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(["<unk>"] + CHARS)}
    model = models.BPE(vocab=vocab, merges=[], unk_token="<unk>")  # no merges: one token per character
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(model), unk_token="<unk>")
    tokenizer.add_tokens(specials, special_tokens=True)
    tokenizer.eos_token = tokenizer.pad_token = "<|endoftext|>"
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_text_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer with ChatML special tokens and a chat template."""
    return _char_tokenizer(CHATML)


class _ImageTextProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL's processor without its video processor, which transformers 5 builds only with
    torchvision; everything the data pipeline uses (template, images, text) is Qwen2_5_VLProcessor's own."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def tiny_qwen25vl_processor() -> Qwen2_5_VLProcessor:
    tokenizer = _char_tokenizer(CHATML + VISION)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=56 * 56)
    return _ImageTextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )


def qwen25vl_token_ids(processor) -> dict[str, int]:
    """The token ids a Qwen2_5_VLConfig needs to match the processor."""
    ids = processor.tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": processor.image_token_id,
        "video_token_id": processor.video_token_id,
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def decode_chars(tokenizer, ids) -> str:
    """Ids of a character-level tokenizer back to text (special tokens spelled out)."""
    return "".join(tokenizer.convert_ids_to_tokens([int(i) for i in ids]))


def write_parquet(path: str | Path, rows: list[dict], row_group_size: int | None = None) -> Path:
    """Write rows (dicts of one schema) as a Parquet file; ``row_group_size`` rows per row group."""
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)
    return Path(path)


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A PNG of random RGB noise."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
