"""`megasae train` end to end on tiny random hosts: outputs, exact resume (1 and 2 ranks), interrupts,
errors."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from megasae import PeftSaeModel
from megasae.cli import main as cli_main
from megasae.models import load_host_model
from megasae.train import TrainConfig, Trainer
from megasae.train.checkpoint import latest_checkpoint

from data_fixtures import write_parquet
from distributed import run_ranks
from helpers import adapter_tensors, config, fit_until_sigterm


def test_train_writes_a_loadable_adapter_metrics_and_config(host_dir, text_data, tmp_path):
    out = tmp_path / "run"
    Trainer(config(host_dir, text_data, out)).fit()

    host, _ = load_host_model(host_dir)
    model = PeftSaeModel.from_pretrained(host, out)
    assert model.peft_config["default"].k == 4
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6, 8, 10, 12]
    for key in ("step", "tokens", "loss", "fvu", "auxk", "l0", "dead_pct", "lr", "tokens_per_s"):
        assert key in records[0], key
    assert records[-1]["tokens"] == 128 * 12
    assert records[-1]["fvu"] < records[0]["fvu"]
    assert 0 < records[-1]["l0"] <= 4
    assert json.loads((out / "config.json").read_text())["k"] == 4


def test_bf16_compute_trains_float32_weights(host_dir, text_data, tmp_path):
    """--sae-compute-dtype bfloat16: the steps run in bf16, the adapter (and Adam) stay float32, and the run
    follows the float32 one."""
    fp32, mixed = tmp_path / "fp32", tmp_path / "mixed"
    Trainer(config(host_dir, text_data, fp32)).fit()
    Trainer(config(host_dir, text_data, mixed, sae_compute_dtype="bfloat16")).fit()
    weights = adapter_tensors(mixed)
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert json.loads((mixed / "adapter_config.json").read_text())["compute_dtype"] == "bfloat16"

    def final(out):
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]["fvu"]

    assert final(mixed) == pytest.approx(final(fp32), rel=0.05)


def test_sigterm_checkpoints_between_steps_and_resume_continues_exactly(host_dir, text_data, tmp_path):
    straight = tmp_path / "straight"
    Trainer(config(host_dir, text_data, straight)).fit()

    split = tmp_path / "split"
    fit_until_sigterm(config(host_dir, text_data, split), stop_step=5)
    assert latest_checkpoint(split).name == "step-00000005"
    assert not (split / "adapter_model.safetensors").exists()  # the run did not finish
    resumed = Trainer(config(host_dir, text_data, split, resume=True))
    assert resumed.step == 5
    resumed.fit()

    a, b = adapter_tensors(straight), adapter_tensors(split)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [json.loads(line)["step"] for line in (split / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12]  # the resumed run appends to the same log


def _resume_rank(rank, world_size, host_dir, text_data, root):
    cfg = dict(batch_tokens=256, max_tokens=256 * 6)
    Trainer(config(host_dir, text_data, root / "straight", **cfg)).fit()
    fit_until_sigterm(config(host_dir, text_data, root / "split", **cfg), stop_step=3)
    Trainer(config(host_dir, text_data, root / "split", resume=True, **cfg)).fit()


def test_resume_continues_exactly_on_two_ranks(host_dir, text_data, tmp_path):
    run_ranks(_resume_rank, 2, host_dir, text_data, tmp_path)
    latest = latest_checkpoint(tmp_path / "split")
    assert latest.name == "step-00000006"
    # The two replicas hold one state: only the first writes it.
    assert [p.name for p in latest.glob("trainer-rank*.pt")] == ["trainer-rank0.pt"]
    a, b = adapter_tensors(tmp_path / "straight"), adapter_tensors(tmp_path / "split")
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _zero1_rank(rank, world_size, host_dir, text_data, root):
    cfg = dict(batch_tokens=256, max_tokens=256 * 4, save_every=256 * 2)
    Trainer(config(host_dir, text_data, root / "plain", **cfg)).fit()
    fit_until_sigterm(config(host_dir, text_data, root / "zero1", zero1=True, **cfg), stop_step=3)
    Trainer(config(host_dir, text_data, root / "zero1", zero1=True, resume=True, **cfg)).fit()


def test_zero1_shards_adam_without_changing_the_result(host_dir, text_data, tmp_path):
    run_ranks(_zero1_rank, 2, host_dir, text_data, tmp_path)
    a, b = adapter_tensors(tmp_path / "plain"), adapter_tensors(tmp_path / "zero1")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-7)


def test_a_crash_while_saving_keeps_the_previous_checkpoint_latest(host_dir, text_data, tmp_path,
                                                                    monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(config(host_dir, text_data, out, save_every=128 * 4))

    calls = []
    real_save = trainer.model.save_pretrained

    def save_then_crash(path, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            real_save(path, **kwargs)
            raise RuntimeError("disk full")
        real_save(path, **kwargs)

    monkeypatch.setattr(trainer.model, "save_pretrained", save_then_crash)
    with pytest.raises(RuntimeError, match="disk full"):
        trainer.fit()
    latest = latest_checkpoint(out)
    assert latest.name == "step-00000004"
    assert (latest / "trainer-rank0.pt").is_file() and (latest / "adapter_model.safetensors").is_file()
    assert Trainer(config(host_dir, text_data, out, resume=True)).step == 4


def test_batch_tokens_must_divide_into_micro_batches(host_dir, text_data, tmp_path):
    with pytest.raises(ValueError, match=r"--batch-tokens \(100\) must be a multiple of .* = 64\)"):
        Trainer(config(host_dir, text_data, tmp_path, batch_tokens=100))


def test_resume_without_a_checkpoint(host_dir, text_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        Trainer(config(host_dir, text_data, tmp_path / "empty", resume=True))


@pytest.mark.parametrize(
    "data, tokens, message",
    [
        ("missing.parquet", "all", "does not exist"),
        ("numbers.parquet", "all", "has no 'messages' column"),
        ("empty.parquet", "all", "holds no rows"),
        ("text.parquet", "image", "needs chat data with images"),
    ],
)
def test_bad_data_fails_before_the_host_loads(host_dir, tmp_path, monkeypatch, data, tokens, message):
    write_parquet(tmp_path / "numbers.parquet", [{"n": 1}])
    write_parquet(tmp_path / "text.parquet", [{"text": "a b c"}])
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "empty.parquet")

    def must_not_load(*args, **kwargs):
        raise AssertionError("the host model was loaded before the data was checked")

    monkeypatch.setattr("megasae.parallel.host.load_host_model", must_not_load)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        Trainer(config(host_dir, tmp_path / data, tmp_path / "out", tokens=tokens))


def test_cli_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit):
        cli_main(["train", "--help"])
    help_text = capsys.readouterr().out
    for field in TrainConfig.__dataclass_fields__:
        assert f"--{field.replace('_', '-')}" in help_text, field


def test_cli_config_file_with_flag_overrides(host_dir, text_data, tmp_path, monkeypatch, capsys):
    seen = {}
    monkeypatch.setattr("megasae.train.train", lambda cfg: seen.setdefault("cfg", cfg))
    config_file = tmp_path / "run.yaml"
    config_file.write_text(f"model: {host_dir}\ndata: {text_data}\nk: 8\nctx_len: 16\n")
    cli_main(["train", "--config", str(config_file), "--k", "6"])
    cfg = seen["cfg"]
    assert cfg.k == 6 and cfg.ctx_len == 16 and cfg.model == str(host_dir)

    config_file.write_text("kk: 8\n")
    with pytest.raises(SystemExit) as exited:
        cli_main(["train", "--config", str(config_file)])
    assert exited.value.code == 2
    assert "unknown fields ['kk']" in capsys.readouterr().err


def test_readme_documents_every_train_flag():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for field in TrainConfig.__dataclass_fields__:
        assert f"`--{field.replace('_', '-')}`" in readme, field


def test_a_cli_run_ends_with_a_summary_and_curves_and_no_library_warnings(host_dir, text_data, tmp_path):
    """The real entry point, as a user runs it: transformers' FutureWarnings (seen under pytest) stay off."""
    out = tmp_path / "run"
    captured = subprocess.run(
        [sys.executable, "-m", "megasae", "train", "--model", str(host_dir), "--data", str(text_data),
         "--target-modules", "model.layers.0", "model.layers.1", "--k", "4", "--expansion-factor", "4",
         "--ctx-len", "16", "--micro-batch-size", "4", "--batch-tokens", "128", "--max-tokens", "512",
         "--log-every", "2", "--wandb-mode", "disabled", "--device", "cpu", "--output-dir", str(out)],
        capture_output=True, text=True, timeout=600)
    assert captured.returncode == 0, captured.stderr
    assert "Warning" not in captured.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    lines = captured.stdout.strip().splitlines()
    assert lines[0] == f"trained 512 tokens in 4 steps; the adapter is in {out}"
    for line, target in zip(lines[1:3], ("model.layers.0", "model.layers.1")):
        last = records[-1]
        assert line.startswith(f"  {target}: FVU {last[f'fvu/{target}']:.3f}, L0 {last[f'l0/{target}']:.1f}")
    assert lines[3].endswith(
        f"next: megasae eval --adapter {out} --model {host_dir} --output-dir {out / 'eval'}"
    )
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_k_aux_reaches_the_sae_and_its_saved_config(host_dir, text_data, tmp_path):
    trainer = Trainer(config(host_dir, text_data, tmp_path / "run", k_aux=3, max_tokens=128))
    (layer,) = [m for m in trainer.model.modules() if hasattr(m, "sae_spec")]
    assert layer.sae_spec["default"].k_aux == 3
    trainer.fit()
    assert json.loads((tmp_path / "run" / "adapter_config.json").read_text())["k_aux"] == 3
