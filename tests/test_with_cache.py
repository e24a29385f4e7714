"""`model(..., with_cache=True)`: the original project's record of what each SAE read and produced.

References are computed independently: module outputs from the host without SAEs or from a plain hook on
the unwrapped module, reconstructions from the SAE weights by the dense formula.
"""

import copy
import weakref

import torch
from peft import inject_adapter_in_model

import megasae
from megasae import TopKSaeConfig, get_peft_sae_model

from helpers import DummyModel, TwoLayerMLP, tiny_llama


def by_formula(layer, x, adapter="default"):
    """x_hat = W_dec^T relu(topk(W_enc (x - b_dec) + b_enc)) + b_dec (no pre-bias for a transcoder)."""
    W_enc, b_enc, W_dec, b_dec = (getattr(layer, f"sae_{name}")[adapter].detach()
                                  for name in ("W_enc", "b_enc", "W_dec", "b_dec"))
    spec = layer.sae_spec[adapter]
    pre = (x if spec.transcode else x - b_dec) @ W_enc.T + b_enc
    top = pre.topk(spec.k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu()) @ W_dec + b_dec


def base_layer_outputs(model, names):
    """Plain hooks on the unwrapped modules under the SAE layers: their own outputs, flattened."""
    seen = {}
    for name in names:
        model.get_submodule(name).base_layer.register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, out.detach().flatten(0, -2)))
    return seen


def test_the_original_projects_test_pattern():
    model = DummyModel()
    model.eval()
    x = torch.randn(1, 512, 10)
    original_result = model(x).detach()
    peft_model = get_peft_sae_model(model, TopKSaeConfig(k=1, num_latents=5, target_modules=["linear"]))
    peft_model.eval()
    result = peft_model(x, with_cache=True)
    inputs, outputs = peft_model.base_model.input_hidden_dict, peft_model.base_model.output_hidden_dict
    assert list(inputs) == list(outputs) == ["model.linear"]
    torch.testing.assert_close(inputs["model.linear"], original_result.flatten(0, 1))
    torch.testing.assert_close(outputs["model.linear"], result.flatten(0, 1))
    linear = peft_model.get_base_model().linear
    torch.testing.assert_close(outputs["model.linear"], by_formula(linear, original_result.flatten(0, 1)))


def test_several_targets_in_train_and_eval_mode():
    host = tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    targets = ["model.layers.0", "model.layers.2"]
    with torch.no_grad():
        host_logits = host(ids).logits
    model = get_peft_sae_model(host, TopKSaeConfig(k=4, expansion_factor=2, target_modules=targets))
    seen = base_layer_outputs(model.get_base_model(), targets)
    inputs, outputs = model.base_model.input_hidden_dict, model.base_model.output_hidden_dict
    for train in (True, False):
        model.train(train)
        logits = model(input_ids=ids, with_cache=True).logits
        # Capture passes the host's output on; splice replaces each target's output by its reconstruction.
        assert torch.equal(logits, host_logits) == train
        assert sorted(inputs) == sorted(outputs) == ["model.model.layers.0", "model.model.layers.2"]
        for name in targets:
            layer = model.get_base_model().get_submodule(name)
            assert inputs[f"model.{name}"].shape == outputs[f"model.{name}"].shape == (18, 32)
            torch.testing.assert_close(inputs[f"model.{name}"], seen[name])
            torch.testing.assert_close(outputs[f"model.{name}"], by_formula(layer, seen[name]))
            assert outputs[f"model.{name}"].requires_grad  # a loss on them trains the SAEs, as originally


def test_transcoder_reads_the_module_input():
    model = get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(k=4, num_latents=40, transcode=True,
                                                            target_modules=["up"]))
    up = model.get_base_model().up
    x = torch.randn(3, 5, 16)
    for train in (True, False):
        model.train(train)
        model(x, with_cache=True)
        read = model.base_model.input_hidden_dict["model.up"]
        produced = model.base_model.output_hidden_dict["model.up"]
        torch.testing.assert_close(read, x.flatten(0, 1))
        assert produced.shape == (15, 32)  # a prediction of up's 32-wide output
        torch.testing.assert_close(produced, by_formula(up, x.flatten(0, 1)))


def test_injected_host_holds_the_dicts_keyed_by_its_own_module_names():
    host = TwoLayerMLP()
    plain = copy.deepcopy(host)
    x = torch.randn(4, 6, 16)
    model = inject_adapter_in_model(TopKSaeConfig(k=2, num_latents=24, target_modules=["up", "down"]), host)
    # TwoLayerMLP.forward takes no keyword arguments: with_cache never reaches it.
    torch.testing.assert_close(model(x, with_cache=True), plain(x))  # train mode: capture
    assert sorted(model.input_hidden_dict) == sorted(model.output_hidden_dict) == ["down", "up"]
    up_out = plain.up(x)
    torch.testing.assert_close(model.input_hidden_dict["up"], up_out.flatten(0, 1))
    torch.testing.assert_close(model.input_hidden_dict["down"], plain.down(plain.act(up_out)).flatten(0, 1))
    torch.testing.assert_close(model.output_hidden_dict["up"], by_formula(model.up, up_out.flatten(0, 1)))

    model.eval()
    y = model(x, with_cache=True)
    torch.testing.assert_close(model.output_hidden_dict["down"], y.flatten(0, 1))
    torch.testing.assert_close(model.output_hidden_dict["down"],
                               by_formula(model.down, model.input_hidden_dict["down"]))
    # A second adapter injected into the same host keeps one pair of dicts and one flag handler; it is now
    # the active one and targets up only.
    inject_adapter_in_model(TopKSaeConfig(k=2, num_latents=24, target_modules=["up"]), model,
                            adapter_name="b")
    assert len(model._forward_pre_hooks) == len(model._forward_hooks) == 1
    model(x, with_cache=True)
    assert list(model.output_hidden_dict) == ["up"]
    torch.testing.assert_close(model.output_hidden_dict["up"],
                               by_formula(model.up, up_out.flatten(0, 1), "b"))


def test_composes_with_stop_after_targets_and_a_token_mask():
    host = tiny_llama()
    ids = torch.randint(0, 128, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 0] = False
    targets = ["model.layers.0", "model.layers.2"]
    model = get_peft_sae_model(host, TopKSaeConfig(k=4, expansion_factor=2, target_modules=targets))
    seen = base_layer_outputs(model.get_base_model(), targets)
    model.train()
    with model.stop_after_targets(token_mask=mask) as captured:
        returned = model(input_ids=ids, with_cache=True)
    assert returned is captured
    kept = mask.flatten()
    for name in targets:
        read, produced = (d[f"model.{name}"] for d in (model.base_model.input_hidden_dict,
                                                        model.base_model.output_hidden_dict))
        torch.testing.assert_close(read, seen[name])  # every token the module saw
        # The reconstruction on the rows the SAE read; elsewhere the module's own output.
        torch.testing.assert_close(produced[kept], captured[name].x_hat)
        torch.testing.assert_close(produced[~kept], seen[name][~kept])

    injected = inject_adapter_in_model(TopKSaeConfig(k=2, num_latents=24, target_modules=["up", "down"]),
                                       TwoLayerMLP())
    with megasae.stop_after_targets(injected) as captured:
        assert injected(torch.randn(3, 16), with_cache=True) is captured
    assert sorted(injected.output_hidden_dict) == ["down", "up"]


def test_several_adapters_keep_the_module_key():
    model = get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(k=2, num_latents=24, target_modules=["up"]))
    model.add_adapter("other", TopKSaeConfig(k=3, num_latents=32, target_modules=["up", "down"]))
    model.eval()
    host = model.get_base_model()
    x = torch.randn(5, 16)
    inputs, outputs = model.base_model.input_hidden_dict, model.base_model.output_hidden_dict
    model(x, with_cache=True)
    assert sorted(outputs) == ["model.up"]  # "default" targets up only
    torch.testing.assert_close(outputs["model.up"], by_formula(host.up, host.up.base_layer(x), "default"))
    model.set_adapter("other")
    model(x, with_cache=True)
    assert sorted(outputs) == ["model.down", "model.up"]
    torch.testing.assert_close(outputs["model.up"], by_formula(host.up, host.up.base_layer(x), "other"))
    torch.testing.assert_close(outputs["model.down"], by_formula(host.down, inputs["model.down"], "other"))


def test_entries_are_replaced_and_released_without_the_flag():
    config = TopKSaeConfig(k=2, num_latents=24, target_modules=["up", "down"])
    model = get_peft_sae_model(TwoLayerMLP(), config)
    model.train()
    inputs, outputs = model.base_model.input_hidden_dict, model.base_model.output_hidden_dict
    model(torch.randn(2, 3, 16))
    assert inputs == outputs == {}  # nothing recorded without the flag

    model(torch.randn(2, 3, 16), with_cache=True)
    first = [weakref.ref(t) for d in (inputs, outputs) for t in d.values()]
    x = torch.randn(4, 3, 16)
    model(x, with_cache=True)
    assert sorted(inputs) == ["model.down", "model.up"]
    torch.testing.assert_close(inputs["model.up"], model.get_base_model().up.base_layer(x).flatten(0, 1))
    assert all(ref() is None for ref in first)  # the previous call's entries are gone

    recorded = [weakref.ref(t) for d in (inputs, outputs) for t in d.values()]
    model(x)
    assert inputs == outputs == {} and all(ref() is None for ref in recorded)
    assert all(layer.hidden_record is None for layer in megasae.sae_layers(model))
