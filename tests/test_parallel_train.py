"""`megasae train --tp 2`: two gloo ranks splitting the host and the SAE's latents train the same adapter as one
process (fp32, 4 Adam steps of lr 3e-3 with AuxK active). Tolerance rtol 1e-4, atol 1e-4: all-reduces reorder
sums, and Adam turns a ~1e-7 difference in a near-zero gradient into up to a few 1e-5 of weight (measured:
one element of 4096 off by 2.2e-5). Resuming under TP = 2 restores each rank's latents and Adam state exactly.
TP = 2 x DP = 2 on four ranks: test_parallel_train_dp.py."""

import dataclasses

import torch
from safetensors.torch import load_file

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
