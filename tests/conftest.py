import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLVideoProcessor,
)

from helpers import WORDS, save_adapter

torch.use_deterministic_algorithms(True)

# The training runs' text: another word list than the eval data's `WORDS`.
TEXT_WORDS = "the cat sat on a mat while dogs ran in parks and birds sang over green hills".split()


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
    processor = Qwen2_5_VLProcessor(image_processor=tiny.image_processor, tokenizer=tiny.tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=tiny.chat_template)
    processor.save_pretrained(path)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tiny.tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
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


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """200 Parquet rows of 40 random words each, for the training runs."""
    from data_fixtures import write_parquet

    path = tmp_path_factory.mktemp("data") / "text.parquet"
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(200):
        words = torch.randint(0, len(TEXT_WORDS), (40,), generator=g).tolist()
        rows.append({"text": " ".join(TEXT_WORDS[i] for i in words)})
    write_parquet(path, rows)
    return path


@pytest.fixture(scope="module")
def adapter(host_dir, tmp_path_factory):
    """A random SAE on `host_dir`'s layer 1, saved once per module."""
    return save_adapter(host_dir, tmp_path_factory.mktemp("inspect") / "adapter")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
