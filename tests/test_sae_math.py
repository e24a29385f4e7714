"""The SAE math of DESIGN.md, checked against dense formulas written out independently."""

import pytest
import torch

from megasae import sae


def dense_sae(x, W_enc, b_enc, W_dec, b_dec, k):
    """The textbook TopK SAE with a dense latent vector."""
    pre = (x - b_dec) @ W_enc.T + b_enc
    values, indices = pre.topk(k, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    return z @ W_dec + b_dec, z


def random_weights(d=12, M=40, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    w = sae.init_weights(d, d, M, dtype=dtype, generator=g)
    w["b_enc"] = torch.randn(M, generator=g, dtype=dtype) * 0.1
    w["b_dec"] = torch.randn(d, generator=g, dtype=dtype) * 0.1
    return {name: t.requires_grad_() for name, t in w.items()}


def test_init_unit_decoder_rows_and_tied_encoder():
    w = sae.init_weights(16, 16, 64)
    torch.testing.assert_close(w["W_dec"].norm(dim=-1), torch.ones(64))
    assert torch.equal(w["W_enc"], w["W_dec"])
    assert not w["b_enc"].any() and not w["b_dec"].any()
    transcoder = sae.init_weights(8, 16, 64)
    assert transcoder["W_enc"].shape == (64, 8) and transcoder["W_dec"].shape == (64, 16)
    torch.testing.assert_close(transcoder["W_enc"].norm(dim=-1), torch.ones(64))


def test_encode_decode_equal_the_dense_sae():
    w = random_weights()
    x = torch.randn(30, 12, dtype=torch.float64)
    values, indices = sae.encode(x, w["W_enc"], w["b_enc"], w["b_dec"], 5)
    x_hat = sae.decode(values, indices, w["W_dec"], w["b_dec"])
    expected, z = dense_sae(x, w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], 5)
    torch.testing.assert_close(x_hat, expected)
    assert ((values > 0).sum(-1) == (z > 0).sum(-1)).all()


def test_fvu_is_residual_over_total_variance():
    target = torch.randn(50, 8, dtype=torch.float64)
    x_hat = target + 0.1 * torch.randn_like(target)
    expected = ((target - x_hat) ** 2).sum() / ((target - target.mean(0)) ** 2).sum()
    got = sae.fraction_of_variance_unexplained(target, x_hat, sae.total_variance(target))
    torch.testing.assert_close(got, expected.float())
    # Predicting the mean explains nothing; an empty batch is 0, not NaN.
    mean_pred = target.mean(0).expand_as(target)
    fvu = sae.fraction_of_variance_unexplained(target, mean_pred, sae.total_variance(target))
    assert fvu.item() == pytest.approx(1)
    empty = torch.zeros(0, 8)
    assert sae.fraction_of_variance_unexplained(empty, empty, sae.total_variance(empty)).item() == 0


def plain_auxk(x, residual, W_enc, b_enc, b_dec, W_dec, dead_mask, k_aux, total_var):
    """AuxK as written in DESIGN.md, with dense tensors."""
    pre = (x - b_dec) @ W_enc.T + b_enc
    pre = pre.masked_fill(~dead_mask, float("-inf"))
    num_dead = int(dead_mask.sum())
    values, indices = pre.topk(min(k_aux, num_dead), dim=-1)
    z = torch.zeros_like(pre).scatter(-1, indices, values.relu())
    residual_hat = z @ W_dec
    return min(num_dead / k_aux, 1.0) * ((residual_hat - residual) ** 2).sum() / total_var


@pytest.mark.parametrize("num_dead", [3, 25])
def test_auxk_value_and_gradients_match_the_plain_formula(num_dead):
    w = random_weights()
    x = torch.randn(30, 12, dtype=torch.float64)
    dead_mask = torch.zeros(40, dtype=torch.bool)
    dead_mask[torch.randperm(40)[:num_dead]] = True
    x_hat, _ = dense_sae(x, w["W_enc"], w["b_enc"], w["W_dec"], w["b_dec"], 5)
    total_var = ((x - x.mean(0)) ** 2).sum()
    args = (x, (x - x_hat).detach(), w["W_enc"], w["b_enc"], w["b_dec"], w["W_dec"], dead_mask, 8, total_var)

    got = sae.auxk_loss(*args)
    grads = torch.autograd.grad(got, [w["W_enc"], w["b_enc"], w["W_dec"]])
    expected = plain_auxk(*args)
    expected_grads = torch.autograd.grad(expected, [w["W_enc"], w["b_enc"], w["W_dec"]])

    torch.testing.assert_close(got, expected)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e)
    # The point of AuxK: the encoder of dead latents learns.
    assert grads[0][dead_mask].abs().sum() > 0 and grads[1][dead_mask].abs().sum() > 0
    assert grads[0][~dead_mask].abs().sum() == 0


def test_auxk_is_zero_without_dead_latents():
    w = random_weights()
    x = torch.randn(10, 12, dtype=torch.float64)
    loss = sae.auxk_loss(x, x, w["W_enc"], w["b_enc"], w["b_dec"], w["W_dec"],
                         torch.zeros(40, dtype=torch.bool), 8, torch.tensor(1.0))
    assert loss.item() == 0


def test_dead_counters_count_tokens_since_last_fire():
    counters = torch.tensor([0, 5, 100, 7])
    indices = torch.tensor([[1, 2], [1, 3], [1, 2]])
    values = torch.tensor([[1.0, 0.0], [2.0, 0.5], [1.0, 0.0]])  # latent 2 selected but never positive
    sae.update_dead_counters(counters, indices, values)
    assert counters.tolist() == [3, 0, 103, 0]


def test_decoder_grad_projection_and_renormalisation():
    W = torch.nn.functional.normalize(torch.randn(6, 4, dtype=torch.float64), dim=-1).requires_grad_()
    W.grad = torch.randn_like(W)
    sae.remove_parallel_grad_(W)
    torch.testing.assert_close((W.grad * W).sum(-1), torch.zeros(6, dtype=torch.float64))
    with torch.no_grad():
        W.mul_(3.0)
    sae.normalize_rows_(W)
    torch.testing.assert_close(W.norm(dim=-1), torch.ones(6, dtype=torch.float64))
