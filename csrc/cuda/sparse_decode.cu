// CUDA kernels of megasae::sparse_decode, written for clarity first: one thread per output
// element, each summing its terms in a fixed order (no atomics, deterministic).
#include <ATen/OpMathType.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "../common.h"

namespace megasae {
namespace {

constexpr int kWarp = 32;

// Threads per block for the kernels that give one thread to each column of a d-wide row.
int column_threads(int64_t d) {
  return static_cast<int>(std::min<int64_t>(256, (d + kWarp - 1) / kWarp * kWarp));
}

// Block (n, column tile): y[n, c] = b[c] + sum_j values[n, j] * W[indices[n, j], c].
template <typename scalar_t>
__global__ void decode_kernel(const int64_t* __restrict__ I, const scalar_t* __restrict__ V,
                              const scalar_t* __restrict__ W, const scalar_t* __restrict__ B,
                              scalar_t* __restrict__ Y, int64_t k, int64_t d, int64_t M) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t n = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= d) return;
  acc_t acc = B ? static_cast<acc_t>(B[c]) : acc_t(0);
  for (int64_t j = 0; j < k; ++j) {
    const int64_t m = I[n * k + j];
    CUDA_KERNEL_ASSERT(0 <= m && m < M);
    acc += static_cast<acc_t>(V[n * k + j]) * static_cast<acc_t>(W[m * d + c]);
  }
  Y[n * d + c] = static_cast<scalar_t>(acc);
}

// One warp per slot s = (n, j): dv[s] = <grad[n], W[indices[s]]>.
template <typename scalar_t>
__global__ void grad_values_kernel(const scalar_t* __restrict__ G, const int64_t* __restrict__ I,
                                   const scalar_t* __restrict__ W, scalar_t* __restrict__ DV,
                                   int64_t slots, int64_t k, int64_t d, int64_t M) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t s = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (s >= slots) return;  // whole warps leave together, so the shuffles below stay full-warp
  const int64_t m = I[s];
  CUDA_KERNEL_ASSERT(0 <= m && m < M);
  const scalar_t* g = G + (s / k) * d;
  const scalar_t* w = W + m * d;
  acc_t dot = 0;
  for (int64_t c = lane; c < d; c += kWarp) dot += static_cast<acc_t>(g[c]) * static_cast<acc_t>(w[c]);
  for (int offset = kWarp / 2; offset > 0; offset /= 2) dot += __shfl_down_sync(0xffffffffu, dot, offset);
  if (lane == 0) DV[s] = static_cast<scalar_t>(dot);
}

// Block (m, column tile): dW[m, c] = sum over latent m's slots s of values[s] * grad[s / k, c].
template <typename scalar_t>
__global__ void grad_weight_kernel(const scalar_t* __restrict__ G, const scalar_t* __restrict__ V,
                                   const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                                   scalar_t* __restrict__ DW, int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= d) return;
  acc_t acc = 0;
  for (int64_t p = offsets[m]; p < offsets[m + 1]; ++p) {
    const int64_t s = order[p];
    acc += static_cast<acc_t>(V[s]) * static_cast<acc_t>(G[(s / k) * d + c]);
  }
  DW[m * d + c] = static_cast<scalar_t>(acc);
}

at::Tensor sparse_decode_cuda(const at::Tensor& indices_, const at::Tensor& values_, const at::Tensor& W_dec_,
                              const std::optional<at::Tensor>& b_dec) {
  check_sparse_decode(indices_, values_, W_dec_, b_dec);
  const c10::cuda::CUDAGuard guard(W_dec_.device());
  const auto indices = indices_.contiguous();
  const auto values = values_.contiguous();
  const auto W_dec = W_dec_.contiguous();
  const auto bias = b_dec.has_value() ? b_dec->contiguous() : at::Tensor();
  const int64_t N = indices.size(0), k = indices.size(1), M = W_dec.size(0), d = W_dec.size(1);
  auto out = at::empty({N, d}, W_dec.options());
  if (N == 0 || d == 0) return out;
  TORCH_CHECK(N <= INT32_MAX, "sparse_decode: N = ", N, " rows exceed the CUDA grid; split the batch");

  const int threads = column_threads(d);
  const dim3 blocks(N, (d + threads - 1) / threads);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MEGASAE_DISPATCH_FLOATING(W_dec.scalar_type(), "sparse_decode_cuda", [&] {
    decode_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        indices.const_data_ptr<int64_t>(), values.const_data_ptr<scalar_t>(),
        W_dec.const_data_ptr<scalar_t>(), bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), k, d, M);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
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
  const int64_t N = indices.size(0), k = indices.size(1), M = W_dec.size(0), d = W_dec.size(1);
  const int64_t slots = N * k;
  auto grad_values = at::empty({N, k}, values.options());
  auto grad_W = at::empty({M, d}, W_dec.options());

  // Segment the slots by latent, as on the CPU: latent m's slots are order[offsets[m] : offsets[m + 1]].
  at::Tensor sorted, order;
  std::tie(sorted, order) = at::sort(indices.flatten(), /*stable=*/std::optional<bool>(true), /*dim=*/0);
  const auto offsets = at::searchsorted(sorted, at::arange(M + 1, indices.options()));

  const auto stream = c10::cuda::getCurrentCUDAStream();
  MEGASAE_DISPATCH_FLOATING(W_dec.scalar_type(), "sparse_decode_backward_cuda", [&] {
    if (slots > 0) {
      constexpr int threads = 256;
      constexpr int slots_per_block = threads / kWarp;
      TORCH_CHECK(slots / slots_per_block < INT32_MAX, "sparse_decode_backward: N * k = ", slots,
                  " slots exceed the CUDA grid; split the batch");
      grad_values_kernel<scalar_t><<<(slots + slots_per_block - 1) / slots_per_block, threads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(),
          W_dec.const_data_ptr<scalar_t>(), grad_values.mutable_data_ptr<scalar_t>(), slots, k, d, M);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (M > 0 && d > 0) {
      TORCH_CHECK(M <= INT32_MAX, "sparse_decode_backward: M = ", M, " latents exceed the CUDA grid");
      const int threads = column_threads(d);
      const dim3 blocks(M, (d + threads - 1) / threads);
      grad_weight_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
          grad.const_data_ptr<scalar_t>(), values.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(),
          offsets.const_data_ptr<int64_t>(), grad_W.mutable_data_ptr<scalar_t>(), k, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_values, grad_W};
}

}  // namespace

TORCH_LIBRARY_IMPL(megasae, CUDA, m) {
  m.impl("sparse_decode", &sparse_decode_cuda);
  m.impl("sparse_decode_backward", &sparse_decode_backward_cuda);
}

}  // namespace megasae
