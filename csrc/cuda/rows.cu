// CUDA sparse row primitives (see rows.cuh), written for clarity first: one thread per output
// element, each summing its terms in a fixed order (no atomics, deterministic).
#include <ATen/OpMathType.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/searchsorted.h>
#include <ATen/ops/sort.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>

#include <algorithm>
#include <cstdint>

#include "../common.h"
#include "rows.cuh"

namespace megasae {
namespace gpu {
namespace {

constexpr int kWarp = 32;

// Threads per block for the kernels that give one thread to each column of a d-wide row.
int column_threads(int64_t d) {
  return static_cast<int>(std::min<int64_t>(256, (d + kWarp - 1) / kWarp * kWarp));
}

// Block (n, column tile): y[n, c] = b[c] + sum_j w[n, j] * W[I[n, j], c].
template <typename scalar_t>
__global__ void gather_kernel(const int64_t* __restrict__ I, const scalar_t* __restrict__ V,
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

// One warp per slot s = (n, j): dot[s] = <G[n], W[I[s]]>.
template <typename scalar_t>
__global__ void dots_kernel(const scalar_t* __restrict__ G, const int64_t* __restrict__ I,
                            const scalar_t* __restrict__ W, scalar_t* __restrict__ D, int64_t slots, int64_t k,
                            int64_t d, int64_t M) {
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
  if (lane == 0) D[s] = static_cast<scalar_t>(dot);
}

// Block (m, column tile): grad[m, c] = sum over latent m's slots s of w[s] * R[s / k, c]; the
// block's column-0 thread also writes S[m] = sum of w[s].
template <typename scalar_t>
__global__ void segment_kernel(const scalar_t* __restrict__ R, const scalar_t* __restrict__ V,
                               const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                               scalar_t* __restrict__ DW, scalar_t* __restrict__ S, int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t m = blockIdx.x;
  const int64_t c = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c >= d) return;
  acc_t acc = 0, total = 0;
  for (int64_t p = offsets[m]; p < offsets[m + 1]; ++p) {
    const int64_t s = order[p];
    const acc_t v = static_cast<acc_t>(V[s]);
    acc += v * static_cast<acc_t>(R[(s / k) * d + c]);
    total += v;
  }
  DW[m * d + c] = static_cast<scalar_t>(acc);
  if (S != nullptr && c == 0) S[m] = static_cast<scalar_t>(total);
}

}  // namespace

void gather_rows(const at::Tensor& indices, const at::Tensor& weights, const at::Tensor& table,
                 const at::Tensor& bias, at::Tensor& out) {
  const int64_t N = indices.size(0), k = indices.size(1), M = table.size(0), d = table.size(1);
  if (N == 0 || d == 0) return;
  TORCH_CHECK(N <= INT32_MAX, "megasae: N = ", N, " rows exceed the CUDA grid; split the batch");
  const int threads = column_threads(d);
  const dim3 blocks(N, (d + threads - 1) / threads);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MEGASAE_DISPATCH_FLOATING(table.scalar_type(), "megasae_gather_rows_cuda", [&] {
    gather_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
        indices.const_data_ptr<int64_t>(), weights.const_data_ptr<scalar_t>(), table.const_data_ptr<scalar_t>(),
        bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(), k, d, M);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor row_dots(const at::Tensor& rows, const at::Tensor& indices, const at::Tensor& table) {
  const int64_t k = indices.size(1), M = table.size(0), d = table.size(1), slots = indices.numel();
  auto out = at::empty(indices.sizes(), table.options());
  if (slots == 0) return out;
  constexpr int threads = 256;
  constexpr int slots_per_block = threads / kWarp;
  TORCH_CHECK(slots / slots_per_block < INT32_MAX, "megasae: N * k = ", slots,
              " slots exceed the CUDA grid; split the batch");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MEGASAE_DISPATCH_FLOATING(table.scalar_type(), "megasae_row_dots_cuda", [&] {
    dots_kernel<scalar_t><<<(slots + slots_per_block - 1) / slots_per_block, threads, 0, stream>>>(
        rows.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(), table.const_data_ptr<scalar_t>(),
        out.mutable_data_ptr<scalar_t>(), slots, k, d, M);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> segment_rows(const at::Tensor& indices, const at::Tensor& weights,
                                                const at::Tensor& rows, int64_t M, bool with_sums) {
  const int64_t k = indices.size(1), d = rows.size(1);
  auto grad = at::empty({M, d}, rows.options());
  auto sums = with_sums ? at::empty({M}, rows.options()) : at::Tensor();
  if (M == 0) return {grad, sums};
  TORCH_CHECK(M <= INT32_MAX, "megasae: M = ", M, " latents exceed the CUDA grid");
  // Latent m's slots are order[offsets[m] : offsets[m + 1]] after a stable sort.
  at::Tensor sorted, order;
  std::tie(sorted, order) = at::sort(indices.flatten(), /*stable=*/std::optional<bool>(true), /*dim=*/0);
  const auto offsets = at::searchsorted(sorted, at::arange(M + 1, indices.options()));
  const int threads = column_threads(std::max<int64_t>(d, 1));
  const dim3 blocks(M, std::max<int64_t>(1, (d + threads - 1) / threads));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MEGASAE_DISPATCH_FLOATING(rows.scalar_type(), "megasae_segment_rows_cuda", [&] {
    if (d > 0) {
      segment_kernel<scalar_t><<<blocks, threads, 0, stream>>>(
          rows.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(),
          offsets.const_data_ptr<int64_t>(), grad.mutable_data_ptr<scalar_t>(),
          with_sums ? sums.mutable_data_ptr<scalar_t>() : nullptr, k, d);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    } else if (with_sums) {
      // No columns to ride on: sum the weights per latent with a one-column segment.
      auto ones = at::empty({indices.size(0), 1}, rows.options()).fill_(1);
      segment_kernel<scalar_t><<<dim3(M, 1), 32, 0, stream>>>(
          ones.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(),
          offsets.const_data_ptr<int64_t>(), sums.mutable_data_ptr<scalar_t>(), nullptr, k, 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad, sums};
}

}  // namespace gpu
}  // namespace megasae
