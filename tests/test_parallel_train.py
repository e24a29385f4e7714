"""`megasae train --tp 2`: two gloo ranks splitting the host and the SAE's latents train the same adapter as one
process (fp32, 4 Adam steps of lr 3e-3 with AuxK active). Tolerance rtol 1e-4, atol 1e-4: all-reduces reorder
sums, and Adam turns a ~1e-7 difference in a near-zero gradient into up to a few 1e-5 of weight (measured:
one element of 4096 off by 2.2e-5). Resuming under TP = 2 restores each rank's latents and Adam state exactly.
TP = 2 x DP = 2 on four ranks: test_parallel_train_dp.py."""

import dataclasses
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from megasae.errors import Interrupted
from megasae.train import TrainConfig, Trainer

from data_fixtures import write_parquet
from distributed import run_ranks

WORDS = "the cat sat on a mat while dogs ran in parks and birds sang over green hills".split()


def _config(host_dir, data, output_dir, **overrides) -> TrainConfig:
    fields = dict(model=str(host_dir), data=str(data), target_modules=("model.layers.1",), k=4, expansion_factor=4,
                  ctx_len=16, micro_batch_size=4, batch_tokens=128, max_tokens=128 * 4, warmup_steps=1,
                  log_every=1, wandb_mode="disabled", output_dir=output_dir, device="cpu",
                  dead_tokens_threshold=64, lr=3e-3)
    return TrainConfig(**dict(fields, **overrides))


def text_rows(path):
    g = torch.Generator().manual_seed(0)
    rows = [{"text": " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (40,), generator=g).tolist())}
            for _ in range(60)]
    return write_parquet(path, rows)


def train_and_resume_rank(rank, world_size, cfg):
    trainer = Trainer(cfg)
    trainer.fit()
    # Resuming restores this rank's SAEs from the whole adapter of the checkpoint, with its Adam state
    # (a pipeline stage without SAEs has neither).
    resumed = Trainer(dataclasses.replace(cfg, resume=True))
    assert resumed.step == trainer.step
    for mine, restored in zip(trainer.params, resumed.params, strict=True):
        assert torch.equal(mine, restored)
    if trainer.optimizer is not None:
        for mine, restored in zip(trainer.optimizer.state.values(), resumed.optimizer.state.values(), strict=True):
            assert torch.equal(mine["exp_avg"], restored["exp_avg"])


def test_tp2_trains_the_same_adapter_as_one_process(host_dir, tmp_path):
    data = text_rows(tmp_path / "text.parquet")
    Trainer(_config(host_dir, data, tmp_path / "tp1")).fit()
    run_ranks(train_and_resume_rank, 2, _config(host_dir, data, tmp_path / "tp2", tp=2))
    expected, got = load_file(tmp_path / "tp1" / "adapter_model.safetensors"), load_file(
        tmp_path / "tp2" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4, msg=lambda m: f"{key}: {m}")


def _sigterm_after(trainer, stop_step):
    real_step = trainer.train_step

    def step_then_sigterm():
        metrics = real_step()
        if trainer.step == stop_step and trainer.par.rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    trainer.train_step = step_then_sigterm
    with pytest.raises(Interrupted):
        trainer.fit()


def _resume_at_tp2_rank(rank, world_size, cfg):
    _sigterm_after(Trainer(dataclasses.replace(cfg, resume=True, tp=2)), stop_step=6)


def test_resume_across_tensor_parallel_sizes_matches_an_uninterrupted_run(host_dir, tmp_path):
    """One process for 3 steps, two TP ranks for 3 more, one process to the end: the same adapter as one
    uninterrupted process (the checkpoint holds whole SAEs and Adam moments; each TP size reshards them)."""
    data = text_rows(tmp_path / "text.parquet")
    cfg = _config(host_dir, data, tmp_path / "straight", max_tokens=128 * 8)
    Trainer(cfg).fit()
    split = dataclasses.replace(cfg, output_dir=tmp_path / "split")
    _sigterm_after(Trainer(split), stop_step=3)
    run_ranks(_resume_at_tp2_rank, 2, split)
    resumed = Trainer(dataclasses.replace(split, resume=True))
    assert resumed.step == 6
    resumed.fit()
    expected = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    got = load_file(tmp_path / "split" / "adapter_model.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4, msg=lambda m: f"{key}: {m}")


def _two_data_parallel_ranks(rank, world_size, cfg):
    with pytest.raises(ValueError, match=r"written by 1 ranks at --tp 1, this run has 2 at --tp 1"):
        Trainer(dataclasses.replace(cfg, resume=True))


def test_resume_refuses_another_number_of_data_parallel_ranks(host_dir, tmp_path):
    data = text_rows(tmp_path / "text.parquet")
    cfg = _config(host_dir, data, tmp_path / "run")
    _sigterm_after(Trainer(cfg), stop_step=2)
    run_ranks(_two_data_parallel_ranks, 2, cfg)
