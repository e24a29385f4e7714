"""`megasae inspect` under torchrun writes the page one process writes: --pp 2 splits the tiny 3-layer Llama
layer 0 | layers 1-2, so with the SAE on layer 1 stage 0 only relays and stage 1 collects; --tp 2 splits the
host and the SAE's latents over 2 ranks. --top 4 picks the latents by their firing counts, over all latents
under TP too. fp32, norm outliers left out (factor 1: the SAE reads only some positions). Under PP the page
is identical; under TP its text is identical and each printed number within 1e-3, the last digit printed
(measured: identical too)."""

import dataclasses
import re

import pytest

from megasae.eval import InspectConfig, run_inspect

from distributed import run_ranks
from helpers import SETTINGS

NUMBER = re.compile(r"\d+\.\d+")


def _inspect_rank(rank, world_size, cfg):
    run_inspect(cfg)


def _config(host_dir, adapter_dir, words_data, tmp_path):
    return InspectConfig(adapter=adapter_dir, model=str(host_dir), data=str(words_data), top=4,
                         output=tmp_path / "one.html", **{**SETTINGS, "outlier_factor": 1.0})


def assert_same_page(one: str, split: str, abs_tol: float) -> None:
    """The same page up to `abs_tol` on each printed number."""
    assert NUMBER.sub("#", split) == NUMBER.sub("#", one)
    assert [float(x) for x in NUMBER.findall(split)] == pytest.approx(
        [float(x) for x in NUMBER.findall(one)], abs=abs_tol)


@pytest.mark.parametrize("parallel, abs_tol", [({"pp": 2}, 0.0), ({"tp": 2}, 1e-3)], ids=["pp2", "tp2"])
def test_split_over_two_ranks_writes_one_process_page(host_dir, adapter, words_data, tmp_path,
                                                       parallel, abs_tol):
    one = _config(host_dir, adapter, words_data, tmp_path)
    split = dataclasses.replace(one, output=tmp_path / "split.html", **parallel)
    run_inspect(one)
    run_ranks(_inspect_rank, 2, split)
    one_page, split_page = one.output.read_text(), split.output.read_text()
    assert one_page.count("<li>") >= 4  # the latents have examples: there is something to compare
    assert_same_page(one_page, split_page, abs_tol)


def test_a_world_size_other_than_tp_times_pp_is_refused(tmp_path, monkeypatch):
    """Before joining the job: no rank waits for the others."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    cfg = InspectConfig(adapter=tmp_path / "unread", latents="1", pp=2, device="cpu", output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"megasae inspect splits .* run it on 1 x 2 = 2 ranks .*, not 4\."):
        run_inspect(cfg)
    assert not list(tmp_path.iterdir())
