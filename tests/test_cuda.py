"""Training, eval and --compile on a CUDA device, each against the same run on the CPU.

Skipped without a GPU (CI has none): `launch/gpu_check.sh` runs this file on a lent GPU. The kernel
tests (tests/test_ops.py, tests/test_topk_encode.py) check the CUDA kernels op by op; this file checks
that the whole trainer, with those kernels inside, gives what the CPU gives.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

from megasae.eval import EvalConfig, evaluate
from megasae.train import TrainConfig, Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TARGET = "model.layers.1"


@pytest.fixture(autouse=True)
def _fp32_and_deterministic_where_it_exists():
    # Exact fp32 on both devices (no TF32), and ops without a deterministic CUDA kernel warn, not fail:
    # users never turn deterministic mode on, so the trainer must not depend on it.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(True)


def train(host_dir, data, out, device, **overrides):
    fields = dict(model=str(host_dir), data=str(data), target_modules=(TARGET,), k=4, expansion_factor=4,
                  ctx_len=16, micro_batch_size=4, batch_tokens=128, max_tokens=128 * 12, warmup_steps=2,
                  log_every=1, wandb_mode="disabled", output_dir=out, device=device,
                  dead_tokens_threshold=256, lr=3e-3)
    fields.update(overrides)
    Trainer(TrainConfig(**fields)).fit()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return records, load_file(out / "adapter_model.safetensors")


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_fp32_training_on_cuda_follows_the_cpu_run(host_dir, words_data, tmp_path, architecture):
    cpu, cpu_weights = train(host_dir, words_data, tmp_path / "cpu", "cpu", architecture=architecture)
    gpu, gpu_weights = train(host_dir, words_data, tmp_path / "cuda", "cuda", architecture=architecture)
    # Step 1 sees the same batch and the same init: equal to float32 rounding.
    for key in ("loss", "fvu", "auxk", "l0"):
        assert gpu[0][key] == pytest.approx(cpu[0][key], rel=1e-4, abs=1e-6), key
    # Later steps may pick a different latent at a near-tie; the runs must still end together.
    assert gpu[-1]["fvu"] == pytest.approx(cpu[-1]["fvu"], rel=0.03)
    assert gpu[-1]["fvu"] < gpu[0]["fvu"]
    for name, weight in cpu_weights.items():
        cosine = torch.nn.functional.cosine_similarity(weight.flatten(), gpu_weights[name].flatten(), dim=0)
        assert cosine > 0.99, name


@pytest.mark.parametrize("sae_compute_dtype", ["float32", "bfloat16"])
def test_bf16_training_on_cuda_learns(host_dir, words_data, tmp_path, sae_compute_dtype):
    records, weights = train(host_dir, words_data, tmp_path / "bf16", "cuda", dtype="bfloat16",
                             sae_compute_dtype=sae_compute_dtype)
    assert records[-1]["fvu"] < 0.9 * records[0]["fvu"]
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in weights.values())


def test_eval_on_cuda_equals_eval_on_cpu(host_dir, words_data, tmp_path):
    train(host_dir, words_data, tmp_path / "run", "cpu")
    results = {}
    for device in ("cpu", "cuda"):
        cfg = EvalConfig(adapter=tmp_path / "run", model=str(host_dir), data=str(words_data), max_tokens=160,
                         batch_size=4, ctx_len=16, seed=3, device=device,
                         output_dir=tmp_path / f"eval-{device}")
        results[device] = evaluate(cfg)["targets"][TARGET]["groups"]["all"]
    assert results["cuda"]["tokens"] == results["cpu"]["tokens"]
    for key in ("fvu", "l0", "dead_fraction", "ce_clean", "ce_spliced", "ce_ablated", "loss_recovered"):
        assert results["cuda"][key] == pytest.approx(results["cpu"][key], rel=1e-3, abs=1e-6), key


def test_compiled_blocks_on_cuda_equal_eager(host_dir, words_data, tmp_path):
    eager, _ = train(host_dir, words_data, tmp_path / "eager", "cuda", max_tokens=128 * 3)
    compiled, _ = train(host_dir, words_data, tmp_path / "compiled", "cuda", max_tokens=128 * 3, compile=True)
    for key in ("loss", "fvu", "l0"):
        assert compiled[0][key] == pytest.approx(eager[0][key], rel=1e-4, abs=1e-6), key
