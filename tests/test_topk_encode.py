"""megasae.ops.topk_encode on the compiled kernels (CPU, and CUDA where a GPU exists) against the
reference: exact selection, values, gradients, dead masks, ties, dtypes, and the whole SAE step."""

import pytest
import torch

from megasae import ops
from megasae.ops import reference

HAS_EXT = ops.backend() != "reference"
pytestmark = pytest.mark.skipif(not HAS_EXT, reason="megasae._C is not built")

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
]

M, D = 67, 10  # neither a power of two


def inputs(N=37, d=D, m=M, dtype=torch.float32, device="cpu", bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, d, generator=g, dtype=torch.float64)
    W_enc = torch.randn(m, d, generator=g, dtype=torch.float64)
    b_enc = torch.randn(m, generator=g, dtype=torch.float64)
    b_dec = torch.randn(d, generator=g, dtype=torch.float64) if bias else None

    def cast(t):
        return None if t is None else t.to(device=device, dtype=dtype)

    return cast(x), cast(W_enc), cast(b_enc), cast(b_dec)


def kernel(x, W_enc, b_enc, b_dec, k, dead_mask=None, chunk_size=0):
    return torch.ops.megasae.topk_encode(x, W_enc, b_enc, b_dec, k, dead_mask, chunk_size)


def dense_pre(x, W_enc, b_enc, b_dec):
    """Pre-activations in float64 from the inputs as given (x - b_dec rounded in their dtype, as the ops
    do)."""
    x_in = x if b_dec is None else x - b_dec
    return (x_in.double() @ W_enc.double().T + b_enc.double()).cpu()


def check_selection(x, W_enc, b_enc, b_dec, k, values, indices, dead_mask=None, atol=0.0, rtol=1e-6):
    """values/indices are a top-k of relu(pre) over the selectable latents: right shapes, distinct
    indices, values equal to relu(pre) there, sorted, and nothing left out beats what was taken."""
    N, m = x.shape[0], W_enc.shape[0]
    assert values.shape == indices.shape == (N, k)
    assert values.dtype == x.dtype and indices.dtype == torch.int64
    assert values.device == x.device and indices.device == x.device
    values, indices = values.double().cpu(), indices.cpu()
    pre = dense_pre(x, W_enc, b_enc, b_dec)
    live = torch.ones(m, dtype=torch.bool) if dead_mask is None else dead_mask.cpu()
    L = int(live.sum())
    taken = min(k, L)
    if N == 0 or k == 0:
        return
    assert (indices >= 0).all() and (indices < m).all()
    assert (indices.sort(1).values.diff(dim=1) != 0).all(), "an index repeats within a row"
    assert live[indices[:, :taken]].all(), "a masked latent was selected"
    if taken < k:  # padding: the first unselectable latents, value 0
        fill = (~live).nonzero().flatten()[: k - taken]
        assert (indices[:, taken:] == fill).all() and (values[:, taken:] == 0).all()
    if taken == 0:
        return
    chosen = pre.gather(1, indices[:, :taken])
    scale = pre.abs().max().clamp_min(1)
    torch.testing.assert_close(values[:, :taken], chosen.relu(), atol=atol * scale, rtol=rtol)
    assert (values[:, :-1] >= values[:, 1:]).all(), "rows are not sorted"
    left_out = pre.masked_fill(~live, float("-inf")).scatter(1, indices[:, :taken], float("-inf"))
    bound = chosen.min(1).values + atol * scale
    assert (left_out.max(1).values <= bound).all(), "a better latent was left out"


# --- forward ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("chunk", [0, 1, 16, 64, 200])
@pytest.mark.parametrize("k", [1, 8, M])
@pytest.mark.parametrize("N", [0, 1, 37])
def test_forward_float64_equals_reference(N, k, chunk, bias, device):
    """No ties in float64: the same latents as the reference, in the same (sorted) order."""
    x, W_enc, b_enc, b_dec = inputs(N, dtype=torch.float64, device=device, bias=bias)
    values, indices = kernel(x, W_enc, b_enc, b_dec, k, None, chunk)
    want_v, want_i = reference.topk_encode(
        x.cpu(), W_enc.cpu(), b_enc.cpu(), None if b_dec is None else b_dec.cpu(), k
    )
    if k == M:  # relu zeros tie at the bottom: compare as sets there
        assert (indices.cpu().sort(1).values == torch.arange(M)).all()
        torch.testing.assert_close(values.cpu(), want_v)
    else:
        assert torch.equal(indices.cpu(), want_i)
        torch.testing.assert_close(values.cpu(), want_v)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [0, 7, 32])
@pytest.mark.parametrize("k", [1, 8, M])
def test_forward_float32(k, chunk, device):
    x, W_enc, b_enc, b_dec = inputs(53, device=device)
    values, indices = kernel(x, W_enc, b_enc, b_dec, k, None, chunk)
    check_selection(x, W_enc, b_enc, b_dec, k, values, indices, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("k", [1, 8, 32])
def test_forward_low_precision(k, dtype, device):
    """Pre-activations accumulate in float32 and round once: within a 16-bit rounding of float64."""
    x, W_enc, b_enc, b_dec = inputs(64, d=48, m=300, dtype=dtype, device=device)
    values, indices = kernel(x, W_enc, b_enc, b_dec, k, None, 64)
    # Selection is made on the float32 sums, so only near-ties within float32 rounding can differ.
    check_selection(x, W_enc, b_enc, b_dec, k, values, indices, atol=1e-5, rtol=2**-8)


@pytest.mark.parametrize("device", DEVICES)
def test_forward_independent_of_chunk_size(device):
    """The same latents for every chunk size (BLAS may round tiles of other widths differently)."""
    x, W_enc, b_enc, b_dec = inputs(45, d=16, m=500, device=device)
    want = kernel(x, W_enc, b_enc, b_dec, 20, None, 0)
    for chunk in (7, 50, 128, 499, 500, 4096):
        got = kernel(x, W_enc, b_enc, b_dec, 20, None, chunk)
        assert torch.equal(got[1], want[1]), chunk
        torch.testing.assert_close(got[0], want[0], msg=f"chunk {chunk}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [0, 3])
def test_exact_ties_go_to_the_lower_index(chunk, device):
    x, W_enc, b_enc, b_dec = inputs(9, device=device)
    W_enc[20:40] = W_enc[5]  # latents 5 and 20..39 share one direction and bias
    b_enc[20:40] = b_enc[5] = 100.0  # and beat everything else
    values, indices = kernel(x, W_enc, b_enc, b_dec, 8, None, chunk)
    assert (indices.cpu() == torch.tensor([5, 20, 21, 22, 23, 24, 25, 26])).all()
    assert (values == values[:, :1]).all()
    # Everything equal: the first k latents.
    zeros = torch.zeros_like(W_enc)
    values, indices = kernel(x, zeros, torch.zeros_like(b_enc), b_dec, 5, None, chunk)
    assert (indices.cpu() == torch.arange(5)).all() and (values == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("chunk", [0, 2, 16])
@pytest.mark.parametrize("live", [0, 3, 8, 40, M])
def test_dead_mask(live, chunk, device):
    x, W_enc, b_enc, b_dec = inputs(29, device=device)
    dead_mask = torch.zeros(M, dtype=torch.bool)
    dead_mask[torch.randperm(M, generator=torch.Generator().manual_seed(live))[:live]] = True
    dead_mask = dead_mask.to(device)
    values, indices = kernel(x, W_enc, b_enc, b_dec, 8, dead_mask, chunk)
    check_selection(x, W_enc, b_enc, b_dec, 8, values, indices, dead_mask, atol=1e-6, rtol=1e-5)
    want_v, want_i = reference.topk_encode(*(t.cpu() for t in (x, W_enc, b_enc, b_dec)), 8, dead_mask.cpu())
    torch.testing.assert_close(values.cpu(), want_v)
    assert torch.equal(indices.cpu(), want_i)  # padding included: the first unselectable latents


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    x, W_enc, b_enc, b_dec = inputs(31, device=device)
    want = kernel(x, W_enc, b_enc, b_dec, 6)
    x_t, W_t = x.t().contiguous().t(), W_enc.t().contiguous().t()  # same values, column-major
    b_s = torch.stack([b_enc, b_enc], 1)[:, 0]  # stride 2
    for args in ((x_t, W_enc, b_enc), (x, W_t, b_enc), (x, W_enc, b_s)):
        got = kernel(*args, b_dec, 6, None, 16)
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0])


# --- backward --------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_gradcheck(masked, bias, device):
    x, W_enc, b_enc, b_dec = inputs(5, d=4, m=12, dtype=torch.float64, device=device, bias=bias, seed=3)
    dead_mask = None
    if masked:
        dead_mask = torch.tensor([True, False] * 6, device=device)
    leaves = [t.requires_grad_() for t in (x, W_enc, b_enc, b_dec) if t is not None]

    def f(x, W, b, *rest):
        return kernel(x, W, b, rest[0] if rest else None, 3, dead_mask, 4)[0]

    assert torch.autograd.gradcheck(f, leaves)


def step_grads(encode, decode, x, W_enc, b_enc, b_dec, W_dec, k, dead_mask=None, x_grad=True):
    """Gradients of an SAE step's FVU (and an AuxK-like term over dead_mask) for every input."""
    leaves = [t.detach().clone().requires_grad_() for t in (x, W_enc, b_enc, b_dec, W_dec)]
    leaves[0].requires_grad_(x_grad)
    x, W_enc, b_enc, b_dec, W_dec = leaves
    values, indices = encode(x, W_enc, b_enc, b_dec, k)
    x_hat = decode(indices, values, W_dec, b_dec)
    total = (x - x.mean(0)).pow(2).sum()
    loss = (x_hat - x).pow(2).sum() / total
    if dead_mask is not None:
        v_aux, i_aux = encode(x, W_enc, b_enc, b_dec, k, dead_mask)
        e_hat = decode(i_aux, v_aux, W_dec, None)
        loss = loss + (e_hat - (x - x_hat).detach()).pow(2).sum() / total / 32
    loss.backward()
    return [loss.detach()] + [t.grad for t in leaves], indices


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("masked, x_grad", [(False, True), (True, True), (False, False)])
def test_step_gradients_equal_reference(masked, x_grad, device):
    """A whole SAE step (encode, decode, FVU, AuxK-like term) against the reference's autograd;
    without a gradient for x the kernels skip it (b_dec's share comes from grad_b_enc)."""
    g = torch.Generator().manual_seed(7)
    x, W_enc, b_enc, b_dec = inputs(256, d=48, m=700, device=device, seed=5)
    W_dec = torch.randn(700, 48, generator=g).to(device)
    dead_mask = (torch.rand(700, generator=g) < 0.1).to(device) if masked else None
    args = (x, W_enc, b_enc, b_dec, W_dec, 16, dead_mask)
    got, got_i = step_grads(
        lambda *a: ops.topk_encode(*a, chunk_size=96), ops.sparse_decode, *args, x_grad=x_grad
    )
    cpu = [t.cpu() if isinstance(t, torch.Tensor) else t for t in args]
    want, want_i = step_grads(reference.topk_encode, reference.sparse_decode, *cpu, x_grad=x_grad)
    assert torch.equal(got_i.cpu(), want_i)
    names = ("loss", "x", "W_enc", "b_enc", "b_dec", "W_dec")
    for name, a, b in zip(names, got, want):
        if b is None:
            assert a is None, name
            continue
        # Both sides sum in float32, in different orders: the reference itself is up to ~2e-7 of the
        # gradient's largest entry away from float64, so small entries get an absolute slack at that scale.
        torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-6 * max(1.0, b.abs().max().item()),
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False])
def test_bf16_gradients(bias, device):
    """bf16 gradients within a few bf16 roundings of the float32 formula on the same selection."""
    x, W_enc, b_enc, b_dec = inputs(64, d=32, m=200, dtype=torch.bfloat16, device=device, bias=bias)
    leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_dec) if t is not None]
    values, indices = ops.topk_encode(*leaves, *([] if bias else [None]), 16, chunk_size=64)
    up = torch.randn(values.shape, generator=torch.Generator().manual_seed(3)).to(values)
    (values * up).sum().backward()


    def f32(t):
        return t.float().cpu()

    x_in = f32(x) if b_dec is None else f32(x - b_dec)  # x - b_dec rounds in bf16, as in the ops
    G = torch.zeros(x.shape[0], 200).scatter(1, indices.cpu(), f32(up) * (f32(values) > 0))
    want = [G @ f32(W_enc), G.T @ x_in, G.sum(0)] + ([-(G @ f32(W_enc)).sum(0)] if bias else [])
    for t, w in zip(leaves, want):
        assert t.grad.dtype == torch.bfloat16
        torch.testing.assert_close(f32(t.grad), w, rtol=2**-6, atol=2**-6 * w.abs().max().item())


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_skips_relu_zeros_and_padding(device):
    x, W_enc, b_enc, b_dec = inputs(16, device=device)
    b_enc = b_enc - 50  # every pre-activation negative: relu cuts all
    dead_mask = torch.zeros(M, dtype=torch.bool, device=device)
    dead_mask[:2] = True
    leaves = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_dec)]
    values, _ = ops.topk_encode(*leaves, 5, dead_mask)
    assert (values == 0).all()
    values.sum().backward()
    for t in leaves:
        assert (t.grad == 0).all()


# --- registration ----------------------------------------------------------------------------


def test_opcheck():
    """Schema, fake impl and autograd registration hold up under torch.compile's tracing."""
    for bias, masked in ((True, False), (False, True)):
        x, W_enc, b_enc, b_dec = inputs(9, bias=bias)
        dead_mask = torch.arange(M) % 3 == 0 if masked else None
        args = (x.requires_grad_(), W_enc.requires_grad_(), b_enc.requires_grad_(), b_dec, 4, dead_mask, 16)
        torch.library.opcheck(torch.ops.megasae.topk_encode.default, args)
    values, indices = kernel(x.detach(), W_enc.detach(), b_enc.detach(), None, 4)
    for need_grad_x in (True, False):
        args = (torch.randn(9, 4), values, indices, x.detach(), W_enc.detach(), None, need_grad_x)
        torch.library.opcheck(torch.ops.megasae.topk_encode_backward.default, args)


def test_torch_compile_step():
    x, W_enc, b_enc, b_dec = inputs(33)
    W_dec = torch.randn(M, D)

    def step(x, W_enc, b_enc, b_dec, W_dec):
        values, indices = ops.topk_encode(x, W_enc, b_enc, b_dec, 5)
        return (ops.sparse_decode(indices, values, W_dec, b_dec) - x).pow(2).sum()

    leaves = [t.requires_grad_() for t in (W_enc, b_enc, b_dec, W_dec)]
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    compiled(x, *leaves).backward()
    got = [t.grad.clone() for t in leaves]
    for t in leaves:
        t.grad = None
    step(x, *leaves).backward()
    for a, t in zip(got, leaves):
        torch.testing.assert_close(a, t.grad)


def test_front_uses_kernel():
    x, W_enc, b_enc, b_dec = inputs(4)
    values, _ = ops.topk_encode(x, W_enc.requires_grad_(), b_enc, b_dec, 2)
    assert "megasae_topk_encode" in values.grad_fn.name()


def test_no_double_backward():
    x, W_enc, b_enc, b_dec = inputs(4)
    W_enc.requires_grad_()
    loss = kernel(x, W_enc, b_enc, b_dec, 3)[0].square().sum()
    (grad,) = torch.autograd.grad(loss, W_enc, create_graph=True)
    with pytest.raises(NotImplementedError, match="double backward"):
        grad.sum().backward()


def test_kernel_errors():
    x, W_enc, b_enc, b_dec = inputs(4)
    with pytest.raises(RuntimeError, match=r"k = 68 must be in \[0, 67\]"):
        kernel(x, W_enc, b_enc, b_dec, M + 1)
    with pytest.raises(RuntimeError, match="W_enc is Double on cpu but x is Float"):
        kernel(x, W_enc.double(), b_enc, b_dec, 2)
    with pytest.raises(RuntimeError, match=r"b_dec has shape \[9\] but must be \[10\]"):
        kernel(x, W_enc, b_enc, b_dec[:9], 2)
    with pytest.raises(RuntimeError, match="dead_mask is Float"):
        kernel(x, W_enc, b_enc, b_dec, 2, torch.ones(M))
    with pytest.raises(RuntimeError, match="Long"):
        kernel(x.long(), W_enc.long(), b_enc.long(), None, 2)


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, "k": True}, "k = True must be an int"),
        (lambda a: {**a, "k": -1}, r"k = -1 must be an int in \[0, 67\]"),
        (lambda a: {**a, "x": a["x"].long(), "W_enc": a["W_enc"].long()}, "x is torch.int64"),
        (
            lambda a: {**a, "dead_mask": torch.ones(M, dtype=torch.bool, device="meta")},
            "dead_mask is on meta",
        ),
        (
            lambda a: {**a, "b_enc": a["b_enc"].double()},
            "b_enc is torch.float64 on cpu but x is torch.float32",
        ),
        (lambda a: {**a, "chunk_size": -2}, "chunk_size = -2 must be an int >= 0"),
    ],
)
def test_front_validation(change, match):
    x, W_enc, b_enc, b_dec = inputs(4)
    args = change({"x": x, "W_enc": W_enc, "b_enc": b_enc, "b_dec": b_dec, "k": 2})
    with pytest.raises(ValueError, match=match):
        ops.topk_encode(**args)
