"""Tiny random hosts for the parallelism tests (hidden 64, 2 layers) and a hook that records a layer's output."""

from __future__ import annotations

import io

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)


def tiny_llama(kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=96, num_key_value_heads=kv_heads, **SMALL)).eval()


def tiny_qwen2(kv_heads: int = 1) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=96, num_key_value_heads=kv_heads, **SMALL)).eval()


def tiny_qwen25vl(processor) -> Qwen2_5_VLForConditionalGeneration:
    from data_fixtures import qwen25vl_token_ids

    text = dict(SMALL, vocab_size=len(processor.tokenizer), num_key_value_heads=2,
                rope_scaling={"type": "mrope", "mrope_section": [2, 2, 4]})
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                  fullatt_block_indexes=[0])
    torch.manual_seed(0)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **qwen25vl_token_ids(processor))
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def image_chat_inputs(processor) -> dict[str, torch.Tensor]:
    """Two chat rows with one image each: input ids, attention mask, pixel values and image grid."""
    from data_fixtures import png_bytes
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    images = [Image.open(io.BytesIO(png_bytes(56, 56, seed))) for seed in range(2)]
    return dict(processor(text=[text, text], images=images, return_tensors="pt"))


def decoder_layers(model) -> torch.nn.ModuleList:
    inner = model.model
    return getattr(inner, "language_model", inner).layers


class _Stop(Exception):
    pass


@torch.no_grad()
def hidden_after(model, layer: int, inputs: dict) -> torch.Tensor:
    """The residual stream after decoder layer `layer` (the SAE's target) on `inputs`; the forward stops there."""
    seen = []

    def record(module, args, out):
        seen.append(out[0] if isinstance(out, tuple) else out)
        raise _Stop

    handle = decoder_layers(model)[layer].register_forward_hook(record)
    try:
        model(**inputs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]
