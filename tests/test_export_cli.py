"""`megasae export` / `megasae import` from the command line, what a trained adapter records of its training,
and eval following that record unless a flag overrides it."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from megasae import formats
from megasae.cli import main as cli_main
from megasae.eval import EvalConfig, InspectConfig, evaluate, run_inspect
from megasae.train import TrainConfig, Trainer

TARGET = "model.layers.1"


@pytest.fixture(scope="module")
def trained(host_dir, words_data, tmp_path_factory):
    """A short training run with a token policy of its own: --tokens text, --outlier-factor 3."""
    out = tmp_path_factory.mktemp("run")
    Trainer(TrainConfig(model=str(host_dir), data=str(words_data), target_modules=(TARGET,), k=4,
                        expansion_factor=2, ctx_len=16, micro_batch_size=4, batch_tokens=64,
                        max_tokens=64 * 2, warmup_steps=1,
                        outlier_factor=3.0, tokens="text", wandb_mode="disabled", output_dir=out,
                        device="cpu")).fit()
    return out


def test_the_adapter_records_how_it_was_trained(trained, host_dir, words_data):
    config = json.loads((trained / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(host_dir)
    assert (config["dataset"], config["ctx_len"], config["relu_codes"]) == (str(words_data), 16, True)
    assert config["token_policy"] == {"mask_position_0": True, "exclude_special_tokens": True,
                                      "outlier_factor": 3.0, "tokens": "text"}


def test_eval_follows_the_recorded_policy_unless_a_flag_says_otherwise(trained, host_dir, words_data):
    cfg = EvalConfig(adapter=str(trained), model=str(host_dir), data=str(words_data), max_tokens=64,
                     batch_size=4, ctx_len=16, device="cpu")
    assert evaluate(cfg)["settings"]["outlier_factor"] == 3.0
    assert evaluate(cfg)["settings"]["tokens"] == "text"
    overridden = evaluate(dataclasses.replace(cfg, outlier_factor=None, tokens="all"))["settings"]
    assert (overridden["outlier_factor"], overridden["tokens"]) == (None, "all")


def test_export_and_import_on_the_command_line(trained, host_dir, words_data, tmp_path, capsys):
    cli_main(["export", "--adapter", str(trained), "--format", "saelens",
              "--output-dir", str(tmp_path / "lens")])
    assert f"wrote {tmp_path / 'lens'}" in capsys.readouterr().out
    metadata = json.loads((tmp_path / "lens" / TARGET / "cfg.json").read_text())["metadata"]
    assert metadata == {"model_name": str(host_dir), "hook_name": TARGET, "context_size": 16,
                        "dataset_path": str(words_data), "seqpos_slice": [1, None],
                        "exclude_special_tokens": True, "prepend_bos": False}
    cli_main(["export", "--adapter", str(trained), "--format", "sparsify", "--target", TARGET,
              "--output-dir", str(tmp_path / "sparsify")])
    assert [p.name for p in (tmp_path / "sparsify").iterdir()] == ["layers.1"]
    cli_main(["import", str(tmp_path / "sparsify"), "--output-dir", str(tmp_path / "back")])
    assert "sparsify SAEs on model.layers.1" in capsys.readouterr().out
    original = load_file(trained / "adapter_model.safetensors")
    back = load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert back.keys() == original.keys() and all(torch.equal(back[k], original[k]) for k in back)
    with pytest.raises(SystemExit):
        cli_main(["export", "--adapter", str(trained), "--format", "onnx",
                  "--output-dir", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()


def test_eval_reads_an_original_project_adapter(host_dir, words_data, tmp_path):
    """Its SAEs sit on nn.Linear modules; --adapter takes its directory as it is."""
    path = tmp_path / "original"
    path.mkdir()
    linear = f"{TARGET}.mlp.down_proj"
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "TOPK_SAE", "k": 3, "num_latents": 40,
                                                          "target_modules": [linear]}))
    encoder = torch.nn.Linear(32, 40, bias=False).weight.detach()
    save_file({f"base_model.model.{linear}.sae_encoder.weight": encoder,
               f"base_model.model.{linear}.sae_W_dec": encoder.clone(),
               f"base_model.model.{linear}.sae_b_dec": torch.zeros(32)}, path / "adapter_model.safetensors")
    result = evaluate(EvalConfig(adapter=str(path), model=str(host_dir), data=str(words_data), max_tokens=64,
                                 batch_size=4, ctx_len=16, device="cpu"))
    stats = result["targets"][linear]["groups"]["all"]
    assert stats["tokens"] > 0 and 0 < stats["l0"] <= 3
    # No recorded policy: megasae train's defaults.
    assert (result["settings"]["tokens"], result["settings"]["outlier_factor"]) == ("all", 10.0)


def test_inspect_reads_an_exported_folder_as_it_reads_the_adapter(trained, host_dir, words_data, tmp_path):
    formats.export(trained, "sparsify", tmp_path / "sparsify")
    pages = {}
    for name, adapter in (("adapter", trained), ("sparsify", tmp_path / "sparsify" / "layers.1")):
        cfg = InspectConfig(adapter=str(adapter), model=str(host_dir), data=str(words_data), max_tokens=64,
                            batch_size=4, ctx_len=16, device="cpu", top=2, output=tmp_path / f"{name}.html",
                            tokens="all", outlier_factor=3.0)  # sparsify records no policy: give one
        pages[name] = run_inspect(cfg).read_text()
    # Same latents and contexts; only the adapter named on the page differs.
    assert pages["adapter"].replace(str(trained), "X") == pages["sparsify"].replace(
        str(tmp_path / "sparsify" / "layers.1"), "X")


def test_the_built_in_host_is_recorded_by_its_hub_name(host_dir, words_data, tmp_path, monkeypatch):
    import megasae.parallel.host as host_module
    from megasae.models import load_host_model

    # The tiny host stands in for the built-in SmolLM2, which loads from a local GGUF converted into a cache.
    monkeypatch.setattr(host_module, "load_host_model", lambda path, **kw: load_host_model(host_dir, **kw))
    trainer = Trainer(TrainConfig(data=str(words_data), target_modules=(TARGET,), k=4, expansion_factor=2,
                                  ctx_len=16, micro_batch_size=4, batch_tokens=64, max_tokens=64,
                                  wandb_mode="disabled", output_dir=tmp_path, device="cpu"))
    assert trainer.sae_configs["default"].base_model_name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
