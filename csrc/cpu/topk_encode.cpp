// CPU kernels of megasae::topk_encode: values, indices = relu(topk_k((x - b_dec) W_enc^T + b_enc)).
//
// Forward: the rows are cut into tasks of R rows that the threads take dynamically; a task walks
// the latents in chunks of C, computing each chunk's pre-activations as one BLAS tile [R, C] (one
// at::mm into the thread's own buffer, single-threaded inside the parallel region) and merging it
// into its rows' running top-k while the tile is still in cache (merge_tile below). The threads
// never wait for each other before the end. Exact, never more than one [R, C] tile per thread in
// memory, and ties are broken by the lower latent index, so the result depends neither on C nor on
// the number of threads.
//
// Backward from g = grad_values * (values > 0), O(N k d), through the row primitives of rows.h:
// grad_W_enc[m] / grad_b_enc[m] sum g[n, j] (x[n] - b_dec) / g[n, j] over the slots of latent m
// (segmented by latent, no atomics), and, only when x needs it, grad_x[n] = sum_j g[n, j]
// W_enc[I[n, j]] (a gather). b_dec's share needs no grad_x: sum_n grad_x[n] = grad_b_enc @ W_enc.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/ops/gt.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/nonzero.h>
#include <ATen/ops/sub.h>
#include <ATen/ops/where.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <limits>
#include <vector>

#include "../common.h"
#include "rows.h"

#if defined(__SSE2__)
#include <immintrin.h>
#endif

namespace megasae {
namespace {

// Rows per task and pre-activations per tile: tasks of 512 rows with 2048-latent tiles (4 MiB of
// float32 per thread, well inside L3 next to the chunk of W_enc) ran within noise of the best of
// 256..2048 rows and 1..16 MiB tiles at N = 4096, d = 576 on two cores (BENCHMARKS.md, "Kernels").
constexpr int64_t kRowsPerTask = 512;
constexpr int64_t kTileElements = int64_t(1) << 20;
constexpr int64_t kMinChunk = 256, kMaxChunk = 4096;

template <typename acc_t>
struct Entry {
  acc_t v;
  int64_t i;
};

// The order of selection: larger value first, then lower latent index.
template <typename acc_t>
inline bool before(const Entry<acc_t>& a, const Entry<acc_t>& b) {
  return a.v > b.v || (a.v == b.v && a.i < b.i);
}

// Running top-k state of the rows of one task.
template <typename acc_t>
struct Running {
  std::vector<Entry<acc_t>> entries;  // [rows, k]; row r's first count[r] are filled
  std::vector<int64_t> count;
  std::vector<acc_t> kth;  // k-th best value of a full row: a later latent must beat it strictly
};

// max over i < n of t[i] + b[i], ignoring NaN (-inf if all are NaN).
template <typename acc_t>
inline acc_t block_max(const acc_t* t, const acc_t* b, int64_t n) {
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = t[i] + b[i];
    best = v > best ? v : best;
  }
  return best;
}

#if defined(__SSE2__)
template <>
inline float block_max<float>(const float* t, const float* b, int64_t n) {
  __m128 m = _mm_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t i = 0;
  // _mm_max_ps(v, m) returns m where v is NaN, so NaN never wins.
  for (; i + 4 <= n; i += 4) m = _mm_max_ps(_mm_add_ps(_mm_loadu_ps(t + i), _mm_loadu_ps(b + i)), m);
  m = _mm_max_ps(m, _mm_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm_max_ps(m, _mm_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));
  float best = _mm_cvtss_f32(m);
  for (; i < n; ++i) {
    const float v = t[i] + b[i];
    best = v > best ? v : best;
  }
  return best;
}
#endif

// One row's merge: the running entries plus the survivors of a tile row, kept to the k best.
template <typename acc_t>
struct RowMerge {
  Entry<acc_t>* buf;  // capacity entries
  int64_t capacity, k;
  Entry<acc_t>* row;  // the row's running entries
  int64_t held;       // how many the row held before this tile
  bool full;
  acc_t kth;
  int64_t size = -1;  // entries in buf; -1 until the running entries are loaded

  void push(acc_t v, int64_t id) {
    if (size < 0) {
      size = held;
      std::copy(row, row + held, buf);
    }
    buf[size++] = {v, id};
    if (size == capacity || (!full && size == k)) shrink();
  }
  void shrink() {  // keep the k best; the k-th becomes the bar
    if (size > k) std::nth_element(buf, buf + (k - 1), buf + size, before<acc_t>);
    size = k;
    full = true;
    kth = std::min_element(buf, buf + k, [](const Entry<acc_t>& a, const Entry<acc_t>& b) { return a.v < b.v; })->v;
  }
};

// Candidates of t[0:n] + b[0:n] for a row that has a floor or is full: v >= floor and, when
// full, v > kth (the bar moves up as the merge shrinks).
template <typename acc_t>
inline void scan(RowMerge<acc_t>& m, const acc_t* t, const acc_t* b, int64_t n, acc_t floor, const int64_t* ids,
                 int64_t first_id) {
  for (int64_t c = 0; c < n; ++c) {
    const acc_t v = t[c] + b[c];
    if (v >= floor && (!m.full || v > m.kth)) m.push(v, ids ? ids[c] : first_id + c);
  }
}

#if defined(__SSE2__)
template <>
inline void scan<float>(RowMerge<float>& m, const float* t, const float* b, int64_t n, float floor,
                        const int64_t* ids, int64_t first_id) {
  const __m128 floor4 = _mm_set1_ps(floor);
  int64_t c = 0;
  for (; c + 4 <= n; c += 4) {
    const __m128 v = _mm_add_ps(_mm_loadu_ps(t + c), _mm_loadu_ps(b + c));
    int lanes = _mm_movemask_ps(_mm_cmpge_ps(v, floor4));
    if (m.full) lanes &= _mm_movemask_ps(_mm_cmpgt_ps(v, _mm_set1_ps(m.kth)));
    if (lanes == 0) continue;  // NaN compares false: never a candidate here
    alignas(16) float vals[4];
    _mm_store_ps(vals, v);
    for (; lanes != 0; lanes &= lanes - 1) {
      const int lane = __builtin_ctz(lanes);
      if (!m.full || vals[lane] > m.kth) m.push(vals[lane], ids ? ids[c + lane] : first_id + c + lane);
    }
  }
  for (; c < n; ++c) {
    const float v = t[c] + b[c];
    if (v >= floor && (!m.full || v > m.kth)) m.push(v, ids ? ids[c] : first_id + c);
  }
}
#endif

// Merge the tile [rows, cols] (b_enc not yet added) into the running top-k of rows [begin, end).
//
// A full row keeps the elements that beat its k-th value (vectorised compare, a few survivors).
// A fresh row first takes maxima of blocks of B columns, with B chosen so that there are at least
// 2k blocks, and uses their k-th largest as a floor: k blocks reach it, so the row's k-th value
// does too, and only elements at or above it can be selected. Survivors join the running entries
// in a buffer that std::nth_element cuts back to the k best when it fills and at the end. A row
// without a floor (a chunk narrower than 2k) takes everything, NaN as -inf.
template <typename acc_t>
void merge_tile(Running<acc_t>& run, const acc_t* tile, int64_t cols, const acc_t* bias, const int64_t* ids,
                int64_t first_id, int64_t k, int64_t begin, int64_t end) {
  constexpr acc_t kInf = std::numeric_limits<acc_t>::infinity();
  const int64_t capacity = 2 * k + 256;
  std::vector<Entry<acc_t>> buf(capacity);
  int64_t block = 16;
  while (block > 1 && cols / block < 2 * k) block /= 2;
  const int64_t blocks = (cols + block - 1) / block;
  std::vector<acc_t> block_best(blocks);
  for (int64_t r = begin; r < end; ++r) {
    const acc_t* t = tile + r * cols;
    const int64_t held = run.count[r];
    RowMerge<acc_t> m{buf.data(), capacity, k, run.entries.data() + r * k, held, held == k, run.kth[r]};
    acc_t floor = -kInf;
    if (held == 0 && blocks >= k) {
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t c0 = b * block;
        block_best[b] = block_max(t + c0, bias + c0, std::min(block, cols - c0));
      }
      std::nth_element(block_best.begin(), block_best.begin() + (k - 1), block_best.end(), std::greater<acc_t>());
      floor = block_best[k - 1];
    }
    if (!m.full && floor == -kInf) {
      for (int64_t c = 0; c < cols; ++c) {
        const acc_t v = t[c] + bias[c];
        // NaN ranks as -inf (relu makes it 0); a full row's bar is never beaten by it.
        if (!m.full || v > m.kth) m.push(v == v ? v : -kInf, ids ? ids[c] : first_id + c);
      }
    } else {
      scan(m, t, bias, cols, floor, ids, first_id);
    }
    if (m.size < 0) continue;  // nothing beat the row's k-th value
    if (m.size > k) m.shrink();
    std::copy(buf.data(), buf.data() + m.size, m.row);
    run.count[r] = m.size;
    run.kth[r] = m.kth;
  }
}

EncodeOut topk_encode_cpu(const at::Tensor& x_, const at::Tensor& W_enc_, const at::Tensor& b_enc,
                          const std::optional<at::Tensor>& b_dec, int64_t k,
                          const std::optional<at::Tensor>& dead_mask, int64_t chunk_size) {
  check_topk_encode(x_, W_enc_, b_enc, b_dec, k, dead_mask, chunk_size);
  const int64_t N = x_.size(0), M = W_enc_.size(0);
  auto values = at::empty({N, k}, x_.options());
  auto indices = at::empty({N, k}, x_.options().dtype(at::kLong));
  if (N == 0 || k == 0) return {values, indices};

  const auto acc_type = accumulate_type(x_.scalar_type());
  // x - b_dec in the input dtype (as the reference rounds it), then the compute dtype. Detached:
  // the worker threads below run ATen ops without this thread's autograd exclusion.
  const auto x_in = (b_dec.has_value() ? at::sub(x_, *b_dec) : x_).to(acc_type).contiguous().detach();
  const auto bias_all = b_enc.to(acc_type).contiguous().detach();
  const auto W_enc = W_enc_.detach();
  const bool convert = W_enc.scalar_type() != acc_type;

  // The selectable latents: all of them, or those of dead_mask (ascending, so ties still go to the
  // lower index); slots beyond their number take the first unselectable latents with value 0.
  at::Tensor live, fill;
  int64_t L = M;
  if (dead_mask.has_value()) {
    live = at::nonzero(*dead_mask).flatten().contiguous();
    L = live.numel();
    if (L < k) fill = at::nonzero(dead_mask->logical_not()).flatten().narrow(0, 0, k - L).contiguous();
  }
  const int64_t* fill_p = fill.defined() ? fill.const_data_ptr<int64_t>() : nullptr;

  // Tasks of R rows, handed out dynamically to the threads: each runs every chunk of its rows with
  // its own tile (one BLAS call per chunk, single-threaded inside the parallel region), so the
  // threads never wait for each other until the end.
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  const int64_t R = std::min(kRowsPerTask, std::max<int64_t>(1, (N + threads - 1) / threads));
  const int64_t C = chunk_latents(chunk_size, R, std::max<int64_t>(L, 1), kTileElements, kMinChunk, kMaxChunk);
  const int64_t tasks = (N + R - 1) / R;
  std::atomic<int64_t> next_task{0};

  AT_DISPATCH_FLOATING_TYPES(acc_type, "topk_encode_cpu", [&] {
    using acc_t = scalar_t;
    MEGASAE_DISPATCH_FLOATING(x_.scalar_type(), "topk_encode_cpu_out", [&] {
      using out_t = scalar_t;
      out_t* V = values.mutable_data_ptr<out_t>();
      int64_t* I = indices.mutable_data_ptr<int64_t>();
      at::parallel_for(0, std::min(threads, tasks), 1, [&](int64_t, int64_t) {
        const at::AutoDispatchBelowADInplaceOrView below_autograd;
        auto tile_storage = at::empty({R * C}, x_in.options());
        cpu::advise_huge_pages(tile_storage);
        Running<acc_t> run;
        run.entries.resize(R * k);
        for (int64_t task = next_task++; task < tasks; task = next_task++) {
          const int64_t r0 = task * R, rows = std::min(R, N - r0);
          const auto x_rows = x_in.narrow(0, r0, rows);
          run.count.assign(rows, 0);
          run.kth.assign(rows, -std::numeric_limits<acc_t>::infinity());
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
            if (convert) W_chunk = W_chunk.to(acc_type);  // bf16/fp16 weights: the GEMM runs in float32
            at::Tensor tile = tile_storage.narrow(0, 0, rows * cols).view({rows, cols});
            at::mm_out(tile, x_rows, W_chunk.t());
            merge_tile<acc_t>(run, tile.const_data_ptr<acc_t>(), cols, bias_chunk.const_data_ptr<acc_t>(),
                              ids_chunk.defined() ? ids_chunk.const_data_ptr<int64_t>() : nullptr, c0, k, 0,
                              rows);
          }
          // Sort each row, apply relu, and pad rows short of k selectable latents.
          for (int64_t r = 0; r < rows; ++r) {
            Entry<acc_t>* row = run.entries.data() + r * k;
            const int64_t count = run.count[r];
            std::sort(row, row + count, before<acc_t>);
            out_t* v = V + (r0 + r) * k;
            int64_t* i = I + (r0 + r) * k;
            for (int64_t j = 0; j < k; ++j) {
              const bool filled = j < count;
              v[j] = static_cast<out_t>(filled ? std::max(row[j].v, acc_t(0)) : acc_t(0));
              i[j] = filled ? row[j].i : fill_p[j - count];
            }
          }
        }
      });
    });
  });
  return {values, indices};
}

EncodeGrads topk_encode_backward_cpu(const at::Tensor& grad_values_, const at::Tensor& values_,
                                     const at::Tensor& indices_, const at::Tensor& x_, const at::Tensor& W_enc_,
                                     const std::optional<at::Tensor>& b_dec, bool need_grad_x) {
  check_topk_encode_backward(grad_values_, values_, indices_, x_, W_enc_, b_dec);
  const auto indices = indices_.contiguous();
  // relu: no gradient where the value was cut to 0 (or a padding slot).
  const auto g = at::where(at::gt(values_, 0), grad_values_, 0).contiguous();
  const auto W_enc = W_enc_.contiguous();
  const auto x_in = (b_dec.has_value() ? at::sub(x_, *b_dec) : x_).contiguous();
  at::Tensor grad_x = at::empty({need_grad_x ? x_in.size(0) : 0, x_in.size(1)}, x_in.options());
  if (need_grad_x) cpu::gather_rows(indices, g, W_enc, at::Tensor(), grad_x, "topk_encode_backward", "W_enc");
  auto [grad_W, grad_b, unused] = cpu::segment_rows(indices, g, x_in, W_enc.size(0), /*with_sums=*/true,
                                                     at::Tensor(), "topk_encode_backward", "W_enc");
  return EncodeGrads{grad_x, grad_W, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(megasae, CPU, m) {
  m.impl("topk_encode", &topk_encode_cpu);
  m.impl("topk_encode_backward", &topk_encode_backward_cpu);
}

}  // namespace megasae
