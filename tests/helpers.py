"""Plain helpers several test modules share: tiny hosts, a random saved adapter, and train/eval configs.

Fixtures live in conftest.py; this is an ordinary module, imported as `from helpers import ...`.
"""

import dataclasses
import os
import signal

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from megasae import TopKSaeConfig, get_peft_sae_model
from megasae.errors import Interrupted
from megasae.eval import EvalConfig
from megasae.models import load_host_model
from megasae.train import TrainConfig, Trainer

from data_fixtures import write_parquet

# The words of `text_rows`, the parallel training tests' data.
TEXT_ROW_WORDS = "the cat sat on a mat while dogs ran in parks and birds sang over green hills".split()

WORDS = "a quick brown fox jumps over the lazy dog while seven tired owls hum old songs".split()

# The SAE's layer in the tiny Llama `host_dir` (3 decoder layers).
TARGET = "model.layers.1"

# The eval and inspect settings of a small, fast run on CPU.
SETTINGS = dict(max_tokens=256, batch_size=4, ctx_len=16, seed=3, device="cpu", outlier_factor=None)


class DummyModel(nn.Module):
    """The host model of the original project's README example."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(10, 10)

    def forward(self, x):
        return self.linear(x)


class TwoLayerMLP(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.act = nn.GELU()
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def tiny_llama(seed: int = 0, num_layers: int = 4, **config) -> LlamaForCausalLM:
    """A random Llama (hidden 32, 4 heads, 2 KV heads, vocab 128) in eval mode; `config` overrides any
    LlamaConfig field."""
    torch.manual_seed(seed)
    fields = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    fields.update(config)
    return LlamaForCausalLM(LlamaConfig(**fields)).eval()


def save_adapter(host_dir, path, targets=(TARGET,), weights=None, k=4, num_latents=64):
    """A random SAE whose b_dec is the mean of one batch (as training starts), or the given weights."""
    host, _ = load_host_model(host_dir)
    sae_config = TopKSaeConfig(k=k, num_latents=num_latents, target_modules=list(targets))
    model = get_peft_sae_model(host, sae_config)
    model.train()
    with torch.no_grad(), model.capture():
        model(input_ids=torch.randint(3, 90, (2, 16)))
    for name, tensor in (weights or {}).items():
        dict(model.named_parameters())[f"base_model.model.{TARGET}.sae_{name}.default"].data.copy_(tensor)
    model.save_pretrained(path)
    return path


def eval_config(host_dir, adapter, data, **overrides) -> EvalConfig:
    fields = dict(adapter=adapter, model=str(host_dir), data=str(data), max_tokens=160, batch_size=4,
                  ctx_len=16, seed=3, device="cpu", outlier_factor=None)
    fields.update(overrides)
    return EvalConfig(**fields)


def config(host_dir, text_data, output_dir, **overrides) -> TrainConfig:
    """A 12-step training run on `host_dir` and `text_data` (the fixtures), 128 tokens a step."""
    fields = dict(model=str(host_dir), data=str(text_data), target_modules=("model.layers.1",), k=4,
                  expansion_factor=4, ctx_len=16, micro_batch_size=4, batch_tokens=128, max_tokens=128 * 12,
                  warmup_steps=2, log_every=2, wandb_mode="disabled", output_dir=output_dir, device="cpu",
                  dead_tokens_threshold=256, lr=3e-3)
    fields.update(overrides)
    return TrainConfig(**fields)


def adapter_tensors(output_dir):
    return load_file(output_dir / "adapter_model.safetensors")


def fit_until_sigterm(cfg: TrainConfig, stop_step: int) -> Interrupted:
    """Run, sending this process SIGTERM right after step `stop_step`, as a scheduler would; the run
    checkpoints and reports the interrupt."""
    trainer = Trainer(cfg)
    real_step = trainer.train_step

    def step_then_sigterm():
        metrics = real_step()
        if trainer.step == stop_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    trainer.train_step = step_then_sigterm
    with pytest.raises(Interrupted) as stopped:
        trainer.fit()
    return stopped.value


def parallel_config(host_dir, data, output_dir, **overrides) -> TrainConfig:
    """A 4-step training run of the parallel training tests, 128 tokens a step."""
    fields = dict(model=str(host_dir), data=str(data), target_modules=("model.layers.1",), k=4,
                  expansion_factor=4, ctx_len=16, micro_batch_size=4, batch_tokens=128, max_tokens=128 * 4,
                  warmup_steps=1, log_every=1, wandb_mode="disabled", output_dir=output_dir, device="cpu",
                  dead_tokens_threshold=64, lr=3e-3)
    return TrainConfig(**dict(fields, **overrides))


def text_rows(path):
    """60 rows of 40 random words of TEXT_ROW_WORDS, written as parquet to `path`."""
    g = torch.Generator().manual_seed(0)
    words = TEXT_ROW_WORDS
    rows = [{"text": " ".join(words[i] for i in torch.randint(0, len(words), (40,), generator=g).tolist())}
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
        states = zip(trainer.optimizer.state.values(), resumed.optimizer.state.values(), strict=True)
        for mine, restored in states:
            assert torch.equal(mine["exp_avg"], restored["exp_avg"])


SAE_WEIGHTS = ("sae_W_enc", "sae_b_enc", "sae_W_dec", "sae_b_dec")


def capture_steps(model, layer, x, mask, keys, steps=2):
    """`steps` captures of `model` on `x` (each backpropagating the SAE loss of `layer`'s module "down"):
    each key of `keys` of every step's SaeOutput, and the summed gradients of `layer`'s default SAE."""
    result = {key: [] for key in keys}
    for _ in range(steps):
        with model.capture(token_mask=mask) as outputs:
            model(x)
        out = outputs["down"]
        out.loss.backward()
        for key in result:
            result[key].append(getattr(out, key).detach().clone())
    result["grads"] = {name: getattr(layer, name)["default"].grad.clone() for name in SAE_WEIGHTS}
    return result
