// CUDA kernels of megasae::sparse_decode: x_hat[n] = sum_j values[n, j] * W_dec[indices[n, j]] + b_dec.
// Built from the row primitives of rows.cuh: no atomics, deterministic.
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../common.h"
#include "rows.cuh"

namespace megasae {
namespace {

at::Tensor sparse_decode_cuda(const at::Tensor& indices_, const at::Tensor& values_, const at::Tensor& W_dec_,
                              const std::optional<at::Tensor>& b_dec) {
  check_sparse_decode(indices_, values_, W_dec_, b_dec);
  const c10::cuda::CUDAGuard guard(W_dec_.device());
  const auto indices = indices_.contiguous();
  const auto values = values_.contiguous();
  const auto W_dec = W_dec_.contiguous();
  const auto bias = b_dec.has_value() ? b_dec->contiguous() : at::Tensor();
  auto out = at::empty({indices.size(0), W_dec.size(1)}, W_dec.options());
  gpu::gather_rows(indices, values, W_dec, bias, out);
  return out;
}

DecodeGrads sparse_decode_backward_cuda(const at::Tensor& grad_, const at::Tensor& indices_,
                                        const at::Tensor& values_, const at::Tensor& W_dec_) {
  check_sparse_decode_backward(grad_, indices_, values_, W_dec_);
  const c10::cuda::CUDAGuard guard(W_dec_.device());
  const auto grad = grad_.contiguous();
  const auto indices = indices_.contiguous();
  const auto values = values_.contiguous();
  const auto W_dec = W_dec_.contiguous();
  auto grad_values = gpu::row_dots(grad, indices, W_dec);
  auto grad_W = std::get<0>(gpu::segment_rows(indices, values, grad, W_dec.size(0), /*with_sums=*/false));
  return {grad_values, grad_W};
}

}  // namespace

TORCH_LIBRARY_IMPL(megasae, CUDA, m) {
  m.impl("sparse_decode", &sparse_decode_cuda);
  m.impl("sparse_decode_backward", &sparse_decode_backward_cuda);
}

}  // namespace megasae
