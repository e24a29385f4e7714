"""`megasae train` on the other host families: Qwen2 on text, Qwen2.5-VL on image+text chat rows."""

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from megasae import PeftSaeModel
from megasae.models import load_host_model
from megasae.train import TrainConfig, Trainer

from data_fixtures import tiny_text_tokenizer, write_parquet


def run(tmp_path, model_dir, data, **overrides):
    fields = dict(model=str(model_dir), data=str(data), k=4, expansion_factor=4, ctx_len=64,
                  micro_batch_size=2, batch_tokens=128, max_tokens=128 * 4, warmup_steps=1, log_every=1,
                  wandb_mode="disabled", output_dir=tmp_path / "run", device="cpu", lr=3e-3)
    fields.update(overrides)
    out = Trainer(TrainConfig(**fields)).fit()
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_qwen2_on_text(tmp_path):
    tokenizer = tiny_text_tokenizer()
    torch.manual_seed(0)
    Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                 eos_token_id=tokenizer.eos_token_id)).save_pretrained(tmp_path / "host")
    tokenizer.save_pretrained(tmp_path / "host")
    data = write_parquet(tmp_path / "text.parquet", [{"text": f"document {i} " * 20} for i in range(40)])
    records = run(tmp_path, tmp_path / "host", data, target_modules=("model.layers.0",))
    assert len(records) == 4 and all(0 < r["fvu"] < 10 for r in records)
    host, _ = load_host_model(tmp_path / "host")
    PeftSaeModel.from_pretrained(host, tmp_path / "run")


@pytest.mark.parametrize("tokens", ["all", "image"])
def test_qwen25vl_on_image_chat_rows(tmp_path, qwen25vl_dir, chat_data, tokens):
    records = run(tmp_path, qwen25vl_dir, chat_data, target_modules=("model.language_model.layers.1",),
                  tokens=tokens, outlier_factor=None)
    trained = [r["trained_tokens"] for r in records]
    # Each row holds one 56x56 image: 4 image-pad positions, and 2 rows per micro-batch.
    if tokens == "image":
        assert trained == [8.0] * 4
    else:
        assert all(t > 8 for t in trained)
    assert all(0 < r["fvu"] < 10 for r in records)
