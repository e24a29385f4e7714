"""`megasae train --tp 2`: two gloo ranks splitting the host and the SAE's latents train the same adapter as
one process (fp32, 4 Adam steps of lr 3e-3 with AuxK active). Tolerance rtol 1e-4, atol 1e-4: all-reduces
reorder sums, and Adam turns a ~1e-7 difference in a near-zero gradient into up to a few 1e-5 of weight
(measured: one element of 4096 off by 2.2e-5). Resuming under TP = 2 restores each rank's latents and Adam
state exactly. TP = 2 x DP = 2 on four ranks: test_parallel_train_dp.py."""

import dataclasses
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from megasae.errors import Interrupted
from megasae.train import Trainer

from distributed import run_ranks
from helpers import parallel_config, text_rows, train_and_resume_rank


def test_tp2_trains_the_same_adapter_as_one_process(host_dir, tmp_path):
    data = text_rows(tmp_path / "text.parquet")
    Trainer(parallel_config(host_dir, data, tmp_path / "tp1")).fit()
    run_ranks(train_and_resume_rank, 2, parallel_config(host_dir, data, tmp_path / "tp2", tp=2))
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


def _resume_on_two_data_parallel_ranks(rank, world_size, cfg):
    trainer = Trainer(dataclasses.replace(cfg, resume=True, micro_batch_size=2))
    assert (trainer.par.dp_size, trainer.step) == (2, 3)
    _sigterm_after(trainer, stop_step=6)


@pytest.mark.parametrize("middle", [_resume_at_tp2_rank, _resume_on_two_data_parallel_ranks],
                         ids=["tp2", "dp2"])
def test_resume_on_other_ranks_matches_an_uninterrupted_run(host_dir, tmp_path, middle):
    """One process for 3 steps, two ranks for 3 more, one process to the end: the same adapter and logged
    metrics as one uninterrupted process. The checkpoint holds whole SAEs and Adam moments, which each TP
    size reshards, and one data position: data-parallel ranks share each batch of the one-process order,
    and with half the micro-batch each, every micro-step (whose tokens FVU is normalised over) is the same."""
    data = text_rows(tmp_path / "text.parquet")
    cfg = parallel_config(host_dir, data, tmp_path / "straight", max_tokens=128 * 8)
    Trainer(cfg).fit()
    split = dataclasses.replace(cfg, output_dir=tmp_path / "split")
    _sigterm_after(Trainer(split), stop_step=3)
    run_ranks(middle, 2, split)
    resumed = Trainer(dataclasses.replace(split, resume=True))
    assert resumed.step == 6
    resumed.fit()
    expected = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    got = load_file(tmp_path / "split" / "adapter_model.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4, msg=lambda m: f"{key}: {m}")
    logged = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (tmp_path / "straight", tmp_path / "split")]
    for want, have in zip(*logged, strict=True):
        for key in want.keys() - {"tokens_per_s"}:
            assert have[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (want["step"], key)
