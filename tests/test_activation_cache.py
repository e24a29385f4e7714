"""`megasae cache` then `megasae train --activations`: the stored rows are the host's own activations at the
positions the token mask keeps; training from the cache streams them in a seeded, resumable order without
the host and saves an adapter that loads on the real host; bad caches are refused in one sentence."""

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from megasae import PeftSaeModel
from megasae.data import build_batches
from megasae.data.activations import ActivationBatches
from megasae.errors import Interrupted
from megasae.models import load_host_model
from megasae.train import TrainConfig, Trainer
from megasae.train.cache import CacheConfig, write_cache

from distributed import run_ranks

TARGETS = ("model.layers.0", "model.layers.1")


def cache_config(host_dir, data, out, **overrides):
    fields = dict(output_dir=out, model=str(host_dir), data=str(data), target_modules=TARGETS, max_tokens=600,
                  shard_tokens=200, ctx_len=16, micro_batch_size=4, device="cpu", cache_dtype="float32")
    return CacheConfig(**{**fields, **overrides})


def train_config(cache, out, **overrides):
    fields = dict(activations=cache, target_modules=TARGETS, k=4, expansion_factor=4, ctx_len=16,
                  micro_batch_size=4, batch_tokens=128, max_tokens=128 * 6, warmup_steps=1, log_every=1,
                  wandb_mode="disabled", output_dir=out, device="cpu", lr=3e-3, outlier_factor=None)
    return TrainConfig(**{**fields, **overrides})


@pytest.fixture(scope="module")
def cache(host_dir, text_data, tmp_path_factory):
    return write_cache(cache_config(host_dir, text_data, tmp_path_factory.mktemp("cache") / "c"))


def test_the_cache_holds_the_hosts_activations_at_the_kept_positions(host_dir, text_data, cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["tokens"] >= 600
    assert manifest["targets"] == {t: {"width": 32, "transcode": False} for t in TARGETS}
    host, tokenizer = load_host_model(host_dir)
    batches = build_batches(str(text_data), tokenizer, ctx_len=16, batch_size=4, rank=0, world_size=1, seed=0)
    expected = {t: [] for t in TARGETS}
    with torch.inference_mode():
        while sum(len(x) for x in expected[TARGETS[0]]) < manifest["tokens"]:
            batch = next(batches)
            hidden = host(**batch.inputs, output_hidden_states=True).hidden_states
            for i, target in enumerate(TARGETS):
                expected[target].append(hidden[i + 1][batch.token_mask])
    shards = [load_file(cache / s["file"]) for s in manifest["shards"]]
    for target in TARGETS:
        stored = torch.cat([shard[target] for shard in shards])
        torch.testing.assert_close(stored, torch.cat(expected[target]), rtol=1e-5, atol=1e-5)


def test_every_cached_row_once_per_epoch_shared_by_ranks_and_resumed_exactly(cache):
    manifest = json.loads((cache / "manifest.json").read_text())
    total = manifest["tokens"]
    everything = torch.cat([load_file(cache / s["file"])["model.layers.0"] for s in manifest["shards"]])
    rows = ActivationBatches(cache, 1, 0, 1, seed=0)
    seen = torch.cat([next(rows).inputs["model.layers.0"] for _ in range(total)])
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, everything.tolist()))
    first = [next(ActivationBatches(cache, 1, 0, 1, seed=s)).inputs["model.layers.0"] for s in (0, 1)]
    assert not torch.equal(*first)  # the order depends on the seed

    # Two ranks take halves of the one-rank order's batches, across the epoch's end; the one-rank state
    # continues on them (an elastic resume).
    one = ActivationBatches(cache, 10, 0, 1, seed=0)
    for _ in range(7):
        next(one)
    ranks = [ActivationBatches(cache, 5, rank, 2, seed=0) for rank in (0, 1)]
    for rows in ranks:
        rows.load_state_dict(one.state_dict())
    for _ in range(40):
        whole = next(one).inputs["model.layers.1"]
        assert torch.equal(torch.cat([next(rows).inputs["model.layers.1"] for rows in ranks]), whole)
    assert all(rows.state_dict() == one.state_dict() for rows in ranks)


def test_training_from_the_cache_needs_no_host_and_loads_on_the_host(host_dir, cache, tmp_path, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the host was loaded")

    monkeypatch.setattr("megasae.parallel.host.load_host_model", must_not_load)
    Trainer(train_config(cache, tmp_path / "run")).fit()
    monkeypatch.undo()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["fvu"] < records[0]["fvu"]
    config = json.loads((tmp_path / "run" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(host_dir.resolve())
    host, _ = load_host_model(host_dir)
    model = PeftSaeModel.from_pretrained(host, tmp_path / "run")
    assert sorted(layer.module_path for layer in model.base_model.model.modules()
                  if hasattr(layer, "sae_W_enc")) == list(TARGETS)


def test_training_from_the_cache_resumes_exactly(cache, tmp_path):
    Trainer(train_config(cache, tmp_path / "straight")).fit()
    split = Trainer(train_config(cache, tmp_path / "split"))
    real_step = split.train_step

    def step_then_sigterm():
        out = real_step()
        if split.step == 3:
            signal.raise_signal(signal.SIGTERM)
        return out

    split.train_step = step_then_sigterm
    with pytest.raises(Interrupted):
        split.fit()
    Trainer(train_config(cache, tmp_path / "split", resume=True)).fit()
    a = load_file(tmp_path / "straight" / "adapter_model.safetensors")
    b = load_file(tmp_path / "split" / "adapter_model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_an_interrupted_cache_continues_where_it_stopped(host_dir, text_data, cache, tmp_path, monkeypatch):
    from megasae.train import cache as cache_module

    real = cache_module._write_shard
    calls = []

    def die_after_two(*args):
        real(*args)
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(cache_module, "_write_shard", die_after_two)
    with pytest.raises(KeyboardInterrupt):
        write_cache(cache_config(host_dir, text_data, tmp_path / "c"))
    monkeypatch.undo()
    write_cache(cache_config(host_dir, text_data, tmp_path / "c"))
    for a, b in zip(sorted(cache.glob("shard-*")), sorted((tmp_path / "c").glob("shard-*")), strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_bad_caches_and_mismatched_runs_are_refused(host_dir, text_data, cache, tmp_path):
    with pytest.raises(FileExistsError, match="holds a complete cache"):
        write_cache(cache_config(host_dir, text_data, cache))
    with pytest.raises(ValueError, match=r"holds a cache made with other settings \(seed 0 -> 1\)"):
        write_cache(cache_config(host_dir, text_data, cache, seed=1))
    with pytest.raises(
        ValueError, match=r"holds no activations of 'model.layers.2'; it holds model.layers.0"
    ):
        Trainer(train_config(cache, tmp_path / "a", target_modules=("model.layers.2",)))
    with pytest.raises(ValueError, match="holds the activations of --data"):
        Trainer(train_config(cache, tmp_path / "b", data=str(tmp_path)))
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in cache.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    shard = broken / "shard-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-8] + b"\0" * 8)
    batches = ActivationBatches(broken, 100, 0, 1, seed=0)
    with pytest.raises(ValueError, match=r"shard-00001.safetensors does not match the sha256 .* corrupt"):
        for _ in range(20):
            next(batches)
    with pytest.raises(FileNotFoundError, match="is no activation cache"):
        Trainer(train_config(tmp_path, tmp_path / "c"))


MEMORY_PROBE = """
import json, resource, sys
from pathlib import Path
import torch
from safetensors.torch import save_file
from megasae.data.activations import FORMAT, MANIFEST, ActivationBatches, sha256, shard_name

cache, shards = Path(sys.argv[1]), int(sys.argv[2])
cache.mkdir()
entries = []
for i in range(shards):  # 32 MiB a shard: 16,384 rows of width 512, float32
    save_file({"layer": torch.randn(16_384, 512)}, cache / shard_name(i))
    entries.append({"file": shard_name(i), "tokens": 16_384, "sha256": sha256(cache / shard_name(i))})
manifest = {"format": FORMAT, "settings": {}, "complete": True, "tokens": 16_384 * shards, "shards": entries,
            "targets": {"layer": {"width": 512, "transcode": False}}, "data_state": None}
(cache / MANIFEST).write_text(json.dumps(manifest))
batches = ActivationBatches(cache, 4096, 0, 1, seed=0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(4 * shards + 4):  # one whole epoch and into the next
    next(batches)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_reading_a_cache_takes_the_same_memory_whatever_its_size(tmp_path):
    """Peak memory while streaming a cache of 1 shard and of 8 shards (32 MiB each): a shard at a time."""
    import subprocess
    import sys

    def peak_mib(shards):
        done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(tmp_path / f"c{shards}"), str(shards)],
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return int(done.stdout.strip().splitlines()[-1])

    small, large = peak_mib(1), peak_mib(8)
    assert large < small + 48, (small, large)  # the whole 256 MiB cache in memory would add ~224 MiB


def test_a_sweep_trains_from_the_cache_as_its_runs_do(cache, tmp_path):
    Trainer(train_config(cache, tmp_path / "sweep", k=(2, 4))).fit()
    for k in (2, 4):
        Trainer(train_config(cache, tmp_path / f"k{k}", k=k)).fit()
        alone = load_file(tmp_path / f"k{k}" / "adapter_model.safetensors")
        swept = load_file(tmp_path / "sweep" / f"k{k}" / "adapter_model.safetensors")
        assert alone.keys() == swept.keys()
        for key in alone:
            torch.testing.assert_close(swept[key], alone[key], rtol=1e-5, atol=1e-6)


def _cache_rank(rank, world_size, cfg):
    write_cache(cfg)


@pytest.mark.parametrize("split", [dict(tp=2), dict(pp=2)], ids=["tp2", "pp2"])
def test_a_cache_written_by_a_split_host_holds_the_same_activations(host_dir, text_data, cache, tmp_path,
                                                                     split):
    """Two ranks run the host (its layers split, or its stages, with model.layers.0 and model.layers.1 on
    different stages of the 3-layer host cut at its last target) and rank 0 writes what both recorded:
    the rows, shards and manifest one process writes."""
    out = tmp_path / "split"
    run_ranks(_cache_rank, 2, cache_config(host_dir, text_data, out, **split))
    one, two = (json.loads((d / "manifest.json").read_text()) for d in (cache, out))
    assert two["targets"] == one["targets"] and two["settings"] == one["settings"]
    assert [s["tokens"] for s in two["shards"]] == [s["tokens"] for s in one["shards"]]
    for mine, theirs in zip(two["shards"], one["shards"], strict=True):
        got, expected = load_file(out / mine["file"]), load_file(cache / theirs["file"])
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-4)
