"""`megasae bench kernels`: its paths compute the same step, and the harness writes what it prints."""

import json
import subprocess
import sys

import torch

from megasae.bench.kernels import BatchTopK, Megasae, Naive, Shape, make_params
from megasae.cli import main as cli_main
from megasae.sae.batchtopk import batchtopk_encode


def test_naive_and_megasae_steps_compute_the_same_gradients():
    shape = Shape(N=64, d=16, M=96, k=5)
    t = make_params(shape, torch.float64, "cpu")
    naive, fused = Naive(t, shape), Megasae(t, shape, chunk_size=32)
    naive()
    fused()
    for a, b in zip(naive.params, fused.params):
        torch.testing.assert_close(b.grad, a.grad)


def test_batchtopk_step_computes_the_gradients_of_its_selection():
    shape = Shape(N=64, d=16, M=96, k=5)
    t = make_params(shape, torch.float64, "cpu")
    step = BatchTopK(t, shape)
    step()
    params = [t[n].clone().requires_grad_() for n in ("W_enc", "b_enc", "b_dec", "W_dec")]
    W_enc, b_enc, b_dec, W_dec = params
    values, indices = batchtopk_encode(t["x"], W_enc, b_enc, b_dec, 5, 20)
    x_hat = torch.zeros(64, 96, dtype=torch.float64).scatter(1, indices, values) @ W_dec + b_dec
    x = t["x"]
    ((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).backward()
    for a, b in zip(params, step.params):
        torch.testing.assert_close(b.grad, a.grad)


def test_cli_writes_a_row_per_path_and_shape(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    cli_main(["bench", "kernels", "--device", "cpu", "--shapes", "64x16x96x4", "128x16x96x8",
              "--paths", "floor", "naive", "megasae", "batchtopk", "--repeats", "2", "--warmup", "0",
              "--json", str(out)])
    result = json.loads(out.read_text())
    rows = {(r["M"], r["k"], r["path"]): r for r in result["results"]}
    assert set(rows) == {(96, k, p) for k in (4, 8) for p in ("floor", "naive", "megasae", "batchtopk")}
    for r in rows.values():
        assert len(r["times_s"]) == 2 and r["median_s"] > 0 and r["peak_mib"] is not None
    assert rows[(96, 4, "floor")]["ratio_to_floor"] == 1.0
    printed = capsys.readouterr().out
    assert "N=64 d=16 M=96 k=4: megasae" in printed and "x its TopK step" in printed


def test_the_kernel_benchmark_loads_no_training_code():
    # It must run in a peer's environment that has torch and the extension but not megasae's data stack.
    code = ("import sys; from megasae.cli import main; import megasae.bench.kernels; "
            "print([m for m in ('megasae.train', 'megasae.data', 'megasae.eval') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
