"""`megasae train --tp 2` on four ranks (TP = 2 x DP = 2) trains the same adapter as two data-parallel ranks,
which read the same share of the data (fp32, 4 Adam steps; tolerance as in test_parallel_train.py: rtol 1e-4,
atol 1e-4)."""

import torch
from safetensors.torch import load_file

from megasae.train import Trainer

from distributed import run_ranks
from helpers import parallel_config, text_rows


def _train_rank(rank, world_size, cfg):
    trainer = Trainer(cfg)
    tp = cfg.tp
    assert (trainer.par.tp_rank, trainer.par.dp_rank, trainer.par.dp_size) == (rank % tp, rank // tp, 2)
    trainer.fit()


def test_tp2_dp2_trains_the_same_adapter_as_dp2(host_dir, tmp_path):
    data = text_rows(tmp_path / "text.parquet")
    run_ranks(_train_rank, 2, parallel_config(host_dir, data, tmp_path / "dp2"))
    run_ranks(_train_rank, 4, parallel_config(host_dir, data, tmp_path / "tp2dp2", tp=2))
    expected = load_file(tmp_path / "dp2" / "adapter_model.safetensors")
    got = load_file(tmp_path / "tp2dp2" / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4, msg=lambda m: f"{key}: {m}")
