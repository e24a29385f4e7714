"""BatchTopK SAEs against a dense plain-PyTorch reference: the same codes, losses and gradients (float64); the
inference threshold learnt, saved, reloaded and used by splicing and evaluation; TP 2 equals one process;
SAELens export and megasae's reader round trip; bad settings refused in one sentence."""

import json

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from megasae import PeftSaeModel, TopKSaeConfig, formats, get_peft_sae_model, ops, sae
from megasae.errors import SettingError
from megasae.peft.shard import shard_saes
from megasae.sae.batchtopk import THRESHOLD_RATE, update_threshold_
from megasae.train import TrainConfig

from distributed import run_ranks
from helpers import TwoLayerMLP, capture_steps

N, D, M, K = 16, 8, 32, 3


@pytest.fixture(params=["kernel", "reference"])
def backend(request, monkeypatch):
    """The compiled CPU kernels, then the pure-PyTorch reference ops, under the same selection."""
    if request.param == "reference":
        monkeypatch.setattr(ops, "_C", None)
    return request.param


def weights(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shapes = {"x": (N, D), "W_enc": (M, D), "b_enc": (M,), "W_dec": (M, D), "b_dec": (D,)}
    return {name: torch.randn(*shape, generator=g, dtype=dtype) for name, shape in shapes.items()}


def dense_pre(x, W_enc, b_enc, b_dec):
    return (x - b_dec) @ W_enc.T + b_enc


def dense_batchtopk(pre, k):
    """The paper's rule on the whole [N, M] matrix: the k N largest of relu(pre) in the batch."""
    acts = pre.relu()
    cut = acts.flatten().topk(k * acts.shape[0]).values[-1]
    return acts * ((acts >= cut) & (acts > 0))


def dense_jumprelu(pre, threshold):
    return pre.relu() * (pre > threshold)


def densify(values, indices, num_latents=M):
    return torch.zeros(values.shape[0], num_latents, dtype=values.dtype).scatter_add(-1, indices, values)


def fvu(target, x_hat):
    return (target - x_hat).pow(2).sum() / (target - target.mean(0)).pow(2).sum()


@pytest.mark.parametrize("seed", range(4))
def test_batch_selection_is_the_dense_reference(seed, backend):
    w = weights(seed)
    values, indices = sae.batchtopk_encode(w["x"], w["W_enc"], w["b_enc"], w["b_dec"], K, 4 * K)
    want = dense_batchtopk(dense_pre(w["x"], w["W_enc"], w["b_enc"], w["b_dec"]), K)
    torch.testing.assert_close(densify(values, indices), want, rtol=0, atol=1e-12)
    per_row = (values > 0).sum(-1)
    assert per_row.sum() == K * N and len(set(per_row.tolist())) > 1  # busy rows took more than quiet ones


def test_losses_and_gradients_are_those_of_the_dense_reference(backend):
    w = weights(1)
    ours = {name: t.clone().requires_grad_() for name, t in w.items() if name != "x"}
    ref = {name: t.clone().requires_grad_() for name, t in w.items() if name != "x"}
    values, indices = sae.batchtopk_encode(w["x"], ours["W_enc"], ours["b_enc"], ours["b_dec"], K, 4 * K)
    loss = fvu(w["x"], sae.decode(values, indices, ours["W_dec"], ours["b_dec"]))
    codes = dense_batchtopk(dense_pre(w["x"], ref["W_enc"], ref["b_enc"], ref["b_dec"]), K)
    ref_loss = fvu(w["x"], codes @ ref["W_dec"] + ref["b_dec"])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=0)
    loss.backward()
    ref_loss.backward()
    for name in ours:
        torch.testing.assert_close(ours[name].grad, ref[name].grad, rtol=1e-10, atol=1e-12)


def test_gradcheck_in_float64(backend):
    w = weights(2)

    def reconstruct(W_enc, b_enc, W_dec, b_dec):
        values, indices = sae.batchtopk_encode(w["x"], W_enc, b_enc, b_dec, K, 4 * K)
        return sae.decode(values, indices, W_dec, b_dec)

    inputs = tuple(w[name].clone().requires_grad_() for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
    assert torch.autograd.gradcheck(reconstruct, inputs)


def test_a_row_that_keeps_all_its_candidates_widens_the_encoder():
    w = weights(3)
    w["x"][5] *= 50  # one busy row holds most of the batch's largest codes: widened twice, alone
    with pytest.warns(UserWarning, match="some rows kept all of their candidate latents"):
        values, indices = sae.batchtopk_encode(w["x"], w["W_enc"], w["b_enc"], w["b_dec"], K, K)
    want = dense_batchtopk(dense_pre(w["x"], w["W_enc"], w["b_enc"], w["b_dec"]), K)
    torch.testing.assert_close(densify(values, indices), want, rtol=0, atol=1e-12)
    assert (values[5] > 0).sum() > K


def test_the_inference_rule_is_jumprelu_and_does_not_depend_on_the_batch(backend):
    w = weights(4)
    threshold = torch.tensor(4.0, dtype=torch.float64)  # rows keep up to 9 of their 12 candidates
    args = (w["W_enc"], w["b_enc"], w["b_dec"], K, 4 * K, threshold)
    values, indices = sae.batchtopk_encode(w["x"], *args)
    want = dense_jumprelu(dense_pre(w["x"], w["W_enc"], w["b_enc"], w["b_dec"]), threshold)
    torch.testing.assert_close(densify(values, indices), want, rtol=0, atol=1e-12)
    for row in range(N):
        alone, alone_indices = sae.batchtopk_encode(w["x"][row:row + 1], *args)
        torch.testing.assert_close(densify(alone, alone_indices)[0], want[row], rtol=0, atol=1e-12)


def test_the_threshold_is_a_running_mean_of_the_smallest_kept_code():
    threshold = torch.zeros(())
    update_threshold_(threshold, torch.tensor([[0.0, 2.0, 3.0], [0.5, 0.0, 0.0]]))
    assert threshold == 0.5  # the first batch sets it
    update_threshold_(threshold, torch.tensor([[1.5, 0.0]]))
    torch.testing.assert_close(threshold, torch.tensor(0.5 + THRESHOLD_RATE * (1.5 - 0.5)))
    update_threshold_(threshold, torch.zeros(0, 2))  # no codes: no change
    torch.testing.assert_close(threshold, torch.tensor(0.5 + THRESHOLD_RATE * (1.5 - 0.5)))


# -- the PEFT layer ------------------------------------------------------------------------------------------

CONFIG = dict(k=3, num_latents=24, target_modules=["down"], architecture="batchtopk", dead_tokens_threshold=5)


def _model(group=None, **overrides):
    torch.manual_seed(0)
    model = get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(**{**CONFIG, **overrides}))
    shard_saes(model, group)
    model.train()
    return model


def _layer(model):
    return model.get_base_model().down


def trained(steps=3, **overrides):
    """A BatchTopK SAE after `steps` Adam steps; also the smallest code each step kept."""
    model = _model(**overrides)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    smallest = []
    for step in range(steps):
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(step))
        with model.capture() as outputs:
            model(x)
        out = outputs["down"]
        smallest.append(out.values[out.values > 0].min().item())
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, smallest


def down_output(model, x):
    """What the host's `down` module outputs (the rows its SAE reads)."""
    mlp = model.get_base_model()
    return mlp.down.base_layer(mlp.act(mlp.up(x))).detach()


def spliced_reference(model, x):
    """What the spliced BatchTopK SAE must give: the dense JumpReLU codes at its threshold, decoded."""
    layer = _layer(model)
    W_enc, b_enc, W_dec, b_dec = (getattr(layer, f"sae_{name}")["default"].detach()
                                  for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
    pre = dense_pre(down_output(model, x), W_enc, b_enc, b_dec)
    return dense_jumprelu(pre, layer.sae_threshold["default"]) @ W_dec + b_dec


def test_training_learns_the_threshold_and_splicing_uses_it(tmp_path):
    model, smallest = trained()
    layer = _layer(model)
    want = smallest[0]
    for value in smallest[1:]:
        want += THRESHOLD_RATE * (value - want)
    assert layer.sae_threshold["default"].item() == pytest.approx(want, rel=1e-6)

    model.eval()
    x = torch.randn(10, 16)
    with torch.no_grad():
        batch = model(x)
        torch.testing.assert_close(batch, spliced_reference(model, x), rtol=1e-5, atol=1e-5)
        for row in range(3):  # one token's reconstruction does not depend on its batch
            torch.testing.assert_close(model(x[row:row + 1])[0], batch[row], rtol=1e-5, atol=1e-6)
        with model.capture() as outputs:  # evaluation reads the SAE the same way
            model(x)
    torch.testing.assert_close(outputs["down"].x_hat, batch, rtol=1e-6, atol=1e-6)


def test_the_threshold_is_saved_and_reloaded(tmp_path):
    model, _ = trained()
    model.save_pretrained(tmp_path)
    threshold = _layer(model).sae_threshold["default"]
    key = "base_model.model.down.sae_threshold"
    assert load_file(tmp_path / "adapter_model.safetensors")[key] == threshold
    assert json.loads((tmp_path / "adapter_config.json").read_text())["architecture"] == "batchtopk"
    assert formats.read(tmp_path).saes["down"].threshold == threshold

    torch.manual_seed(1)  # another init: the reloaded SAE must come from the files alone
    loaded = PeftSaeModel.from_pretrained(TwoLayerMLP(), tmp_path)
    assert _layer(loaded).sae_threshold["default"] == threshold
    loaded.get_base_model().load_state_dict(model.get_base_model().state_dict())  # the same host weights
    model.eval()
    x = torch.randn(6, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_a_topk_adapter_saves_no_threshold(tmp_path):
    model, _ = trained(steps=1, architecture="topk")
    model.save_pretrained(tmp_path)
    assert not any("threshold" in key for key in load_file(tmp_path / "adapter_model.safetensors"))


def test_a_batchtopk_sae_that_never_trained_refuses_to_splice():
    model = _model()
    model.eval()
    with pytest.raises(ValueError, match="has no inference threshold yet: train it for at least one step"):
        model(torch.randn(4, 16))


def two_steps(x, mask, group=None):
    """Two capture steps of a Matryoshka BatchTopK SAE on standardised rows, as megasae train's default (b_dec
    init, dead counters, AuxK, the threshold)."""
    model = _model(group, matryoshka_prefixes=[6, 12, 24], normalize_activations="layer_norm")
    layer = _layer(model)
    result = capture_steps(model, layer, x, mask, ("fvu", "auxk", "loss", "x_hat"))
    result["threshold"] = layer.sae_threshold["default"].clone()
    return result


def _tp_rank(rank, world_size, x, mask, expected, result_file):
    got = two_steps(x, mask, dist.group.WORLD)
    for key in ("fvu", "auxk", "loss", "x_hat"):
        torch.testing.assert_close(torch.stack(got[key]), torch.stack(expected[key]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got["threshold"], expected["threshold"], rtol=1e-6, atol=0)
    rows = slice(rank * 12, (rank + 1) * 12)
    for name, grad in got["grads"].items():
        want = expected["grads"][name]
        torch.testing.assert_close(grad, want if name == "sae_b_dec" else want[rows], rtol=1e-5, atol=1e-6)
    if rank == 0:
        torch.save(True, result_file)


def test_tp2_equals_one_process(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(12, 16)
    mask = torch.rand(12) > 0.2
    expected = two_steps(x, mask)
    assert expected["auxk"][1] > 0  # latents died after the first step, so AuxK took part
    run_ranks(_tp_rank, 2, x, mask, expected, tmp_path / "ok")
    assert (tmp_path / "ok").exists()


def _dp_rank(rank, world_size, xs, result_file):
    model = _model()
    with model.capture(group=dist.group.WORLD) as outputs:
        model(xs[rank])
    values = outputs["down"].values.detach()
    assert (values > 0).sum() == CONFIG["k"] * xs[rank].shape[0]  # k x N over this rank's own N tokens
    smallest = [torch.zeros(()) for _ in range(world_size)]
    dist.all_gather(smallest, values[values > 0].min())
    torch.testing.assert_close(_layer(model).sae_threshold["default"], torch.stack(smallest).mean())
    if rank == 0:
        torch.save(True, result_file)


def test_data_parallel_ranks_select_over_their_own_batch_and_share_one_threshold(tmp_path):
    run_ranks(_dp_rank, 2, [torch.randn(10, 16), 3 * torch.randn(14, 16)], tmp_path / "ok")
    assert (tmp_path / "ok").exists()


# -- formats -------------------------------------------------------------------------------------------------

def test_saelens_export_is_its_jumprelu_sae_and_reads_back(tmp_path):
    model, _ = trained()
    model.save_pretrained(tmp_path / "adapter")
    formats.export(tmp_path / "adapter", "saelens", tmp_path / "out")
    folder = tmp_path / "out" / "down"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_sae"] == 24 and cfg["k"] == 3
    w = load_file(folder / "sae_weights.safetensors")
    layer = _layer(model)
    threshold = layer.sae_threshold["default"]
    assert torch.equal(w["threshold"], threshold.expand(24))

    # SAELens's JumpReLU SAE on the exported tensors reconstructs as megasae's spliced SAE does.
    x = torch.randn(10, 16)
    rows = down_output(model, x)
    pre = (rows - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    theirs = (pre.relu() * (pre > w["threshold"])) @ w["W_dec"] + w["b_dec"]
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs, rtol=1e-5, atol=1e-5)

    back = formats.read(folder)
    assert back.config.architecture == "batchtopk" and back.config.k == 3
    assert back.saes["down"].threshold == threshold
    original = formats.read(tmp_path / "adapter").saes["down"]
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back.saes["down"], name), getattr(original, name)), name


def test_saelens_jumprelu_sae_with_per_latent_thresholds_is_refused(tmp_path):
    model, _ = trained(steps=1)
    model.save_pretrained(tmp_path / "adapter")
    formats.export(tmp_path / "adapter", "saelens", tmp_path / "out")
    file = tmp_path / "out" / "down" / "sae_weights.safetensors"
    tensors = load_file(file)
    tensors["threshold"] = torch.rand(24) + 0.1
    save_file(tensors, file)
    with pytest.raises(ValueError, match="per-latent or non-positive JumpReLU thresholds"):
        formats.read(tmp_path / "out" / "down")


def test_sparsify_export_refuses_a_batchtopk_sae(tmp_path):
    model, _ = trained(steps=1)
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="is a BatchTopK SAE, whose inference threshold sparsify's TopK "
                                         "SparseCoder cannot express"):
        formats.export(tmp_path / "adapter", "sparsify", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- bad settings --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("settings, message", [
    (dict(architecture="gated"), r"architecture must be one of \['topk', 'batchtopk'\], got 'gated'"),
    (dict(architecture="batchtopk", k_max=2), r"k_max must be None or an integer of at least k \(3\), got 2"),
    (dict(architecture="batchtopk", relu_codes=False), "relu_codes must be True"),
])
def test_bad_sae_settings(settings, message):
    with pytest.raises(ValueError, match=message):
        TopKSaeConfig(k=3, target_modules=["down"], **settings)


def test_k_max_above_the_number_of_latents_names_the_module():
    with pytest.raises(ValueError, match=r"k_max \(40\) must be at most the number of latents \(24\) of the "
                                         "SAE on 'down'"):
        _model(k_max=40)


@pytest.mark.parametrize("settings, message", [
    (dict(architecture="gated"), "--architecture must be one of 'topk', 'batchtopk', got 'gated'"),
    (dict(k=8, k_max=4), r"--k-max must be at least --k \(8\), got 4"),
])
def test_bad_train_settings(settings, message):
    with pytest.raises(SettingError, match=message):
        TrainConfig(**settings)
