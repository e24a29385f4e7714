"""`megasae inspect` on a tiny Llama: the chosen latents' strongest contexts, --top, bad input, and the page
rendered by headless Chromium (skipped where no Chromium is installed)."""

import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from megasae.cli import main as cli_main
from megasae.eval import EvalConfig, InspectConfig, evaluate, run_inspect
from megasae.eval.batches import held_out_batches
from megasae.eval.splice import EvalHost
from megasae.parallel import ParallelState

from helpers import SETTINGS, TARGET, save_adapter


def strongest_per_sequence(host_dir, adapter, data, latent):
    """Each sequence's strongest activation of `latent`, read straight off the SAE's codes."""
    cfg = InspectConfig(adapter=adapter, model=str(host_dir), data=str(data), **SETTINGS)
    host = EvalHost(cfg, ParallelState(device=cfg.torch_device()))
    model, processor = host.model, host.processor
    best = []
    for batch in held_out_batches(cfg.data, processor, max_tokens=cfg.max_tokens, ctx_len=cfg.ctx_len,
                                  batch_size=cfg.batch_size, seed=cfg.seed):
        with torch.no_grad(), model.stop_after_targets(token_mask=batch.token_mask) as outputs:
            model(**batch.inputs)
        out = outputs[TARGET]
        dense = torch.zeros(out.num_tokens, 64).scatter(1, out.indices, out.values)
        acts = torch.zeros(batch.token_mask.numel())
        acts[out.kept] = dense[:, latent]
        best += acts.view(batch.token_mask.shape).max(dim=1).values.tolist()
    return sorted((b for b in best if b > 0), reverse=True)


def sections(page):
    return re.findall(r'<section class="latent" id="latent-(\d+)">', page)


def test_latents_show_their_strongest_contexts(host_dir, adapter, words_data, tmp_path):
    page_path = tmp_path / "page.html"
    cli_main(["inspect", "--model", str(host_dir), "--adapter", str(adapter), "--data", str(words_data),
              "--latents", "3,0", "--examples", "5", "--output", str(page_path)]
             + [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()])
    page = page_path.read_text()
    assert sections(page) == ["3", "0"]
    latent_3 = page.split('id="latent-0"')[0]
    scores = [float(s) for s in re.findall(r'<span class="score">([0-9.]+)</span>', latent_3)]
    want = strongest_per_sequence(host_dir, adapter, words_data, 3)[:5]
    assert scores == pytest.approx(want, abs=1e-3)  # the top 5 sequences, strongest first
    # The strongest token of the first example is fully shaded; a context is at most 24 + 1 + 8 tokens.
    first = latent_3.split("<li>")[1]
    assert 'background:rgba(255,90,0,1.000)' in first and first.count("<span") - 1 <= 33


def test_top_picks_the_most_frequent_latents(host_dir, adapter, words_data, tmp_path):
    page = run_inspect(InspectConfig(adapter=adapter, model=str(host_dir), data=str(words_data), top=4,
                                     output_dir=tmp_path, **SETTINGS)).read_text()
    frequency = evaluate(EvalConfig(adapter=adapter, model=str(host_dir), data=str(words_data), **SETTINGS))[
        "targets"][TARGET]["groups"]["all"]["firing_frequency"]
    most = torch.argsort(torch.tensor(frequency), descending=True, stable=True)[:4].tolist()
    assert [int(i) for i in sections(page)] == most
    assert (tmp_path / "inspect.html").is_file()


@pytest.mark.parametrize("flags, message", [
    ({"latents": "1,64,99"},
     r"Latent ids \[64, 99\] do not exist: the SAE on 'model.layers.1' has 64 latents, ids 0"),
    ({"latents": "1,x"}, "--latents must be comma-separated latent ids such as 0,17,42, got '1,x'"),
    ({"latents": "1", "top": 3}, "Pass exactly one of --latents"),
    ({}, "Pass exactly one of --latents"),
    ({"latents": "1", "target": "model.layers.2"},
     r"has no SAE on 'model.layers.2'; its targets are \['model.layers.1'\]"),
])
def test_bad_input_gets_one_clear_sentence(host_dir, adapter, words_data, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        run_inspect(InspectConfig(adapter=adapter, model=str(host_dir), data=str(words_data),
                                  output_dir=tmp_path, **SETTINGS, **flags))
    assert not list(tmp_path.iterdir())  # nothing written


def chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.skipif(chromium() is None, reason="no chromium binary (Debian: apt-get install chromium)")
def test_page_renders_in_headless_chromium(host_dir, adapter, words_data, tmp_path):
    page = run_inspect(InspectConfig(adapter=adapter, model=str(host_dir), data=str(words_data),
                                     latents="3,0", output_dir=tmp_path, **SETTINGS))
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(flags + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120,
                         check=True).stdout
    assert sections(dom) == ["3", "0"] and dom.count("<li>") >= 2
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1000,700", page.as_uri()],
                   capture_output=True, timeout=120, check=True)
    with Image.open(shot) as image:
        pixels = np.asarray(image.convert("RGB")).reshape(-1, 3).astype(int)
    assert len(np.unique(pixels, axis=0)) > 50  # text and shading, not a blank page
    # The highlight colour (255, 90, 0) at some alpha over white: orange pixels are there.
    assert ((pixels[:, 0] > 240) & (pixels[:, 2] < 200) & (pixels[:, 1] > pixels[:, 2])).sum() > 100


def test_an_adapter_with_several_targets_needs_target(host_dir, words_data, tmp_path):
    adapter = save_adapter(host_dir, tmp_path / "two", targets=("model.layers.0", TARGET))
    message = r"has SAEs on \['model.layers.0', 'model.layers.1'\]; choose one with --target"
    with pytest.raises(ValueError, match=message):
        run_inspect(InspectConfig(adapter=adapter, model=str(host_dir), data=str(words_data), latents="1",
                                  output_dir=tmp_path, **SETTINGS))
    page = run_inspect(InspectConfig(adapter=adapter, model=str(host_dir), data=str(words_data), latents="1",
                                     target="model.layers.0", output_dir=tmp_path, **SETTINGS)).read_text()
    assert "<h1>Top-activating contexts: <code>model.layers.0</code></h1>" in page
