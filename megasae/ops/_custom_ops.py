"""Fake impls and autograd for the ops that megasae._C defines (see csrc/ops.cpp)."""

import torch

import megasae._C  # noqa: F401  registers torch.ops.megasae.* with the dispatcher

# --- sparse_decode ---------------------------------------------------------------------------


@torch.library.register_fake("megasae::sparse_decode")
def _(indices, values, W_dec, b_dec):
    return W_dec.new_empty(indices.shape[0], W_dec.shape[1])


@torch.library.register_fake("megasae::sparse_decode_backward")
def _(grad, indices, values, W_dec):
    return torch.empty_like(values), torch.empty_like(W_dec)


def _decode_setup_context(ctx, inputs, output):
    indices, values, W_dec, b_dec = inputs
    ctx.save_for_backward(indices, values, W_dec)
    ctx.has_bias = b_dec is not None


def _decode_backward(ctx, grad):
    indices, values, W_dec = ctx.saved_tensors
    grad_values, grad_W_dec = torch.ops.megasae.sparse_decode_backward(grad, indices, values, W_dec)
    grad_b_dec = grad.sum(0) if ctx.has_bias else None
    return None, grad_values, grad_W_dec, grad_b_dec


# --- topk_encode -----------------------------------------------------------------------------


@torch.library.register_fake("megasae::topk_encode")
def _(x, W_enc, b_enc, b_dec, k, dead_mask=None, chunk_size=0):
    return x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.int64)


@torch.library.register_fake("megasae::topk_encode_backward")
def _(grad_values, values, indices, x, W_enc, b_dec, need_grad_x=True):
    grad_x = torch.empty_like(x) if need_grad_x else x.new_empty(0, x.shape[1])
    return grad_x, torch.empty_like(W_enc), W_enc.new_empty(W_enc.shape[0])


def _encode_setup_context(ctx, inputs, output):
    x, W_enc, b_enc, b_dec, k, dead_mask, chunk_size = inputs
    values, indices = output
    ctx.mark_non_differentiable(indices)
    ctx.save_for_backward(values, indices, x, W_enc, b_dec)


def _encode_backward(ctx, grad_values, grad_indices):
    values, indices, x, W_enc, b_dec = ctx.saved_tensors
    need_grad_x = ctx.needs_input_grad[0]
    grad_x, grad_W_enc, grad_b_enc = torch.ops.megasae.topk_encode_backward(
        grad_values, values, indices, x, W_enc, b_dec, need_grad_x
    )
    # x - b_dec: the pre-bias gets -sum_n grad_x[n] = -sum_m grad_b_enc[m] W_enc[m], which needs
    # no grad_x (an SAE's input rarely wants one).
    grad_b_dec = None
    if b_dec is not None and ctx.needs_input_grad[3]:
        grad_b_dec = -(grad_b_enc @ W_enc)
    return (grad_x if need_grad_x else None), grad_W_enc, grad_b_enc, grad_b_dec, None, None, None


# --- autograd registration -------------------------------------------------------------------


def _no_double_backward(op):
    def backward(ctx, *grads):
        raise NotImplementedError(f"megasae.ops.{op} has no second derivative (double backward).")

    return backward


torch.library.register_autograd(
    "megasae::sparse_decode", _decode_backward, setup_context=_decode_setup_context
)
torch.library.register_autograd(
    "megasae::topk_encode", _encode_backward, setup_context=_encode_setup_context
)
# Without these, backprop through the backward ops would silently give wrong second derivatives.
torch.library.register_autograd("megasae::sparse_decode_backward", _no_double_backward("sparse_decode"))
torch.library.register_autograd("megasae::topk_encode_backward", _no_double_backward("topk_encode"))
