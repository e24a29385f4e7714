"""Sweeps: several SAEs per target from one host forward, each the SAE its own run trains."""

import json

import pytest
import torch
from safetensors.torch import load_file

from megasae import PeftSaeModel
from megasae.cli import main as cli_main
from megasae.errors import SettingError
from megasae.models import load_host_model
from megasae.train import Trainer
from megasae.train.sweep import SaeSettings

from distributed import run_ranks
from helpers import (
    adapter_tensors,
    config,
    fit_until_sigterm,
    parallel_config,
    text_rows,
    train_and_resume_rank,
)

TARGETS = ("model.layers.0", "model.layers.1")


def _same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_each_sae_of_a_sweep_is_the_sae_of_its_own_run(host_dir, text_data, tmp_path):
    """Two targets, a grid of k x width (the default lr follows the width): every SAE of the sweep equals,
    weights and metrics, a run of its settings alone. The clip (small enough to act at every step) bounds
    each SAE's gradient over its own targets."""
    sweep = tmp_path / "sweep"
    shared = dict(target_modules=TARGETS, lr=None, grad_clip=0.05)
    Trainer(config(host_dir, text_data, sweep, k=(2, 4), expansion_factor=(2, 4), **shared)).fit()
    runs = {"k2-x2": dict(k=2, expansion_factor=2), "k2-x4": dict(k=2, expansion_factor=4),
            "k4-x2": dict(k=4, expansion_factor=2), "k4-x4": dict(k=4, expansion_factor=4)}
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name != "checkpoints") == sorted(runs)
    records = [json.loads(line) for line in (sweep / "metrics.jsonl").read_text().splitlines()]
    for name, settings in runs.items():
        alone = tmp_path / name
        Trainer(config(host_dir, text_data, alone, **shared, **settings)).fit()
        _same_tensors(adapter_tensors(sweep / name), adapter_tensors(alone))
        own = [json.loads(line) for line in (alone / "metrics.jsonl").read_text().splitlines()]
        for target in TARGETS:
            assert [r[f"fvu/{name}/{target}"] for r in records] == pytest.approx(
                [r[f"fvu/{target}"] for r in own], rel=1e-5)
        assert records[-1][f"lr/{name}"] == pytest.approx(own[-1]["lr"])
        saved = json.loads((sweep / name / "adapter_config.json").read_text())
        assert (saved["k"], saved["expansion_factor"]) == (settings["k"], settings["expansion_factor"])

    host, _ = load_host_model(host_dir)
    model = PeftSaeModel.from_pretrained(host, sweep / "k2-x4")
    assert model.get_base_model().model.layers[1].sae_W_enc["default"].shape == (128, 32)
    with pytest.raises(ValueError, match=r"holds several adapters \(a sweep's\), one per subdirectory: name "
                                         f"one of {sweep / 'k2-x2'}, "):
        PeftSaeModel.from_pretrained(host, sweep)
    assert (sweep / "curves.png").is_file()


def test_a_sweep_file_names_its_saes_and_sets_each_one(host_dir, text_data, tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("- {k: 2, name: narrow}\n- {k: 4, auxk_alpha: 0.0, lr: 0.001}\n")
    out = tmp_path / "run"
    cfg = config(host_dir, text_data, out, sweep=sweep_file, eval_every=6, eval_data=str(text_data),
                 eval_tokens=128)
    assert cfg.saes() == [
        SaeSettings("narrow", k=2, num_latents=0, expansion_factor=4, lr=3e-3, auxk_alpha=1 / 32),
        SaeSettings("k4-lr0p001-auxk0", k=4, num_latents=0, expansion_factor=4, lr=1e-3, auxk_alpha=0.0),
    ]
    Trainer(cfg).fit()
    alone = tmp_path / "alone"
    Trainer(config(host_dir, text_data, alone, k=4, auxk_alpha=0.0, lr=1e-3)).fit()
    _same_tensors(adapter_tensors(out / "k4-lr0p001-auxk0"), adapter_tensors(alone))
    assert json.loads((out / "narrow" / "adapter_config.json").read_text())["k"] == 2
    held_out = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    l0 = {name: held_out[f"eval/l0/{name}/model.layers.1"] for name in ("narrow", "k4-lr0p001-auxk0")}
    assert 0 < l0["narrow"] <= 2 < l0["k4-lr0p001-auxk0"] <= 4
    assert [s["name"] for s in json.loads((out / "config.json").read_text())["saes"]] == [
        "narrow", "k4-lr0p001-auxk0"]


def test_a_sweep_resumes_exactly(host_dir, text_data, tmp_path):
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    Trainer(config(host_dir, text_data, straight, k=(2, 4))).fit()
    fit_until_sigterm(config(host_dir, text_data, stopped, k=(2, 4)), stop_step=5)
    Trainer(config(host_dir, text_data, stopped, k=(2, 4), resume=True)).fit()
    for name in ("k2", "k4"):
        for key, tensor in adapter_tensors(straight / name).items():
            assert torch.equal(tensor, adapter_tensors(stopped / name)[key]), key

    with pytest.raises(ValueError, match=r"--k \[2, 4\] -> \[2, 8\]"):
        Trainer(config(host_dir, text_data, stopped, k=(2, 8), resume=True))
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("- {k: 2}\n- {k: 4}\n")
    Trainer(config(host_dir, text_data, tmp_path / "from_file", sweep=sweep_file, max_tokens=128 * 6)).fit()
    sweep_file.write_text("- {k: 2}\n- {k: 3}\n")
    with pytest.raises(ValueError, match="the SAEs of --sweep"):
        Trainer(config(host_dir, text_data, tmp_path / "from_file", sweep=sweep_file, resume=True))


def test_overwrite_deletes_the_adapters_of_a_sweep(host_dir, text_data, tmp_path):
    out = tmp_path / "run"
    Trainer(config(host_dir, text_data, out, k=(2, 4), max_tokens=128 * 2)).fit()
    (out / "notes.txt").write_text("mine")
    Trainer(config(host_dir, text_data, out, max_tokens=128 * 2, overwrite=True)).fit()
    assert not (out / "k2" / "adapter_model.safetensors").exists()
    assert (out / "adapter_model.safetensors").is_file() and (out / "notes.txt").read_text() == "mine"


def test_a_sweep_under_tensor_parallelism_equals_one_process(host_dir, tmp_path):
    data = text_rows(tmp_path / "text.parquet")
    Trainer(parallel_config(host_dir, data, tmp_path / "one", k=(2, 4))).fit()
    run_ranks(train_and_resume_rank, 2, parallel_config(host_dir, data, tmp_path / "tp", tp=2, k=(2, 4)))
    for name in ("k2", "k4"):
        _same_tensors(adapter_tensors(tmp_path / "tp" / name), adapter_tensors(tmp_path / "one" / name))


def test_comma_lists_on_the_command_line(host_dir, text_data, tmp_path, capsys):
    out = tmp_path / "run"
    flags = {"--model": host_dir, "--data": text_data, "--target-modules": "model.layers.1", "--k": "2,4",
             "--lr": "1e-3,3e-3", "--expansion-factor": 4, "--ctx-len": 16, "--micro-batch-size": 4,
             "--batch-tokens": 128, "--max-tokens": 256, "--warmup-steps": 1, "--wandb-mode": "disabled",
             "--device": "cpu", "--output-dir": out}
    cli_main(["train", *(str(part) for pair in flags.items() for part in pair)])
    names = ["k2-lr0p001", "k2-lr0p003", "k4-lr0p001", "k4-lr0p003"]
    for name in names:
        assert load_file(out / name / "adapter_model.safetensors")
    printed = capsys.readouterr().out
    for name in names:
        assert f"{name}/model.layers.1: FVU" in printed and f"--adapter {out / name}" in printed


@pytest.mark.parametrize("sweep, message", [
    ("- {k: 0}\n", r"SAE 0 of the sweep: --k must be at least 1, got 0\."),
    ("- {k: 2, width: 8}\n", r"SAE 0 of sweep file .* sets \['width'\]; it may set"),
    ("k: 2\n", "must hold a non-empty list of mappings"),
    ("- {k: 2, name: a}\n- {k: 4, name: a}\n", r"names several SAEs \['a'\]"),
    ("- {k: 2, name: a.b}\n", "must be letters, digits"),
])
def test_a_bad_sweep_is_refused_in_one_sentence(host_dir, text_data, tmp_path, sweep, message):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(sweep)
    with pytest.raises((ValueError, SettingError), match=message):
        config(host_dir, text_data, tmp_path / "run", sweep=sweep_file)


def test_a_sweep_file_and_a_comma_list_are_one_too_many(host_dir, text_data, tmp_path):
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text("- {k: 2}\n")
    with pytest.raises(SettingError, match="--sweep lists the SAEs to train; put --k in"):
        config(host_dir, text_data, tmp_path / "run", sweep=sweep_file, k=(2, 4))
    with pytest.raises(SettingError, match="--k must be at least 1, got 0"):
        config(host_dir, text_data, tmp_path / "run", k=(2, 0))


def test_bench_sweep_times_the_sweep_against_its_runs_and_compares_their_saes(host_dir, text_data, tmp_path):
    from megasae.bench.sweep import format_table, parse_args, run

    args = parse_args(["--model", str(host_dir), "--data", str(text_data), "--target", "model.layers.1",
                       "--k", "2,4", "--max-tokens", "256", "--batch-size", "4", "--ctx-len", "16",
                       "--device", "cpu"])
    result = run(args, tmp_path)
    assert [s["name"] for s in result["saes"]] == ["k2", "k4"]
    for sae in result["saes"]:
        assert sae["max_abs_weight_difference"] < 1e-5
        assert sae["final_fvu_sweep"] == pytest.approx(sae["final_fvu_alone"], rel=1e-5)
    assert result["speedup"] == pytest.approx(result["alone_s"] / result["sweep_s"])
    assert result["steps"] == 4 and result["steps_speedup"] > 0
    assert "| k4 |" in format_table(result)
