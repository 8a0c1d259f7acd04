// CPU kernels of sparse accumulation (fedcomp::sparse_accumulate). Argument checking that users see (ValueError/TypeError naming the
// argument) happens in fedcomp/ops.py; the TORCH_CHECKs here guard the kernels against direct
// torch.ops calls.

#include "common.h"
#include "ops.h"

namespace fedcomp::cpu {
namespace {

using at::Tensor;

// ===========================================================================
// sparse_accumulate: out[idx] += alpha * v, with no atomics, and duplicates
// accumulated in list order, as a serial loop would. Sorted indices (top-k
// and rand-k payloads) are split into equal runs of the list, each cut moved
// past a run of equal indices, so the work items touch disjoint entries.
// Otherwise each work item owns a slice of `out` and applies, in list order,
// the entries that fall in it.
// ===========================================================================
template <typename val_t, typename index_t>
void sparse_accumulate_impl(float* out, int64_t n, const index_t* idx, const val_t* val, int64_t m,
                            float alpha) {
  bool ascending = true;
  for (int64_t j = 0; j < m; ++j) {
    TORCH_CHECK_INDEX(idx[j] >= 0 && idx[j] < n, "fedcomp::sparse_accumulate: indices must lie in [0, ",
                      n, "), got ", static_cast<int64_t>(idx[j]), " at position ", j);
    ascending &= j == 0 || idx[j - 1] <= idx[j];
  }
  auto add = [&](int64_t j) { out[idx[j]] = out[idx[j]] + alpha * to_f(val[j]); };
  if (ascending) {
    const int64_t parts = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, m >> 12));
    std::vector<int64_t> cut(parts + 1, m);
    cut[0] = 0;
    for (int64_t p = 1; p < parts; ++p) {
      int64_t j = std::max(cut[p - 1], m * p / parts);
      while (j > 0 && j < m && idx[j] == idx[j - 1]) ++j;
      cut[p] = j;
    }
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t j = cut[p]; j < cut[p + 1]; ++j) add(j);
    });
    return;
  }
  // Every slice scans the whole list, so fan out only when the list is long.
  const int64_t slices = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, m >> 18));
  const int64_t width = ceil_div(n, slices);
  at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t lo = s * width, hi = lo + width;
      for (int64_t j = 0; j < m; ++j)
        if (idx[j] >= lo && idx[j] < hi) add(j);
    }
  });
}

}  // namespace

void sparse_accumulate_cpu(const Tensor& out, const Tensor& indices, const Tensor& values, double alpha) {
  TORCH_CHECK(out.dim() == 1 && out.is_contiguous() && out.scalar_type() == at::kFloat &&
                  indices.is_contiguous() && values.is_contiguous() && indices.numel() == values.numel(),
              "fedcomp::sparse_accumulate: bad arguments");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "sparse_accumulate_cpu", [&] {
    using val_t = scalar_t;
    AT_DISPATCH_INDEX_TYPES(indices.scalar_type(), "sparse_accumulate_idx", [&] {
      sparse_accumulate_impl<val_t, index_t>(out.data_ptr<float>(), out.numel(),
                                             indices.const_data_ptr<index_t>(),
                                             values.const_data_ptr<val_t>(), values.numel(),
                                             static_cast<float>(alpha));
    });
  });
}

}  // namespace fedcomp::cpu
