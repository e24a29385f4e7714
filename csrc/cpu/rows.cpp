// CPU sparse row primitives (see rows.h).
//
// Both reduce to one inner operation on a handful of table rows: out = bias + sum_j w_j r_j (a
// weighted combination), with, in the decoder backward, dot(r, w) taken in the same pass. Combinations run a block of 32 columns at a time with
// the accumulators in registers across all rows, so each row element is loaded once and nothing
// else touches memory; the random rows' first lines are all in flight together. float32 uses
// AVX2/FMA when the processor has it (checked at run time; the library itself targets plain
// x86-64), every other case the portable loops below.
#include "rows.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "../common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define MEGASAE_X86 1
#include <immintrin.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace megasae {
namespace cpu {
namespace {

constexpr int64_t kColumns = 32;  // columns per register block

inline void check_index(int64_t m, int64_t M, int64_t slot, const char* op, const char* table_name) {
  TORCH_CHECK(0 <= m && m < M, op, ": indices holds ", m, " at flat position ", slot, ", but ", table_name,
              " has only ", M, " rows");
}

// out[0:d] = bias[0:d] (or 0) + sum_j w[j] * rows[j][0:d], accumulated in acc_t.
template <typename acc_t, typename scalar_t>
void combine_generic(scalar_t* out, const scalar_t* bias, const scalar_t* const* rows, const acc_t* w,
                     int64_t count, int64_t d) {
  for (int64_t c0 = 0; c0 < d; c0 += kColumns) {
    const int64_t n = std::min(kColumns, d - c0);
    acc_t acc[kColumns];
    for (int64_t c = 0; c < n; ++c) acc[c] = bias ? static_cast<acc_t>(bias[c0 + c]) : acc_t(0);
    for (int64_t j = 0; j < count; ++j) {
      const scalar_t* r = rows[j] + c0;
      const acc_t v = w[j];
#pragma omp simd
      for (int64_t c = 0; c < n; ++c) acc[c] += v * static_cast<acc_t>(r[c]);
    }
    for (int64_t c = 0; c < n; ++c) out[c0 + c] = static_cast<scalar_t>(acc[c]);
  }
}

#ifdef MEGASAE_X86
bool has_avx2() {
  static const bool yes = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return yes;
}

__attribute__((target("avx2,fma"))) void combine_avx2(float* out, const float* bias, const float* const* rows,
                                                       const float* w, int64_t count, int64_t d) {
  int64_t c0 = 0;
  for (; c0 + 32 <= d; c0 += 32) {
    __m256 a0, a1, a2, a3;
    if (bias) {
      a0 = _mm256_loadu_ps(bias + c0);
      a1 = _mm256_loadu_ps(bias + c0 + 8);
      a2 = _mm256_loadu_ps(bias + c0 + 16);
      a3 = _mm256_loadu_ps(bias + c0 + 24);
    } else {
      a0 = a1 = a2 = a3 = _mm256_setzero_ps();
    }
    for (int64_t j = 0; j < count; ++j) {
      const float* r = rows[j] + c0;
      _mm_prefetch(reinterpret_cast<const char*>(r + 64), _MM_HINT_T0);  // two blocks ahead
      _mm_prefetch(reinterpret_cast<const char*>(r + 80), _MM_HINT_T0);
      const __m256 v = _mm256_set1_ps(w[j]);
      a0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(r), a0);
      a1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(r + 8), a1);
      a2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(r + 16), a2);
      a3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(r + 24), a3);
    }
    _mm256_storeu_ps(out + c0, a0);
    _mm256_storeu_ps(out + c0 + 8, a1);
    _mm256_storeu_ps(out + c0 + 16, a2);
    _mm256_storeu_ps(out + c0 + 24, a3);
  }
  for (; c0 < d; ++c0) {
    float acc = bias ? bias[c0] : 0.f;
    for (int64_t j = 0; j < count; ++j) acc = std::fma(w[j], rows[j][c0], acc);
    out[c0] = acc;
  }
}

#endif

// acc[0:d] += v * r[0:d] and return <r, w> (the decoder backward's two uses of one row).
template <typename acc_t, typename scalar_t>
acc_t axpy_dot_generic(acc_t* acc, acc_t v, const scalar_t* r, const scalar_t* w, int64_t d) {
  acc_t s = 0;
#pragma omp simd reduction(+ : s)
  for (int64_t c = 0; c < d; ++c) {
    const acc_t x = static_cast<acc_t>(r[c]);
    s += x * static_cast<acc_t>(w[c]);
    acc[c] += v * x;
  }
  return s;
}

#ifdef MEGASAE_X86
__attribute__((target("avx2,fma"))) float axpy_dot_avx2(float* acc, float v, const float* r, const float* w,
                                                         int64_t d) {
  const __m256 v8 = _mm256_set1_ps(v);
  __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
  int64_t c = 0;
  for (; c + 16 <= d; c += 16) {
    const __m256 r0 = _mm256_loadu_ps(r + c), r1 = _mm256_loadu_ps(r + c + 8);
    s0 = _mm256_fmadd_ps(r0, _mm256_loadu_ps(w + c), s0);
    s1 = _mm256_fmadd_ps(r1, _mm256_loadu_ps(w + c + 8), s1);
    _mm256_storeu_ps(acc + c, _mm256_fmadd_ps(v8, r0, _mm256_loadu_ps(acc + c)));
    _mm256_storeu_ps(acc + c + 8, _mm256_fmadd_ps(v8, r1, _mm256_loadu_ps(acc + c + 8)));
  }
  const __m256 s8 = _mm256_add_ps(s0, s1);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
  float total = _mm_cvtss_f32(h);
  for (; c < d; ++c) {
    total = std::fma(r[c], w[c], total);
    acc[c] = std::fma(v, r[c], acc[c]);
  }
  return total;
}
#endif

template <typename acc_t, typename scalar_t>
inline acc_t axpy_dot(acc_t* acc, acc_t v, const scalar_t* r, const scalar_t* w, int64_t d) {
#ifdef MEGASAE_X86
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (has_avx2()) return axpy_dot_avx2(acc, v, r, w, d);
  }
#endif
  return axpy_dot_generic<acc_t, scalar_t>(acc, v, r, w, d);
}

template <typename acc_t, typename scalar_t>
inline void combine(scalar_t* out, const scalar_t* bias, const scalar_t* const* rows, const acc_t* w, int64_t count,
                    int64_t d) {
#ifdef MEGASAE_X86
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (has_avx2()) return combine_avx2(out, bias, rows, w, count, d);
  }
#endif
  combine_generic<acc_t, scalar_t>(out, bias, rows, w, count, d);
}

}  // namespace

void advise_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t(2) << 20;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.nbytes());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // a hint; may fail
#else
  (void)t;
#endif
}

int64_t grain(int64_t work_per_item) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, work_per_item));
}

void gather_rows(const at::Tensor& indices, const at::Tensor& weights, const at::Tensor& table,
                 const at::Tensor& bias, at::Tensor& out, const char* op, const char* table_name) {
  const int64_t N = indices.size(0), k = indices.size(1), M = table.size(0), d = table.size(1);
  MEGASAE_DISPATCH_FLOATING(table.scalar_type(), "megasae_gather_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t* I = indices.const_data_ptr<int64_t>();
    const scalar_t* V = weights.const_data_ptr<scalar_t>();
    const scalar_t* W = table.const_data_ptr<scalar_t>();
    const scalar_t* B = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* Y = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, grain(k * d), [&](int64_t begin, int64_t end) {
      std::vector<const scalar_t*> rows(k);
      std::vector<acc_t> w(k);
      for (int64_t n = begin; n < end; ++n) {
        int64_t count = 0;
        for (int64_t j = 0; j < k; ++j) {
          const int64_t s = n * k + j;
          check_index(I[s], M, s, op, table_name);
          const acc_t v = V[s];
          if (v == acc_t(0)) continue;  // relu zeros and padding contribute nothing
          rows[count] = W + I[s] * d;
          w[count++] = v;
        }
        combine<acc_t, scalar_t>(Y + n * d, B, rows.data(), w.data(), count, d);
      }
    });
  });
}

SegmentOut segment_rows(const at::Tensor& indices, const at::Tensor& weights, const at::Tensor& rows, int64_t M,
                        bool with_sums, const at::Tensor& dot_table, const char* op, const char* table_name) {
  const int64_t k = indices.size(1), d = rows.size(1), slots = indices.numel();
  auto grad = at::empty({M, d}, rows.options());
  advise_huge_pages(grad);  // written once, untouched so far: fewer page faults
  auto sums = with_sums ? at::empty({M}, rows.options()) : at::Tensor();
  auto dots = dot_table.defined() ? at::empty(indices.sizes(), rows.options()) : at::Tensor();

  // Stable counting sort of the slots by latent: latent m owns order[offsets[m] : offsets[m + 1]].
  const int64_t* I = indices.const_data_ptr<int64_t>();
  std::vector<int64_t> offsets(M + 1, 0), order(slots);
  for (int64_t s = 0; s < slots; ++s) {
    check_index(I[s], M, s, op, table_name);
    ++offsets[I[s] + 1];
  }
  for (int64_t m = 0; m < M; ++m) offsets[m + 1] += offsets[m];

  MEGASAE_DISPATCH_FLOATING(rows.scalar_type(), "megasae_segment_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* V = weights.const_data_ptr<scalar_t>();
    const scalar_t* R = rows.const_data_ptr<scalar_t>();
    const scalar_t* T = dots.defined() ? dot_table.const_data_ptr<scalar_t>() : nullptr;
    scalar_t* DW = grad.mutable_data_ptr<scalar_t>();
    scalar_t* DB = with_sums ? sums.mutable_data_ptr<scalar_t>() : nullptr;
    scalar_t* DD = dots.defined() ? dots.mutable_data_ptr<scalar_t>() : nullptr;
    // The weights travel with the sort (read in slot order, written at random), so the loop
    // below reads them in order instead of at random.
    std::vector<acc_t> sorted_w(slots);
    {
      std::vector<int64_t> next(offsets.begin(), offsets.end() - 1);
      for (int64_t s = 0; s < slots; ++s) {
        const int64_t p = next[I[s]]++;
        order[p] = s;
        sorted_w[p] = static_cast<acc_t>(V[s]);
      }
    }
    const int64_t work_per_latent = d + (M > 0 ? slots * d / M : 0);
    at::parallel_for(0, M, grain(work_per_latent), [&](int64_t begin, int64_t end) {
      std::vector<const scalar_t*> src;
      std::vector<acc_t> w, acc(T ? d : 0);
      for (int64_t m = begin; m < end; ++m) {
        acc_t total = 0;
        if (T) {  // one pass over each slot's row: the dot with table[m] and the weighted sum
          std::fill(acc.begin(), acc.end(), acc_t(0));
          for (int64_t p = offsets[m]; p < offsets[m + 1]; ++p) {
            const int64_t s = order[p];
            if (p + 1 < offsets[m + 1]) {
              const char* next = reinterpret_cast<const char*>(R + (order[p + 1] / k) * d);
              __builtin_prefetch(next);
              __builtin_prefetch(next + 64);
            }
            const acc_t v = sorted_w[p];
            total += v;
            DD[s] = static_cast<scalar_t>(axpy_dot<acc_t, scalar_t>(acc.data(), v, R + (s / k) * d, T + m * d, d));
          }
          for (int64_t c = 0; c < d; ++c) DW[m * d + c] = static_cast<scalar_t>(acc[c]);
        } else {
          src.clear();
          w.clear();
          for (int64_t p = offsets[m]; p < offsets[m + 1]; ++p) {
            const int64_t s = order[p];
            const acc_t v = sorted_w[p];
            total += v;
            if (v == acc_t(0)) continue;
            src.push_back(R + (s / k) * d);
            w.push_back(v);
          }
          combine<acc_t, scalar_t>(DW + m * d, nullptr, src.data(), w.data(), static_cast<int64_t>(src.size()), d);
        }
        if (DB) DB[m] = static_cast<scalar_t>(total);
      }
    });
  });
  return {grad, sums, dots};
}

}  // namespace cpu
}  // namespace megasae
