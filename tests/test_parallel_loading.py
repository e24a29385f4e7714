"""Slice-reading loading: each of two gloo ranks reads only its slices of the safetensors files, up to the
last target layer, and gives the single-process hidden states (fp32; rtol 1e-5, atol 1e-5)."""

import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from megasae.parallel import init_distributed
from megasae.parallel.loading import load_sharded_host

from data_fixtures import tiny_qwen25vl_processor
from distributed import run_ranks
from parallel_hosts import decoder_layers, hidden_after, image_chat_inputs, tiny_llama, tiny_qwen25vl

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


def _loading_rank(rank, world_size, path, result_file):
    from megasae.parallel import loading

    par = init_distributed("cpu", tp=world_size)
    reads, read = [], loading._read
    loading._read = lambda *args: reads.append(read(*args)) or reads[-1]  # every tensor the loader reads

    def status(key):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith(key)).split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset this process's peak resident set (VmHWM) to its current size
    before = status("VmRSS:")
    model = load_sharded_host(path, ["model.layers.1"], par.tp_group, par.tp_rank, par.tp_size)
    if rank == 0:
        torch.save({
            "peak": status("VmHWM:") - before,
            "read": sum(t.numel() * t.element_size() for t in reads),
            "largest_read": max(t.numel() * t.element_size() for t in reads),
            "held": sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta),
        }, result_file)


def test_a_rank_reads_and_holds_only_its_slices(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=4)
    model = LlamaForCausalLM(config)
    full = 4 * sum(p.numel() for p in model.parameters())
    largest = 4 * max(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path / "host", max_shard_size="50MB")
    del model
    run_ranks(_loading_rank, 2, tmp_path / "host", tmp_path / "m.pt")
    m = torch.load(tmp_path / "m.pt")
    print(f"full model {full / 2**20:.1f} MiB; TP rank 0 of 2 (target layer 1) read {m['read'] / 2**20:.1f} MiB, "
          f"at most {m['largest_read'] / 2**20:.2f} MiB at once (largest full weight {largest / 2**20:.2f} MiB); "
          f"its peak resident set grew by {m['peak'] / 2**20:.1f} MiB while loading")
    assert m["read"] == m["held"]  # nothing read is thrown away
    assert m["largest_read"] <= largest / 2  # never a full weight, only this rank's half
    assert m["held"] < 0.15 * full  # 2 of 8 layers, half of each, half the embedding
    assert m["peak"] < 0.25 * full
