"""Bad input through the command line's entry point: a non-zero exit, no traceback, and one line that names
the flag or file and what is valid."""

import subprocess
import sys

import pytest
import torch

from megasae.cli import main as cli_main

from data_fixtures import write_parquet


def _run(args, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exited:
        cli_main(args)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = err.strip().splitlines()
    return exited.value.code, lines[-1] if lines else ""


def _bad_files(tmp_path):
    (tmp_path / "notes.parquet").write_text("not parquet at all")
    write_parquet(tmp_path / "empty-texts.parquet", [{"text": ""}] * 4)
    (tmp_path / "quoted.yaml").write_text('k: "32"\n')
    (tmp_path / "broken.yaml").write_text("k: [1,\n")
    (tmp_path / "a-file").write_text("")
    (tmp_path / "bad-adapter").mkdir()
    (tmp_path / "bad-adapter" / "adapter_config.json").write_text("{not json")
    stale = tmp_path / "stale" / "checkpoints"
    stale.mkdir(parents=True)
    (stale / "step-00000004").mkdir()
    (stale / "latest").write_text("step-00000008")


TRAIN_CASES = [
    (["--architecture", "nope"],
     "invalid choice 'nope' for argument '--architecture'. Expected one of ('topk', 'batchtopk')"),
    (["--k", "abc"], "Error parsing --k: invalid literal for int() with base 10: 'abc'"),
    (["--bogus-flag", "3"], "Unrecognized options: --bogus-flag, 3"),
    (["--ctx-len", "0"], "--ctx-len must be at least 1, got 0"),
    (["--shuffle-sequences", "0"], "--shuffle-sequences must be at least 1, got 0"),
    (["--batch-tokens", "0"], "--batch-tokens must be at least 1, got 0"),
    (["--micro-batch-size", "0"], "--micro-batch-size must be at least 1, got 0"),
    (["--log-every", "0"], "--log-every must be at least 1, got 0"),
    (["--max-tokens", "0"], "--max-tokens must be at least 1, got 0"),
    (["--outlier-factor", "0"], "--outlier-factor must be at least 1"),
    (["--data", "{tmp}/notes.parquet"], "notes.parquet is not a readable Parquet file"),
    (["--data", "{tmp}/empty-texts.parquet"], "yields less than one 16-token sequence per epoch"),
    (["--config", "{tmp}/quoted.yaml"], "--k must be an integer or a list of integers, got '32'"),
    (["--config", "{tmp}/broken.yaml"], "broken.yaml is not valid YAML or JSON"),
    (["--output-dir", "{tmp}/a-file"], "--output-dir {tmp}/a-file is a file"),
    (["--output-dir", "{tmp}/stale", "--resume"], "latest names step-00000008, which does not exist"),
    (["--resume", "--overwrite"], "--resume continues the run in --output-dir and --overwrite deletes it"),
]


@pytest.mark.parametrize("args, message", TRAIN_CASES, ids=[" ".join(case[0]) for case in TRAIN_CASES])
def test_train_refuses_in_one_line(host_dir, text_data, tmp_path, capsys, args, message):  # noqa: F811
    _bad_files(tmp_path)
    base = ["--model", str(host_dir), "--data", str(text_data), "--ctx-len", "16", "--micro-batch-size", "2",
            "--batch-tokens", "32", "--wandb-mode", "disabled", "--device", "cpu",
            "--output-dir", str(tmp_path / "out")]
    code, line = _run(["train", *base, *(a.format(tmp=tmp_path) for a in args)], capsys)
    assert code == 2
    assert line.startswith("megasae train: error: ") and message.format(tmp=tmp_path) in line, line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_device_cuda_without_a_gpu(capsys):
    code, line = _run(["train", "--device", "cuda"], capsys)
    assert code == 2 and "--device cuda: torch finds no usable CUDA GPU" in line


OTHER_CASES = [
    (["eval", "--adapter", "{tmp}/nowhere"], "megasae eval: error: ", "nowhere"),
    (["eval", "--adapter", "{tmp}/bad-adapter", "--max-tokens", "0"], "megasae eval: error: ",
     "--max-tokens must be at least 1"),
    (["inspect", "--adapter", "{tmp}/bad-adapter"], "megasae inspect: error: ",
     "Pass exactly one of --latents"),
    (["inspect", "--adapter", "{tmp}/bad-adapter", "--latents", "a,b"], "megasae inspect: error: ",
     "--latents must be comma-separated latent ids"),
    (["inspect", "--adapter", "{tmp}/bad-adapter", "--top", "2", "--examples", "0"],
     "megasae inspect: error: ", "--examples must be at least 1"),
    (["bench", "nope"], "megasae bench: error: ", "valid names: kernels"),
    (["export"], "megasae export: error: ", "Missing from megasae export: --adapter, --format, --output-dir"),
    (["plan", "--model", "{tmp}/nowhere"], "megasae plan: error: ", "nowhere has no config.json"),
    (["trian"], "megasae: error: ", "unknown command 'trian'; valid commands: train"),
]


@pytest.mark.parametrize("args, prefix, message", OTHER_CASES, ids=[" ".join(c[0][:2]) for c in OTHER_CASES])
def test_other_commands_refuse_in_one_line(tmp_path, capsys, args, prefix, message):
    _bad_files(tmp_path)
    code, line = _run([a.format(tmp=tmp_path) for a in args], capsys)
    assert code == 2
    assert line.startswith(prefix) and message in line, line


def test_the_installed_entry_point_prints_one_line_and_debug_the_traceback(tmp_path):
    command = [sys.executable, "-m", "megasae", "train", "--ctx-len", "0"]
    plain = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == ["megasae train: error: --ctx-len must be at least 1, got 0."]
    debug = subprocess.run([*command, "--debug"], capture_output=True, text=True, cwd=tmp_path)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "SettingError" in debug.stderr
    # A flag tyro refuses: rich draws its box here (not under pytest's capture), and it becomes one line.
    choice = subprocess.run([*command[:-2], "--architecture", "nope"], capture_output=True, text=True,
                            cwd=tmp_path)
    assert choice.returncode == 2
    assert choice.stderr.strip().splitlines() == [
        "megasae train: error: invalid choice 'nope' for argument '--architecture'. Expected one of ('topk', "
        "'batchtopk'). (megasae train --help lists every flag)"]


def test_a_rank_leaves_its_process_group_when_its_command_ends(tmp_path, capsys):
    """As torch asks of every rank: a command that fails leaves the group it ran in (a finished one too)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        code, _ = _run(["train", "--ctx-len", "0"], capsys)
        assert code == 2
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
