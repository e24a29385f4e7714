"""What a run promises under bad input and faults: no code runs from a checkpoint, no run is replaced
without --overwrite, `latest` always names a complete checkpoint, the output directory never holds a
mixed adapter, resume refuses changed settings, and SIGTERM exits 143 after checkpointing."""

import hashlib
import json
import os
import signal

import pytest
import torch

from megasae.errors import Interrupted, SettingError
from megasae.train import Trainer, run_dir
from megasae.train import checkpoint as checkpoint_module
from megasae.train.checkpoint import latest_checkpoint

from helpers import adapter_tensors, config, fit_until_sigterm


class RunsCode:
    """Unpickling this calls os.system: what a malicious checkpoint would carry."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _digests(directory):
    return {p.relative_to(directory): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def kill_at_rename(monkeypatch, module, when) -> None:
    """The process dies (KeyboardInterrupt) at the first os.replace in `module` for which
    when(source name, destination name) holds."""
    real_replace = os.replace

    def replace(src, dst):
        if when(os.path.basename(src), os.path.basename(dst)):
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(module.os, "replace", replace)


def test_a_checkpoint_that_would_run_code_is_refused_without_running_it(host_dir, text_data, tmp_path):
    out = tmp_path / "run"
    fit_until_sigterm(config(host_dir, text_data, out), stop_step=3)
    state_file = latest_checkpoint(out) / "trainer-rank0.pt"
    state = torch.load(state_file, weights_only=True)  # what megasae writes is data only
    marker = tmp_path / "pwned"
    state["payload"] = RunsCode(marker)
    torch.save(state, state_file)

    with pytest.raises(ValueError, match="never runs code from a checkpoint"):
        Trainer(config(host_dir, text_data, out, resume=True))
    assert not marker.exists()


def test_a_run_directory_is_not_replaced_without_overwrite(host_dir, text_data, tmp_path):
    out = tmp_path / "run"
    Trainer(config(host_dir, text_data, out)).fit()
    before = _digests(out)
    with pytest.raises(FileExistsError, match=r"holds a run \(.*checkpoints/\): continue it with --resume"):
        Trainer(config(host_dir, text_data, out, k=3))
    assert _digests(out) == before

    (out / "notes.txt").write_text("mine")
    Trainer(config(host_dir, text_data, out, k=3, overwrite=True)).fit()
    assert json.loads((out / "adapter_config.json").read_text())["k"] == 3
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12]  # the old run's lines are gone, not appended to
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_and_overwrite_together_are_refused(host_dir, text_data, tmp_path):
    with pytest.raises(SettingError, match="give one"):
        config(host_dir, text_data, tmp_path, resume=True, overwrite=True)


def test_saving_a_step_again_never_deletes_the_checkpoint_latest_names(host_dir, text_data, tmp_path,
                                                                         monkeypatch):
    """Resuming a finished run saves its last step again; dying at that rename keeps the old copy."""
    out = tmp_path / "run"
    Trainer(config(host_dir, text_data, out)).fit()
    finished = latest_checkpoint(out)
    kill_at_rename(monkeypatch, checkpoint_module, lambda src, dst: src.startswith(".step-"))
    with pytest.raises(KeyboardInterrupt):
        Trainer(config(host_dir, text_data, out, resume=True)).fit()
    monkeypatch.undo()
    assert latest_checkpoint(out) == finished and (finished / "trainer-rank0.pt").is_file()

    resumed = Trainer(config(host_dir, text_data, out, resume=True))
    assert resumed.step == 12
    again = resumed.save_checkpoint()
    assert again.name == "step-00000012.1" and latest_checkpoint(out) == again
    assert not finished.exists()  # the older copy goes once `latest` has moved
    assert not list((out / "checkpoints").glob(".step-*.tmp"))  # the crash's leftover was cleaned up


def test_a_crash_between_the_adapter_renames_leaves_no_mixed_adapter(host_dir, text_data, tmp_path,
                                                                      monkeypatch):
    out = tmp_path / "run"
    Trainer(config(host_dir, text_data, out)).fit()
    expected = adapter_tensors(out)
    kill_at_rename(monkeypatch, run_dir, lambda src, dst: dst == "adapter_config.json")
    with pytest.raises(KeyboardInterrupt):
        Trainer(config(host_dir, text_data, out, resume=True)).fit()
    monkeypatch.undo()
    assert not (out / "adapter_config.json").exists()  # no loader takes weights without their config
    assert not [p for p in out.iterdir() if p.name.startswith(".adapter")]  # the staging directory went

    Trainer(config(host_dir, text_data, out, resume=True)).fit()  # --resume rewrites the adapter
    got = adapter_tensors(out)
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    assert (out / "adapter_config.json").is_file()


def test_resume_rolls_back_the_metrics_logged_after_its_checkpoint(host_dir, text_data, tmp_path,
                                                                    monkeypatch):
    out = tmp_path / "run"
    trainer = Trainer(config(host_dir, text_data, out, log_every=1, save_every=128 * 4))
    real_step = trainer.train_step

    def crash_after_step_6():
        if trainer.step == 6:
            raise RuntimeError("node lost")
        return real_step()

    trainer.train_step = crash_after_step_6
    with pytest.raises(RuntimeError, match="node lost"):
        trainer.fit()
    assert latest_checkpoint(out).name == "step-00000004"
    Trainer(config(host_dir, text_data, out, log_every=1, save_every=128 * 4, resume=True)).fit()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))


@pytest.mark.parametrize("change, shown", [
    (dict(k=3), "--k 4 -> 3"),
    (dict(lr=1e-3), "--lr 0.003 -> 0.001"),
    (dict(num_latents=64), "--num-latents 0 -> 64"),
    (dict(seed=1), "--seed 0 -> 1"),
    (dict(data="other"), "--data"),
])
def test_resume_refuses_a_changed_setting(host_dir, text_data, tmp_path, change, shown):
    out = tmp_path / "run"
    fit_until_sigterm(config(host_dir, text_data, out), stop_step=3)
    if "data" in change:
        other = tmp_path / "other.parquet"
        other.write_bytes(text_data.read_bytes())
        change = dict(data=str(other))
    with pytest.raises(ValueError, match=rf"--resume: this run changes {shown}"):
        Trainer(config(host_dir, text_data, out, resume=True, **change))


def test_resume_accepts_the_settings_that_may_change(host_dir, text_data, tmp_path):
    out = tmp_path / "run"
    fit_until_sigterm(config(host_dir, text_data, out), stop_step=3)
    Trainer(config(host_dir, text_data, out, resume=True, max_tokens=128 * 14, log_every=7, save_every=128,
                   eval_tokens=64)).fit()
    assert latest_checkpoint(out).name == "step-00000014"


def test_sigterm_checkpoints_and_reports_the_interrupt(host_dir, text_data, tmp_path):
    out = tmp_path / "run"
    stopped = fit_until_sigterm(config(host_dir, text_data, out), stop_step=5)
    assert isinstance(stopped, Interrupted) and stopped.exit_code == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM; checkpoint" in str(stopped) and "holds step 5" in str(stopped)
    assert not (out / "adapter_model.safetensors").exists()


def test_the_adapter_files_have_the_users_normal_mode(host_dir, text_data, tmp_path):
    out = tmp_path / "run"
    umask = os.umask(0o022)
    try:
        Trainer(config(host_dir, text_data, out)).fit()
    finally:
        os.umask(umask)
    for name in ("adapter_config.json", "adapter_model.safetensors", "checkpoints/latest"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name


NETWORK_PROBE = """
import json, socket, sys
from pathlib import Path
calls = []
real_getaddrinfo = socket.getaddrinfo
def getaddrinfo(host, *args, **kwargs):
    calls.append(str(host))
    return real_getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
from megasae.train.metrics import MetricsLog
log = MetricsLog(Path(sys.argv[1]), 10, 0, True, "offline", "probe", {})
log.log({"step": 1, "fvu": 0.5, "l0": 4.0, "dead_pct": 0.0, "tokens_per_s": 1.0})
log.close()
print(json.dumps(calls))
"""


def test_wandb_offline_looks_nothing_up_on_the_network(tmp_path):
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    done = subprocess.run([sys.executable, "-c", NETWORK_PROBE, str(tmp_path)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
    assert list(tmp_path.glob("wandb/offline-run-*"))
