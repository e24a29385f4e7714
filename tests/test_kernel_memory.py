"""Peak memory of an SAE training step on the kernels, TopK and BatchTopK: far below one N x M float32 tensor.

Measured in a subprocess as the growth of its peak RSS (VmHWM, reset through /proc/self/clear_refs)
over the resident size before the step, so imports and the inputs do not count; glibc maps every
allocation of 64 KiB or more afresh there, so that the RSS follows the live tensors. The same
measurement around one explicit N x M float32 tensor checks that the method sees such a tensor.
"""

import json
import os
import subprocess
import sys

import pytest

from megasae import ops
from megasae.bench.kernels import reset_peak_rss

N, M, D, K = 4096, 65536, 64, 32
DENSE_MIB = N * M * 4 / 2**20  # one N x M float32 tensor: 1024 MiB

SCRIPT = r"""
import json, re, sys, types
import torch

# Import megasae.ops alone: the package's __init__ (PEFT, transformers) is slow and not needed here.
package = types.ModuleType("megasae")
package.__path__ = [{package_dir!r}]
sys.modules["megasae"] = package
import megasae.ops as ops
from megasae.sae.batchtopk import batchtopk_encode

torch.set_num_threads(2)
N, M, D, K = {N}, {M}, {D}, {K}

def kib(field):
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1))

def step(encode, decode, x, W_enc, b_enc, b_dec, W_dec):
    values, indices = encode(x, W_enc, b_enc, b_dec, K)
    x_hat = decode(indices, values, W_dec, b_dec)
    ((x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).backward()

def peak_of(fn):
    open("/proc/self/clear_refs", "w").write("5")  # reset the peak RSS to the current RSS
    before = kib("VmRSS")
    fn()
    return (kib("VmHWM") - before) / 1024

def peak_mib(encode, decode, M):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    W_dec = torch.randn(M, D, generator=g)
    params = [W_dec.clone(), torch.zeros(M), x.mean(0), W_dec]
    for p in params:
        p.requires_grad_()
    step(encode, decode, x[:8], *params)  # load code paths; small
    for p in params:
        p.grad = None
    return peak_of(lambda: step(encode, decode, x, *params))

out = {{"kernels": peak_mib(ops.topk_encode, ops.sparse_decode, M)}}
out["kernels_quarter_M"] = peak_mib(ops.topk_encode, ops.sparse_decode, M // 4)
out["batchtopk"] = peak_mib(lambda *args: batchtopk_encode(*args, 4 * K), ops.sparse_decode, M)
out["dense"] = peak_of(lambda: torch.empty(N, M).fill_(1.0))
print(json.dumps(out))
"""


@pytest.mark.skipif(ops.backend() == "reference", reason="megasae._C is not built")
@pytest.mark.skipif(not sys.platform.startswith("linux") or not reset_peak_rss(),
                    reason="needs Linux VmHWM reset")
def test_step_peak_memory_far_below_dense():
    code = SCRIPT.format(N=N, M=M, D=D, K=K, package_dir=os.path.dirname(ops.__path__[0]))
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        # glibc: every allocation of 64 KiB or more mapped afresh and returned on free, so that memory
        # malloc keeps after a free cannot hide an allocation from the peak RSS.
        env={**os.environ, "OMP_NUM_THREADS": "2", "MALLOC_MMAP_THRESHOLD_": "65536"},
    )
    assert result.returncode == 0, result.stderr
    peaks = json.loads(result.stdout.strip().splitlines()[-1])
    # The probe: one [N, M] float32 tensor must show up in full.
    assert peaks["dense"] > 0.95 * DENSE_MIB, peaks
    # The kernels hold the gradients of W_enc and W_dec (2 x 16 MiB here), a 4 MiB tile per thread
    # during the forward and [N, k] / [N, d] tensors (1-2 MiB each): allow 64 MiB above the gradients.
    grads_mib = 2 * M * D * 4 / 2**20
    assert peaks["kernels"] < grads_mib + 64, peaks
    assert peaks["kernels"] < DENSE_MIB / 10, peaks
    # Growing M 4x adds the gradients' growth and nothing else of note.
    growth = peaks["kernels"] - peaks["kernels_quarter_M"]
    assert abs(growth - grads_mib * 3 / 4) < 16, peaks
    # BatchTopK: on these random rows the busiest keep about 400 codes, so those rows are encoded again with
    # up to 512 candidates ([N, 512] values and indices: 24 MiB); still no [N, M] tensor.
    assert peaks["batchtopk"] < DENSE_MIB / 8, peaks
