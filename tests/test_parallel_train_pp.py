"""`megasae train --pp 2`: the host's layers split over two pipeline stages (and over TP = 2 x PP = 2 on four
ranks, for Llama, Gemma 2 and Qwen 3 hosts) train the same adapter, and log the same metrics (held-out ones
included), as one process; a stage that owns no target relays the hidden state. fp32, 4 Adam steps;
tolerance rtol 1e-4, atol 1e-4 as for TP (the gradient-norm all-reduce reorders a sum). Resuming restores
each stage's SAEs and Adam state exactly."""

import json

import pytest
import torch
from safetensors.torch import load_file

from megasae.parallel import ParallelState
from megasae.train import Trainer

from data_fixtures import tiny_text_tokenizer
from distributed import run_ranks
from helpers import parallel_config, text_rows, train_and_resume_rank
from parallel_hosts import TEXT_HOSTS


def records(output_dir):
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(one, split):
    expected = load_file(one / "adapter_model.safetensors")
    got = load_file(split / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4, msg=lambda m: f"{key}: {m}")

    def config(d):
        return json.loads((d / "adapter_config.json").read_text())

    assert sorted(config(split)["target_modules"]) == sorted(config(one)["target_modules"])
    run_one, run_split = (d if (d / "metrics.jsonl").is_file() else d.parent for d in (one, split))
    for want, have in zip(records(run_one), records(run_split), strict=True):
        assert have.keys() == want.keys()
        for key in want:
            if key != "tokens_per_s":
                assert have[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize(
    "targets",
    [("model.layers.0", "model.layers.2"), ("model.layers.2",)],
    ids=["an-sae-per-stage", "stage-0-relays"],
)
def test_pp2_trains_the_same_adapter_as_one_process(host_dir, tmp_path, targets):
    """With --eval-every: the held-out numbers each stage measures reach rank 0's log too."""
    data = text_rows(tmp_path / "text.parquet")
    held_out = dict(eval_every=2, eval_data=str(data), eval_tokens=256)
    Trainer(parallel_config(host_dir, data, tmp_path / "one", target_modules=targets, **held_out)).fit()
    split = parallel_config(host_dir, data, tmp_path / "pp2", target_modules=targets, pp=2, **held_out)
    run_ranks(train_and_resume_rank, 2, split)
    assert_same_run(tmp_path / "one", tmp_path / "pp2")
    assert "eval/fvu" in records(tmp_path / "pp2")[1]


@pytest.fixture(params=["llama", "gemma2", "qwen3"])
def family_host_dir(request, host_dir, tmp_path):
    """The tests' Llama host directory, or one of another family of the same size (3 layers, hidden 32)."""
    if request.param == "llama":
        return host_dir
    tokenizer = tiny_text_tokenizer()
    TEXT_HOSTS[request.param](
        kv_heads=2, hidden_size=32, intermediate_size=64, num_hidden_layers=3, head_dim=8,
        vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    ).save_pretrained(tmp_path / "host")
    tokenizer.save_pretrained(tmp_path / "host")
    return tmp_path / "host"


def test_tp2_pp2_on_four_ranks(family_host_dir, tmp_path):
    """Gemma 2's second stage holds a global and a sliding-window layer (window 4 < 16 tokens)."""
    host_dir = family_host_dir
    targets = ("model.layers.0", "model.layers.2")
    data = text_rows(tmp_path / "text.parquet")
    Trainer(parallel_config(host_dir, data, tmp_path / "one", target_modules=targets)).fit()
    split = parallel_config(host_dir, data, tmp_path / "tp2pp2", target_modules=targets, tp=2, pp=2)
    run_ranks(train_and_resume_rank, 4, split)
    assert_same_run(tmp_path / "one", tmp_path / "tp2pp2")


def test_zero1_is_refused_under_pp_up_front(host_dir, tmp_path):
    # Rank 0 of two stages; nothing is communicated before the check.
    par = ParallelState(world_size=2, pp_size=2)
    with pytest.raises(ValueError, match="--zero1 shards Adam's state over data-parallel ranks only"):
        cfg = parallel_config(host_dir, tmp_path / "unread.parquet", tmp_path / "out", pp=2, zero1=True)
        Trainer(cfg, par=par)


def test_a_sweep_over_two_stages_saves_each_sae_whole(host_dir, tmp_path):
    """Each SAE of a sweep gathers its targets from both stages into its own adapter directory, with its own
    gradient clip over both stages: the adapters and metrics of one process."""
    data = text_rows(tmp_path / "text.parquet")
    targets = ("model.layers.0", "model.layers.2")
    Trainer(parallel_config(host_dir, data, tmp_path / "one", target_modules=targets, k=(2, 4),
                            grad_clip=0.05)).fit()
    split = parallel_config(host_dir, data, tmp_path / "pp2", target_modules=targets, pp=2, k=(2, 4),
                            grad_clip=0.05)
    run_ranks(train_and_resume_rank, 2, split)
    for name in ("k2", "k4"):
        assert_same_run(tmp_path / "one" / name, tmp_path / "pp2" / name)


def test_pp2_trains_the_same_batchtopk_matryoshka_saes_as_one_process(host_dir, tmp_path):
    """Each stage's BatchTopK SAE selects over the micro-batch one process would, and its threshold (saved
    in the adapter and in each checkpoint) is the one process's too."""
    data = text_rows(tmp_path / "text.parquet")
    sae = dict(target_modules=("model.layers.0", "model.layers.2"), architecture="batchtopk",
               matryoshka_prefixes=(32, 128))
    Trainer(parallel_config(host_dir, data, tmp_path / "one", **sae)).fit()
    run_ranks(train_and_resume_rank, 2, parallel_config(host_dir, data, tmp_path / "pp2", pp=2, **sae))
    assert_same_run(tmp_path / "one", tmp_path / "pp2")
    saved = load_file(tmp_path / "pp2" / "adapter_model.safetensors")
    assert len([key for key in saved if "threshold" in key]) == 2
