"""Slice-reading loading: each of two gloo ranks reads only its slices of the safetensors files, up to the
last target layer, and gives the single-process hidden states (fp32; rtol 1e-5, atol 1e-5). Under pipeline
parallelism (PP 2, TP 2 x PP 2) each rank reads only its stage's decoder layers, later stages nothing
before them (embedding, vision tower), and every stage gives the single-process hidden state; loaded for
evaluation (to the logits) the final norm and LM head are on the last stage only, which gives the
single-process logits (Gemma 2: read from its tied, scaled embedding, and capped)."""

import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from megasae import TopKSaeConfig, get_peft_sae_model
from megasae.parallel import init_distributed
from megasae.parallel.architectures import stage_layers
from megasae.parallel.loading import load_host_tensor_parallel, load_sharded_host
from megasae.parallel.pipeline import PipelineStage, stage_targets

from data_fixtures import tiny_qwen25vl_processor, tiny_text_tokenizer
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


def _load_rank(rank, world_size, path, target, inputs, expected, num_layers):
    par = init_distributed("cpu", tp=world_size)
    model = load_sharded_host(path, [target], par.tp_group, par.tp_rank, par.tp_size)
    assert len(decoder_layers(model)) == num_layers  # layers after the target are never built
    assert model.lm_head.weight.is_meta  # nor is the LM head read
    torch.testing.assert_close(hidden_after(model, num_layers - 1, inputs), expected, **TOLERANCE)


def test_llama_from_several_safetensors_files(tmp_path):
    model = tiny_llama()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    inputs = {"input_ids": torch.randint(0, 96, (2, 12))}
    run_ranks(_load_rank, 2, tmp_path, "model.layers.0", inputs, hidden_after(model, 0, inputs), 1)


def test_qwen25vl_checkpoint_with_pre_transformers5_names(tmp_path):
    processor = tiny_qwen25vl_processor()
    model = tiny_qwen25vl(processor)
    model.save_pretrained(tmp_path)
    # Published Qwen2.5-VL checkpoints name the text model "model." and the vision tower "visual.".
    weights = load_file(tmp_path / "model.safetensors")
    renamed = {k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
               for k, v in weights.items()}
    assert any(k.startswith("visual.") for k in renamed)
    save_file(renamed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    inputs = image_chat_inputs(processor)
    expected = hidden_after(model, 1, inputs)
    run_ranks(_load_rank, 2, tmp_path, "model.language_model.layers.1", inputs, expected, 2)


def _status(key):
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith(key)).split()[1]) * 1024


def _loading_rank(rank, world_size, path, result_file):
    from megasae.parallel import loading

    par = init_distributed("cpu", tp=world_size)
    reads, read = [], loading._read
    loading._read = lambda *args: reads.append(read(*args)) or reads[-1]  # every tensor the loader reads
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset this process's peak resident set (VmHWM) to its current size
    before = _status("VmRSS:")
    model = load_sharded_host(path, ["model.layers.1"], par.tp_group, par.tp_rank, par.tp_size)
    if rank == 0:
        torch.save({
            "peak": _status("VmHWM:") - before,
            "read": sum(t.numel() * t.element_size() for t in reads),
            "largest_read": max(t.numel() * t.element_size() for t in reads),
            "held": sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta),
        }, result_file)


def save_eight_layer_llama(path) -> tuple[int, int]:
    """A 124 MiB random Llama saved in 50 MB shards with a tokenizer: (its bytes, its largest weight's
    bytes)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path, max_shard_size="50MB")
    tiny_text_tokenizer().save_pretrained(path)
    return 4 * sum(p.numel() for p in model.parameters()), 4 * max(p.numel() for p in model.parameters())


def test_a_rank_reads_and_holds_only_its_slices(tmp_path):
    full, largest = save_eight_layer_llama(tmp_path / "host")
    run_ranks(_loading_rank, 2, tmp_path / "host", tmp_path / "m.pt")
    m = torch.load(tmp_path / "m.pt")
    print(f"full model {full / 2**20:.1f} MiB; TP rank 0 of 2 (target layer 1) "
          f"read {m['read'] / 2**20:.1f} MiB, at most {m['largest_read'] / 2**20:.2f} MiB at once "
          f"(largest full weight {largest / 2**20:.2f} MiB); "
          f"its peak resident set grew by {m['peak'] / 2**20:.1f} MiB while loading")
    assert m["read"] == m["held"]  # nothing read is thrown away
    assert m["largest_read"] <= largest / 2  # never a full weight, only this rank's half
    assert m["held"] < 0.15 * full  # 2 of 8 layers, half of each, half the embedding
    assert m["peak"] < 0.25 * full


# -- pipeline stages: each rank reads only its stage's decoder layers --------------------------------------

STAGE_TARGETS = ["model.layers.1", "model.layers.3"]  # 4 layers: stage 0 owns layers 0-1, stage 1 layers 2-3


def _owners(model, prefix: str) -> set:
    """What this rank's real parameters belong to: decoder layer indices, or the module's name elsewhere."""
    layer = re.compile(re.escape(prefix) + r"\.(\d+)\.")
    return {int(m[1]) if (m := layer.match(n)) else n.rpartition(".")[0]
            for n, p in model.named_parameters() if not p.is_meta}


def _stage_rank(rank, world_size, path, tp, inputs, expected):
    par = init_distributed("cpu", tp=tp, pp=2)
    host, _ = load_host_tensor_parallel(path, STAGE_TARGETS, par)
    mine = stage_layers(4, 2)[par.pp_rank]
    before = {"model.embed_tokens", "model.norm"} if par.pp_rank == 0 else set()
    assert _owners(host, "model.layers") == set(mine) | before
    meta = [n for n, p in host.named_parameters() if p.is_meta]
    assert meta == (["lm_head.weight"] if par.pp_rank == 0 else [])  # a later stage has no LM head at all
    stage = PipelineStage(host, par, last_layer=3)
    torch.manual_seed(0)
    [target] = stage_targets(stage.arch, STAGE_TARGETS, 3, par)
    model = get_peft_sae_model(host, TopKSaeConfig(k=4, num_latents=32, target_modules=[target])).train()
    with model.capture(token_mask=inputs["attention_mask"].bool()) as outputs:
        hidden = stage.forward(model, **inputs)
    torch.testing.assert_close(hidden, expected[par.pp_rank], **TOLERANCE)
    assert outputs[target].x_hat.shape == (int(inputs["attention_mask"].sum()), 64)
    # Loaded for evaluation (to the logits): the last stage, not the first, holds the final norm and LM head.
    whole, _ = load_host_tensor_parallel(path, None, par)
    tail = {"model.norm", "lm_head"} if par.pp_rank == 1 else {"model.embed_tokens"}
    assert _owners(whole, "model.layers") == set(mine) | tail
    assert not any(p.is_meta for p in whole.parameters())
    logits = PipelineStage(whole, par, last_layer=3).logits(whole, **inputs)
    if par.pp_rank == 1:
        torch.testing.assert_close(logits, expected[2], **TOLERANCE)


def _save_four_layers(path, family="llama"):
    model = TEXT_HOSTS[family](kv_heads=2, num_hidden_layers=4)
    model.save_pretrained(path, max_shard_size="100KB")
    tiny_text_tokenizer().save_pretrained(path)  # load_host_tensor_parallel returns the tokenizer too
    ids = torch.randint(0, 96, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        logits = model(**inputs).logits
    return inputs, [hidden_after(model, 1, inputs), hidden_after(model, 3, inputs), logits]


def test_pp2_stages_read_only_their_layers(tmp_path):
    inputs, expected = _save_four_layers(tmp_path)
    run_ranks(_stage_rank, 2, tmp_path, 1, inputs, expected)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3"])
def test_tp2_pp2_stages_read_only_their_slices_of_their_layers(tmp_path, family):
    inputs, expected = _save_four_layers(tmp_path, family)
    run_ranks(_stage_rank, 4, tmp_path, 2, inputs, expected)


def _qwen25vl_stage_rank(rank, world_size, path, inputs, expected):
    par = init_distributed("cpu", pp=2)
    layers = stage_layers(2, 2)[par.pp_rank]
    host = load_sharded_host(path, ["model.language_model.layers.1"], par.tp_group, par.tp_rank, par.tp_size,
                             layers=layers)
    owners = _owners(host, "model.language_model.layers")
    assert {o for o in owners if isinstance(o, int)} == set(layers)
    others = {o for o in owners if isinstance(o, str)}
    if par.pp_rank == 0:  # the embedding, the vision tower and the final norm
        assert {"model.language_model.embed_tokens", "model.language_model.norm"} < others
        assert any(o.startswith("model.visual.") for o in others)
    else:
        assert not others
    stage = PipelineStage(host, par, last_layer=1)
    torch.testing.assert_close(stage.forward(host, **inputs), expected[par.pp_rank], **TOLERANCE)


def test_pp2_qwen25vl_later_stage_reads_no_vision_tower(tmp_path):
    processor = tiny_qwen25vl_processor()
    model = tiny_qwen25vl(processor)
    model.save_pretrained(tmp_path)
    inputs = image_chat_inputs(processor)
    expected = [hidden_after(model, 0, inputs), hidden_after(model, 1, inputs)]
    run_ranks(_qwen25vl_stage_rank, 2, tmp_path, inputs, expected)


def _stage_memory_rank(rank, world_size, path, result_dir):
    from megasae.parallel import loading

    par = init_distributed("cpu", tp=2, pp=2)
    reads, read = [], loading._read
    loading._read = lambda *args: reads.append(read(*args)) or reads[-1]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset this process's peak resident set (VmHWM) to its current size
    before = _status("VmRSS:")
    model, _ = load_host_tensor_parallel(path, ["model.layers.7"], par)
    torch.save({
        "owners": _owners(model, "model.layers"),
        "peak": _status("VmHWM:") - before,
        "read": sum(t.numel() * t.element_size() for t in reads),
        "held": sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta),
    }, result_dir / f"{rank}.pt")


def test_tp2_pp2_rank_holds_a_quarter_of_the_model(tmp_path):
    full, _ = save_eight_layer_llama(tmp_path / "host")
    run_ranks(_stage_memory_rank, 4, tmp_path / "host", tmp_path)
    for rank in range(4):
        m = torch.load(tmp_path / f"{rank}.pt")
        print(f"full model {full / 2**20:.1f} MiB; TP2 x PP2 rank {rank} (target layer 7) holds "
              f"{m['held'] / 2**20:.1f} MiB ({m['held'] / full:.0%}); "
              f"its peak resident set grew by {m['peak'] / 2**20:.1f} MiB while loading")
        stage = range(4) if rank < 2 else range(4, 8)
        assert m["owners"] == set(stage) | ({"model.embed_tokens", "model.norm"} if rank < 2 else set())
        assert m["read"] == m["held"]  # nothing read is thrown away
        assert m["held"] < 0.3 * full  # half the layers, half of each (and half the embedding on stage 0)
        assert m["peak"] < 0.4 * full
