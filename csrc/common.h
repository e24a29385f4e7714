// What the CPU and CUDA kernels share: dtype dispatch and input checks.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <tuple>

// float32, float64 (for gradcheck), bfloat16 and float16; the kernels accumulate in
// at::opmath_type<scalar_t> (float32 for the 16-bit types).
#define MEGASAE_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, TYPE, NAME, __VA_ARGS__)

namespace megasae {

using DecodeGrads = std::tuple<at::Tensor, at::Tensor>;           // (grad_values, grad_W_dec)
using EncodeOut = std::tuple<at::Tensor, at::Tensor>;             // (values, indices)
using EncodeGrads = std::tuple<at::Tensor, at::Tensor, at::Tensor>;  // (grad_x, grad_W_enc, grad_b_enc)

// The dtype the kernels compute and select in: float64 for float64 inputs, float32 otherwise.
inline at::ScalarType accumulate_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// Latents per chunk: the caller's choice when positive, else a tile of about `tile_elements`
// pre-activations ([N, C]) within [lo, hi]; never more than the `live` latents there are.
inline int64_t chunk_latents(int64_t requested, int64_t N, int64_t live, int64_t tile_elements, int64_t lo,
                             int64_t hi) {
  int64_t c = requested;
  if (c <= 0) c = std::min(hi, std::max(lo, tile_elements / std::max<int64_t>(N, 1)));
  return std::max<int64_t>(1, std::min(c, live));
}

inline void check_topk_encode(const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc,
                              const std::optional<at::Tensor>& b_dec, int64_t k,
                              const std::optional<at::Tensor>& dead_mask, int64_t chunk_size) {
  TORCH_CHECK(W_enc.dim() == 2, "topk_encode: W_enc must have shape [M, d_in], got ", W_enc.sizes());
  const int64_t M = W_enc.size(0), d = W_enc.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == d, "topk_encode: x has shape ", x.sizes(), " but must be [N, ", d,
              "] to match W_enc ", W_enc.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "topk_encode: x is ", x.scalar_type(),
              "; it must be float32, bfloat16, float16 or float64");
  TORCH_CHECK(b_enc.dim() == 1 && b_enc.size(0) == M, "topk_encode: b_enc has shape ", b_enc.sizes(),
              " but must be [", M, "]");
  TORCH_CHECK(0 <= k && k <= M, "topk_encode: k = ", k, " must be in [0, ", M, "], M being the number of latents");
  TORCH_CHECK(chunk_size >= 0, "topk_encode: chunk_size = ", chunk_size, " must be >= 0 (0 picks one)");
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == x.scalar_type() && t.device() == x.device(), "topk_encode: ", name, " is ",
                t.scalar_type(), " on ", t.device(), " but x is ", x.scalar_type(), " on ", x.device(),
                "; they must match");
  };
  same(W_enc, "W_enc");
  same(b_enc, "b_enc");
  if (b_dec.has_value()) {
    TORCH_CHECK(b_dec->dim() == 1 && b_dec->size(0) == d, "topk_encode: b_dec has shape ", b_dec->sizes(),
                " but must be [", d, "]");
    same(*b_dec, "b_dec");
  }
  if (dead_mask.has_value()) {
    TORCH_CHECK(dead_mask->scalar_type() == at::kBool && dead_mask->dim() == 1 && dead_mask->size(0) == M,
                "topk_encode: dead_mask is ", dead_mask->scalar_type(), " of shape ", dead_mask->sizes(),
                " but must be bool of shape [", M, "]");
    TORCH_CHECK(dead_mask->device() == x.device(), "topk_encode: dead_mask is on ", dead_mask->device(),
                " but x is on ", x.device());
  }
}

inline void check_topk_encode_backward(const at::Tensor& grad_values, const at::Tensor& values,
                                       const at::Tensor& indices, const at::Tensor& x, const at::Tensor& W_enc,
                                       const std::optional<at::Tensor>& b_dec) {
  TORCH_CHECK(W_enc.dim() == 2 && x.dim() == 2 && x.size(1) == W_enc.size(1),
              "topk_encode_backward: x ", x.sizes(), " and W_enc ", W_enc.sizes(), " must be [N, d] and [M, d]");
  TORCH_CHECK(indices.dim() == 2 && indices.size(0) == x.size(0) && indices.scalar_type() == at::kLong,
              "topk_encode_backward: indices must be int64 [", x.size(0), ", k], got ", indices.scalar_type(),
              " of shape ", indices.sizes());
  TORCH_CHECK(values.sizes() == indices.sizes() && grad_values.sizes() == indices.sizes(),
              "topk_encode_backward: values ", values.sizes(), " and grad_values ", grad_values.sizes(),
              " must have the shape of indices ", indices.sizes());
  for (const at::Tensor* t : {&grad_values, &values, &W_enc}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type() && t->device() == x.device(),
                "topk_encode_backward: every tensor must be ", x.scalar_type(), " on ", x.device(), ", got ",
                t->scalar_type(), " on ", t->device());
  }
  TORCH_CHECK(indices.device() == x.device(), "topk_encode_backward: indices is on ", indices.device(),
              " but x is on ", x.device());
  if (b_dec.has_value()) {
    TORCH_CHECK(b_dec->dim() == 1 && b_dec->size(0) == x.size(1) && b_dec->scalar_type() == x.scalar_type() &&
                    b_dec->device() == x.device(),
                "topk_encode_backward: b_dec must be ", x.scalar_type(), " [", x.size(1), "] on ", x.device());
  }
}

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
