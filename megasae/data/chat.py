"""One chat row to model inputs: chat template, image decoding, the processor, truncation to ctx_len."""

from __future__ import annotations

import io

import torch
from PIL import Image, UnidentifiedImageError

from megasae.data.masks import tokenizer_of


def decode_image(data: bytes | dict, where: str, column: str, index: int) -> Image.Image:
    """Encoded image bytes, or a `datasets` Image feature's {"bytes", "path"} holding them."""
    if isinstance(data, dict):
        data = data.get("bytes")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()  # open() reads only the header; a truncated file fails here
    except (UnidentifiedImageError, OSError, TypeError, ValueError) as err:
        raise ValueError(
            f"{where}: image {index} of column '{column}' is not a valid image ({err})."
        ) from None
    return image


def _parts(content) -> list[dict]:
    """Content parts without the keys Parquet fills with null (a struct column has every part's keys)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [{key: value for key, value in part.items() if value is not None} for part in content]


def _messages(raw, where: str, multimodal: bool) -> tuple[list[dict], int]:
    """The messages for the chat template, and how many image parts they hold.

    A processor's template takes content parts; a plain tokenizer's template expects content strings,
    so for a tokenizer the text parts are joined.
    """
    messages, num_images = [], 0
    for message in raw:
        parts = _parts(message.get("content") or "")
        num_images += sum(part.get("type") == "image" for part in parts)
        if multimodal:
            content = parts
        elif num_images:
            raise ValueError(
                f"{where} has image parts, but the processor is a text tokenizer: load the model's processor."
            )
        else:
            content = "".join(part.get("text", "") for part in parts)
        messages.append({"role": message["role"], "content": content})
    return messages, num_images


def _image_runs(is_image: torch.Tensor) -> int:
    """How many separate runs of image tokens (one per image: each image's placeholders are contiguous
    and wrapped in vision start/end tokens)."""
    starts = is_image.clone()
    starts[1:] &= ~is_image[:-1]
    return int(starts.sum())


def _truncate(inputs: dict, image_keys: set[str], ctx_len: int, image_ids: list[int]) -> dict:
    """Cut to ctx_len tokens without splitting an image: a cut image's placeholders would no longer match
    its pixel features, so the cut moves before it and its pixels are dropped with it."""
    ids = inputs["input_ids"][0]
    if len(ids) <= ctx_len:
        return inputs
    is_image = torch.isin(ids, torch.tensor(image_ids, dtype=torch.long))
    cut = ctx_len
    while cut > 0 and is_image[cut - 1] and is_image[cut]:
        cut -= 1
    out = {key: value[:, :cut] for key, value in inputs.items() if key not in image_keys}
    kept = _image_runs(is_image[:cut])
    if kept and "image_grid_thw" in inputs:  # Qwen-style: prod(t, h, w) rows of pixel_values per image
        grid = inputs["image_grid_thw"][:kept]
        out.update(pixel_values=inputs["pixel_values"][: int(grid.prod(-1).sum())], image_grid_thw=grid)
    elif kept:  # one entry per image
        out.update({key: inputs[key][:kept] for key in image_keys if key in inputs})
    return out


class ChatEncoder:
    """Turns chat rows into per-row model inputs (batch dimension 1) for one processor."""

    def __init__(
        self, processor, ctx_len: int, messages_column: str, images_column: str, image_ids: list[int]
    ):
        self.processor, self.tokenizer = processor, tokenizer_of(processor)
        self.image_processor = getattr(processor, "image_processor", None)
        # What the image processor returns is per image; everything else the processor returns is per token.
        self.image_keys = (
            set(self.image_processor.model_input_names) if self.image_processor is not None else set()
        )
        self.ctx_len, self.image_ids = ctx_len, image_ids
        self.messages_column, self.images_column = messages_column, images_column

    def render(self, row: dict, where: str) -> tuple[str, list, str]:
        """(the chat template's text, the row's encoded images, where): the cheap half, without the images'
        processing."""
        messages, num_parts = _messages(
            row[self.messages_column] or [], where, self.image_processor is not None
        )
        raw_images = row.get(self.images_column) or []
        if num_parts != len(raw_images):
            raise ValueError(
                f"{where} has {num_parts} image parts in '{self.messages_column}' but {len(raw_images)} "
                f"images in '{self.images_column}'; each image part needs one image, in order."
            )
        return self.processor.apply_chat_template(messages, tokenize=False), raw_images, where

    def has_tokens(self, text: str) -> bool:
        """Whether a rendered row has any token, without processing its images (an image part renders to
        placeholder tokens, so a text without tokens has no images either)."""
        return bool(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, text: str, raw_images: list, where: str) -> dict[str, torch.Tensor] | None:
        """The model inputs of a rendered row (batch dimension 1), cut to ctx_len; None when it has no
        tokens."""
        images = [decode_image(data, where, self.images_column, i) for i, data in enumerate(raw_images)]
        # The template already wrote any BOS it wants.
        if self.image_processor is not None:
            inputs = self.processor(
                text=[text], images=images or None, return_tensors="pt", add_special_tokens=False
            )
        else:
            inputs = self.tokenizer([text], return_tensors="pt", add_special_tokens=False)
        if inputs["input_ids"].shape[1] == 0:
            return None
        return _truncate(dict(inputs), self.image_keys, self.ctx_len, self.image_ids)


def collate(
    rows: list[dict[str, torch.Tensor]], image_keys: set[str], pad_id: int
) -> dict[str, torch.Tensor]:
    """Pad per-token tensors on the right to the longest row; concatenate per-image tensors in row order."""
    length = max(row["input_ids"].shape[1] for row in rows)
    batch = {}
    for key in dict.fromkeys(key for row in rows for key in row):
        values = [row[key] for row in rows if key in row]
        if key in image_keys:
            batch[key] = torch.cat(values)
        else:
            fill = pad_id if key == "input_ids" else 0
            batch[key] = torch.cat(
                [torch.nn.functional.pad(v, (0, length - v.shape[1]), value=fill) for v in values]
            )
    return batch
