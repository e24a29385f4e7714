"""The saved adapter is a standard PEFT directory, and peft's adapter API works on SAEs.

A peft upgrade that changes file names, key names or config fields fails here.
"""

import json

import peft
import pytest
import torch
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file

import megasae
from megasae import PeftSaeModel, TopKSaeConfig, get_peft_sae_model

from helpers import TwoLayerMLP, tiny_llama


def trained_mlp_adapter(seed=0, **config):
    torch.manual_seed(seed)
    model = get_peft_sae_model(
        TwoLayerMLP(), TopKSaeConfig(k=4, num_latents=24, target_modules=["up", "down"], **config)
    )
    model.train()
    x = torch.randn(64, 16)
    with model.capture() as outputs:
        model(x)
    sum(o.loss for o in outputs.values()).backward()
    torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    return model


def test_peft_refuses_outside_names_so_we_register_through_its_tables():
    # If a peft release starts accepting outside names, switch megasae.peft.register to it.
    with pytest.raises(ValueError, match="Unknown PEFT type"):
        peft.utils.register_peft_method(name="topk_sae", config_cls=TopKSaeConfig,
                                        model_cls=megasae.peft.TopKSaeModel)
    assert peft.mapping.PEFT_TYPE_TO_CONFIG_MAPPING["TOPK_SAE"] is TopKSaeConfig
    assert peft.mapping.PEFT_TYPE_TO_TUNER_MAPPING["TOPK_SAE"] is megasae.peft.TopKSaeModel
    assert peft.mapping.PEFT_TYPE_TO_PREFIX_MAPPING["TOPK_SAE"] == "sae_"
    assert "TOPK_SAE" not in list(peft.PeftType)


def test_adapter_directory_layout(tmp_path):
    model = trained_mlp_adapter()
    model.save_pretrained(tmp_path)

    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json",
                                                           "adapter_model.safetensors"]
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "TOPK_SAE"
    for field, value in {"k": 4, "num_latents": 24, "expansion_factor": 32, "transcode": False,
                         "auxk_alpha": 1 / 32, "k_aux": None, "dead_tokens_threshold": 10_000_000,
                         "sae_dtype": "float32"}.items():
        assert config[field] == value, field
    assert sorted(config["target_modules"]) == ["down", "up"]

    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(
        f"base_model.model.{module}.sae_{param}"
        for module in ("up", "down")
        for param in ("W_enc", "b_enc", "W_dec", "b_dec")
    )
    assert tensors["base_model.model.up.sae_W_enc"].shape == (24, 32)  # reads up's output (width 32)
    assert tensors["base_model.model.down.sae_W_dec"].shape == (24, 16)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    # Dead-latent statistics are not weights.
    assert not any("tokens_since_fired" in key for key in tensors)


def test_reload_is_bit_identical_in_weights_and_outputs(tmp_path):
    model = trained_mlp_adapter()
    model.save_pretrained(tmp_path)
    torch.manual_seed(1)  # a different random init must not leak into the loaded weights
    loaded = PeftSaeModel.from_pretrained(TwoLayerMLP(), tmp_path)
    assert isinstance(loaded, PeftSaeModel) and isinstance(loaded.peft_config["default"], TopKSaeConfig)

    saved_state = {k: v for k, v in model.state_dict().items() if ".sae_" in k}
    loaded_state = {k: v for k, v in loaded.state_dict().items() if ".sae_" in k}
    assert saved_state.keys() == loaded_state.keys()
    assert all(torch.equal(saved_state[k], loaded_state[k]) for k in saved_state)

    # Give the fresh host the trained host's weights (only those) to compare spliced outputs.
    host_state = {k: v for k, v in model.get_base_model().state_dict().items() if ".sae_" not in k}
    loaded.get_base_model().load_state_dict(host_state, strict=False)
    model.eval(), loaded.eval()
    x = torch.randn(8, 16)
    assert torch.equal(model(x), loaded(x))
    # peft's generic loader knows the method too once megasae is imported.
    assert PeftConfig.from_pretrained(tmp_path).peft_type == "TOPK_SAE"


def test_loaded_adapter_is_frozen_unless_trainable(tmp_path):
    trained_mlp_adapter().save_pretrained(tmp_path)
    frozen = PeftSaeModel.from_pretrained(TwoLayerMLP(), tmp_path)
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftSaeModel.from_pretrained(TwoLayerMLP(), tmp_path, is_trainable=True)
    assert {n for n, p in trainable.named_parameters() if p.requires_grad} == {
        f"base_model.model.{m}.sae_{p}.default"
        for m in ("up", "down")
        for p in ("W_enc", "b_enc", "W_dec", "b_dec")
    }


def test_loaded_b_dec_is_not_reinitialised_by_training(tmp_path):
    model = trained_mlp_adapter()
    model.save_pretrained(tmp_path)
    b_dec = model.get_base_model().up.sae_b_dec["default"].detach().clone()
    loaded = PeftSaeModel.from_pretrained(TwoLayerMLP(), tmp_path, is_trainable=True)
    loaded.train()
    with loaded.capture():
        loaded(torch.randn(16, 16) + 100)
    assert torch.equal(loaded.get_base_model().up.sae_b_dec["default"], b_dec)


def test_disable_adapter_keeps_a_frozen_adapter_frozen(tmp_path):
    # peft's disable_adapter() re-enables with requires_grad=True (peft issue #3447).
    trained_mlp_adapter().save_pretrained(tmp_path)
    frozen = PeftSaeModel.from_pretrained(TwoLayerMLP(), tmp_path)
    with frozen.disable_adapter():
        pass
    assert not any(p.requires_grad for p in frozen.parameters())
    trainable = PeftSaeModel.from_pretrained(TwoLayerMLP(), tmp_path, is_trainable=True)
    with trainable.disable_adapter():
        assert not any(p.requires_grad for p in trainable.parameters())
    assert sum(p.requires_grad for p in trainable.parameters()) == 8


def test_multiple_adapters_save_and_load_each(tmp_path):
    model = trained_mlp_adapter()
    model.add_adapter("wide", TopKSaeConfig(k=2, num_latents=48, target_modules=["down"]))
    model.set_adapter("wide")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "wide" / "adapter_model.safetensors").is_file()

    loaded = PeftSaeModel.from_pretrained(TwoLayerMLP(), tmp_path)
    loaded.load_adapter(tmp_path / "wide", adapter_name="wide")
    down = loaded.get_base_model().down
    assert down.sae_W_enc["default"].shape == (24, 16) and down.sae_W_enc["wide"].shape == (48, 16)
    assert torch.equal(down.sae_W_dec["wide"], model.get_base_model().down.sae_W_dec["wide"])


def test_an_adapter_runs_only_on_the_modules_it_targets():
    # peft activates "other" on every SAE layer, also on up's, which holds only "default".
    model = get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(k=2, num_latents=8, target_modules=["up"]))
    model.add_adapter("other", TopKSaeConfig(k=2, num_latents=8, target_modules=["down"]))
    model.set_adapter("other")
    x = torch.randn(4, 16)
    with model.stop_after_targets() as outputs:
        model(x)
    assert list(outputs) == ["down"]
    model.eval()
    up = model.get_base_model().up
    with torch.no_grad():
        assert torch.equal(up(x), up.base_layer(x))

def test_disable_unload_and_delete():
    model = trained_mlp_adapter()
    model.eval()  # splice
    host = TwoLayerMLP()
    host.load_state_dict({
        k.replace(".base_layer", ""): v
        for k, v in model.get_base_model().state_dict().items()
        if ".sae_" not in k
    })
    x = torch.randn(8, 16)
    assert not torch.equal(model(x), host(x))
    with model.disable_adapter():
        assert torch.equal(model(x), host(x))
    assert not torch.equal(model(x), host(x))

    model.add_adapter("other", TopKSaeConfig(k=2, num_latents=8, target_modules=["down"]))
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert "other" not in model.get_base_model().down.sae_W_enc

    unloaded = model.unload()
    assert isinstance(unloaded.up, torch.nn.Linear) and isinstance(unloaded.down, torch.nn.Linear)
    assert torch.equal(unloaded(x), host(x))


def test_saved_adapter_on_a_transformers_model_keeps_module_paths(tmp_path):
    model = get_peft_sae_model(tiny_llama(), TopKSaeConfig(k=4, expansion_factor=2,
                                                           target_modules=["model.layers.1"]))
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == sorted(f"base_model.model.model.layers.1.sae_{p}"
                                     for p in ("W_enc", "b_enc", "W_dec", "b_dec"))
    assert tensors["base_model.model.model.layers.1.sae_W_enc"].shape == (64, 32)
    loaded = PeftModel.from_pretrained(tiny_llama(), tmp_path)  # peft's own loader, after `import megasae`
    assert torch.equal(loaded.get_base_model().model.layers[1].sae_W_dec["default"],
                       model.get_base_model().model.layers[1].sae_W_dec["default"])
