"""Python front of the megasae kernels.

Each op runs the compiled kernel of megasae._C when one exists for the tensors' device, and the
pure-PyTorch reference (megasae.ops.reference) otherwise. MEGASAE_KERNELS=reference, read at
import, forces the reference everywhere.
"""

import os
import warnings

import torch

from . import reference

__all__ = ["backend", "sparse_decode", "topk_encode"]

_KERNELS = os.environ.get("MEGASAE_KERNELS", "auto")
if _KERNELS not in ("auto", "reference"):
    raise ValueError(f"MEGASAE_KERNELS={_KERNELS!r} is not valid; use 'auto' (the default) or 'reference'.")

_C = None
if _KERNELS == "auto":
    try:
        from megasae import _C
    except ImportError as e:
        warnings.warn(
            f"megasae._C, the compiled C++/CUDA extension, is missing ({e}); megasae runs the slower "
            "pure-PyTorch reference ops. Build it with `pip install --no-build-isolation -e .`.",
            stacklevel=2,
        )
    else:
        from . import _custom_ops  # noqa: F401  fake impls and autograd of the compiled ops


def backend() -> str:
    """The implementation the ops run on this machine: "cuda", "cpu" or "reference"."""
    if _C is None:
        return "reference"
    return "cuda" if _C.with_cuda and torch.cuda.is_available() else "cpu"


def _has_kernel(t: torch.Tensor) -> bool:
    return _C is not None and (t.device.type == "cpu" or (t.device.type == "cuda" and bool(_C.with_cuda)))


def topk_encode(
    x: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    b_dec: torch.Tensor | None,
    k: int,
    dead_mask: torch.Tensor | None = None,
    *,
    chunk_size: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK SAE encoder: (values, indices) of relu(topk_k((x - b_dec) @ W_enc.T + b_enc)).

    x [N, d_in], W_enc [M, d_in], b_enc [M], b_dec [d_in] or None (no pre-bias). With a bool
    dead_mask [M], only latents where it is True are selected; slots beyond the selectable count
    hold value 0 (and the first unselectable latents as indices). values [N, k] has x's dtype and
    each row is sorted, largest first; indices [N, k] is int64. Gradients reach x, W_enc, b_enc and
    b_dec through values.

    The kernels compute the pre-activations chunk_size latents at a time (0: their own choice)
    in float32 (float64 for float64 inputs) and keep a running top-k per row, so no [N, M] tensor
    is ever formed; exact ties go to the lower latent index. The reference ignores chunk_size.
    Tensors may have any strides (the kernels copy what they need contiguous).
    """
    _check_encode(x, W_enc, b_enc, b_dec, k, dead_mask)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(
            f"topk_encode: chunk_size = {chunk_size!r} must be an int >= 0 (0: the kernel picks)."
        )
    if _has_kernel(x):
        return torch.ops.megasae.topk_encode(x, W_enc, b_enc, b_dec, k, dead_mask, chunk_size)
    return reference.topk_encode(x, W_enc, b_enc, b_dec, k, dead_mask)


def sparse_decode(
    indices: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor | None
) -> torch.Tensor:
    """x_hat[n] = sum_j values[n, j] * W_dec[indices[n, j]] + b_dec (b_dec None: no bias).

    indices int64 [N, k], values [N, k], W_dec [M, d_out], b_dec [d_out] or None; values, W_dec
    and b_dec share one dtype. Differentiable in values, W_dec and b_dec.
    """
    _check_decode(indices, values, W_dec, b_dec)
    if _has_kernel(W_dec):
        return torch.ops.megasae.sparse_decode(indices, values, W_dec, b_dec)
    return reference.sparse_decode(indices, values, W_dec, b_dec)


def _shape(t: torch.Tensor | None) -> tuple | None:
    return None if t is None else tuple(t.shape)


# Messages are built only on failure: the checks run on every call, also under torch.compile.
def _check_same(op: str, name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(
            f"{op}: {name} is {t.dtype} on {t.device} but {ref_name} is {ref.dtype} on {ref.device}; "
            "they must match."
        )


def _check_encode(x, W_enc, b_enc, b_dec, k, dead_mask) -> None:
    if W_enc.dim() != 2:
        raise ValueError(f"topk_encode: W_enc has shape {_shape(W_enc)} but must be [M, d_in].")
    M, d_in = W_enc.shape
    if x.dim() != 2 or x.shape[1] != d_in:
        raise ValueError(f"topk_encode: x has shape {_shape(x)} but must be [N, {d_in}] to match W_enc.")
    if b_enc.shape != (M,):
        raise ValueError(f"topk_encode: b_enc has shape {_shape(b_enc)} but must be [{M}].")
    if b_dec is not None and b_dec.shape != (d_in,):
        raise ValueError(f"topk_encode: b_dec has shape {_shape(b_dec)} but must be [{d_in}] or None.")
    if not x.dtype.is_floating_point:
        raise ValueError(f"topk_encode: x is {x.dtype}; it must be float32, bfloat16, float16 or float64.")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= M:
        raise ValueError(f"topk_encode: k = {k!r} must be an int in [0, {M}], M being the number of latents.")
    if dead_mask is not None and (dead_mask.dtype != torch.bool or dead_mask.shape != (M,)):
        raise ValueError(
            f"topk_encode: dead_mask is {dead_mask.dtype} of shape {_shape(dead_mask)} "
            f"but must be a bool tensor of shape [{M}] or None."
        )
    if dead_mask is not None and dead_mask.device != x.device:
        raise ValueError(
            f"topk_encode: dead_mask is on {dead_mask.device} but x is on {x.device}; they must match."
        )
    for name, t in (("W_enc", W_enc), ("b_enc", b_enc), ("b_dec", b_dec)):
        if t is not None:
            _check_same("topk_encode", name, t, "x", x)


def _check_decode(indices, values, W_dec, b_dec) -> None:
    if indices.dim() != 2 or indices.dtype != torch.int64:
        raise ValueError(
            f"sparse_decode: indices is {indices.dtype} of shape {_shape(indices)} but must be int64 [N, k]."
        )
    if values.shape != indices.shape:
        raise ValueError(
            f"sparse_decode: values has shape {_shape(values)} but must match indices {_shape(indices)}."
        )
    if W_dec.dim() != 2:
        raise ValueError(f"sparse_decode: W_dec has shape {_shape(W_dec)} but must be [M, d_out].")
    if b_dec is not None and b_dec.shape != (W_dec.shape[1],):
        raise ValueError(
            f"sparse_decode: b_dec has shape {_shape(b_dec)} but must be [{W_dec.shape[1]}] "
            f"(the width of W_dec {_shape(W_dec)}) or None."
        )
    _check_same("sparse_decode", "values", values, "W_dec", W_dec)
    if indices.device != W_dec.device:
        raise ValueError(
            f"sparse_decode: indices is on {indices.device} but W_dec is on {W_dec.device}; they must match."
        )
    if b_dec is not None:
        _check_same("sparse_decode", "b_dec", b_dec, "W_dec", W_dec)
