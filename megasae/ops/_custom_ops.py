"""Fake impls and autograd for the ops that megasae._C defines (see csrc/ops.cpp)."""

import torch

import megasae._C  # noqa: F401  registers torch.ops.megasae.* with the dispatcher


@torch.library.register_fake("megasae::sparse_decode")
def _(indices, values, W_dec, b_dec):
    return W_dec.new_empty(indices.shape[0], W_dec.shape[1])


@torch.library.register_fake("megasae::sparse_decode_backward")
def _(grad, indices, values, W_dec):
    return torch.empty_like(values), torch.empty_like(W_dec)


def _setup_context(ctx, inputs, output):
    indices, values, W_dec, b_dec = inputs
    ctx.save_for_backward(indices, values, W_dec)
    ctx.has_bias = b_dec is not None


def _backward(ctx, grad):
    indices, values, W_dec = ctx.saved_tensors
    grad_values, grad_W_dec = torch.ops.megasae.sparse_decode_backward(grad, indices, values, W_dec)
    grad_b_dec = grad.sum(0) if ctx.has_bias else None
    return None, grad_values, grad_W_dec, grad_b_dec


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("megasae.ops.sparse_decode has no second derivative (double backward).")


torch.library.register_autograd("megasae::sparse_decode", _backward, setup_context=_setup_context)
# Without this, backprop through the backward op would silently give wrong second derivatives.
torch.library.register_autograd("megasae::sparse_decode_backward", _no_double_backward)
