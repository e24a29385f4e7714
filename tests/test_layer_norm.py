"""SAEs that read each token standardised (normalize_activations="layer_norm"), against a plain-PyTorch
reference written from SAELens's definition: (x - mean) / (std + 1e-5) in, x_hat * std + mean out. Training
works on the standardised rows (losses and gradients), splicing and capture give the host's units, exports
carry the setting to SAELens and refuse sparsify, and `megasae train` defaults it per architecture."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from megasae import PeftSaeModel, TopKSaeConfig, formats, get_peft_sae_model
from megasae.errors import SettingError
from megasae.sae import RowNorm
from megasae.train import TrainConfig

from helpers import TwoLayerMLP

CONFIG = dict(k=3, num_latents=24, target_modules=["down"], normalize_activations="layer_norm")


def standardise(rows):
    """SAELens's layer_norm, written out: the unbiased std, eps added to it on the way in only."""
    mean = rows.mean(-1, keepdim=True)
    std = (rows - mean).std(-1, keepdim=True)
    return (rows - mean) / (std + 1e-5), mean, std


def dense_codes(pre, k, architecture, threshold=None):
    acts = pre.relu()
    if threshold is not None:
        return acts * (pre > threshold)
    if architecture == "topk":
        return torch.zeros_like(acts).scatter(-1, acts.topk(k).indices, acts.topk(k).values)
    cut = acts.flatten().topk(k * acts.shape[0]).values[-1]
    return acts * (acts >= cut)


def _model(**overrides):
    torch.manual_seed(0)
    model = get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(**{**CONFIG, **overrides}))
    model.train()
    return model


def _layer(model):
    return model.get_base_model().down


def _weights(model):
    layer = _layer(model)
    return {name: getattr(layer, f"sae_{name}")["default"] for name in ("W_enc", "b_enc", "W_dec", "b_dec")}


def down_output(model, x):
    mlp = model.get_base_model()
    return mlp.down.base_layer(mlp.act(mlp.up(x))).detach()


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_training_works_on_standardised_rows_and_reports_the_hosts_units(architecture):
    model = _model(architecture=architecture, auxk_alpha=0.0)  # the loss is the FVU alone
    x = 5 * torch.randn(20, 16, generator=torch.Generator().manual_seed(1))
    with model.capture():  # the first batch initialises b_dec (and the encoder scale) on standardised rows
        model(x)
    rows, mean, std = standardise(down_output(model, x))
    torch.testing.assert_close(_weights(model)["b_dec"].detach(), rows.mean(0), rtol=1e-5, atol=1e-6)

    with model.capture() as outputs:
        model(x)
    out = outputs["down"]
    out.loss.backward()
    ref = {name: w.detach().clone().requires_grad_() for name, w in _weights(model).items()}
    pre = (rows - ref["b_dec"]) @ ref["W_enc"].T + ref["b_enc"]
    x_hat = dense_codes(pre, 3, architecture) @ ref["W_dec"] + ref["b_dec"]
    ref_fvu = (rows - x_hat).pow(2).sum() / (rows - rows.mean(0)).pow(2).sum()
    torch.testing.assert_close(out.fvu, ref_fvu, rtol=1e-5, atol=1e-6)
    ref_fvu.backward()
    for name, w in _weights(model).items():
        torch.testing.assert_close(w.grad, ref[name].grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.target, down_output(model, x))
    torch.testing.assert_close(out.x_hat, x_hat.detach() * std + mean, rtol=1e-5, atol=1e-4)


def trained(architecture="batchtopk", steps=3):
    model = _model(architecture=architecture)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for step in range(steps):
        x = torch.randn(32, 16, generator=torch.Generator().manual_seed(step))
        with model.capture() as outputs:
            model(x)
        outputs["down"].loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def spliced_reference(model, x):
    w = {name: t.detach() for name, t in _weights(model).items()}
    rows, mean, std = standardise(down_output(model, x))
    pre = (rows - w["b_dec"]) @ w["W_enc"].T + w["b_enc"]
    thresholds = _layer(model).sae_threshold
    threshold = thresholds["default"] if "default" in thresholds else None
    codes = dense_codes(pre, 3, "topk" if threshold is None else "batchtopk", threshold)
    return (codes @ w["W_dec"] + w["b_dec"]) * std + mean


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_splicing_reads_each_token_standardised(architecture):
    model = trained(architecture)
    model.eval()
    x = torch.randn(10, 16)
    with torch.no_grad():
        batch = model(x)
        torch.testing.assert_close(batch, spliced_reference(model, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(x[:1])[0], batch[0], rtol=1e-5, atol=1e-6)
        with model.capture() as outputs:  # evaluation reads the SAE the same way
            model(x)
    torch.testing.assert_close(outputs["down"].x_hat, batch, rtol=1e-6, atol=1e-6)


class Linear(nn.Module):
    """A host whose module's output scales with its input: down(c x) = c down(x)."""

    def __init__(self):
        super().__init__()
        self.down = nn.Linear(16, 16, bias=False)

    def forward(self, x):
        return self.down(x)


@pytest.mark.filterwarnings("ignore::UserWarning")  # without it the big token widens its candidates
@pytest.mark.parametrize("normalization, same", [("layer_norm", True), ("none", False)])
def test_a_tokens_codes_do_not_grow_with_its_norm(normalization, same):
    """The point of it: at inference a token 50 times the others' norm fires the latents it fires at its own
    scale, where without it the threshold lets it fire many more."""
    torch.manual_seed(0)
    model = get_peft_sae_model(Linear(), TopKSaeConfig(**{**CONFIG, "architecture": "batchtopk",
                                                          "normalize_activations": normalization}))
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(7))
    with model.capture():  # learns b_dec and the threshold
        model(x)
    model.eval()
    with torch.no_grad(), model.capture() as outputs:
        model(torch.cat([x[:4], 50 * x[:4]]))
    fired = (outputs["down"].values > 0).sum(-1)
    assert torch.equal(fired[:4], fired[4:]) == same
    if same:
        values = outputs["down"].values
        torch.testing.assert_close(values[:4], values[4:], rtol=1e-4, atol=1e-5)


def test_saved_reloaded_and_exported_to_saelens_with_the_setting(tmp_path):
    model = trained("batchtopk")
    model.save_pretrained(tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
        "normalize_activations"] == "layer_norm"
    loaded = PeftSaeModel.from_pretrained(TwoLayerMLP(), tmp_path / "adapter")
    loaded.get_base_model().load_state_dict(model.get_base_model().state_dict())
    model.eval()
    loaded.eval()
    x = torch.randn(6, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    formats.export(tmp_path / "adapter", "saelens", tmp_path / "out")
    folder = tmp_path / "out" / "down"
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["normalize_activations"] == "layer_norm" and cfg["architecture"] == "jumprelu"
    w = load_file(folder / "sae_weights.safetensors")
    rows, mean, std = standardise(down_output(model, x))
    pre = (rows - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    theirs = ((pre.relu() * (pre > w["threshold"])) @ w["W_dec"] + w["b_dec"]) * std + mean
    with torch.no_grad():
        torch.testing.assert_close(model(x), theirs, rtol=1e-5, atol=1e-5)
    assert formats.read(folder).config.normalize_activations == "layer_norm"


def test_sparsify_export_refuses_a_standardising_sae(tmp_path):
    model = trained("topk", steps=1)
    model.save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"reads each token standardised \(layer_norm\), which sparsify's "
                                         "SparseCoder cannot express; export it to SAELens instead"):
        formats.export(tmp_path / "adapter", "sparsify", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_adapter_saved_before_the_setting_reads_its_tokens_as_they_are(tmp_path):
    model = trained("topk", steps=1)
    model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    del config["normalize_activations"]
    config_file.write_text(json.dumps(config))
    assert formats.read(tmp_path).config.normalize_activations == "none"
    loaded = PeftSaeModel.from_pretrained(TwoLayerMLP(), tmp_path)
    assert not _layer(loaded).sae_spec["default"].layer_norm


@pytest.mark.parametrize("architecture, setting, resolved", [
    ("batchtopk", "auto", "layer_norm"), ("topk", "auto", "none"),
    ("batchtopk", "none", "none"), ("topk", "layer_norm", "layer_norm"),
])
def test_train_defaults_it_per_architecture(architecture, setting, resolved):
    cfg = TrainConfig(architecture=architecture, normalize_activations=setting)
    assert cfg.peft_config(cfg.saes()[0], ["down"]).normalize_activations == resolved


def test_bad_settings_are_one_sentence():
    with pytest.raises(ValueError, match=r"normalize_activations must be one of \['none', 'layer_norm'\], "
                                         "got 'rms'"):
        TopKSaeConfig(k=3, target_modules=["down"], normalize_activations="rms")
    with pytest.raises(SettingError, match="--normalize-activations must be one of"):
        TrainConfig(normalize_activations="rms")


def test_bfloat16_rows_are_standardised_with_float32_statistics():
    rows = (1000 + torch.randn(4, 64, generator=torch.Generator().manual_seed(0))).bfloat16()
    norm = RowNorm.of(rows)
    want, mean, std = standardise(rows.double())
    assert norm.apply(rows).dtype == torch.bfloat16
    torch.testing.assert_close(norm.apply(rows).double(), want, rtol=0.02, atol=0.02)
    torch.testing.assert_close(norm.undo(norm.apply(rows)).double(), rows.double(), rtol=0.01, atol=0)
