"""The original project's README example, with only the package name changed."""

import torch
import torch.nn as nn
from peft import inject_adapter_in_model

from megasae import PeftSaeModel, TopKSaeConfig, get_peft_sae_model


def test_original_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class DummyModel(nn.Module):
        def __init__(self):
            super().__init__(); self.linear = nn.Linear(10, 10)  # noqa: E702 (the README, verbatim)
        def forward(self, x): return self.linear(x)

    config = TopKSaeConfig(k=1, num_latents=5, target_modules=["linear"])
    model = inject_adapter_in_model(config, DummyModel()); model(torch.randn(1, 512, 10))  # noqa: E702
    peft_model = get_peft_sae_model(DummyModel(), config); peft_model(torch.randn(1, 512, 10))  # noqa: E702
    peft_model.save_pretrained("out")
    loaded = PeftSaeModel.from_pretrained(DummyModel(), "out", adapter_name="default", low_cpu_mem_usage=True)

    assert (tmp_path / "out" / "adapter_config.json").is_file()
    saved = peft_model.get_base_model().linear
    for name in ("sae_W_enc", "sae_b_enc", "sae_W_dec", "sae_b_dec"):
        got = getattr(loaded.get_base_model().linear, name)["default"]
        assert torch.equal(got, getattr(saved, name)["default"])
