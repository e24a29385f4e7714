"""megasae.formats: SAELens, sparsify and the original project's layouts, read and written without the
peers installed: key names, shapes, each format's math recomputed here, exact round trips and one-sentence
errors."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megasae import PeftSaeModel, TopKSaeConfig, formats, get_peft_sae_model, sae, sae_layers
from megasae.formats import hub

from helpers import DummyModel, TwoLayerMLP, tiny_llama

TARGETS = ["model.layers.1", "model.layers.2"]
POLICY = {"mask_position_0": True, "exclude_special_tokens": True, "outlier_factor": 10.0, "tokens": "all"}
K, LATENTS, WIDTH = 4, 64, 32


def random_adapter(path, **config):
    """A tiny-Llama adapter saved by peft, every SAE tensor random (the biases too)."""
    model = get_peft_sae_model(tiny_llama(), TopKSaeConfig(
        k=K, num_latents=LATENTS, target_modules=TARGETS, token_policy=POLICY, ctx_len=16,
        dataset="words.parquet", base_model_name_or_path="org/tiny-llama", **config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".sae_" in name:
                param.copy_(torch.randn_like(param))
    model.save_pretrained(path)
    return path


def spliced(source, x, host=None):
    """{target: the SAE's reconstruction of x} with the SAEs of `source` attached to the host."""
    model = PeftSaeModel.from_pretrained(host or tiny_llama(), source)
    return {layer.module_path: layer._reconstruct("default", x) for layer in sae_layers(model)}


def dense(indices, values, num_latents):
    return torch.zeros(indices.shape[0], num_latents).scatter_(-1, indices, values)


def test_saelens_layout_and_math(tmp_path):
    adapter = random_adapter(tmp_path / "adapter")
    notes = formats.export(adapter, "saelens", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == TARGETS
    assert notes == [f"no {adapter / 'eval.json'}: no sparsity written (run `megasae eval` to measure firing "
                     "frequencies)"]
    x = torch.randn(20, WIDTH)
    ours = spliced(adapter, x)
    for target in TARGETS:
        folder = tmp_path / "out" / target
        assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg == {
            "architecture": "topk", "d_in": WIDTH, "d_sae": LATENTS, "k": K, "dtype": "float32",
            "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
            "reshape_activations": "none",
            "rescale_acts_by_decoder_norm": False,
            "metadata": {"model_name": "org/tiny-llama", "hook_name": target, "context_size": 16,
                         "dataset_path": "words.parquet", "seqpos_slice": [1, None],
                         "exclude_special_tokens": True, "prepend_bos": False},
        }
        w = load_file(folder / "sae_weights.safetensors")
        assert {name: tuple(t.shape) for name, t in w.items()} == {
            "W_enc": (WIDTH, LATENTS), "b_enc": (LATENTS,), "W_dec": (LATENTS, WIDTH), "b_dec": (WIDTH,)}
        # SAELens's TopK SAE: top-k of the pre-activations, then ReLU.
        top = ((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]).topk(K)
        x_hat = dense(top.indices, top.values.relu(), LATENTS) @ w["W_dec"] + w["b_dec"]
        torch.testing.assert_close(ours[target], x_hat, rtol=1e-5, atol=1e-5)


def test_sparsify_layout_and_math(tmp_path):
    adapter = random_adapter(tmp_path / "adapter")
    formats.export(adapter, "sparsify", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["layers.1", "layers.2"]
    x = torch.randn(20, WIDTH)
    ours = spliced(adapter, x)
    for target in TARGETS:
        folder = tmp_path / "out" / target.removeprefix("model.")
        assert json.loads((folder / "cfg.json").read_text()) == {
            "activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": LATENTS,
            "k": K, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": WIDTH}
        w = load_file(folder / "sae.safetensors")
        assert {name: tuple(t.shape) for name, t in w.items()} == {
            "encoder.weight": (LATENTS, WIDTH), "encoder.bias": (LATENTS,), "W_dec": (LATENTS, WIDTH),
            "b_dec": (WIDTH,)}
        # sparsify's SparseCoder: ReLU of the pre-activations, then top-k.
        top = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"]).topk(K)
        x_hat = dense(top.indices, top.values, LATENTS) @ w["W_dec"] + w["b_dec"]
        torch.testing.assert_close(ours[target], x_hat, rtol=1e-5, atol=1e-5)


def test_relu_then_topk_gives_the_codes_of_topk_then_relu():
    # Biases that leave many rows with fewer than k positive pre-activations, where the orders could differ.
    x, W_enc, b_dec = torch.randn(200, WIDTH), torch.randn(LATENTS, WIDTH) / WIDTH**0.5, torch.randn(WIDTH)
    b_enc = torch.randn(LATENTS) - 3
    values, indices = sae.encode(x, W_enc, b_enc, b_dec, K)
    pre = (x - b_dec) @ W_enc.T + b_enc
    assert ((pre > 0).sum(-1) < K).float().mean() > 0.5
    top = pre.relu().topk(K)
    assert torch.equal(dense(indices, values, LATENTS), dense(top.indices, top.values, LATENTS))


def test_round_trips_are_exact(tmp_path):
    adapter = random_adapter(tmp_path / "adapter")
    original = load_file(adapter / "adapter_model.safetensors")
    x = torch.randn(20, WIDTH)
    ours = spliced(adapter, x)
    for fmt in ("saelens", "sparsify"):
        formats.export(adapter, fmt, tmp_path / fmt)
        sources = [tmp_path / fmt / t for t in TARGETS] if fmt == "saelens" else [tmp_path / fmt]
        for i, source in enumerate(sources):
            back = formats.import_sae(source, tmp_path / f"{fmt}-back-{i}")
            tensors = load_file(tmp_path / f"{fmt}-back-{i}" / "adapter_model.safetensors")
            assert tensors and all(torch.equal(t, original[key]) for key, t in tensors.items())
            config = TopKSaeConfig.from_pretrained(str(tmp_path / f"{fmt}-back-{i}"))
            assert (config.k, config.num_latents, config.relu_codes) == (K, LATENTS, True)
            if fmt == "saelens":
                assert (config.base_model_name_or_path, config.ctx_len, config.dataset) == (
                    "org/tiny-llama", 16, "words.parquet")
                # SAELens filters no outliers, so it records none.
                assert config.token_policy == {**POLICY, "outlier_factor": None}
            for target, x_hat in spliced(source, x).items():  # the exported folder loads directly too
                assert target in back.saes and torch.equal(x_hat, ours[target])


def test_sparsity_from_eval_json(tmp_path):
    adapter = random_adapter(tmp_path / "adapter")
    frequency = torch.rand(LATENTS).tolist()
    frequency[0] = 0.0
    (adapter / "eval.json").write_text(json.dumps(
        {"targets": {TARGETS[0]: {"groups": {"all": {"firing_frequency": frequency}}}}}))
    notes = formats.export(adapter, "saelens", tmp_path / "out")
    sparsity = load_file(tmp_path / "out" / TARGETS[0] / "sparsity.safetensors")["sparsity"]
    torch.testing.assert_close(sparsity, torch.tensor(frequency).add(1e-10).log10())
    assert sparsity[0] == -10
    assert not (tmp_path / "out" / TARGETS[1] / "sparsity.safetensors").exists()
    assert notes == [f"{adapter / 'eval.json'} has no firing frequencies of the {LATENTS} latents of "
                     f"{TARGETS[1]!r}: no sparsity written for it"]


def original_adapter(path, k=3, latents=20):
    """An adapter as the original project saves it: its config fields, an nn.Linear encoder without bias."""
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "TOPK_SAE", "k": k, "num_latents": latents, "expansion_factor": 32,
        "target_modules": ["linear"],
        "dead_tokens_threshold": 10_000_000, "base_model_name_or_path": None, "task_type": None,
        "inference_mode": True, "revision": None, "auto_mapping": None, "peft_version": "0.16.0"}))
    # At the scale of its own init: an nn.Linear encoder, the decoder starting as its copy.
    encoder = torch.nn.Linear(10, latents, bias=False).weight.detach()
    weights = {"sae_encoder.weight": encoder, "sae_W_dec": encoder + 0.1 * torch.randn(latents, 10),
               "sae_b_dec": 0.1 * torch.randn(10)}
    save_file({f"base_model.model.linear.{name}": t for name, t in weights.items()},
              path / "adapter_model.safetensors")
    return weights


def original_forward(weights, y, k):
    """The original project's splice: x_hat = W_dec^T topk(W_enc (y - b_dec)) + b_dec, raw top-k values."""
    top = ((y - weights["sae_b_dec"]) @ weights["sae_encoder.weight"].T).topk(k)
    codes = dense(top.indices, top.values, weights["sae_W_dec"].shape[0])
    return codes @ weights["sae_W_dec"] + weights["sae_b_dec"]


def test_original_project_adapter_reproduces_its_outputs(tmp_path):
    weights = original_adapter(tmp_path / "original", k=3, latents=4)  # 3 of 4: negative values get kept
    host = DummyModel()
    same_host = copy.deepcopy(host)
    x = torch.randn(64, 10)
    expected = original_forward(weights, host(x).detach(), 3)
    model = PeftSaeModel.from_pretrained(host, tmp_path / "original").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-6)
        # Negative top-k values are kept: the proof that no ReLU ran.
        values, _ = sae.encode(host.linear.base_layer(x), weights["sae_encoder.weight"], torch.zeros(4),
                               weights["sae_b_dec"], 3, relu=False)
        assert (values < 0).any()

    saes = formats.import_sae(tmp_path / "original", tmp_path / "imported")
    assert saes.format == "original"
    config = json.loads((tmp_path / "imported" / "adapter_config.json").read_text())
    assert (config["relu_codes"], config["k"], config["num_latents"]) == (False, 3, 4)
    assert torch.equal(load_file(tmp_path / "imported" / "adapter_model.safetensors")[
        "base_model.model.linear.sae_b_enc"], torch.zeros(4))
    imported = PeftSaeModel.from_pretrained(same_host, tmp_path / "imported").eval()
    with torch.no_grad():
        torch.testing.assert_close(imported(x), expected, rtol=0, atol=1e-6)
    for fmt in ("saelens", "sparsify"):
        with pytest.raises(ValueError, match="The SAE on 'linear' keeps its raw top-k values without ReLU"):
            formats.export(tmp_path / "imported", fmt, tmp_path / fmt)
        assert not (tmp_path / fmt).exists()


def test_codes_without_relu_get_the_gradients_of_autograd():
    x, W_enc, b_enc, b_dec = torch.randn(30, 8), torch.randn(16, 8), torch.randn(16), torch.randn(8)
    W_dec = torch.randn(16, 8)
    params = [t.requires_grad_() for t in (W_enc, b_enc, W_dec, b_dec)]
    target = torch.randn(30, 8)
    values, indices = sae.encode(x, W_enc, b_enc, b_dec, 4, relu=False)
    ours = torch.autograd.grad((sae.decode(values, indices, W_dec, b_dec) - target).pow(2).sum(), params)
    top = ((x - b_dec) @ W_enc.T + b_enc).topk(4)
    assert torch.equal(indices, top.indices)
    x_hat = dense(top.indices, top.values, 16) @ W_dec + b_dec
    for got, want in zip(ours, torch.autograd.grad((x_hat - target).pow(2).sum(), params)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# -- bad input: one sentence, nothing written -----------------------------------------------------------


def test_unknown_format_and_a_folder_of_no_format(tmp_path):
    adapter = random_adapter(tmp_path / "adapter")
    with pytest.raises(ValueError, match="Unknown export format 'onnx'; valid formats: saelens, sparsify."):
        formats.export(adapter, "onnx", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds none of the SAE formats megasae reads"):
        formats.read(tmp_path / "empty")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage, message", [
    ("drop", r"adapter_model.safetensors has no tensor 'base_model.model.model.layers.2.sae_W_dec'"),
    ("nan", r"key 'base_model.model.model.layers.2.sae_W_dec' holds NaN or infinite values"),
    ("shape", r"key 'base_model.model.model.layers.2.sae_W_dec' has shape \(64, 31\), expected \(64, any\)"
              r"|key 'base_model.model.model.layers.2.sae_b_dec' has shape \(32,\), expected \(31,\)"),
])
def test_a_damaged_adapter_names_the_file_and_key(tmp_path, damage, message):
    adapter = random_adapter(tmp_path / "adapter")
    file = adapter / "adapter_model.safetensors"
    tensors = load_file(file)
    key = "base_model.model.model.layers.2.sae_W_dec"
    if damage == "drop":
        del tensors[key]
    elif damage == "nan":
        tensors[key][3, 5] = float("nan")
    else:
        tensors[key] = tensors[key][:, :31].contiguous()
    save_file(tensors, file)
    for load in (formats.read, lambda a: PeftSaeModel.from_pretrained(tiny_llama(), a)):
        with pytest.raises(ValueError, match=message):
            load(adapter)


def test_missing_weights_file_and_missing_paths_never_reach_the_hub(tmp_path, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("sent to the Hugging Face Hub")

    monkeypatch.setattr(hub, "snapshot_download", no_hub)
    adapter = random_adapter(tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="has an adapter_config.json but no adapter_model.safetensor"):
        PeftSaeModel.from_pretrained(tiny_llama(), adapter)
    monkeypatch.chdir(tmp_path)
    for missing in ("./nope", str(tmp_path / "nope"), "adapter/nope", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            formats.read(missing)


def test_hub_ids_resolve_through_the_cache(tmp_path, monkeypatch):
    random_adapter(tmp_path / "adapter")
    formats.export(tmp_path / "adapter", "saelens", tmp_path / "snapshot")
    calls = []

    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False):
        calls.append((repo_id, allow_patterns, local_files_only))
        if repo_id == "org/cached" or not local_files_only:
            return str(tmp_path / "snapshot")
        raise hub.LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    monkeypatch.chdir(tmp_path)
    assert list(formats.read("org/cached:model.layers.1").saes) == ["model.layers.1"]
    assert calls == [("org/cached", ["model.layers.1/*"], True)]
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="org/missing is neither a local path nor a cached Hugging "
                                                "Face Hub repository, and the Hub is offline"):
        formats.read("org/missing")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    formats.read("org/missing:model.layers.2")  # online: downloaded after the cache missed
    assert calls[-2:] == [("org/missing", ["model.layers.2/*"], True),
                          ("org/missing", ["model.layers.2/*"], False)]


def test_shapes_that_do_not_fit_and_widths_that_do_not_fit_the_host(tmp_path):
    adapter = random_adapter(tmp_path / "adapter")
    formats.export(adapter, "saelens", tmp_path / "out")
    folder = tmp_path / "out" / "model.layers.1"
    tensors = load_file(folder / "sae_weights.safetensors")
    save_file({**tensors, "W_dec": tensors["W_dec"][:, :8].contiguous()}, folder / "sae_weights.safetensors")
    with pytest.raises(ValueError, match=r"sae_weights.safetensors key 'W_dec' has shape \(64, 8\), expected "
                                         r"\(64, 32\)"):
        formats.read(folder)
    # A width-32 SAE on a width-16 module.
    save_file(tensors, folder / "sae_weights.safetensors")
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "down"
    (folder / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"base_model.model.down.sae_W_enc has shape \(64, 32\) in the "
                                         r"checkpoint but \(64, 16\) in the model"):
        PeftSaeModel.from_pretrained(TwoLayerMLP(width=16), folder)


def test_outputs_are_atomic_and_never_overwrite(tmp_path, monkeypatch):
    adapter = random_adapter(tmp_path / "adapter")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="taken already exists and is not empty"):
        formats.export(adapter, "sparsify", tmp_path / "taken")
    assert [p.name for p in (tmp_path / "taken").iterdir()] == ["keep.txt"]
    (tmp_path / "empty").mkdir()
    formats.export(adapter, "sparsify", tmp_path / "empty")  # an empty directory is filled

    def fail(saes, directory, *args):
        (directory / "half").mkdir()
        raise OSError("disk full")

    monkeypatch.setattr(formats.saelens, "write", fail)
    with pytest.raises(OSError, match="disk full"):
        formats.export(adapter, "saelens", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "empty", "taken"]


def test_a_transcoder_is_refused_by_saelens_before_anything_is_written(tmp_path):
    adapter = random_adapter(tmp_path / "adapter", transcode=True)
    with pytest.raises(ValueError, match="The SAE on 'model.layers.1' is a transcoder and SAELens has no "
                                         "TopK transcoder; export it to sparsify instead."):
        formats.export(adapter, "saelens", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    formats.export(adapter, "sparsify", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "layers.1" / "cfg.json").read_text())["transcode"] is True


def test_saelens_decoder_norm_rescaling_and_no_input_bias_fold_into_megasae_weights(tmp_path):
    folder = tmp_path / "lens"
    folder.mkdir()
    w = {"W_enc": torch.randn(WIDTH, LATENTS), "b_enc": torch.randn(LATENTS),
         "W_dec": 3 * torch.rand(LATENTS, 1) * torch.randn(LATENTS, WIDTH), "b_dec": torch.randn(WIDTH)}
    save_file(w, folder / "sae_weights.safetensors")
    (folder / "cfg.json").write_text(json.dumps({
        "architecture": "topk", "d_in": WIDTH, "d_sae": LATENTS, "k": K, "dtype": "float32",
        "apply_b_dec_to_input": False, "rescale_acts_by_decoder_norm": True,
        "metadata": {"hook_name": "model.layers.1", "model_name": "org/tiny-llama"}}))
    x = torch.randn(50, WIDTH)
    # SAELens's TopK SAE with both options: no b_dec on the input, pre-activations times the decoder row
    # norms, codes divided by them again before decoding.
    norms = w["W_dec"].norm(dim=-1)
    top = ((x @ w["W_enc"] + w["b_enc"]) * norms).topk(K)
    x_hat = (dense(top.indices, top.values.relu(), LATENTS) / norms) @ w["W_dec"] + w["b_dec"]
    torch.testing.assert_close(spliced(folder, x)["model.layers.1"], x_hat, rtol=1e-4, atol=1e-4)
    assert formats.read(folder).config.token_policy is None  # SAELens recorded no seqpos_slice


@pytest.mark.parametrize("edit, message", [
    ({"architecture": "gated"}, "has architecture 'gated'; megasae reads SAELens SAEs with "
                                "architecture 'topk' or 'jumprelu'"),
    ({"normalize_activations": "expected_average_only_in"}, "has normalize_activations"),
    ({"metadata": {}}, "names no hook_name: megasae cannot tell which module the SAE reads"),
    ({"k": 65}, r"has k = 65; it must be an integer from 1 to the 64 latents"),
])
def test_saelens_configs_megasae_cannot_read(tmp_path, edit, message):
    random_adapter(tmp_path / "adapter")
    formats.export(tmp_path / "adapter", "saelens", tmp_path / "out")
    folder = tmp_path / "out" / "model.layers.1"
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(ValueError, match=message):
        formats.read(folder)


def test_a_sparsify_run_directory_of_different_ks_is_refused(tmp_path):
    random_adapter(tmp_path / "adapter")
    formats.export(tmp_path / "adapter", "sparsify", tmp_path / "out")
    cfg_file = tmp_path / "out" / "layers.2" / "cfg.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "k": 8}))
    assert formats.read(tmp_path / "out" / "layers.2").config.k == 8  # one hookpoint at a time reads
    with pytest.raises(ValueError, match=r"holds hookpoints with different \(k, transcode\) settings"):
        formats.read(tmp_path / "out")


def test_an_adapter_saved_before_these_fields_loads_as_before(tmp_path):
    adapter = random_adapter(tmp_path / "adapter")
    config_file = adapter / "adapter_config.json"
    config = json.loads(config_file.read_text())
    for key in ("relu_codes", "token_policy", "ctx_len", "dataset"):
        del config[key]
    config_file.write_text(json.dumps(config))
    saes = formats.read(adapter)
    assert saes.config.relu_codes and saes.config.token_policy is None and saes.config.ctx_len is None
    x = torch.randn(20, WIDTH)
    w = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.sae_"
    top = ((x - w[key + "b_dec"]) @ w[key + "W_enc"].T + w[key + "b_enc"]).topk(K)
    x_hat = dense(top.indices, top.values.relu(), LATENTS) @ w[key + "W_dec"] + w[key + "b_dec"]
    torch.testing.assert_close(spliced(adapter, x)["model.layers.1"], x_hat, rtol=1e-5, atol=1e-5)


def test_a_hub_id_the_network_cannot_provide_fails_in_one_sentence(tmp_path, monkeypatch):
    def snapshot_download(repo_id, allow_patterns=None, local_files_only=False):
        raise hub.LocalEntryNotFoundError("not cached") if local_files_only else OSError("no route to host")

    monkeypatch.setattr(hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError,
        match=r"org/gone is neither a local path nor a cached Hugging Face Hub "
        r"repository, and the Hub could not provide it \(OSError\)",
    ):
        formats.read("org/gone")
