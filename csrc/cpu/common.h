// What every CPU kernel file shares: work-item sizes, parallel loops whose chunking does not
// depend on the thread count (so results are identical whatever at::get_num_threads() says),
// the rows of a stacked call, and the fused load of x + residual.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/scalar_tensor.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "../common/fedcomp_math.h"

namespace fedcomp::cpu {

using at::Tensor;

constexpr int64_t kChunk = 1 << 16;  // elements per work item
// Work items of the decodes (sign/qsgd decode and accumulate), whose entries are independent
// (any split gives the same bits): small enough that one client's model of a few 10^4
// entries, aggregated on the server, already spreads over the threads.
constexpr int64_t kDecodeChunk = 1 << 13;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

// Run fn(chunk, begin, end) over [0, n) in chunks of `chunk` elements, in parallel.
template <typename F>
void for_chunks(int64_t n, int64_t chunk, const F& fn) {
  const int64_t nchunks = ceil_div(n, chunk);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) fn(c, c * chunk, std::min(n, (c + 1) * chunk));
  });
}

template <bool kEF, typename scalar_t>
inline float load_a(const scalar_t* x, const scalar_t* r, int64_t i) {
  if constexpr (kEF) return to_f(x[i]) + to_f(r[i]);
  else return to_f(x[i]);
}

// ===========================================================================
// Many clients at once: x and residual are [m, n] stacks and each row gets
// exactly the 1-D op. With at least as many rows as threads, the rows are the
// one parallel region (the kernels' own parallel_for calls then run inline,
// serially, inside it); with fewer, rows run one after another, each parallel
// inside. Chunking never depends on the thread count, so both give the same
// bits as m separate calls.
// ===========================================================================
template <typename F>
void for_rows(int64_t m, const F& row) {
  if (m >= at::get_num_threads()) {
    at::parallel_for(0, m, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) row(i);
    });
  } else {
    for (int64_t i = 0; i < m; ++i) row(i);
  }
}

// The residual row of x's row i: rows[i] of a [K, n] residual when `rows` is given (the
// residuals of many keys kept in one buffer), else row i. Python checks that the rows are
// distinct; here, their count and range.
inline std::vector<int64_t> residual_rows(const std::optional<Tensor>& residual, at::OptionalIntArrayRef rows,
                                          int64_t m, int64_t n, const char* name) {
  std::vector<int64_t> out(m);
  for (int64_t i = 0; i < m; ++i) out[i] = i;
  if (!rows.has_value() || !residual) return out;
  TORCH_CHECK(static_cast<int64_t>(rows->size()) == m && residual->dim() == 2 && residual->size(1) == n &&
                  residual->is_contiguous(),
              "fedcomp::", name, ": with rows, residual must be a contiguous [K, n] tensor and rows hold one "
              "entry per row of x");
  for (int64_t i = 0; i < m; ++i) {
    out[i] = (*rows)[i];
    TORCH_CHECK(out[i] >= 0 && out[i] < residual->size(0), "fedcomp::", name, ": rows entry ", out[i],
                " out of range [0, ", residual->size(0), ")");
  }
  return out;
}

}  // namespace fedcomp::cpu
