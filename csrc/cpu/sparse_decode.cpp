// CPU kernels of megasae::sparse_decode: x_hat[n] = sum_j values[n, j] * W_dec[indices[n, j]] + b_dec.
// Every output element is written by one thread in a fixed order: no atomics, deterministic.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../common.h"

namespace megasae {
namespace {

// Items per parallel_for chunk so that each chunk does about GRAIN_SIZE multiply-adds.
int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_item));
}

void check_index(int64_t m, int64_t M, int64_t slot) {
  TORCH_CHECK(0 <= m && m < M, "sparse_decode: indices holds ", m, " at flat position ", slot,
              ", but W_dec has only ", M, " rows");
}

at::Tensor sparse_decode_cpu(const at::Tensor& indices_, const at::Tensor& values_, const at::Tensor& W_dec_,
                             const std::optional<at::Tensor>& b_dec) {
  check_sparse_decode(indices_, values_, W_dec_, b_dec);
  const auto indices = indices_.contiguous();
  const auto values = values_.contiguous();
  const auto W_dec = W_dec_.contiguous();
  const auto bias = b_dec.has_value() ? b_dec->contiguous() : at::Tensor();
  const int64_t N = indices.size(0), k = indices.size(1), M = W_dec.size(0), d = W_dec.size(1);
  auto out = at::empty({N, d}, W_dec.options());

  MEGASAE_DISPATCH_FLOATING(W_dec.scalar_type(), "sparse_decode_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* I = indices.const_data_ptr<int64_t>();
    const scalar_t* V = values.const_data_ptr<scalar_t>();
    const scalar_t* W = W_dec.const_data_ptr<scalar_t>();
    const scalar_t* B = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* Y = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, grain(k * d), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d);
      for (int64_t n = begin; n < end; ++n) {
        for (int64_t c = 0; c < d; ++c) acc[c] = B ? static_cast<acc_t>(B[c]) : acc_t(0);
        for (int64_t j = 0; j < k; ++j) {
          const int64_t m = I[n * k + j];
          check_index(m, M, n * k + j);
          const acc_t v = V[n * k + j];
          const scalar_t* w = W + m * d;
          for (int64_t c = 0; c < d; ++c) acc[c] += v * static_cast<acc_t>(w[c]);
        }
        for (int64_t c = 0; c < d; ++c) Y[n * d + c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
  return out;
}

DecodeGrads sparse_decode_backward_cpu(const at::Tensor& grad_, const at::Tensor& indices_,
                                       const at::Tensor& values_, const at::Tensor& W_dec_) {
  check_sparse_decode_backward(grad_, indices_, values_, W_dec_);
  const auto grad = grad_.contiguous();
  const auto indices = indices_.contiguous();
  const auto values = values_.contiguous();
  const auto W_dec = W_dec_.contiguous();
  const int64_t N = indices.size(0), k = indices.size(1), M = W_dec.size(0), d = W_dec.size(1);
  auto grad_values = at::empty({N, k}, values.options());
  auto grad_W = at::empty({M, d}, W_dec.options());

  // Segment the N*k slots by latent: after a stable sort, latent m's slots are
  // order[offsets[m] : offsets[m + 1]], so each latent's gradient row has a single writer.
  at::Tensor sorted, order;
  std::tie(sorted, order) = at::sort(indices.flatten(), /*stable=*/std::optional<bool>(true), /*dim=*/0);
  const auto offsets = at::searchsorted(sorted, at::arange(M + 1, indices.options()));

  MEGASAE_DISPATCH_FLOATING(W_dec.scalar_type(), "sparse_decode_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* G = grad.const_data_ptr<scalar_t>();
    const int64_t* I = indices.const_data_ptr<int64_t>();
    const scalar_t* V = values.const_data_ptr<scalar_t>();
    const scalar_t* W = W_dec.const_data_ptr<scalar_t>();
    const int64_t* order_p = order.const_data_ptr<int64_t>();
    const int64_t* offsets_p = offsets.const_data_ptr<int64_t>();
    scalar_t* DV = grad_values.mutable_data_ptr<scalar_t>();
    scalar_t* DW = grad_W.mutable_data_ptr<scalar_t>();

    // grad_values[n, j] = <grad[n], W_dec[indices[n, j]]>
    at::parallel_for(0, N, grain(k * d), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const scalar_t* g = G + n * d;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t m = I[n * k + j];
          check_index(m, M, n * k + j);
          const scalar_t* w = W + m * d;
          acc_t dot = 0;
          for (int64_t c = 0; c < d; ++c) dot += static_cast<acc_t>(g[c]) * static_cast<acc_t>(w[c]);
          DV[n * k + j] = static_cast<scalar_t>(dot);
        }
      }
    });

    // grad_W_dec[m] = sum over slots (n, j) of latent m of values[n, j] * grad[n]
    const int64_t work_per_latent = d + (M > 0 ? N * k * d / M : 0);
    at::parallel_for(0, M, grain(work_per_latent), [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d);
      for (int64_t m = begin; m < end; ++m) {
        std::fill(acc.begin(), acc.end(), acc_t(0));
        for (int64_t p = offsets_p[m]; p < offsets_p[m + 1]; ++p) {
          const int64_t slot = order_p[p];
          const acc_t v = V[slot];
          const scalar_t* g = G + (slot / k) * d;
          for (int64_t c = 0; c < d; ++c) acc[c] += v * static_cast<acc_t>(g[c]);
        }
        for (int64_t c = 0; c < d; ++c) DW[m * d + c] = static_cast<scalar_t>(acc[c]);
      }
    });
  });
  return {grad_values, grad_W};
}

}  // namespace

TORCH_LIBRARY_IMPL(megasae, CPU, m) {
  m.impl("sparse_decode", &sparse_decode_cpu);
  m.impl("sparse_decode_backward", &sparse_decode_backward_cpu);
}

}  // namespace megasae
