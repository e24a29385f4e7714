// What the CPU and CUDA kernels share: dtype dispatch and input checks.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <tuple>

// float32, float64 (for gradcheck), bfloat16 and float16; the kernels accumulate in
// at::opmath_type<scalar_t> (float32 for the 16-bit types).
#define MEGASAE_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

namespace megasae {

using DecodeGrads = std::tuple<at::Tensor, at::Tensor>;  // (grad_values, grad_W_dec)

inline void check_sparse_decode(const at::Tensor& indices, const at::Tensor& values,
                                const at::Tensor& W_dec, const std::optional<at::Tensor>& b_dec) {
  TORCH_CHECK(indices.dim() == 2 && indices.scalar_type() == at::kLong,
              "sparse_decode: indices must be an int64 tensor of shape [N, k], got ",
              indices.scalar_type(), " of shape ", indices.sizes());
  TORCH_CHECK(values.sizes() == indices.sizes(), "sparse_decode: values has shape ", values.sizes(),
              " but must have the shape of indices ", indices.sizes());
  TORCH_CHECK(W_dec.dim() == 2, "sparse_decode: W_dec must have shape [M, d], got ", W_dec.sizes());
  TORCH_CHECK(values.scalar_type() == W_dec.scalar_type(), "sparse_decode: values is ",
              values.scalar_type(), " but W_dec is ", W_dec.scalar_type(), "; they must match");
  TORCH_CHECK(indices.device() == W_dec.device() && values.device() == W_dec.device(),
              "sparse_decode: indices (", indices.device(), ") and values (", values.device(),
              ") must be on W_dec's device ", W_dec.device());
  if (b_dec.has_value()) {
    TORCH_CHECK(b_dec->dim() == 1 && b_dec->size(0) == W_dec.size(1), "sparse_decode: b_dec has shape ",
                b_dec->sizes(), " but must be [", W_dec.size(1), "] to match W_dec ", W_dec.sizes());
    TORCH_CHECK(b_dec->scalar_type() == W_dec.scalar_type() && b_dec->device() == W_dec.device(),
                "sparse_decode: b_dec (", b_dec->scalar_type(), " on ", b_dec->device(),
                ") must match W_dec (", W_dec.scalar_type(), " on ", W_dec.device(), ")");
  }
}

inline void check_sparse_decode_backward(const at::Tensor& grad, const at::Tensor& indices,
                                         const at::Tensor& values, const at::Tensor& W_dec) {
  check_sparse_decode(indices, values, W_dec, std::nullopt);
  TORCH_CHECK(grad.dim() == 2 && grad.size(0) == indices.size(0) && grad.size(1) == W_dec.size(1),
              "sparse_decode_backward: grad has shape ", grad.sizes(), " but must be [",
              indices.size(0), ", ", W_dec.size(1), "]");
  TORCH_CHECK(grad.scalar_type() == W_dec.scalar_type() && grad.device() == W_dec.device(),
              "sparse_decode_backward: grad (", grad.scalar_type(), " on ", grad.device(),
              ") must match W_dec (", W_dec.scalar_type(), " on ", W_dec.device(), ")");
}

}  // namespace megasae
