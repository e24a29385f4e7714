"""`megasae bench quality` on a tiny random host: every variant trains on the same tokens and is evaluated,
BatchTopK ones through their threshold, on the same held-out tokens."""

import json

from megasae.bench.quality import VARIANTS, main
from megasae.peft.config import TopKSaeConfig


def test_every_variant_trains_on_the_same_tokens_and_is_evaluated(host_dir, text_data, words_data, tmp_path,
                                                                  capsys):
    runs, out = tmp_path / "runs", tmp_path / "quality.json"
    main(["--model", str(host_dir), "--data", str(text_data), "--eval-data", str(words_data),
          "--target", "model.layers.1", "--k", "4", "--num-latents", "64",
          "--matryoshka-prefixes", "16", "64", "--max-tokens", "512", "--eval-tokens", "128",
          "--ctx-len", "16", "--micro-batch-size", "4", "--batch-tokens", "128", "--device", "cpu",
          "--output-dir", str(runs), "--json", str(out)])
    results = json.loads(out.read_text())["results"]
    assert list(results) == list(VARIANTS)
    for variant in VARIANTS:
        config = TopKSaeConfig.from_pretrained(str(runs / variant))
        assert config.architecture == ("topk" if variant == "topk" else "batchtopk")
        # each architecture's own default: BatchTopK reads standardised tokens
        assert config.normalize_activations == ("none" if variant == "topk" else "layer_norm")
        assert 0 < results[variant]["fvu"] and results[variant]["tokens"] == results["topk"]["tokens"]

    def trained_tokens(variant):
        return [json.loads(line)["trained_tokens"] for line in open(runs / variant / "metrics.jsonl")]

    assert trained_tokens("batchtopk") == trained_tokens("topk") == trained_tokens("matryoshka-batchtopk")
    prefixes = results["matryoshka-batchtopk"]["prefix_fvu"]
    assert list(prefixes) == ["16", "64"] and prefixes["64"] == results["matryoshka-batchtopk"]["fvu"]
    assert results["topk"]["prefix_fvu"] == {}
    assert "matryoshka-batchtopk" in capsys.readouterr().out


def test_one_normalisation_and_data_order_for_every_variant(host_dir, text_data, tmp_path):
    runs = tmp_path / "runs"
    main(["--model", str(host_dir), "--data", str(text_data), "--eval-data", str(text_data),
          "--target", "model.layers.1", "--k", "4", "--num-latents", "64", "--max-tokens", "128",
          "--eval-tokens", "64", "--ctx-len", "16", "--micro-batch-size", "4", "--batch-tokens", "64",
          "--device", "cpu", "--variants", "topk", "batchtopk", "--normalize-activations", "layer_norm",
          "--shuffle-sequences", "3", "--output-dir", str(runs)])
    for variant in ("topk", "batchtopk"):
        assert TopKSaeConfig.from_pretrained(str(runs / variant)).normalize_activations == "layer_norm"
        assert json.loads((runs / variant / "config.json").read_text())["shuffle_sequences"] == 3
