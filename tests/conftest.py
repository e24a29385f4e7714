import pytest
import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLVideoProcessor,
)

torch.use_deterministic_algorithms(True)

WORDS = "a quick brown fox jumps over the lazy dog while seven tired owls hum old songs".split()


class DummyModel(nn.Module):
    """The host model of the original project's README example."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(10, 10)

    def forward(self, x):
        return self.linear(x)


class TwoLayerMLP(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.act = nn.GELU()
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def tiny_llama(seed: int = 0, num_layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def host_dir(tmp_path_factory):
    """A tiny random Llama saved with a character-level tokenizer: a host directory `megasae train` loads."""
    from data_fixtures import tiny_text_tokenizer

    path = tmp_path_factory.mktemp("host")
    tokenizer = tiny_text_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def qwen25vl_dir(tmp_path_factory):
    """A tiny random Qwen2.5-VL saved with its processor: 56x56 images become 4 image tokens."""
    from data_fixtures import qwen25vl_token_ids, tiny_qwen25vl_processor

    path = tmp_path_factory.mktemp("qwen25vl")
    tiny = tiny_qwen25vl_processor()
    # The saved processor is the real one (its video processor needs torchvision, the `vl` extra).
    Qwen2_5_VLProcessor(image_processor=tiny.image_processor, tokenizer=tiny.tokenizer,
                        video_processor=Qwen2VLVideoProcessor(), chat_template=tiny.chat_template).save_pretrained(path)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tiny.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        **qwen25vl_token_ids(tiny),
    )
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory):
    """12 chat rows, each one 56x56 noise image and a question, for the Qwen2.5-VL host."""
    from data_fixtures import png_bytes, write_parquet

    rows = []
    for i in range(12):
        content = [{"type": "image"}, {"type": "text", "text": f"what is in picture {i}?"}]
        rows.append({
            "messages": [{"role": "user", "content": content},
                         {"role": "assistant", "content": [{"type": "text", "text": "noise, mostly."}]}],
            "images": [png_bytes(56, 56, seed=i)],
        })
    return write_parquet(tmp_path_factory.mktemp("chat") / "chat.parquet", rows)


@pytest.fixture(scope="module")
def words_data(tmp_path_factory):
    """60 Parquet rows of 30 random words each: about 9,000 characters of plain text."""
    from data_fixtures import write_parquet

    g = torch.Generator().manual_seed(1)
    rows = [{"text": " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (30,), generator=g).tolist())}
            for _ in range(60)]
    return write_parquet(tmp_path_factory.mktemp("eval-data") / "text.parquet", rows)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
