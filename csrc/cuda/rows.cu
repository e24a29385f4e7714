// CUDA sparse row primitives (see rows.cuh). Every output element is summed by one thread in a
// fixed order (no atomics, deterministic). Rows move as 16-byte packs whenever the width and the
// base pointers allow (8 bf16/fp16, 4 fp32 or 2 fp64 per load), and a block first stages the
// (row, weight) pairs it is about to read in shared memory, so that its threads issue the wide row
// loads back to back instead of each walking an index -> weight -> row chain.
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
#include <initializer_list>
#include <type_traits>

#include "../common.h"
#include "rows.cuh"

namespace megasae {
namespace gpu {
namespace {

constexpr int kWarp = 32;
constexpr int kMaxThreads = 256;  // per block; also the (row, weight) pairs a block stages at once

template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T x[V];
};

// acc += w * row[0:V], row read as one pack.
template <typename scalar_t, int V, typename acc_t>
__device__ __forceinline__ void add_scaled(acc_t (&acc)[V], acc_t w, const scalar_t* row) {
  const auto p = *reinterpret_cast<const Pack<scalar_t, V>*>(row);
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] += w * static_cast<acc_t>(p.x[i]);
}

template <typename scalar_t, int V, typename acc_t>
__device__ __forceinline__ void store(scalar_t* out, const acc_t (&acc)[V]) {
  Pack<scalar_t, V> p;
#pragma unroll
  for (int i = 0; i < V; ++i) p.x[i] = static_cast<scalar_t>(acc[i]);
  *reinterpret_cast<Pack<scalar_t, V>*>(out) = p;
}

// Elements per pack for these rows: the widest whose loads stay aligned, else 1.
template <typename scalar_t>
int pack_width(int64_t d, std::initializer_list<const void*> bases) {
  constexpr int wide = 16 / sizeof(scalar_t);
  if (d % wide != 0) return 1;
  for (const void* base : bases) {
    if (reinterpret_cast<uintptr_t>(base) % 16 != 0) return 1;
  }
  return wide;
}

// Calls launch(std::integral_constant<int, V>{}) with V = 1 or the wide pack width.
template <typename scalar_t, typename Launch>
void with_pack_width(int width, Launch&& launch) {
  if (width == 1) {
    launch(std::integral_constant<int, 1>{});
  } else {
    launch(std::integral_constant<int, 16 / sizeof(scalar_t)>{});
  }
}

// Threads per block when each thread covers V columns of a d-wide row.
int column_threads(int64_t d, int V) {
  const int64_t packs = (d + V - 1) / V;
  return static_cast<int>(std::min<int64_t>(kMaxThreads, (packs + kWarp - 1) / kWarp * kWarp));
}

// Block (n, column tile): y[n, c] = b[c] + sum_j w[n, j] * W[I[n, j], c], j in order.
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kMaxThreads)
    gather_kernel(const int64_t* __restrict__ I, const scalar_t* __restrict__ Wt, const scalar_t* __restrict__ W,
                  const scalar_t* __restrict__ B, scalar_t* __restrict__ Y, int64_t k, int64_t d, int64_t M) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ int64_t s_row[kMaxThreads];
  __shared__ acc_t s_weight[kMaxThreads];
  const int tid = threadIdx.x;
  const int64_t n = blockIdx.x;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + tid) * V;
  const bool active = c < d;
  acc_t acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = (B != nullptr && active) ? static_cast<acc_t>(B[c + i]) : acc_t(0);
  for (int64_t j0 = 0; j0 < k; j0 += blockDim.x) {
    const int count = static_cast<int>(std::min<int64_t>(blockDim.x, k - j0));
    if (tid < count) {
      const int64_t m = I[n * k + j0 + tid];
      CUDA_KERNEL_ASSERT(0 <= m && m < M);
      s_row[tid] = m;
      s_weight[tid] = static_cast<acc_t>(Wt[n * k + j0 + tid]);
    }
    __syncthreads();
    if (active) {
      for (int j = 0; j < count; ++j) add_scaled<scalar_t, V>(acc, s_weight[j], W + s_row[j] * d + c);
    }
    __syncthreads();
  }
  if (active) store<scalar_t, V>(Y + n * d + c, acc);
}

// One warp per slot s = (n, j): dot[s] = <G[n], W[I[s]]>.
template <typename scalar_t, int V>
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
  for (int64_t c = static_cast<int64_t>(lane) * V; c < d; c += kWarp * V) {
    const auto gp = *reinterpret_cast<const Pack<scalar_t, V>*>(g + c);
    const auto wp = *reinterpret_cast<const Pack<scalar_t, V>*>(w + c);
#pragma unroll
    for (int i = 0; i < V; ++i) dot += static_cast<acc_t>(gp.x[i]) * static_cast<acc_t>(wp.x[i]);
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) dot += __shfl_down_sync(0xffffffffu, dot, offset);
  if (lane == 0) D[s] = static_cast<scalar_t>(dot);
}

// Block (m, column tile): grad[m, c] = sum over latent m's slots s, in slot order, of
// w[s] * R[s / k, c]; the first block of latent m also writes S[m] = sum of w[s].
template <typename scalar_t, int V>
__global__ void __launch_bounds__(kMaxThreads)
    segment_kernel(const scalar_t* __restrict__ R, const scalar_t* __restrict__ Wt,
                   const int64_t* __restrict__ order, const int64_t* __restrict__ offsets,
                   scalar_t* __restrict__ DW, scalar_t* __restrict__ S, int64_t k, int64_t d) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ int64_t s_row[kMaxThreads];
  __shared__ acc_t s_weight[kMaxThreads];
  const int tid = threadIdx.x;
  const int64_t m = blockIdx.x;
  const int64_t c = (static_cast<int64_t>(blockIdx.y) * blockDim.x + tid) * V;
  const bool active = c < d;
  const int64_t begin = offsets[m], end = offsets[m + 1];
  acc_t acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = 0;
  acc_t total = 0;
  for (int64_t p0 = begin; p0 < end; p0 += blockDim.x) {
    const int count = static_cast<int>(std::min<int64_t>(blockDim.x, end - p0));
    if (tid < count) {
      const int64_t s = order[p0 + tid];
      s_row[tid] = s / k;
      s_weight[tid] = static_cast<acc_t>(Wt[s]);
    }
    __syncthreads();
    if (active) {
      for (int j = 0; j < count; ++j) {
        add_scaled<scalar_t, V>(acc, s_weight[j], R + s_row[j] * d + c);
        total += s_weight[j];
      }
    }
    __syncthreads();
  }
  if (active) store<scalar_t, V>(DW + m * d + c, acc);
  if (S != nullptr && blockIdx.y == 0 && tid == 0) S[m] = static_cast<scalar_t>(total);
}

}  // namespace

void gather_rows(const at::Tensor& indices, const at::Tensor& weights, const at::Tensor& table,
                 const at::Tensor& bias, at::Tensor& out) {
  const int64_t N = indices.size(0), k = indices.size(1), M = table.size(0), d = table.size(1);
  if (N == 0 || d == 0) return;
  TORCH_CHECK(N <= INT32_MAX, "megasae: N = ", N, " rows exceed the CUDA grid; split the batch");
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MEGASAE_DISPATCH_FLOATING(table.scalar_type(), "megasae_gather_rows_cuda", [&] {
    const scalar_t* B = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    const int width = pack_width<scalar_t>(d, {table.const_data_ptr(), out.const_data_ptr()});
    with_pack_width<scalar_t>(width, [&](auto pack) {
      constexpr int V = decltype(pack)::value;
      const int threads = column_threads(d, V);
      const dim3 blocks(N, (d / V + threads - 1) / threads);
      gather_kernel<scalar_t, V><<<blocks, threads, 0, stream>>>(
          indices.const_data_ptr<int64_t>(), weights.const_data_ptr<scalar_t>(), table.const_data_ptr<scalar_t>(),
          B, out.mutable_data_ptr<scalar_t>(), k, d, M);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
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
    const int width = pack_width<scalar_t>(d, {rows.const_data_ptr(), table.const_data_ptr()});
    with_pack_width<scalar_t>(width, [&](auto pack) {
      constexpr int V = decltype(pack)::value;
      dots_kernel<scalar_t, V><<<(slots + slots_per_block - 1) / slots_per_block, threads, 0, stream>>>(
          rows.const_data_ptr<scalar_t>(), indices.const_data_ptr<int64_t>(), table.const_data_ptr<scalar_t>(),
          out.mutable_data_ptr<scalar_t>(), slots, k, d, M);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
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
  const auto stream = c10::cuda::getCurrentCUDAStream();
  MEGASAE_DISPATCH_FLOATING(rows.scalar_type(), "megasae_segment_rows_cuda", [&] {
    if (d > 0) {
      const int width = pack_width<scalar_t>(d, {rows.const_data_ptr(), grad.const_data_ptr()});
      with_pack_width<scalar_t>(width, [&](auto pack) {
        constexpr int V = decltype(pack)::value;
        const int threads = column_threads(d, V);
        const dim3 blocks(M, (d / V + threads - 1) / threads);
        segment_kernel<scalar_t, V><<<blocks, threads, 0, stream>>>(
            rows.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(),
            offsets.const_data_ptr<int64_t>(), grad.mutable_data_ptr<scalar_t>(),
            with_sums ? sums.mutable_data_ptr<scalar_t>() : nullptr, k, d);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    } else if (with_sums) {
      // No columns to ride on: sum the weights per latent with a one-column segment.
      auto ones = at::empty({indices.size(0), 1}, rows.options()).fill_(1);
      segment_kernel<scalar_t, 1><<<dim3(M, 1), kWarp, 0, stream>>>(
          ones.const_data_ptr<scalar_t>(), weights.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(),
          offsets.const_data_ptr<int64_t>(), sums.mutable_data_ptr<scalar_t>(), nullptr, k, 1);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad, sums};
}

}  // namespace gpu
}  // namespace megasae
