"""What an attached SAE does to its host: capture, splice, truncation, targets, transcoders, dtypes."""

import pytest
import torch
from peft import inject_adapter_in_model

import megasae
from megasae import TopKSaeConfig, get_peft_sae_model

from helpers import DummyModel, TwoLayerMLP, tiny_llama


def layer_outputs(model, names):
    """The outputs of the named modules in a plain forward, via hooks (the independent reference)."""
    seen = {}
    handles = [model.get_submodule(n).register_forward_hook(
        lambda m, a, out, n=n: seen.__setitem__(n, (out[0] if isinstance(out, tuple) else out).detach()))
        for n in names]
    return seen, handles


def test_capture_leaves_host_output_unchanged_and_records_losses():
    host = tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        expected = host(ids).logits
    config = TopKSaeConfig(k=4, expansion_factor=2, target_modules=["model.layers.1"])
    model = get_peft_sae_model(host, config)
    model.train()
    with model.capture() as outputs:
        logits = model(input_ids=ids).logits
    assert torch.equal(logits, expected)
    out = outputs["model.layers.1"]
    assert out.num_tokens == 18 and out.x.shape == (18, 32) and out.x_hat.shape == (18, 32)
    assert out.loss.requires_grad and 0 < out.fvu.item()
    assert out.l0.item() <= 4
    # Outside a capture block, train mode still records the latest output.
    model(input_ids=ids)
    assert megasae.sae_outputs(model)["model.layers.1"].num_tokens == 18


def test_eval_splices_the_reconstruction_and_overrides_switch_modes():
    torch.manual_seed(0)
    model = get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(k=3, num_latents=20, target_modules=["up"]))
    host = model.get_base_model()
    up = host.up
    x = torch.randn(5, 16)
    with torch.no_grad():
        host_out = host.down(host.act(up.base_layer(x)))
        model.train()
        torch.testing.assert_close(model(x), host_out)  # capture (and b_dec from this first batch)

        values, indices = megasae.sae.encode(up.base_layer(x), up.sae_W_enc["default"],
                                             up.sae_b_enc["default"], up.sae_b_dec["default"], 3)
        x_hat = megasae.sae.decode(values, indices, up.sae_W_dec["default"], up.sae_b_dec["default"])
        spliced_out = host.down(host.act(x_hat))
        assert not torch.allclose(spliced_out, host_out)

        model.eval()
        torch.testing.assert_close(model(x), spliced_out)
        model.train()
        model.set_sae_mode("splice")
        torch.testing.assert_close(model(x), spliced_out)
        model.eval()
        model.set_sae_mode("capture")
        torch.testing.assert_close(model(x), host_out)
        model.set_sae_mode("auto")
        torch.testing.assert_close(model(x), spliced_out)
        with pytest.raises(ValueError, match="SAE mode must be"):
            model.set_sae_mode("steer")


def test_inject_adapter_in_model_keeps_plain_forward_returning_host_output():
    host = DummyModel()
    x = torch.randn(1, 7, 10)
    expected = host(x).detach()
    model = inject_adapter_in_model(TopKSaeConfig(k=1, num_latents=5, target_modules=["linear"]), host)
    torch.testing.assert_close(model(x), expected)  # nn.Module starts in train mode: capture
    with megasae.capture(model) as outputs:
        model(x)
    assert outputs["linear"].num_tokens == 7


def test_stop_after_targets_skips_later_layers_and_matches_full_forward():
    host = tiny_llama(num_layers=4)
    ids = torch.randint(0, 128, (2, 11))
    targets = ["model.layers.0", "model.layers.2"]
    seen, handles = layer_outputs(host, targets)
    with torch.no_grad():
        host(ids)
    for h in handles:
        h.remove()

    model = get_peft_sae_model(host, TopKSaeConfig(k=4, expansion_factor=2, target_modules=targets))
    model.train()
    calls = []
    for name in ("model.layers.2", "model.layers.3", "model.norm", "lm_head"):
        module = model.get_base_model().get_submodule(name)
        module.register_forward_pre_hook(lambda *a, name=name: calls.append(name))

    with model.stop_after_targets() as outputs:
        returned = model(input_ids=ids)
    assert returned is outputs
    assert calls == ["model.layers.2"]  # the last target ran; nothing after it did
    for name in targets:
        torch.testing.assert_close(outputs[name].x, seen[name].reshape(-1, 32))
    # Outside the block the host runs in full again.
    calls.clear()
    assert model(input_ids=ids).logits.shape == (2, 11, 128)
    assert calls == ["model.layers.2", "model.layers.3", "model.norm", "lm_head"]


def test_token_mask_selects_the_rows_the_sae_reads():
    host = tiny_llama()
    ids = torch.randint(0, 128, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[:, 0] = False
    mask[1, 4:] = False
    seen, _ = layer_outputs(host, ["model.layers.1"])
    with torch.no_grad():
        host(ids)
    config = TopKSaeConfig(k=4, expansion_factor=2, target_modules=["model.layers.1"])
    model = get_peft_sae_model(host, config)
    model.train()
    with model.stop_after_targets(token_mask=mask) as outputs:
        model(input_ids=ids)
    torch.testing.assert_close(outputs["model.layers.1"].x, seen["model.layers.1"][mask])
    with pytest.raises(ValueError, match=r"token_mask has shape \(2, 5\)"):
        with model.stop_after_targets(token_mask=mask[:, :5]):
            model(input_ids=ids)


def test_first_batch_sets_b_dec_to_its_masked_mean_and_fits_the_encoder_scale():
    model = get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(k=2, num_latents=8, target_modules=["down"]))
    model.train()
    down = model.get_base_model().down
    W_enc = down.sae_W_enc["default"].detach().clone()
    W_dec = down.sae_W_dec["default"].detach().clone()
    x = torch.randn(3, 4, 16)
    mask = torch.rand(3, 4) > 0.3
    with model.capture(token_mask=mask) as outputs:
        model(x)
    rows = outputs["down"].x
    b_dec = rows.mean(0)
    torch.testing.assert_close(down.sae_b_dec["default"], b_dec)
    # The scale s minimising ||(x - b_dec) - s y||^2, y the unscaled encoder's reconstruction, by hand.
    pre = (rows - b_dec) @ W_enc.T
    top = pre.topk(2, dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    y = z @ W_dec
    s = ((rows - b_dec) * y).sum() / y.pow(2).sum()
    torch.testing.assert_close(down.sae_W_enc["default"], s * W_enc)
    assert ((rows - b_dec - s * y).pow(2).sum() < (rows - b_dec - y).pow(2).sum())
    before = {name: getattr(down, name)["default"].detach().clone() for name in ("sae_b_dec", "sae_W_enc")}
    with model.capture():
        model(x + 5)
    for name, value in before.items():
        assert torch.equal(getattr(down, name)["default"], value)  # only the first batch


def test_targets_by_name_suffix_and_regex():
    def targeted(target_modules):
        config = TopKSaeConfig(k=2, num_latents=8, target_modules=target_modules)
        model = get_peft_sae_model(tiny_llama(), config)
        return sorted(layer.module_path for layer in megasae.sae_layers(model))

    assert targeted(["model.layers.1"]) == ["model.layers.1"]
    assert targeted(["o_proj"]) == [f"model.layers.{i}.self_attn.o_proj" for i in range(4)]
    assert targeted(r"model\.layers\.[13]\.mlp\.down_proj") == ["model.layers.1.mlp.down_proj",
                                                                "model.layers.3.mlp.down_proj"]


def test_num_latents_follows_the_width_the_sae_reads():
    def latents(transcode):
        config = TopKSaeConfig(k=2, expansion_factor=3, transcode=transcode, target_modules=["up"])
        model = get_peft_sae_model(TwoLayerMLP(width=16), config)
        up = model.get_base_model().up
        return up.sae_W_enc["default"].shape, up.sae_W_dec["default"].shape

    assert latents(transcode=False) == ((96, 32), (96, 32))  # up's output is 32 wide
    assert latents(transcode=True) == ((48, 16), (48, 32))  # a transcoder reads up's 16-wide input


def test_transcoder_reads_input_and_predicts_output():
    torch.manual_seed(0)
    model = get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(k=4, num_latents=40, transcode=True,
                                                            target_modules=["up"]))
    model.train()
    x = torch.randn(32, 16)
    with model.capture() as outputs:
        model(x)
    out = outputs["up"]
    up = model.get_base_model().up
    torch.testing.assert_close(out.x, x)
    torch.testing.assert_close(out.target, up.base_layer(x).detach())
    expected_fvu = ((out.target - out.x_hat) ** 2).sum() / ((out.target - out.target.mean(0)) ** 2).sum()
    torch.testing.assert_close(out.fvu, expected_fvu)


def test_sae_weights_are_fp32_on_a_bf16_host_with_a_bf16_option():
    host = tiny_llama().to(torch.bfloat16)
    ids = torch.randint(0, 128, (1, 5))
    model = get_peft_sae_model(host, TopKSaeConfig(k=2, num_latents=16, target_modules=["model.layers.0"]))
    layer = model.get_base_model().model.layers[0]
    assert layer.sae_W_enc["default"].dtype == torch.float32
    model.eval()
    assert model(input_ids=ids).logits.dtype == torch.bfloat16  # spliced back in the host's dtype

    bf16 = get_peft_sae_model(tiny_llama().to(torch.bfloat16),
                              TopKSaeConfig(k=2, num_latents=16, target_modules=["model.layers.0"],
                                            sae_dtype="bfloat16"))
    assert bf16.get_base_model().model.layers[0].sae_W_dec["default"].dtype == torch.bfloat16


def test_bf16_compute_over_fp32_weights_follows_the_fp32_step():
    """Mixed precision: the SAE step runs on bf16 casts of its float32 weights, whose gradients land in
    float32. Against the float32 step on the same weights: a near-tie may pick another latent now and then
    (bf16 keeps 8 bits of mantissa), so the selections agree on most slots and FVU and gradients to bf16's
    precision."""
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))

    def step(compute_dtype):
        torch.manual_seed(1)
        model = get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(k=4, num_latents=64, target_modules=["down"],
                                                                compute_dtype=compute_dtype))
        layer = model.get_base_model().down
        model.train()
        with model.capture() as outputs:
            model(x)
        outputs["down"].loss.backward()
        return outputs["down"], layer

    mixed, layer = step("bfloat16")
    assert mixed.x_hat.dtype == torch.bfloat16
    for weights in (layer.sae_W_enc, layer.sae_b_enc, layer.sae_W_dec, layer.sae_b_dec):
        assert weights["default"].dtype == weights["default"].grad.dtype == torch.float32
    fp32, reference = step(None)
    same = (mixed.indices.sort(-1).values == fp32.indices.sort(-1).values).float().mean()
    assert same > 0.95
    assert mixed.fvu.item() == pytest.approx(fp32.fvu.item(), rel=1e-2)
    for name in ("sae_W_enc", "sae_W_dec", "sae_b_dec"):
        a, b = getattr(layer, name)["default"].grad, getattr(reference, name)["default"].grad
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99, name


def test_training_loop_lowers_fvu_and_keeps_decoder_rows_unit_norm():
    torch.manual_seed(0)
    model = get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(k=4, num_latents=64, target_modules=["down"]))
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    data = torch.randn(256, 16)
    fvus = []
    for step in range(60):
        with model.stop_after_targets() as outputs:
            model(data)
        loss = outputs["down"].loss
        loss.backward()
        model.remove_parallel_decoder_grads()
        opt.step()
        opt.zero_grad()
        model.normalize_decoders()
        fvus.append(outputs["down"].fvu.item())
    assert fvus[-1] < 0.5 * fvus[0]
    W_dec = model.get_base_model().down.sae_W_dec["default"]
    torch.testing.assert_close(W_dec.norm(dim=-1), torch.ones(64))


def test_dead_latents_are_counted_and_feed_auxk():
    model = get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(k=2, num_latents=32, dead_tokens_threshold=8,
                                                            target_modules=["down"]))
    model.train()
    x = torch.randn(8, 16)
    with model.capture() as outputs:
        model(x)
    first = outputs["down"]
    assert first.num_dead == 0 and first.auxk.item() == 0
    fired = set(first.indices[first.values > 0].tolist())
    with model.capture() as outputs:
        model(x)  # 8 tokens seen: the latents that did not fire on them are dead now
    assert outputs["down"].num_dead == 32 - len(fired) > 0
    assert outputs["down"].auxk.item() > 0
    torch.testing.assert_close(outputs["down"].loss, outputs["down"].fvu + outputs["down"].auxk / 32)


def test_outlier_filter_drops_attention_sink_tokens():
    model = get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(k=2, num_latents=8, target_modules=["up"]))
    model.train()
    x = torch.randn(2, 10, 16)
    x[0, 3] *= 1000  # an attention-sink-like token
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[:, 0] = False
    with model.capture(token_mask=mask, outlier_factor=10.0) as outputs:
        model(x)
    with torch.no_grad():
        acts = model.get_base_model().up.base_layer(x)
    keep = mask.clone()
    keep[0, 3] = False
    assert (acts[0, 3].norm() > 10 * acts[mask].norm(dim=-1).median()) and outputs["up"].num_tokens == 17
    torch.testing.assert_close(outputs["up"].x, acts[keep])
