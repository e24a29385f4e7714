"""Evaluation under tensor parallelism: `megasae eval --tp 2` writes one process's eval.json, and
`megasae train --tp 2 --eval-every` runs the held-out forward on both TP ranks (the host and the SAE's
latents are split between them) and logs on rank 0 the same numbers as one process."""

import json

import pytest
from transformers import LlamaConfig, LlamaForCausalLM

from megasae.eval import EvalConfig, run_eval
from megasae.train import TrainConfig, Trainer

from distributed import run_ranks
from helpers import save_adapter

TARGET = "model.layers.1"


def _train_rank(rank, world_size, cfg):
    Trainer(cfg).fit()


def test_eval_every_under_tensor_parallelism_logs_what_one_process_logs(host_dir, words_data, tmp_path):
    def config(out, **overrides):
        return TrainConfig(model=str(host_dir), data=str(words_data), target_modules=(TARGET,), k=4,
                           expansion_factor=4, ctx_len=16, micro_batch_size=4, batch_tokens=64,
                           max_tokens=64 * 2, warmup_steps=1, log_every=2, eval_every=1,
                           eval_data=str(words_data), eval_tokens=128, wandb_mode="disabled", output_dir=out,
                           device="cpu", lr=3e-3, **overrides)

    Trainer(config(tmp_path / "tp1")).fit()
    run_ranks(_train_rank, 2, config(tmp_path / "tp2", tp=2))
    one, two = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                for name in ("tp1", "tp2"))
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
    for a, b in zip(one, two):
        for key in ("eval/fvu", "eval/l0", "eval/dead_pct"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key


def _eval_rank(rank, world_size, cfg):
    run_eval(cfg)


@pytest.mark.parametrize("tied", [False, True])
def test_eval_under_tensor_parallelism_reports_what_one_process_reports(tmp_path, words_data, tied):
    """The whole host (LM head replicated; read from the embedding when tied) and the SAE's latents split
    over 2 ranks give one process's eval.json."""
    from data_fixtures import tiny_text_tokenizer

    host_dir = tmp_path / "host"
    tokenizer = tiny_text_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(host_dir)
    tokenizer.save_pretrained(host_dir)
    adapter = save_adapter(host_dir, tmp_path / "adapter")

    def config_for(out, **overrides):
        return EvalConfig(adapter=adapter, model=str(host_dir), data=str(words_data), max_tokens=160,
                          batch_size=4, ctx_len=16, seed=3, device="cpu", output_dir=out, **overrides)

    run_eval(config_for(tmp_path / "tp1"))
    run_ranks(_eval_rank, 2, config_for(tmp_path / "tp2", tp=2))
    one, two = (json.loads((tmp_path / name / "eval.json").read_text())["targets"][TARGET]["groups"]["all"]
                for name in ("tp1", "tp2"))
    assert two["tokens"] == one["tokens"] > 0
    assert two["firing_frequency"] == one["firing_frequency"]
    for key in ("fvu", "cosine_similarity", "l0", "ce_clean", "ce_spliced", "ce_ablated", "kl_clean_spliced"):
        assert two[key] == pytest.approx(one[key], rel=1e-4, abs=1e-6), key
