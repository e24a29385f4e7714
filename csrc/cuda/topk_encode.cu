// CUDA kernels of megasae::topk_encode: values, indices = relu(topk_k((x - b_dec) W_enc^T + b_enc)).
//
// Forward: the latents are taken in chunks of C. Each chunk's pre-activations are one cuBLAS tile
// [rows, C] in float32 (bf16/fp16 inputs multiply on tensor cores and accumulate in float32,
// through at::mm's out_dtype), then merge_kernel (one block per row) merges the tile into the row's
// running top-k: a filter pass keeps the columns that beat the row's current k-th value (its
// survivors go to shared memory), a block-wide radix select over running + survivors finds the new
// k-th value exactly, and a compaction pass writes the new running top-k (ping-pong buffers).
// Exact ties at the k-th value go to the lower latent index (a second radix select over the tied
// indices), as on the CPU, so the selected set never depends on C or on scheduling. Never more
// than one [rows, C] tile in memory.
//
// Backward, O(N k d), through the row primitives of rows.cuh (no atomics): with
// g = grad_values * (values > 0), grad_W_enc / grad_b_enc segmented by latent and, only when x
// needs it, grad_x as a gather of W_enc rows.
#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/clamp_min.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gather.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <optional>

#include "../common.h"
#include "rows.cuh"

namespace megasae {
namespace {

constexpr int kThreads = 256;   // per row block of merge_kernel
constexpr int kCapacity = 2048;  // survivors a row keeps in shared memory; more are re-read from the tile
constexpr int kWarp = 32;
// About 64M pre-activations (256 MiB in float32) per tile, 1024 to 16384 latents.
constexpr int64_t kTileElements = int64_t(1) << 26;
constexpr int64_t kMinChunk = 1024, kMaxChunk = 16384;
constexpr int64_t kMaxRows = int64_t(1) << 16;

// Order-preserving unsigned keys: a < b as floating point iff key(a) < key(b) (NaN is mapped to
// -inf before it gets here).
template <typename acc_t>
struct Keys;

template <>
struct Keys<float> {
  using type = uint32_t;
  using storage = int32_t;
  __device__ static uint32_t of(float v) {
    const uint32_t u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
};

template <>
struct Keys<double> {
  using type = unsigned long long;
  using storage = int64_t;
  __device__ static unsigned long long of(double v) {
    const unsigned long long u = static_cast<unsigned long long>(__double_as_longlong(v));
    return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
  }
};

template <typename K>
struct Selected {
  K key;         // the rank-th largest key
  int64_t tied;  // how many keys equal to it are within the top rank
};

// The rank-th largest (1-based) among the keys that for_each_key(f) hands to f across the block,
// found 8 bits at a time from the top; returns it and how many keys equal to it fall within the
// top rank. Every thread of the block must call it; it ends synchronised.
template <typename K, typename ForEachKey>
__device__ Selected<K> radix_select(ForEachKey for_each_key, int64_t rank, unsigned int* hist,
                                              K* s_prefix, int64_t* s_rank) {
  K prefix = 0, mask = 0;
  for (int shift = static_cast<int>(sizeof(K)) * 8 - 8; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) hist[b] = 0;
    __syncthreads();
    for_each_key([&](K key) {
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & 0xff], 1u);
    });
    __syncthreads();
    if (threadIdx.x < kWarp) {
      // Warp 0 finds the bin holding the rank-th largest: lane l sums bins 255-8l down to 248-8l,
      // a prefix sum over the lanes (highest bins first) picks the lane, the lane picks the bin.
      const int lane = threadIdx.x;
      unsigned int local = 0;
      for (int i = 0; i < 8; ++i) local += hist[255 - 8 * lane - i];
      unsigned int inclusive = local;
      for (int offset = 1; offset < kWarp; offset <<= 1) {
        const unsigned int up = __shfl_up_sync(0xffffffffu, inclusive, offset);
        if (lane >= offset) inclusive += up;
      }
      const unsigned int exclusive = inclusive - local;
      const unsigned int wanted = static_cast<unsigned int>(rank);
      if (exclusive < wanted && wanted <= inclusive) {  // exactly one lane
        unsigned int r = wanted - exclusive;
        int b = 255 - 8 * lane;
        for (int i = 0; i < 7 && hist[b] < r; ++i, --b) r -= hist[b];
        *s_prefix = prefix | (static_cast<K>(b) << shift);
        *s_rank = r;
      }
    }
    __syncthreads();
    prefix = *s_prefix;
    rank = *s_rank;
    mask |= static_cast<K>(0xff) << shift;
    __syncthreads();
  }
  return Selected<K>{prefix, rank};
}

// Block r merges tile row r (pre-activations without b_enc; column c is latent ids[c], or
// first_id + c) into row r's running top-k: (in_v, in_i)[0:count[r]] -> (out_v, out_i).
// kth[r] holds the key of the k-th value of a full row (count[r] == k).
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(const acc_t* __restrict__ tile, int64_t cols, const acc_t* __restrict__ bias,
                 const int64_t* __restrict__ ids, int64_t first_id, const acc_t* __restrict__ in_v,
                 const int64_t* __restrict__ in_i, acc_t* __restrict__ out_v, int64_t* __restrict__ out_i,
                 int64_t* __restrict__ count, typename Keys<acc_t>::type* __restrict__ kth, int64_t k) {
  using K = typename Keys<acc_t>::type;
  using IdKey = unsigned long long;
  __shared__ acc_t s_value[kCapacity];
  __shared__ int32_t s_col[kCapacity];
  __shared__ unsigned int hist[256];
  __shared__ unsigned long long s_found, s_slot, s_tied;
  __shared__ K s_prefix, s_min;
  __shared__ IdKey s_id_prefix;
  __shared__ int64_t s_rank;

  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x, lane = tid % kWarp;
  const acc_t* t = tile + row * cols;
  in_v += row * k;
  in_i += row * k;
  out_v += row * k;
  out_i += row * k;
  const int64_t held = count[row];
  const bool full = held == k;
  const K bar = kth[row];

  auto value_at = [&](int64_t c) {
    const acc_t v = t[c] + bias[c];
    // NaN ranks as -inf (relu makes it 0); + 0 turns -0 into +0 so that the two tie as on the CPU.
    return v == v ? v + acc_t(0) : -std::numeric_limits<acc_t>::infinity();
  };
  auto survives = [&](acc_t v) { return !full || Keys<acc_t>::of(v) > bar; };
  auto id_at = [&](int64_t c) { return ids != nullptr ? ids[c] : first_id + c; };

  // 1. Filter: the survivors of the tile row, in column order within each warp's stride.
  if (tid == 0) {
    s_found = 0;
    s_slot = 0;
    s_tied = 0;
    s_min = ~K(0);
  }
  __syncthreads();
  for (int64_t base = 0; base < cols; base += blockDim.x) {
    const int64_t c = base + tid;
    bool keep = false;
    acc_t v = 0;
    if (c < cols) {
      v = value_at(c);
      keep = survives(v);
    }
    const unsigned int ballot = __ballot_sync(0xffffffffu, keep);
    unsigned long long first = 0;
    if (lane == 0 && ballot != 0) first = atomicAdd(&s_found, static_cast<unsigned long long>(__popc(ballot)));
    first = __shfl_sync(0xffffffffu, first, 0);
    if (keep) {
      const unsigned long long pos = first + __popc(ballot & ((1u << lane) - 1u));
      if (pos < kCapacity) {
        s_value[pos] = v;
        s_col[pos] = static_cast<int32_t>(c);
      }
    }
  }
  __syncthreads();
  const int64_t found = static_cast<int64_t>(s_found);
  if (found == 0) {  // nothing beats the row's k-th value: carry the running top-k over
    for (int64_t j = tid; j < held; j += blockDim.x) {
      out_v[j] = in_v[j];
      out_i[j] = in_i[j];
    }
    return;
  }
  const bool in_shared = found <= kCapacity;

  // Every candidate (running entries, then survivors) as f(value, latent, survivor position or -1).
  auto for_each = [&](auto&& f) {
    for (int64_t j = tid; j < held; j += blockDim.x) f(in_v[j], in_i[j], int64_t(-1));
    if (in_shared) {
      for (int64_t p = tid; p < found; p += blockDim.x) f(s_value[p], id_at(s_col[p]), p);
    } else {
      for (int64_t c = tid; c < cols; c += blockDim.x) {
        const acc_t v = value_at(c);
        if (survives(v)) f(v, id_at(c), int64_t(-1));
      }
    }
  };

  const int64_t total = held + found;
  if (total <= k) {
    // 2a. Everything fits: keep the running entries in place and append the survivors.
    for (int64_t j = tid; j < held; j += blockDim.x) {
      out_v[j] = in_v[j];
      out_i[j] = in_i[j];
    }
    if (in_shared) {
      for (int64_t p = tid; p < found; p += blockDim.x) {
        out_v[held + p] = s_value[p];
        out_i[held + p] = id_at(s_col[p]);
      }
    } else {  // survivors re-read from the tile take their slots in arrival order
      for (int64_t c = tid; c < cols; c += blockDim.x) {
        const acc_t v = value_at(c);
        if (survives(v)) {
          const int64_t pos = held + static_cast<int64_t>(atomicAdd(&s_slot, 1ull));
          out_v[pos] = v;
          out_i[pos] = id_at(c);
        }
      }
    }
    if (total == k) {
      for_each([&](acc_t v, int64_t, int64_t) { atomicMin(&s_min, Keys<acc_t>::of(v)); });
    }
    __syncthreads();
    if (tid == 0) {
      count[row] = total;
      if (total == k) kth[row] = s_min;
    }
    return;
  }

  // 2b. Radix-select the k-th largest value among running entries and survivors.
  const Selected<K> selected = radix_select<K>(
      [&](auto&& f) { for_each([&](acc_t v, int64_t, int64_t) { f(Keys<acc_t>::of(v)); }); }, k, hist,
      &s_prefix, &s_rank);
  const K kth_key = selected.key;
  const int64_t take_tied = selected.tied;
  for_each([&](acc_t v, int64_t, int64_t) {
    if (Keys<acc_t>::of(v) == kth_key) atomicAdd(&s_tied, 1ull);
  });
  __syncthreads();
  // More values equal to the k-th than places for them: the lower latent indices win.
  const bool all_tied = static_cast<int64_t>(s_tied) <= take_tied;
  IdKey id_bar = 0;
  if (!all_tied) {
    id_bar = radix_select<IdKey>(
                 [&](auto&& f) {
                   for_each([&](acc_t v, int64_t id, int64_t) {
                     if (Keys<acc_t>::of(v) == kth_key) f(~static_cast<IdKey>(id));
                   });
                 },
                 take_tied, hist, &s_id_prefix, &s_rank)
                 .key;
  }

  // 3. Compaction: the k winners, in arrival order (the final sort orders them).
  for_each([&](acc_t v, int64_t id, int64_t) {
    const K key = Keys<acc_t>::of(v);
    const bool win = key > kth_key || (key == kth_key && (all_tied || ~static_cast<IdKey>(id) >= id_bar));
    if (win) {
      const int64_t pos = static_cast<int64_t>(atomicAdd(&s_slot, 1ull));
      out_v[pos] = v;
      out_i[pos] = id;
    }
  });
  if (tid == 0) {
    count[row] = k;
    kth[row] = kth_key;
  }
}

// tile = x_in @ W_chunk^T in the tile's dtype (float32, or float64 for float64 inputs). bf16/fp16
// operands go through aten::mm.dtype_out (tensor cores, float32 accumulation and output), looked
// up at run time since older PyTorch lacks it; without it the products round to the input dtype.
void chunk_gemm(at::Tensor& tile, const at::Tensor& x_in, const at::Tensor& W_chunk) {
  if (x_in.scalar_type() == tile.scalar_type()) {
    at::mm_out(tile, x_in, W_chunk.t());
    return;
  }
  using MmDtypeOut = at::Tensor&(const at::Tensor&, const at::Tensor&, at::ScalarType, at::Tensor&);
  static const auto mm_dtype_out = []() -> std::optional<c10::TypedOperatorHandle<MmDtypeOut>> {
    const auto handle = c10::Dispatcher::singleton().findSchema({"aten::mm", "dtype_out"});
    if (!handle.has_value()) return std::nullopt;
    return handle->typed<MmDtypeOut>();
  }();
  static std::atomic<bool> works{true};
  if (mm_dtype_out.has_value() && works.load()) {
    try {
      mm_dtype_out->call(x_in, W_chunk.t(), tile.scalar_type(), tile);
      return;
    } catch (const c10::Error&) {
      works.store(false);  // not for these dtypes here: fall back from now on
    }
  }
  tile.copy_(at::mm(x_in, W_chunk.t()));
}

EncodeOut topk_encode_cuda(const at::Tensor& x_, const at::Tensor& W_enc, const at::Tensor& b_enc,
                           const std::optional<at::Tensor>& b_dec, int64_t k,
                           const std::optional<at::Tensor>& dead_mask, int64_t chunk_size) {
  check_topk_encode(x_, W_enc, b_enc, b_dec, k, dead_mask, chunk_size);
  const c10::cuda::CUDAGuard guard(x_.device());
  const int64_t N = x_.size(0), M = W_enc.size(0);
  auto values = at::empty({N, k}, x_.options());
  auto indices = at::empty({N, k}, x_.options().dtype(at::kLong));
  if (N == 0 || k == 0) return {values, indices};

  const auto acc_type = accumulate_type(x_.scalar_type());
  const auto x_in = (b_dec.has_value() ? at::sub(x_, *b_dec) : x_).contiguous();  // input dtype
  const auto bias_all = b_enc.to(acc_type).contiguous();

  at::Tensor live, fill;
  int64_t L = M;
  if (dead_mask.has_value()) {
    live = at::nonzero(*dead_mask).flatten().contiguous();  // ascending: ties still go to lower indices
    L = live.numel();
    if (L < k) fill = at::nonzero(dead_mask->logical_not()).flatten().narrow(0, 0, k - L).contiguous();
  }
  const int64_t R = std::min(N, kMaxRows);
  TORCH_CHECK(R <= INT32_MAX, "topk_encode: too many rows for the CUDA grid");
  const int64_t C = chunk_latents(chunk_size, R, std::max<int64_t>(L, 1), kTileElements, kMinChunk, kMaxChunk);
  TORCH_CHECK(C <= INT32_MAX, "topk_encode: chunk_size = ", C, " is too large");
  auto tile_storage = at::empty({R * C}, x_in.options().dtype(acc_type));
  const auto stream = c10::cuda::getCurrentCUDAStream();

  for (int64_t r0 = 0; r0 < N; r0 += R) {
    const int64_t rows = std::min(R, N - r0);
    const auto x_rows = x_in.narrow(0, r0, rows);
    auto run_v = at::empty({2, rows, k}, x_in.options().dtype(acc_type));
    auto run_i = at::empty({2, rows, k}, x_in.options().dtype(at::kLong));
    auto count = at::zeros({rows}, x_in.options().dtype(at::kLong));
    auto kth = at::zeros({rows}, x_in.options().dtype(acc_type == at::kDouble ? at::kLong : at::kInt));
    int src = 0;

    for (int64_t c0 = 0; c0 < L; c0 += C) {
      const int64_t cols = std::min(C, L - c0);
      at::Tensor W_chunk, bias_chunk, ids_chunk;
      if (live.defined()) {
        ids_chunk = live.narrow(0, c0, cols);
        W_chunk = W_enc.index_select(0, ids_chunk);
        bias_chunk = bias_all.index_select(0, ids_chunk);
      } else {
        W_chunk = W_enc.narrow(0, c0, cols);
        bias_chunk = bias_all.narrow(0, c0, cols);
      }
      at::Tensor tile = tile_storage.narrow(0, 0, rows * cols).view({rows, cols});
      chunk_gemm(tile, x_rows, W_chunk);
      AT_DISPATCH_FLOATING_TYPES(acc_type, "topk_encode_cuda", [&] {
        using K = typename Keys<scalar_t>::type;
        merge_kernel<scalar_t><<<rows, kThreads, 0, stream>>>(
            tile.const_data_ptr<scalar_t>(), cols, bias_chunk.const_data_ptr<scalar_t>(),
            ids_chunk.defined() ? ids_chunk.const_data_ptr<int64_t>() : nullptr, c0,
            run_v[src].const_data_ptr<scalar_t>(), run_i[src].const_data_ptr<int64_t>(),
            run_v[1 - src].mutable_data_ptr<scalar_t>(), run_i[1 - src].mutable_data_ptr<int64_t>(),
            count.mutable_data_ptr<int64_t>(), reinterpret_cast<K*>(kth.mutable_data_ptr()), k);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
      src = 1 - src;
    }

    // Every row holds min(L, k) entries; pad with the first unselectable latents at value 0.
    auto v = run_v[src];
    auto i = run_i[src];
    if (L < k) {
      v.narrow(1, L, k - L).fill_(-std::numeric_limits<double>::infinity());
      i.narrow(1, L, k - L).copy_(fill.unsqueeze(0).expand({rows, k - L}));
    }
    // Deterministic order: by latent, then (stable) by value, largest first.
    at::Tensor by_index, order;
    std::tie(by_index, order) = at::sort(i, /*stable=*/std::optional<bool>(true), /*dim=*/1, /*descending=*/false);
    v = v.gather(1, order);
    at::Tensor sorted_v;
    std::tie(sorted_v, order) = at::sort(v, /*stable=*/std::optional<bool>(true), /*dim=*/1, /*descending=*/true);
    values.narrow(0, r0, rows).copy_(at::clamp_min(sorted_v, 0));
    indices.narrow(0, r0, rows).copy_(by_index.gather(1, order));
  }
  return {values, indices};
}

EncodeGrads topk_encode_backward_cuda(const at::Tensor& grad_values_, const at::Tensor& values_,
                                      const at::Tensor& indices_, const at::Tensor& x_, const at::Tensor& W_enc_,
                                      const std::optional<at::Tensor>& b_dec, bool need_grad_x) {
  check_topk_encode_backward(grad_values_, values_, indices_, x_, W_enc_, b_dec);
  const c10::cuda::CUDAGuard guard(x_.device());
  const auto indices = indices_.contiguous();
  const auto g = at::where(at::gt(values_, 0), grad_values_, 0).contiguous();
  const auto W_enc = W_enc_.contiguous();
  const auto x_in = (b_dec.has_value() ? at::sub(x_, *b_dec) : x_).contiguous();
  at::Tensor grad_x = at::empty({need_grad_x ? x_in.size(0) : 0, x_in.size(1)}, x_in.options());
  if (need_grad_x) gpu::gather_rows(indices, g, W_enc, at::Tensor(), grad_x);
  auto [grad_W, grad_b] = gpu::segment_rows(indices, g, x_in, W_enc.size(0), /*with_sums=*/true);
  return EncodeGrads{grad_x, grad_W, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(megasae, CUDA, m) {
  m.impl("topk_encode", &topk_encode_cuda);
  m.impl("topk_encode_backward", &topk_encode_backward_cuda);
}

}  // namespace megasae
