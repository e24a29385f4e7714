"""`megasae bench train` on a tiny random host: the harness runs, measures and writes its JSON.

The sparsify part runs only where a Python with eai-sparsify is found (.venv-sparsify).
"""

import json

import pytest
import torch

from megasae.bench.peers import peer_python
from megasae.bench.train import heldout_fvu, main, megasae_mask

SPARSIFY_PYTHON = peer_python("sparsify")


def bench(host_dir, out, *extra):
    main(["--model", str(host_dir), "--target", "model.layers.1", "--k", "4", "--expansion-factor", "4",
          "--batch-size", "2", "--ctx-len", "16", "--steps", "3", "--eval-batches", "1", "--round-steps", "2",
          "--threads", "1", "--json", str(out), *extra])
    return json.loads(out.read_text())


def test_heldout_fvu_is_zero_for_a_perfect_sae_and_one_for_the_mean():
    torch.manual_seed(0)
    rows = torch.randn(50, 4)
    eye = torch.eye(4)
    perfect = {"W_enc": torch.cat([eye, -eye]), "b_enc": torch.zeros(8), "W_dec": torch.cat([eye, -eye]),
               "b_dec": torch.zeros(4)}
    assert heldout_fvu(perfect, rows, k=4)["fvu"] == pytest.approx(0, abs=1e-6)
    mean_only = {"W_enc": torch.zeros(8, 4), "b_enc": -torch.ones(8), "W_dec": torch.zeros(8, 4),
                 "b_dec": rows.mean(0)}
    assert heldout_fvu(mean_only, rows, k=2)["fvu"] == pytest.approx(1, abs=1e-5)


def test_megasae_mask_drops_norm_outliers_of_the_kept_tokens():
    acts = torch.ones(1, 4, 3)
    acts[0, 2] *= 100
    token_mask = torch.tensor([[False, True, True, True]])
    assert megasae_mask(acts, token_mask, 10.0).tolist() == [False, True, False, True]
    assert megasae_mask(acts, token_mask, None).tolist() == [False, True, True, True]


def test_bench_train_megasae_alone(host_dir, tmp_path, capsys):
    result = bench(host_dir, tmp_path / "r.json", "--skip-sparsify")
    rows = {r["name"]: r for r in result["rows"]}
    ours = rows["megasae train step"]
    assert len(ours["step_times"]) == 3 and ours["tokens_per_s"] > 0
    assert 0 < ours["heldout_masked"]["fvu"] < 10 and ours["heldout_all"]["tokens"] == 32
    assert ours["heldout_masked"]["tokens"] <= 30  # position 0 of both sequences is never counted
    assert ours["trained_tokens"] <= 3 * 2 * 15
    assert any(name.startswith("host forward to") for name in rows)
    assert result["settings"]["num_latents"] == 128 and result["targets"] == {}
    assert "megasae train step" in capsys.readouterr().out
    assert result["settings"]["megasae_compile"] is False


def test_bench_train_compiled_host_trains_the_same_sae(host_dir, tmp_path):
    eager = bench(host_dir, tmp_path / "eager.json", "--skip-sparsify")
    compiled = bench(host_dir, tmp_path / "compiled.json", "--skip-sparsify", "--compile")
    assert compiled["settings"]["megasae_compile"] is True
    fvus = [next(r for r in result["rows"] if r["name"] == "megasae train step")["heldout_masked"]["fvu"]
            for result in (eager, compiled)]
    assert fvus[1] == pytest.approx(fvus[0], rel=1e-3)


@pytest.mark.skipif(SPARSIFY_PYTHON is None, reason="no .venv-sparsify with eai-sparsify")
def test_bench_train_with_sparsify(host_dir, tmp_path):
    result = bench(host_dir, tmp_path / "r.json", "--sparsify-variants", "shipped,masked")
    rows = {r.get("variant"): r for r in result["rows"] if r.get("variant")}
    assert set(rows) == {"shipped", "masked"}
    for row in rows.values():
        assert row["error"] is None, row["error"]
        assert len(row["step_times"]) == 3 and row["tokens_per_s"] > 0
        assert 0 < row["heldout_masked"]["fvu"] < 10
    assert rows["shipped"]["trained_tokens"] == 3 * 2 * 16
    ours = next(r for r in result["rows"] if r["name"] == "megasae train step")
    assert rows["masked"]["trained_tokens"] == ours["trained_tokens"]
    assert set(result["targets"]) == {"speed_2x", "fvu_no_worse"}


def test_bench_train_from_cache_trains_on_the_same_activations_without_the_host(host_dir, tmp_path):
    result = bench(host_dir, tmp_path / "r.json", "--skip-sparsify", "--from-cache")
    rows = {r["name"]: r for r in result["rows"]}
    host, cached = rows["megasae train step"], rows["megasae train step, from the cache"]
    cache = result["cache"]
    # The cache holds the activations the host trainer's mask keeps (before the per-batch outlier filter).
    assert host["trained_tokens"] <= cache["activations"] <= 3 * 2 * 15
    assert cached["trained_tokens"] <= cache["activations"] and cache["steps"] == cache["activations"] // 32
    assert cache["bytes"] > cache["activations"] * 32 * 2  # float16 rows of width 32, plus the manifest
    assert cached["vs_host"] == pytest.approx(cached["tokens_per_s"] / host["tokens_per_s"])
    assert 0 < cached["heldout_masked"]["fvu"] < 10
