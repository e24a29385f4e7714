"""Latent-parallel SAEs: two gloo ranks each holding half the latents equal one process holding all of them
(fp32; rtol 1e-5, atol 1e-6), and adapters saved under one TP size load under another."""

import pytest
import torch
import torch.distributed as dist

from megasae import PeftSaeModel, TopKSaeConfig, get_peft_sae_model
from megasae.peft.shard import save_adapter, shard_saes

from distributed import run_ranks
from helpers import TwoLayerMLP, capture_steps

CONFIG = dict(k=3, num_latents=24, target_modules=["down"], dead_tokens_threshold=5)
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def _model(group=None):
    torch.manual_seed(0)
    model = get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(**CONFIG))
    shard_saes(model, group)
    model.train()
    return model


def _layer(model):
    return model.get_base_model().down


def two_steps(x, mask, group=None):
    """Two capture steps (b_dec init, dead counters, AuxK active on the second); what must agree."""
    model = _model(group)
    layer = _layer(model)
    result = capture_steps(model, layer, x, mask, ("fvu", "auxk", "l0", "x_hat"))
    result["counters"] = layer.sae_tokens_since_fired["default"].clone()
    return result


def _latent_rank(rank, world_size, x, mask, expected, result_file):
    got = two_steps(x, mask, dist.group.WORLD)
    for key in ("fvu", "auxk", "l0", "x_hat"):
        torch.testing.assert_close(torch.stack(got[key]), torch.stack(expected[key]), **TOLERANCE)
    assert torch.equal(got["counters"], expected["counters"])
    rows = slice(rank * 12, (rank + 1) * 12)
    for name, grad in got["grads"].items():
        want = expected["grads"][name]
        torch.testing.assert_close(grad, want if name == "sae_b_dec" else want[rows], **TOLERANCE)
    if rank == 0:
        torch.save(True, result_file)


def test_tp2_sae_forward_backward_equal_one_process(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(12, 16)
    mask = torch.rand(12) > 0.2
    expected = two_steps(x, mask)
    assert expected["auxk"][1] > 0  # latents died after the first step, so AuxK took part
    run_ranks(_latent_rank, 2, x, mask, expected, tmp_path / "ok")
    assert (tmp_path / "ok").exists()


def _trained_once(model, x):
    """One capture step sets b_dec from the data, then eval(): the forward splices the reconstruction."""
    with model.capture():
        model(x)
    model.eval()
    with torch.no_grad():
        return model(x)


def _save_rank(rank, world_size, x, adapter_dir, result_file):
    model = _model(dist.group.WORLD)
    spliced = _trained_once(model, x)
    save_adapter(model, adapter_dir, is_main=rank == 0)
    if rank == 0:
        torch.save(spliced, result_file)


def test_save_under_tp2_load_under_tp1(tmp_path):
    x = torch.randn(10, 16)
    run_ranks(_save_rank, 2, x, tmp_path / "adapter", tmp_path / "spliced.pt")
    torch.manual_seed(0)
    loaded = PeftSaeModel.from_pretrained(TwoLayerMLP(), tmp_path / "adapter").eval()
    assert _layer(loaded).sae_W_enc["default"].shape == (24, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), torch.load(tmp_path / "spliced.pt"), **TOLERANCE)


def _load_rank(rank, world_size, x, adapter_dir, expected, result_file):
    torch.manual_seed(0)
    model = PeftSaeModel.from_pretrained(TwoLayerMLP(), adapter_dir)
    shard_saes(model, dist.group.WORLD)
    assert _layer(model).sae_W_enc["default"].shape == (12, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), expected, **TOLERANCE)
    if rank == 0:
        torch.save(True, result_file)


def test_save_under_tp1_load_under_tp2(tmp_path):
    x = torch.randn(10, 16)
    model = _model()
    expected = _trained_once(model, x)
    model.save_pretrained(tmp_path / "adapter")
    run_ranks(_load_rank, 2, x, tmp_path / "adapter", expected, tmp_path / "ok")
    assert (tmp_path / "ok").exists()


def test_latents_must_divide_over_the_ranks(monkeypatch):
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)  # fails before any collective
    model = get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(**dict(CONFIG, num_latents=25)))
    with pytest.raises(
        ValueError, match=r"'down' has 25 latents, which cannot be split over 2 tensor-parallel"
    ):
        shard_saes(model, object())
