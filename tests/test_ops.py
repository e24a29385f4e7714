"""megasae.ops: the compiled kernels against the pure-PyTorch reference, and the reference itself."""

import os
import subprocess
import sys

import pytest
import torch

from megasae import ops
from megasae.ops import reference

HAS_EXT = ops.backend() != "reference"
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="megasae._C is not built")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

M, D = 67, 33  # neither a power of two


def decode_inputs(N, k, dtype=torch.float32, bias=True, device="cpu", m=M, d=D, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, m, (N, k), generator=g)
    if k > 1:
        indices[:, -1] = indices[:, 0]  # a latent repeated within each row
    values = torch.randn(N, k, generator=g)
    W_dec = torch.randn(m, d, generator=g)
    b_dec = torch.randn(d, generator=g) if bias else None

    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    return indices.to(device), cast(values), cast(W_dec), cast(b_dec)


def decode_with_grads(fn, indices, values, W_dec, b_dec, grad_out):
    """fn's output and the gradients of <output, grad_out> for values, W_dec and b_dec."""
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (values, W_dec, b_dec)]
    out = fn(indices, *leaves)
    out.backward(grad_out)
    return [out.detach()] + [t.grad if t is not None else None for t in leaves]


def kernel_decode(indices, values, W_dec, b_dec):
    return torch.ops.megasae.sparse_decode(indices, values, W_dec, b_dec)


def assert_matches_reference(indices, values, W_dec, b_dec, **tol):
    """The kernel, in the inputs' dtype, against the reference in float32 on the same (rounded) inputs."""
    grad_out = torch.randn(indices.shape[0], W_dec.shape[1], generator=torch.Generator().manual_seed(1)).to(
        W_dec
    )
    got = decode_with_grads(kernel_decode, indices, values, W_dec, b_dec, grad_out)

    def f32(t):
        return None if t is None else t.float().cpu()

    want = decode_with_grads(
        reference.sparse_decode, indices.cpu(), f32(values), f32(W_dec), f32(b_dec), f32(grad_out)
    )
    for name, g, w in zip(("x_hat", "grad values", "grad W_dec", "grad b_dec"), got, want):
        if w is None:
            assert g is None
            continue
        assert g.dtype == values.dtype, name
        torch.testing.assert_close(g.float().cpu(), w, msg=lambda m, name=name: f"{name}: {m}", **tol)


# --- the extension itself --------------------------------------------------------------------


def test_extension_built():
    if os.environ.get("MEGASAE_ALLOW_NO_EXTENSION") == "1":
        pytest.skip("MEGASAE_ALLOW_NO_EXTENSION=1")
    assert HAS_EXT, "megasae._C failed to import; the tests would only exercise the reference ops"
    assert ops.backend() == ("cuda" if torch.cuda.is_available() else "cpu")


def _run_python(code, **env):
    result = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_env_forces_reference():
    code = "import megasae.ops as o, sys; print(o.backend(), 'megasae._C' in sys.modules)"
    assert _run_python(code, MEGASAE_KERNELS="reference") == "reference False"


def test_missing_extension_warns_once_and_falls_back():
    code = """
import sys, warnings, torch
sys.modules["megasae._C"] = None  # makes `import megasae._C` raise ImportError
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import megasae.ops as o
    import megasae.ops  # a second import must not warn again
messages = [str(w.message) for w in caught if "megasae._C" in str(w.message)]
assert len(messages) == 1 and "reference" in messages[0], messages
x = o.sparse_decode(torch.tensor([[1, 0]]), torch.ones(1, 2), torch.eye(2), None)
assert x.tolist() == [[1.0, 1.0]], x
print(o.backend())
"""
    assert _run_python(code) == "reference"


# --- sparse_decode on the CPU kernel ---------------------------------------------------------


@needs_ext
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [1, 8, M])
@pytest.mark.parametrize("N", [0, 1, 37, 512])
def test_sparse_decode_cpu_fp32(N, k, bias):
    assert_matches_reference(*decode_inputs(N, k, bias=bias), rtol=1e-5, atol=1e-5)


# The kernel accumulates in float32 and rounds once, so each output is within one rounding
# (2^-9 relative for bf16) of the float32 result on the same inputs.
@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 8, M])
def test_sparse_decode_cpu_low_precision(k, dtype):
    assert_matches_reference(*decode_inputs(200, k, dtype=dtype), rtol=2**-8, atol=1e-4)


@needs_ext
def test_sparse_decode_cpu_non_contiguous():
    indices, values, W_dec, b_dec = decode_inputs(37, 8)
    W_t = W_dec.t().contiguous().t()  # same values, column-major
    values_t = values.t().contiguous().t()
    torch.testing.assert_close(
        kernel_decode(indices, values_t, W_t, b_dec), reference.sparse_decode(indices, values, W_dec, b_dec)
    )


@needs_ext
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_decode_gradcheck(bias):
    indices, values, W_dec, b_dec = decode_inputs(5, 3, dtype=torch.float64, bias=bias, m=7, d=4)
    inputs = [t.requires_grad_() if t is not None else None for t in (values, W_dec, b_dec)]
    assert torch.autograd.gradcheck(lambda v, w, b: kernel_decode(indices, v, w, b), inputs)


@needs_ext
def test_sparse_decode_opcheck():
    """Schema, fake impl and autograd registration hold up under torch.compile's tracing."""
    for bias in (True, False):
        indices, values, W_dec, b_dec = decode_inputs(9, 4, bias=bias)
        args = (indices, values.requires_grad_(), W_dec.requires_grad_(), b_dec)
        torch.library.opcheck(torch.ops.megasae.sparse_decode.default, args)
    args = (torch.randn(9, D), indices, values.detach(), W_dec.detach())
    torch.library.opcheck(torch.ops.megasae.sparse_decode_backward.default, args)


@needs_ext
def test_sparse_decode_no_double_backward():
    indices, values, W_dec, b_dec = decode_inputs(4, 2)
    values.requires_grad_()
    (grad_values,) = torch.autograd.grad(
        kernel_decode(indices, values, W_dec, b_dec).square().sum(), values, create_graph=True
    )
    with pytest.raises(NotImplementedError, match="double backward"):
        grad_values.sum().backward()


@needs_ext
def test_sparse_decode_front_uses_kernel():
    indices, values, W_dec, b_dec = decode_inputs(4, 2)
    out = ops.sparse_decode(indices, values.requires_grad_(), W_dec, b_dec)
    assert "megasae_sparse_decode" in out.grad_fn.name()


@needs_ext
def test_sparse_decode_kernel_errors():
    indices, values, W_dec, b_dec = decode_inputs(4, 2)
    with pytest.raises(RuntimeError, match="only 67 rows"):
        kernel_decode(indices + M, values, W_dec, b_dec)
    with pytest.raises(RuntimeError, match="int64"):
        kernel_decode(indices.int(), values, W_dec, b_dec)
    with pytest.raises(RuntimeError, match="must match"):
        kernel_decode(indices, values.double(), W_dec, b_dec)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda i, v, W, b: (i, v[:, :1], W, b), "values has shape"),
        (lambda i, v, W, b: (i.int(), v, W, b), "indices is torch.int32"),
        (lambda i, v, W, b: (i, v, W, b[:-1]), r"b_dec has shape \(32,\) but must be \[33\]"),
        (
            lambda i, v, W, b: (i, v.bfloat16(), W, b),
            "values is torch.bfloat16 on cpu but W_dec is torch.float32",
        ),
    ],
)
def test_sparse_decode_validation(change, match):
    with pytest.raises(ValueError, match=match):
        ops.sparse_decode(*change(*decode_inputs(4, 2)))


# --- sparse_decode on the CUDA kernel --------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("d", [D, 64])  # 64: rows move as 16-byte packs
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [1, 8, M])
@pytest.mark.parametrize("N", [0, 1, 37, 512])
def test_sparse_decode_cuda_fp32(N, k, bias, d):
    assert_matches_reference(*decode_inputs(N, k, bias=bias, device="cuda", d=d), rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("d", [D, 64])  # 64: rows move as 16-byte packs
@pytest.mark.parametrize("k", [1, 8, M])
def test_sparse_decode_cuda_bf16(k, d):
    assert_matches_reference(
        *decode_inputs(200, k, dtype=torch.bfloat16, device="cuda", d=d), rtol=2**-8, atol=1e-4
    )


@needs_cuda
def test_sparse_decode_cuda_gradcheck():
    indices, values, W_dec, b_dec = decode_inputs(5, 3, dtype=torch.float64, device="cuda", m=7, d=4)
    inputs = [t.requires_grad_() for t in (values, W_dec, b_dec)]
    assert torch.autograd.gradcheck(lambda v, w, b: kernel_decode(indices, v, w, b), inputs)


# --- topk_encode (the reference behind the front) --------------------------------------------


def encode_inputs(N=24, d=10, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g)
    W_enc = torch.randn(M, d, generator=g)
    b_enc = torch.randn(M, generator=g)
    b_dec = torch.randn(d, generator=g) if bias else None
    return x, W_enc, b_enc, b_dec


def dense_pre(x, W_enc, b_enc, b_dec):
    return (x - (0 if b_dec is None else b_dec)) @ W_enc.T + b_enc


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [1, 8, M])
def test_topk_encode_values(k, bias):
    x, W_enc, b_enc, b_dec = encode_inputs(bias=bias)
    values, indices = ops.topk_encode(x, W_enc, b_enc, b_dec, k)
    pre = dense_pre(x, W_enc, b_enc, b_dec)
    assert values.shape == indices.shape == (x.shape[0], k)
    assert indices.dtype == torch.int64 and values.dtype == x.dtype
    torch.testing.assert_close(values, pre.gather(1, indices).relu())
    # The selected latents are the k largest: none left out beats the smallest one chosen.
    kth = pre.gather(1, indices).min(1, keepdim=True).values
    assert (pre.scatter(1, indices, float("-inf")) <= kth).all()
    assert (values >= 0).all()
    if k == M:
        assert (values == 0).any()  # the negative pre-activations were cut by relu


def test_topk_encode_dead_mask():
    x, W_enc, b_enc, b_dec = encode_inputs()
    dead = torch.zeros(M, dtype=torch.bool)
    dead[[3, 10, 40, 41, 66]] = True
    b_enc = b_enc + 100 * dead  # live latents: their pre-activations are all positive
    values, indices = ops.topk_encode(x, W_enc, b_enc, b_dec, 8, dead_mask=dead)
    # Only 5 latents are selectable: those fill 5 slots, the other 3 carry 0.
    assert dead[indices[:, :5]].all() and (values[:, :5] > 0).all() and (values[:, 5:] == 0).all()
    pre = dense_pre(x, W_enc, b_enc, b_dec)
    torch.testing.assert_close(values[:, :5], pre[:, dead].topk(5).values)


@pytest.mark.parametrize("bias", [True, False])
def test_topk_encode_gradients(bias):
    x, W_enc, b_enc, b_dec = encode_inputs(bias=bias)
    dead = torch.rand(M, generator=torch.Generator().manual_seed(2)) < 0.9
    leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_dec) if t is not None]
    values, indices = ops.topk_encode(*leaves, *([] if bias else [None]), 12, dead_mask=dead)
    g = torch.randn(values.shape, generator=torch.Generator().manual_seed(3))
    (values * g).sum().backward()

    # Dense formula: G[n, m] is the upstream gradient where latent m was selected and active.
    x_in = x - (0 if b_dec is None else b_dec)
    G = torch.zeros(x.shape[0], M).scatter(1, indices, g * (values > 0))
    want = [G @ W_enc, G.T @ x_in, G.sum(0)] + ([-(G @ W_enc).sum(0)] if bias else [])
    for t, w in zip(leaves, want):
        torch.testing.assert_close(t.grad, w)


def test_topk_encode_validation():
    x, W_enc, b_enc, b_dec = encode_inputs()
    with pytest.raises(ValueError, match=r"k = 68 must be an int in \[0, 67\]"):
        ops.topk_encode(x, W_enc, b_enc, b_dec, M + 1)
    with pytest.raises(ValueError, match=r"x has shape \(24, 9\) but must be \[N, 10\]"):
        ops.topk_encode(x[:, :9], W_enc, b_enc, b_dec, 4)
    with pytest.raises(ValueError, match="dead_mask is torch.float32 of shape"):
        ops.topk_encode(x, W_enc, b_enc, b_dec, 4, dead_mask=torch.ones(M))
