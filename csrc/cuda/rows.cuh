// The sparse row primitives that the CUDA kernels of both ops are built from (the CUDA twins of
// cpu/rows.h). Every output element is written by one thread that sums its terms in a fixed order:
// no atomics, deterministic results.
//
//   gather_rows:  out[n]   = bias + sum_j w[n, j] * table[I[n, j]]        (decode; encoder grad of x)
//   row_dots:     dot[n,j] = <rows[n], table[I[n, j]]>                    (decoder grad of values)
//   segment_rows: grad[m]  = sum over slots s with I[s] = m of w[s] * rows[s / k], and sum w[s]
//                                                                         (grads of W_dec, W_enc, b_enc)
//
// Tensors are contiguous CUDA tensors of one floating dtype on the current device; indices are
// int64 [N, k]. An index out of range trips a device-side assertion.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace megasae {
namespace gpu {

// out [N, d] is written, not accumulated into; bias may be undefined.
void gather_rows(const at::Tensor& indices, const at::Tensor& weights, const at::Tensor& table,
                 const at::Tensor& bias, at::Tensor& out);

at::Tensor row_dots(const at::Tensor& rows, const at::Tensor& indices, const at::Tensor& table);

// (grad [M, d], weight sums [M] when with_sums else undefined); slots are bucketed by latent with
// a stable sort, so latent m's terms are summed in slot order.
std::tuple<at::Tensor, at::Tensor> segment_rows(const at::Tensor& indices, const at::Tensor& weights,
                                                const at::Tensor& rows, int64_t M, bool with_sums);

}  // namespace gpu
}  // namespace megasae
