"""Bad input gets one clear sentence that names the thing and what would be valid."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

from megasae import PeftSaeModel, TopKSaeConfig, get_peft_sae_model

from helpers import TwoLayerMLP, tiny_llama


def test_missing_target_names_the_closest_modules():
    with pytest.raises(ValueError) as err:
        config = TopKSaeConfig(k=2, target_modules=["model.layers.1", "model.layer.3"])
        get_peft_sae_model(tiny_llama(), config)
    message = str(err.value)
    assert "'model.layer.3' not found in LlamaForCausalLM" in message
    assert "model.layers.3" in message


def test_missing_regex_target():
    with pytest.raises(ValueError, match="not found in TwoLayerMLP"):
        get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(k=2, target_modules=r"encoder\..*"))


def test_unsupported_target_type():
    with pytest.raises(TypeError, match=r"Cannot attach a TopK SAE to 'act' \(GELU\)"):
        get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(k=2, target_modules=["act"]))


def test_module_that_returns_no_hidden_state():
    class ReturnsDict(torch.nn.Module):
        hidden_size = 4

        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            return {"hidden": self.proj(x)}

    class Host(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = ReturnsDict()

        def forward(self, x):
            return self.block(x)

    model = get_peft_sae_model(Host(), TopKSaeConfig(k=1, num_latents=4, target_modules=["block"]))
    with pytest.raises(TypeError, match="returned dict"):
        model(torch.randn(2, 4))


@pytest.mark.parametrize("k", [0, -3])
def test_k_below_one(k):
    with pytest.raises(ValueError, match="k must be a positive integer"):
        TopKSaeConfig(k=k, target_modules=["up"])


def test_k_above_num_latents():
    with pytest.raises(ValueError, match=r"k \(9\) must be at most num_latents \(8\)"):
        TopKSaeConfig(k=9, num_latents=8, target_modules=["up"])
    # With num_latents from the expansion factor the check happens once the width is known.
    message = r"k \(40\) must be at most the number of latents \(32\) of the SAE on 'down'"
    with pytest.raises(ValueError, match=message):
        get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(k=40, expansion_factor=2, target_modules=["down"]))


def test_bad_sae_dtype():
    with pytest.raises(ValueError, match="sae_dtype must be one of"):
        TopKSaeConfig(k=2, target_modules=["up"], sae_dtype="float16")
    with pytest.raises(ValueError, match="compute_dtype must be None or one of"):
        TopKSaeConfig(k=2, target_modules=["up"], compute_dtype="float16")


def test_adapter_that_does_not_fit_names_key_and_shapes(tmp_path):
    get_peft_sae_model(TwoLayerMLP(width=16), TopKSaeConfig(k=2, num_latents=8, target_modules=["down"])) \
        .save_pretrained(tmp_path)
    with pytest.raises(ValueError) as err:
        PeftSaeModel.from_pretrained(TwoLayerMLP(width=24), tmp_path)
    message = str(err.value)
    assert "base_model.model.down.sae_W_enc" in message
    assert "(8, 16) in the checkpoint but (8, 24) in the model" in message


def test_directory_that_is_not_an_adapter(tmp_path):
    with pytest.raises(ValueError, match="holds none of the SAE formats megasae reads: a megasae or"):
        PeftSaeModel.from_pretrained(TwoLayerMLP(), tmp_path)


def test_directory_with_another_peft_method(tmp_path):
    get_peft_model(TwoLayerMLP(), LoraConfig(target_modules=["up"])).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
    with pytest.raises(ValueError, match="has peft_type 'LORA', expected 'TOPK_SAE'"):
        PeftSaeModel.from_pretrained(TwoLayerMLP(), tmp_path)


def test_two_active_adapters_on_one_layer():
    """Both capture side by side (a sweep), but only one can produce the module's output."""
    model = get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(k=2, num_latents=8, target_modules=["down"]))
    model.add_adapter("other", TopKSaeConfig(k=3, num_latents=8, target_modules=["down"]))
    model.base_model.set_adapter(["default", "other"])
    with model.capture() as outputs:
        model(torch.randn(2, 16))
    assert sorted(outputs) == ["default/down", "other/down"]
    assert outputs["other/down"].l0 == 3
    model.eval()
    with pytest.raises(ValueError, match="splices, caches or replaces with one adapter at a time"):
        model(torch.randn(2, 16))
