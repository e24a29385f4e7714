// The sparse row primitives that the CPU kernels of both ops are built from. Every output element
// has a single writer that sums its terms in a fixed order: no atomics, deterministic results.
//
//   gather_rows:  out[n]   = bias + sum_j w[n, j] * table[I[n, j]]        (decode; encoder grad of x)
//   segment_rows: grad[m]  = sum over slots s with I[s] = m of w[s] * rows[s / k], and sum w[s],
//                 optionally with dot[n, j] = <rows[n], table[I[n, j]]> in the same pass
//                                                                (grads of W_dec and values, W_enc, b_enc)
//
// Tensors are contiguous and share one floating dtype; indices are int64 [N, k]. `op` and `table`
// name the caller's op and table for the out-of-range error.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace megasae {
namespace cpu {

// Items per at::parallel_for chunk so that each chunk does about GRAIN_SIZE multiply-adds.
int64_t grain(int64_t work_per_item);

// Asks Linux to back the whole 2 MiB pages inside a large, not yet touched tensor with huge pages
// (transparent huge pages in madvise mode): one page fault per 2 MiB instead of per 4 KiB.
void advise_huge_pages(const at::Tensor& t);

// out [N, d] is written, not accumulated into; bias may be undefined.
void gather_rows(const at::Tensor& indices, const at::Tensor& weights, const at::Tensor& table,
                 const at::Tensor& bias, at::Tensor& out, const char* op, const char* table_name);

// (grad [M, d], weight sums [M] when with_sums, dots [N, k] when dot_table is defined): with a
// dot_table [M, d], also dot[n, j] = <rows[n], dot_table[I[n, j]]>, from the same pass over each
// slot's row (the decoder backward needs both and reads each gradient row once). Slots are bucketed
// by latent with a stable counting sort, O(N k + M), so latent m's terms are summed in slot order.
using SegmentOut = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
SegmentOut segment_rows(const at::Tensor& indices, const at::Tensor& weights, const at::Tensor& rows, int64_t M,
                        bool with_sums, const at::Tensor& dot_table, const char* op, const char* table_name);

}  // namespace cpu
}  // namespace megasae
