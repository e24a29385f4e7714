"""`megasae train --tp 2 --eval-every`: both tensor-parallel ranks run the held-out forward (the host and the
SAE's latents are split between them) and rank 0 logs the same numbers as one process."""

import json

import pytest

from megasae.train import TrainConfig, Trainer

from distributed import run_ranks

TARGET = "model.layers.1"


def _train_rank(rank, world_size, cfg):
    Trainer(cfg).fit()


def test_eval_every_under_tensor_parallelism_logs_what_one_process_logs(host_dir, words_data, tmp_path):
    def config(out, **overrides):
        return TrainConfig(model=str(host_dir), data=str(words_data), target_modules=(TARGET,), k=4,
                           expansion_factor=4, ctx_len=16, micro_batch_size=4, batch_tokens=64, max_tokens=64 * 2,
                           warmup_steps=1, log_every=2, eval_every=1, eval_data=str(words_data), eval_tokens=128,
                           wandb_mode="disabled", output_dir=out, device="cpu", lr=3e-3, **overrides)

    Trainer(config(tmp_path / "tp1")).fit()
    run_ranks(_train_rank, 2, config(tmp_path / "tp2", tp=2))
    one, two = ([json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
                for name in ("tp1", "tp2"))
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2]
    for a, b in zip(one, two):
        for key in ("eval/fvu", "eval/l0", "eval/dead_pct"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
