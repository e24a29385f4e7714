"""The SAE's settings are defined once: `megasae train`, `megasae plan` and TopKSaeConfig share one default
per setting, and a run's settings reach the PEFT config of every SAE it trains."""

import dataclasses
from pathlib import Path

from megasae.peft import TopKSaeConfig
from megasae.plan import PlanConfig
from megasae.train.config import SaeConfig, SaeSize, TrainConfig


def _defaults(config_type) -> dict:
    return {f.name: f.default for f in dataclasses.fields(config_type)}


def test_train_plan_and_the_peft_config_share_every_default():
    peft, train, plan = _defaults(TopKSaeConfig), _defaults(TrainConfig), _defaults(PlanConfig)
    # Matryoshka prefixes are a tuple flag (none: ()) and a list field (none: None), and train's normalisation
    # defaults per architecture (none: the architecture's), compared below.
    shared = [f.name for f in dataclasses.fields(SaeConfig)
              if f.name in peft and f.name not in ("matryoshka_prefixes", "normalize_activations")]
    assert {"k", "num_latents", "expansion_factor", "architecture", "k_max", "k_aux", "transcode",
            "auxk_alpha", "dead_tokens_threshold"} <= set(shared)
    for name in shared:
        assert train[name] == peft[name], name
    for f in dataclasses.fields(SaeSize):
        assert plan[f.name] == train[f.name], f.name
    assert train["expansion_factor"] == 32  # the original project's and sparsify's (README, "TopKSaeConfig")
    assert not train["matryoshka_prefixes"] and peft["matryoshka_prefixes"] is None
    assert train["normalize_activations"] == "auto" and peft["normalize_activations"] == "none"
    assert train["sae_compute_dtype"] == peft["sae_dtype"]


def test_a_run_s_settings_reach_the_peft_config_of_each_of_its_saes():
    cfg = TrainConfig(k=(8, 16), num_latents=256, architecture="batchtopk", k_max=40, k_aux=7,
                      matryoshka_prefixes=(64, 256), transcode=True, auxk_alpha=0.25,
                      dead_tokens_threshold=99, sae_compute_dtype="bfloat16", output_dir=Path("unused"))
    configs = [cfg.peft_config(sae, ["model.layers.1"], ctx_len=64) for sae in cfg.saes()]
    assert [c.k for c in configs] == [8, 16]
    for c in configs:
        assert (c.num_latents, c.architecture, c.k_max, c.k_aux, c.matryoshka_prefixes, c.transcode,
                c.auxk_alpha, c.dead_tokens_threshold, c.compute_dtype, c.ctx_len) == (
            256, "batchtopk", 40, 7, [64, 256], True, 0.25, 99, "bfloat16", 64)
        assert c.target_modules == {"model.layers.1"}
