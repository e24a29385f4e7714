"""Tiny random hosts for the parallelism tests (hidden 64, 2 layers) and a hook that records a layer's output.

TEXT_HOSTS builds a text host of each family megasae splits; Gemma 2's sliding window (4) is shorter than
the test sequences and its caps are low enough to bite, and Gemma 2's and Qwen 3's norms (zeros and ones
at init) are drawn at random, so that every one of them is exercised."""

from __future__ import annotations

import io

import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import helpers

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)


def tiny_llama(kv_heads: int = 2, **config) -> LlamaForCausalLM:
    """helpers.tiny_llama at this module's size (SMALL, vocab 96)."""
    return helpers.tiny_llama(**{**SMALL, "vocab_size": 96, "num_key_value_heads": kv_heads, **config})


def tiny_qwen2(kv_heads: int = 1, **config) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    fields = {**SMALL, "vocab_size": 96, "num_key_value_heads": kv_heads, **config}
    return Qwen2ForCausalLM(Qwen2Config(**fields)).eval()


@torch.no_grad()
def _random_norms(model):
    for name, param in model.named_parameters():
        if "norm" in name:
            param.add_(0.2 * torch.randn_like(param))
    return model.eval()


def tiny_gemma2(kv_heads: int = 2, **config) -> Gemma2ForCausalLM:
    """Layers alternate sliding-window (even) and global attention; embeddings tied and scaled by 8."""
    torch.manual_seed(0)
    fields = {**SMALL, "vocab_size": 96, "num_key_value_heads": kv_heads, "head_dim": 16,
              "query_pre_attn_scalar": 16, "sliding_window": 4, "attn_logit_softcapping": 2.0,
              "final_logit_softcapping": 1.0, **config}
    return _random_norms(Gemma2ForCausalLM(Gemma2Config(**fields)))


def tiny_qwen3(kv_heads: int = 1, **config) -> Qwen3ForCausalLM:
    """q_norm and k_norm over each head's 16 dimensions."""
    torch.manual_seed(0)
    fields = {**SMALL, "vocab_size": 96, "num_key_value_heads": kv_heads, "head_dim": 16, **config}
    return _random_norms(Qwen3ForCausalLM(Qwen3Config(**fields)))


TEXT_HOSTS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gemma2": tiny_gemma2, "qwen3": tiny_qwen3}


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
    from PIL import Image

    from data_fixtures import png_bytes

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
    """The residual stream after decoder layer `layer` (the SAE's target) on `inputs`; the forward stops
    there."""
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
