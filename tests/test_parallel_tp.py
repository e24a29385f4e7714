"""Tensor-parallel hosts: two gloo ranks sharding a tiny model in place give the single-process hidden
states at the target layer (fp32; all-reduces reorder sums, hence rtol 1e-5, atol 1e-5)."""

import pytest
import torch
from transformers import Qwen2_5_VLConfig

from megasae.parallel import check_parallel_sizes, init_distributed, shard_model
from megasae.parallel.architectures import Layout
from megasae.parallel.layers import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding

from data_fixtures import tiny_qwen25vl_processor
from distributed import run_ranks
from parallel_hosts import (
    TEXT_HOSTS,
    decoder_layers,
    hidden_after,
    image_chat_inputs,
    tiny_llama,
    tiny_qwen25vl,
)

TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}


def _tp_rank(rank, world_size, cases):
    par = init_distributed("cpu", tp=world_size)
    assert par.tp_size == 2 and par.tp_rank == rank and par.dp_group is None
    for model, inputs, expected, kv_rows in cases:
        shard_model(model, par.tp_group, par.tp_rank, par.tp_size)
        attention = decoder_layers(model)[0].self_attn
        assert isinstance(attention.q_proj, ColumnParallelLinear) and attention.q_proj.out_features == 32
        assert isinstance(attention.o_proj, RowParallelLinear) and attention.o_proj.in_features == 32
        assert attention.k_proj.out_features == kv_rows
        torch.testing.assert_close(hidden_after(model, 1, inputs), expected, **TOLERANCE)


def _case(model, inputs, kv_rows):
    return model, inputs, hidden_after(model, 1, inputs), kv_rows


@pytest.mark.parametrize("family", ["llama-qwen2", "gemma2-qwen3"])
def test_text_models(family):
    """Each pair: one KV head of two per rank, then one KV head replicated on both."""
    ids = torch.randint(0, 96, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the attention mask is threaded through the sharded attention
    two_kv, one_kv = (TEXT_HOSTS[name] for name in family.split("-"))
    run_ranks(_tp_rank, 2, [
        _case(two_kv(kv_heads=2), {"input_ids": ids}, kv_rows=16),
        _case(one_kv(kv_heads=1), {"input_ids": ids, "attention_mask": mask}, kv_rows=16),
    ])


def test_qwen25vl_with_an_image():
    processor = tiny_qwen25vl_processor()
    model = tiny_qwen25vl(processor)
    inputs = image_chat_inputs(processor)
    assert (inputs["input_ids"] == model.config.image_token_id).any()
    run_ranks(_tp_rank, 2, [_case(model, inputs, kv_rows=16)])


def test_vocab_parallel_embedding_covers_every_id():
    layout = Layout(q_heads=4, kv_heads=2, head_dim=16, intermediate_size=128, vocab_size=10, tp=4)
    rows = [layout.vocab_rows(r) for r in range(4)]
    assert rows == [(0, 3), (3, 6), (6, 9), (9, 10)]
    table = torch.randn(10, 5)
    ids = torch.tensor([[0, 4, 9, 3]])
    pieces = []
    for start, stop in rows:  # one process: the sum of the ranks' partial lookups is the whole lookup
        emb = VocabParallelEmbedding(start, stop - start, 5, group=None)
        emb.weight.data.copy_(table[start:stop])
        pieces.append(emb(ids))
    torch.testing.assert_close(sum(pieces), table[ids])


def test_qwen25vl_7b_heads_allow_tp_1_2_4():
    config = Qwen2_5_VLConfig(text_config=dict(hidden_size=3584, intermediate_size=18944,
                                               num_attention_heads=28, num_key_value_heads=4,
                                               vocab_size=152064))
    for tp in (1, 2, 4):
        Layout.from_config(config, tp).check("Qwen2.5-VL-7B")
    with pytest.raises(ValueError, match=r"--tp 8: it has 28 query heads, 4 KV heads .* one of \[1, 2, 4\]"):
        Layout.from_config(config, 8).check("Qwen2.5-VL-7B")


def test_indivisible_heads_fail_before_touching_the_model():
    model = tiny_llama()
    with pytest.raises(ValueError, match=r"LlamaForCausalLM cannot be split over --tp 3"):
        shard_model(model, None, 0, 3)
    assert isinstance(decoder_layers(model)[0].self_attn.q_proj, torch.nn.Linear)


def test_world_size_must_be_tp_times_pp_times_dp(monkeypatch):
    with pytest.raises(ValueError, match=r"World size 6 is not tp x pp x dp for --tp 4 --pp 1"):
        check_parallel_sizes(6, 4, 1)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match=r"World size 1 is not tp x pp x dp for --tp 2"):
        init_distributed("cpu", tp=2)
