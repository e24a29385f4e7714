// CPU kernels of megasae::sparse_decode: x_hat[n] = sum_j values[n, j] * W_dec[indices[n, j]] + b_dec.
// Built from the row primitives of rows.h: no atomics, deterministic.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../common.h"
#include "rows.h"

namespace megasae {
namespace {

at::Tensor sparse_decode_cpu(const at::Tensor& indices_, const at::Tensor& values_, const at::Tensor& W_dec_,
                             const std::optional<at::Tensor>& b_dec) {
  check_sparse_decode(indices_, values_, W_dec_, b_dec);
  const auto indices = indices_.contiguous();
  const auto values = values_.contiguous();
  const auto W_dec = W_dec_.contiguous();
  const auto bias = b_dec.has_value() ? b_dec->contiguous() : at::Tensor();
  auto out = at::empty({indices.size(0), W_dec.size(1)}, W_dec.options());
  cpu::gather_rows(indices, values, W_dec, bias, out, "sparse_decode", "W_dec");
  return out;
}

DecodeGrads sparse_decode_backward_cpu(const at::Tensor& grad_, const at::Tensor& indices_,
                                       const at::Tensor& values_, const at::Tensor& W_dec_) {
  check_sparse_decode_backward(grad_, indices_, values_, W_dec_);
  const auto grad = grad_.contiguous();
  const auto indices = indices_.contiguous();
  const auto values = values_.contiguous();
  const auto W_dec = W_dec_.contiguous();
  // By latent, in one pass over the gradient rows of each latent's slots:
  // grad_W_dec[m] = sum over slots (n, j) of latent m of values[n, j] * grad[n], and
  // grad_values[n, j] = <grad[n], W_dec[m]>.
  auto [grad_W, unused, grad_values] =
      cpu::segment_rows(indices, values, grad, W_dec.size(0), /*with_sums=*/false, W_dec, "sparse_decode", "W_dec");
  return {grad_values, grad_W};
}

}  // namespace

TORCH_LIBRARY_IMPL(megasae, CPU, m) {
  m.impl("sparse_decode", &sparse_decode_cpu);
  m.impl("sparse_decode_backward", &sparse_decode_backward_cpu);
}

}  // namespace megasae
