"""Matryoshka SAEs: the loss and gradients of a dense plain-PyTorch reference (TopK and BatchTopK), a float64
gradcheck of the prefix reconstructions, FVU per prefix in training's held-out numbers and in `megasae eval`,
the threshold and prefixes through training, saving and resuming, and bad prefixes refused in one sentence."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from megasae import TopKSaeConfig, get_peft_sae_model, sae
from megasae.errors import SettingError
from megasae.eval import evaluate
from megasae.eval.metrics import ReconstructionStats
from megasae.train import TrainConfig, Trainer

from helpers import TARGET, TwoLayerMLP, eval_config
from test_batchtopk import dense_batchtopk, dense_pre, densify, fvu

PREFIXES = [6, 12, 24]


def dense_topk(pre, k):
    top = pre.topk(k)
    return torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())


@pytest.mark.parametrize("architecture, dense_codes", [("topk", dense_topk), ("batchtopk", dense_batchtopk)])
def test_loss_and_gradients_are_those_of_the_dense_reference(architecture, dense_codes):
    torch.manual_seed(0)
    weights = [1.0, 2.0, 5.0]
    config = TopKSaeConfig(k=3, num_latents=24, target_modules=["down"], architecture=architecture,
                           matryoshka_prefixes=PREFIXES, matryoshka_weights=weights)
    model = get_peft_sae_model(TwoLayerMLP(), config)
    model.train()
    layer = model.get_base_model().down
    layer.sae_needs_init["default"] = False  # keep the weights as drawn, so the reference starts from them
    x = torch.randn(20, 16)
    with model.capture() as outputs:
        model(x)
    out = outputs["down"]
    out.loss.backward()

    params = {name: getattr(layer, f"sae_{name}")["default"].detach().double().requires_grad_()
              for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    rows = out.x.double()
    codes = dense_codes(dense_pre(rows, params["W_enc"], params["b_enc"], params["b_dec"]), 3)
    prefix_fvu = [fvu(rows, codes[:, :m] @ params["W_dec"][:m] + params["b_dec"]) for m in PREFIXES]
    loss = sum(w * f for w, f in zip(weights, prefix_fvu)) / sum(weights)  # no dead latent yet: no AuxK
    loss.backward()

    assert out.auxk == 0
    torch.testing.assert_close(out.loss.double(), loss, rtol=1e-5, atol=0)
    for m, want in zip(PREFIXES, prefix_fvu):
        torch.testing.assert_close(out.prefix_fvu[m].double(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(out.fvu, out.prefix_fvu[24])
    for name, param in params.items():
        got = getattr(layer, f"sae_{name}")["default"].grad.double()
        torch.testing.assert_close(got, param.grad, rtol=1e-4, atol=1e-6)


def test_prefix_reconstructions_gradcheck_in_float64():
    g = torch.Generator().manual_seed(0)
    values = torch.rand(5, 4, generator=g, dtype=torch.float64)
    indices = torch.stack([torch.randperm(24, generator=g)[:4] for _ in range(5)])
    W_dec = torch.randn(24, 8, generator=g, dtype=torch.float64)
    b_dec = torch.randn(8, generator=g, dtype=torch.float64)

    def inner_prefix(values, W_dec, b_dec):
        return sae.prefix_reconstructions(values, indices, W_dec, b_dec, (12,))[12]

    want = densify(values, indices, 24)[:, :12] @ W_dec[:12] + b_dec
    torch.testing.assert_close(inner_prefix(values, W_dec, b_dec), want)
    inputs = tuple(t.clone().requires_grad_() for t in (values, W_dec, b_dec))
    assert torch.autograd.gradcheck(inner_prefix, inputs)


def test_eval_statistics_sum_the_fvu_of_each_prefix_over_batches():
    torch.manual_seed(0)
    stats = ReconstructionStats(num_latents=24, k=3)
    targets, prefix_x_hats = [], []
    for _ in range(2):
        target = torch.randn(7, 4)
        prefix_x_hat = {m: target + torch.randn(7, 4) / m for m in PREFIXES}
        values, indices = torch.rand(7, 5), torch.randint(0, 24, (7, 5))  # 5 codes: more than k, as BatchTopK
        stats.add(target, prefix_x_hat[24], values, indices, prefix_x_hat)
        targets.append(target)
        prefix_x_hats.append(prefix_x_hat)
    target = torch.cat(targets)
    summary = stats.summary()
    for m in PREFIXES:
        want = fvu(target, torch.cat([p[m] for p in prefix_x_hats])).item()
        assert summary["prefix_fvu"][m] == pytest.approx(want, rel=1e-6)
    assert summary["l0"] == 5 and summary["l0_histogram"][5] == 14


def test_train_eval_and_resume_a_matryoshka_batchtopk_sae(host_dir, words_data, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(model=str(host_dir), data=str(words_data), target_modules=(TARGET,), k=4,
                      num_latents=64, architecture="batchtopk", matryoshka_prefixes=(16, 32, 64), ctx_len=16,
                      micro_batch_size=4, batch_tokens=64, max_tokens=64 * 6, warmup_steps=1, log_every=3,
                      eval_every=3, eval_data=str(words_data), eval_tokens=128, wandb_mode="disabled",
                      output_dir=out, device="cpu", lr=3e-3)
    trainer = Trainer(cfg)
    trainer.fit()
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["architecture"] == "batchtopk" and saved["matryoshka_prefixes"] == [16, 32, 64]
    threshold = load_file(out / "adapter_model.safetensors")[f"base_model.model.{TARGET}.sae_threshold"]
    assert threshold > 0

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["fvu_prefix_64"] == pytest.approx(records[-1]["fvu"])  # the training batches' too
    assert {"fvu_prefix_16", "fvu_prefix_32"} <= set(records[-1])
    final = evaluate(eval_config(host_dir, out, words_data, max_tokens=128, seed=0, outlier_factor=10.0))
    stats = final["targets"][TARGET]["groups"]["all"]
    assert stats["prefix_fvu"][64] == pytest.approx(stats["fvu"])
    for m in (16, 32, 64):  # the held-out numbers of training are those `megasae eval` computes
        assert records[-1][f"eval/fvu_prefix_{m}"] == pytest.approx(stats["prefix_fvu"][m], rel=1e-5)

    resumed = Trainer(dataclasses.replace(cfg, resume=True))
    layer = next(m for m in resumed.model.modules() if hasattr(m, "sae_threshold"))
    assert layer.sae_threshold["default"] == threshold


@pytest.mark.parametrize("prefixes, message", [
    ([8, 8, 24], r"matryoshka_prefixes must be positive integers in strictly increasing order, got "
                 r"\[8, 8, 24\]"),
    ([0, 24], "must be positive integers"),
    ([8, 16], r"The last of matryoshka_prefixes must be the number of latents \(24\), got 16"),
])
def test_bad_prefixes(prefixes, message):
    with pytest.raises(ValueError, match=message):
        TopKSaeConfig(k=3, num_latents=24, target_modules=["down"], matryoshka_prefixes=prefixes)


def test_the_last_prefix_is_checked_against_the_number_of_latents_the_module_gives():
    with pytest.raises(ValueError, match=r"The last of matryoshka_prefixes of the SAE on 'down' must be the "
                                         r"number of latents \(32\), got 24"):
        get_peft_sae_model(TwoLayerMLP(), TopKSaeConfig(k=3, expansion_factor=2, target_modules=["down"],
                                                        matryoshka_prefixes=[8, 24]))


def test_weights_must_fit_the_prefixes():
    message = r"matryoshka_weights must give one non-negative weight per Matryoshka prefix \(\[8, 24\]\)"
    with pytest.raises(ValueError, match=message):
        TopKSaeConfig(k=3, num_latents=24, target_modules=["down"], matryoshka_prefixes=[8, 24],
                      matryoshka_weights=[1.0])


@pytest.mark.parametrize("settings, message", [
    (dict(matryoshka_prefixes=(64, 32)), r"--matryoshka-prefixes must be positive integers in strictly "
                                         r"increasing order, got \[64, 32\]"),
    (dict(num_latents=64, matryoshka_prefixes=(16, 32)),
     r"The last of --matryoshka-prefixes must be the number of latents \(64\), got 32"),
])
def test_bad_train_prefixes(settings, message):
    with pytest.raises(SettingError, match=message):
        TrainConfig(**settings)


def test_report_shows_the_fvu_of_each_prefix():
    from megasae.eval.report import ROWS, report_markdown

    group = {key: None for key, _, _ in ROWS}
    groups = {"all": {**group, "fvu": 0.3, "prefix_fvu": {8: 0.5, 24: 0.3}},
              "text": {**group, "fvu": 0.4, "prefix_fvu": {"8": 0.6, "24": 0.4}}}  # as eval.json reads back
    result = {"settings": {"ctx_len": 16, "seed": 0, "tokens": "all", "outlier_factor": None}, "model": "m",
              "adapter": "a", "data": "d", "tokens": 10, "sequences": 1,
              "targets": {"down": {"groups": groups, "num_latents": 24, "k": 4}}}
    lines = report_markdown(result).splitlines()
    assert "| FVU of latents < 8 | 0.5000 | 0.6000 |" in lines
    assert lines.index("| FVU of latents < 8 | 0.5000 | 0.6000 |") + 1 == lines.index(
        "| FVU of latents < 24 | 0.3000 | 0.4000 |")
