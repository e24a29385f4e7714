"""Which token positions the SAEs train on (DESIGN.md, "Token mask").

Excluded always: padding, position 0 of every sequence, and special tokens, except the image
placeholder tokens: in Qwen2.5-VL the image patches enter the language model at `<|image_pad|>`
positions, so those are image positions, not special ones.
"""

from __future__ import annotations

import torch

TOKEN_CHOICES = ("all", "text", "image")


def tokenizer_of(processor):
    """The tokenizer of a processor, or the tokenizer itself."""
    return getattr(processor, "tokenizer", processor)


def image_token_ids(processor) -> list[int]:
    """The ids whose positions carry image features: the processor's image token, if it has one."""
    token_id = getattr(processor, "image_token_id", None)
    if token_id is None and getattr(processor, "image_token", None) is not None:
        token_id = tokenizer_of(processor).convert_tokens_to_ids(processor.image_token)
    return [] if token_id is None else [int(token_id)]


def special_token_ids(tokenizer) -> list[int]:
    """The named special tokens plus every added token marked special (chat markers such as <|im_start|>
    are added tokens that transformers 5 does not list in ``all_special_ids``)."""
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in tokenizer.added_tokens_decoder.items() if token.special)
    return sorted(ids)


class TokenMasker:
    """Computes ``token_mask`` for batches of one processor."""

    def __init__(self, processor, tokens: str):
        if tokens not in TOKEN_CHOICES:
            raise ValueError(f"tokens must be one of {', '.join(TOKEN_CHOICES)}, got {tokens!r}.")
        images = image_token_ids(processor)
        if tokens == "image" and not images:
            raise ValueError(
                f"tokens='image' needs a processor with an image token; {type(processor).__name__} has none."
            )
        self.tokens = tokens
        self.image_ids = torch.tensor(images, dtype=torch.long)
        special = set(special_token_ids(tokenizer_of(processor))) - set(images)
        self.excluded_ids = torch.tensor(sorted(special), dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.bool() & ~torch.isin(input_ids, self.excluded_ids)
        mask[:, 0] = False  # position 0 holds the attention sink, whatever its token
        is_image = torch.isin(input_ids, self.image_ids)
        if self.tokens == "text":
            mask &= ~is_image
        elif self.tokens == "image":
            mask &= is_image
        return mask
