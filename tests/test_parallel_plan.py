"""`megasae plan`: per-rank memory from a config alone, checked against the parameters of real (tiny) modules
after sharding and against numbers computed by hand."""

import dataclasses
import json
from pathlib import Path

import pytest
from transformers import LlamaConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from megasae.cli import main as cli_main
from megasae.parallel import shard_model
from megasae.parallel.architectures import stage_layers
from megasae.plan import PlanConfig, estimate

from parallel_hosts import SMALL, TEXT_HOSTS, decoder_layers

# estimate() takes the host's config itself, so the model directory is never read.
GIVEN = Path("config-given-to-estimate")
VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64)


def _numel(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_host_weights_equal_the_sharded_modules(tp):
    config = Qwen2_5_VLConfig(text_config=dict(SMALL, vocab_size=90, num_key_value_heads=2),
                              vision_config=VISION)
    model = Qwen2_5_VLForConditionalGeneration(config)
    shard_model(model, None, 0, tp)  # rank 0's shapes; no forward, so no group is needed
    inner = model.model
    real = _numel([decoder_layers(model)[0], inner.language_model.embed_tokens, inner.visual])
    cfg = PlanConfig(model=GIVEN, tp=tp, target_modules=("model.language_model.layers.0",), dtype="float32")
    [stage] = estimate(cfg, config)
    assert stage.host_weights == 4 * real


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("family", TEXT_HOSTS)
def test_text_families_host_weights_equal_the_sharded_modules(family, tp):
    """Gemma 2's four norms per layer and tied embedding, Qwen 3's per-head q/k norms, Qwen2's q/k/v biases;
    at tp 4 each of the two KV heads is held by two ranks."""
    model = TEXT_HOSTS[family](kv_heads=2)
    config = model.config
    shard_model(model, None, 0, tp)
    real = _numel([decoder_layers(model)[0], model.model.embed_tokens])
    cfg = PlanConfig(model=GIVEN, tp=tp, target_modules=("model.layers.0",), dtype="float32")
    [stage] = estimate(cfg, config)
    assert stage.host_weights == 4 * real


def test_gemma2_2b_tp2_host_weights_by_hand(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "gemma2", "hidden_size": 2304, "intermediate_size": 9216, "num_attention_heads": 8,
        "num_key_value_heads": 4, "head_dim": 256, "num_hidden_layers": 26, "vocab_size": 256000,
    }))
    cli_main(["plan", "--model", str(tmp_path), "--tp", "2", "--target-modules", "model.layers.12"])
    out = capsys.readouterr().out
    # Per rank: 13 layers of 2304 * 1024 (q) + 2 * 2304 * 512 (k, v) + 1024 * 2304 (o) + 3 * 2304 * 4608 (MLP)
    # + 4 * 2304 (norms) = 38,937,600 parameters; half the (tied) embedding, 128000 * 2304.
    params = 13 * 38_937_600 + 128_000 * 2304
    assert f"{2 * params / 1024**3:.2f}" in out  # 1.49 GiB of bf16
    assert out.startswith("gemma2: 26 layers, hidden 2304, 8 query / 4 KV heads")


def test_hand_computed_tp2_pp2():
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2)
    cfg = PlanConfig(model=GIVEN, tp=2, pp=2, target_modules=("model.layers.2",), num_latents=256, k=4,
                     micro_batch_size=2, ctx_len=8, dtype="float32")
    first, second = estimate(cfg, config)
    # Layers 0-2 over two stages; per rank a layer has q 32 rows, k/v 16 each, o 32 columns, MLP 64 wide:
    # 64 * 64 (q, k, v) + 32 * 64 (o) + 3 * 64 * 64 (MLP) + 2 * 64 (norms) = 18560 parameters.
    assert (first.layers, second.layers) == (range(1), range(1, 3))
    assert first.host_weights == 4 * (18560 + 48 * 64)  # + half the embedding rows
    assert second.host_weights == 4 * 2 * 18560
    # 16 tokens x (3 * 64 + 2 * (2 + 1) * 16 + 3 * 64) = 7680 fp32 activations on both stages.
    assert first.host_activations == second.host_activations == 4 * 7680
    # The SAE (128 latents per rank) lives on stage 1: 2 * 128 * 64 + 128 + 64 = 16576 parameters.
    assert (first.sae_weights, first.optimizer) == (0, 0)
    assert second.sae_weights == 4 * 16576 + 8 * 256  # + int64 dead-latent counters of all latents
    assert second.sae_grads == 4 * 16576 and second.optimizer == 8 * 16576
    assert second.sae_activations == 4 * 16 * (4 * 64 + 3 * 2 * (4 + 32))
    assert second.targets == ("model.layers.2",)
    # BatchTopK gathers its k_max candidates per token (by default 4 k) instead of k.
    for k_max, candidates in ((None, 16), (10, 10)):
        batchtopk = dataclasses.replace(cfg, architecture="batchtopk", k_max=k_max)
        assert estimate(batchtopk, config)[1].sae_activations == 4 * 16 * (4 * 64 + 3 * 2 * (candidates + 32))
    # --k-aux sets the AuxK encoder's candidates (half the width, 32, by default).
    assert estimate(dataclasses.replace(cfg, k_aux=10), config)[1].sae_activations == 4 * 16 * (
        4 * 64 + 3 * 2 * (4 + 10))
    # A sweep's SAEs all live on the stage: 256 latents as above, and 512 (2 * 256 * 64 + 256 + 64 = 33088
    # parameters per rank).
    sweep = estimate(dataclasses.replace(cfg, num_latents=(256, 512)), config)[1]
    assert sweep.sae_weights == 4 * (16576 + 33088) + 8 * (256 + 512)
    assert sweep.sae_grads == 4 * (16576 + 33088) and sweep.optimizer == 8 * (16576 + 33088)
    assert sweep.sae_activations == 2 * 4 * 16 * (4 * 64 + 3 * 2 * (4 + 32))


def test_qwen25vl_7b_tp4_host_weights_by_hand(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2_5_vl", "hidden_size": 3584, "intermediate_size": 18944,
        "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28, "vocab_size": 152064,
        "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
                          "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
                          "temporal_patch_size": 2},
    }))
    cli_main(["plan", "--model", str(tmp_path), "--tp", "4",
              "--target-modules", "model.language_model.layers.14", "--gpu-memory-gb", "2"])
    out = capsys.readouterr().out
    # Per rank: 15 layers of 3584 * 1152 + 1152 (q, k, v and biases) + 896 * 3584 (o) + 3 * 3584 * 4736 (MLP)
    # + 7168 (norms) = 58,269,824 parameters; embedding 38016 * 3584; vision tower 676,537,856 (replicated).
    params = 15 * 58_269_824 + 38_016 * 3584 + 676_537_856
    assert f"{2 * params / 1024**3:.2f}" in out  # 3.14 GiB of bf16
    assert "NO" in out and "stage 0 needs" in out and "more than 2 GiB" in out


def test_stages_balance_layers_and_refuse_empty_ones():
    assert stage_layers(15, 2) == [range(7), range(7, 15)]
    assert stage_layers(4, 4) == [range(i, i + 1) for i in range(4)]
    with pytest.raises(
        ValueError,
        match=r"--pp 3 needs at least 3 decoder layers up to the last target, but there are 2",
    ):
        stage_layers(2, 3)


def test_targets_outside_the_decoder_layers_are_refused():
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4)
    with pytest.raises(ValueError, match=r"Target layer 7 does not exist: the host has 4 decoder layers"):
        estimate(PlanConfig(model=GIVEN, target_modules=("model.layers.7",)), config)
    with pytest.raises(ValueError, match=r"Target module 'lm_head' is not inside a decoder layer"):
        estimate(PlanConfig(model=GIVEN, target_modules=("lm_head",)), config)
