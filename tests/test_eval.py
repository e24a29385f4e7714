"""`megasae eval` on a tiny Llama host: every metric against plain-torch references on the same batches,
the known answers of a perfect and a zero SAE, the written files, bad input, and --eval-every in training."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from megasae import TopKSaeConfig, get_peft_sae_model
from megasae.cli import main as cli_main
from megasae.eval import evaluate
from megasae.eval.batches import held_out_batches
from megasae.files import write_atomic
from megasae.models import load_host_model
from megasae.train import TrainConfig, Trainer

from data_fixtures import write_parquet
from helpers import TARGET, WORDS, eval_config, save_adapter


def reference(host_dir, adapter_dir, cfg):
    """Every number of evaluate() recomputed with plain torch: a hooked HF model and a dense SAE."""
    host = AutoModelForCausalLM.from_pretrained(host_dir).eval()
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    w = {key.rsplit(".sae_", 1)[1]: t for key, t in tensors.items()}
    k = json.loads((adapter_dir / "adapter_config.json").read_text())["k"]
    xs, x_hats, zs, ce, kl, state = [], [], [], {"clean": [], "spliced": [], "ablated": []}, [], {}

    def hook(module, args, output):
        h = output[0] if isinstance(output, tuple) else output
        keep = state["mask"].clone()
        if cfg.outlier_factor is not None:
            norms = h.norm(dim=-1)
            keep &= norms <= cfg.outlier_factor * norms[state["mask"]].median()
        x = h[keep]
        pre = (x - w["b_dec"]) @ w["W_enc"].T + w["b_enc"]
        top = pre.topk(k, dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        x_hat = z @ w["W_dec"] + w["b_dec"]
        state["keep"] = keep
        if state["mode"] == "clean":
            xs.append(x), x_hats.append(x_hat), zs.append(z)
            return output
        h = h.clone()
        h[keep] = x_hat if state["mode"] == "spliced" else 0
        return (h, *output[1:]) if isinstance(output, tuple) else h

    host.get_submodule(TARGET).register_forward_hook(hook)
    tokenizer = AutoTokenizer.from_pretrained(host_dir)
    with torch.no_grad():
        for batch in held_out_batches(cfg.data, tokenizer, max_tokens=cfg.max_tokens, ctx_len=cfg.ctx_len,
                                      batch_size=cfg.batch_size, seed=cfg.seed):
            ids = batch.inputs["input_ids"]
            logits = {}
            for mode in ("clean", "spliced", "ablated"):
                state.update(mode=mode, mask=batch.token_mask)
                logits[mode] = host(**batch.inputs).logits
            scored = state["keep"].clone()
            scored[:, -1] = False  # packed text: every next token is real, but the last has none
            labels = ids[:, 1:][scored[:, :-1]]
            log_probs = {mode: value[scored].double().log_softmax(-1) for mode, value in logits.items()}
            for mode, value in log_probs.items():
                ce[mode].append(F.nll_loss(value, labels, reduction="none"))
            kl.append((log_probs["clean"].exp() * (log_probs["clean"] - log_probs["spliced"])).sum(-1))
    x, x_hat, z = torch.cat(xs), torch.cat(x_hats), torch.cat(zs)
    frequency = (z > 0).float().mean(0)
    predictions = sum(v.numel() for v in ce["clean"])
    ce = {mode: torch.cat(v).mean().item() for mode, v in ce.items()}
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    return {
        "tokens": x.shape[0], "fvu": fvu.item(), "explained_variance": 1 - fvu.item(),
        "mse": ((x - x_hat) ** 2).mean().item(),
        "cosine_similarity": F.cosine_similarity(x_hat, x, dim=-1).mean().item(),
        "relative_norm": (x_hat.norm(dim=-1) / x.norm(dim=-1)).mean().item(),
        "l0": (z > 0).sum(-1).float().mean().item(),
        "dead_fraction": (frequency == 0).float().mean().item(),
        "dense_fraction": (frequency > 0.1).float().mean().item(),
        "firing_frequency": frequency.tolist(),
        "predictions": predictions,
        "ce_clean": ce["clean"], "ce_spliced": ce["spliced"], "ce_ablated": ce["ablated"],
        "loss_recovered": (ce["ablated"] - ce["spliced"]) / (ce["ablated"] - ce["clean"]),
        "kl_clean_spliced": torch.cat(kl).mean().item(),
    }


@pytest.mark.parametrize("outlier_factor", [None, 1.0])
def test_every_metric_matches_a_plain_torch_reference(host_dir, words_data, tmp_path, outlier_factor):
    """With factor 1, the rows above the median norm are outliers: neither read, scored nor spliced."""
    adapter = save_adapter(host_dir, tmp_path / "adapter")
    cfg = eval_config(host_dir, adapter, words_data, outlier_factor=outlier_factor)
    got = evaluate(cfg)["targets"][TARGET]["groups"]["all"]
    want = reference(host_dir, adapter, cfg)
    assert got["tokens"] == want["tokens"] > 50
    for key, value in want.items():
        if key == "firing_frequency":
            torch.testing.assert_close(torch.tensor(got[key]), torch.tensor(value),
                                       atol=1e-6, rtol=0)
        else:
            # Loss recovered divides CE differences of a few 1e-3 on a random host: looser.
            rel = 1e-3 if key == "loss_recovered" else 1e-5
            assert got[key] == pytest.approx(value, rel=rel, abs=1e-7), key
    assert sum(got["l0_histogram"]) == got["tokens"]
    # The last column predicts nothing.
    assert got["kl_clean_spliced"] > 0 and got["predictions"] < got["tokens"]


def test_a_perfect_sae_recovers_all_loss_and_a_zero_sae_none(host_dir, words_data, tmp_path):
    eye = torch.eye(32)
    # Latent i reads +x_i, latent 32 + i reads -x_i: with k = 32 the positive half is kept, and decodes to x.
    perfect = save_adapter(host_dir, tmp_path / "perfect", k=32, weights={
        "W_enc": torch.cat([eye, -eye]), "W_dec": torch.cat([eye, -eye]), "b_enc": torch.zeros(64),
        "b_dec": torch.zeros(32)})
    got = evaluate(eval_config(host_dir, perfect, words_data))["targets"][TARGET]["groups"]["all"]
    assert got["fvu"] == pytest.approx(0, abs=1e-10) and got["cosine_similarity"] == pytest.approx(1)
    assert got["ce_spliced"] == pytest.approx(got["ce_clean"], abs=1e-6)
    assert got["loss_recovered"] == pytest.approx(1, abs=1e-5)
    assert got["kl_clean_spliced"] == pytest.approx(0, abs=1e-6)
    assert abs(got["ce_ablated"] - got["ce_clean"]) > 1e-3  # the ratio is well defined

    zero = save_adapter(host_dir, tmp_path / "zero",
                        weights={"W_dec": torch.zeros(64, 32), "b_dec": torch.zeros(32)})
    got = evaluate(eval_config(host_dir, zero, words_data))["targets"][TARGET]["groups"]["all"]
    assert got["ce_spliced"] == pytest.approx(got["ce_ablated"], abs=1e-6)
    assert got["loss_recovered"] == pytest.approx(0, abs=1e-5)
    assert got["relative_norm"] == 0 and got["fvu"] > 1


def test_cli_writes_report_json_and_plots_for_each_target(host_dir, words_data, tmp_path, capsys):
    adapter = save_adapter(host_dir, tmp_path / "adapter", targets=("model.layers.0", "model.layers.2"))
    out = tmp_path / "out"
    cli_main(["eval", "--model", str(host_dir), "--adapter", str(adapter), "--data", str(words_data),
              "--max-tokens", "64", "--batch-size", "4", "--ctx-len", "16", "--device", "cpu",
              "--output-dir", str(out)])
    assert "report.md" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["density.png", "eval.json", "l0.png", "report.md"]
    result = json.loads((out / "eval.json").read_text())
    assert list(result["targets"]) == ["model.layers.0", "model.layers.2"]
    for target in result["targets"].values():
        stats = target["groups"]["all"]
        assert len(stats["firing_frequency"]) == target["num_latents"] == 64
        assert stats["tokens"] > stats["predictions"] > 0 and stats["loss_recovered"] is not None
    report = (out / "report.md").read_text()
    assert "## `model.layers.0`: 64 latents, k = 4" in report and "## `model.layers.2`" in report
    fvu = result["targets"]["model.layers.2"]["groups"]["all"]["fvu"]
    assert f"| FVU | {fvu:.4f} |" in report and "| loss recovered |" in report
    for name in ("density.png", "l0.png"):
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.height > image.width / 2  # one panel per target


def test_bad_input_gets_one_clear_sentence(host_dir, words_data, tmp_path):
    not_adapter = tmp_path / "not-an-adapter"
    not_adapter.mkdir()
    with pytest.raises(ValueError, match="not-an-adapter holds none of the SAE formats megasae reads"):
        evaluate(eval_config(host_dir, not_adapter, words_data))
    adapter = save_adapter(host_dir, tmp_path / "adapter")
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), empty)
    with pytest.raises(ValueError, match="empty.parquet holds no rows"):
        evaluate(eval_config(host_dir, adapter, empty))
    small = write_parquet(tmp_path / "small.parquet", [{"text": "only a few words"}])
    with pytest.raises(ValueError,
                       match="small.parquet holds less than one batch of 4 sequences of 16 tokens"):
        evaluate(eval_config(host_dir, adapter, small))


def test_one_pass_at_most(host_dir, tmp_path):
    adapter = save_adapter(host_dir, tmp_path / "adapter")
    texts = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(8)]
    data = write_parquet(tmp_path / "small.parquet", [{"text": t} for t in texts])
    once = evaluate(eval_config(host_dir, adapter, data, max_tokens=10**6))
    # One token per character plus an EOS per text; the batch that would wrap into a second pass is dropped.
    total = sum(len(t) + 1 for t in texts)
    assert once["tokens"] == total // 64 * 64


def test_train_eval_every_logs_the_held_out_numbers_eval_computes(host_dir, words_data, tmp_path):
    out = tmp_path / "run"
    cfg = TrainConfig(model=str(host_dir), data=str(words_data), target_modules=(TARGET,), k=4,
                      expansion_factor=2, ctx_len=16, micro_batch_size=4, batch_tokens=64, max_tokens=64 * 6,
                      warmup_steps=1, log_every=4, eval_every=3, eval_data=str(words_data), eval_tokens=128,
                      wandb_mode="disabled", output_dir=out, device="cpu", lr=3e-3)
    Trainer(cfg).fit()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 4, 6]
    assert ["eval/fvu" in r for r in records] == [True, False, True]
    final = evaluate(eval_config(host_dir, out, words_data, max_tokens=128, seed=0, outlier_factor=10.0))
    stats = final["targets"][TARGET]["groups"]["all"]
    assert records[-1]["eval/fvu"] == pytest.approx(stats["fvu"], rel=1e-5)
    assert records[-1]["eval/l0"] == pytest.approx(stats["l0"], rel=1e-6)
    assert records[-1]["eval/dead_pct"] == pytest.approx(100 * stats["dead_fraction"])
    with pytest.raises(ValueError, match="--eval-every needs --eval-data"):
        Trainer(TrainConfig(model=str(host_dir), data=str(words_data), eval_every=2, output_dir=out,
                            device="cpu"))


def test_writes_are_atomic_and_replace_is_checked(host_dir, tmp_path):
    target = write_atomic(tmp_path / "eval.json", "old")
    with pytest.raises(TypeError):
        write_atomic(target, 123)  # fails mid-write
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]
    assert target.stat().st_mode & 0o777 == 0o644
    config = TopKSaeConfig(k=2, num_latents=8, target_modules=[TARGET])
    model = get_peft_sae_model(load_host_model(host_dir)[0], config)
    message = r"replace must map target module paths \['model.layers.1'\] to 'sae' or 'zero'"
    with pytest.raises(ValueError, match=message), model.capture(replace={"model.layers.2": "sae"}):
        pass
