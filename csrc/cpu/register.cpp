// Registers the CPU kernels for the fedcomp ops' CPU dispatch key. The schemas are declared in
// Python (fedcomp/_schemas.py, defined by fedcomp/_library.py), so the ops exist whether or not
// this extension is built; loading it overrides their reference kernels on CPU tensors.

#include <torch/library.h>

#include "ops.h"

namespace fedcomp::cpu {

TORCH_LIBRARY_IMPL(fedcomp, CPU, m) {
  m.impl("randk_positions", &randk_positions_cpu);
  m.impl("randk_ef_rows", &randk_ef_rows_cpu);
  m.impl("topk_ef", &topk_ef_cpu);
  m.impl("topk_threshold_ef", &topk_threshold_ef_cpu);
  m.impl("sign_ef", &sign_ef_cpu);
  m.impl("sign_decode", &sign_decode_cpu);
  m.impl("sign_majority", &sign_majority_cpu);
  m.impl("qsgd", &qsgd_cpu);
  m.impl("qsgd_rows", &qsgd_rows_cpu);
  m.impl("qsgd_decode", &qsgd_decode_cpu);
  m.impl("sparse_accumulate", &sparse_accumulate_cpu);
  m.impl("sign_accumulate", &sign_accumulate_cpu);
  m.impl("topk_ef_rows", &topk_ef_rows_cpu);  // the same kernels serve [n] and [m, n]
  m.impl("sign_ef_rows", &sign_ef_rows_cpu);
  m.impl("qsgd_accumulate", &qsgd_accumulate_cpu);
  m.impl("sign_accumulate_many", &sign_accumulate_many_cpu);
  m.impl("qsgd_accumulate_many", &qsgd_accumulate_many_cpu);
}

}  // namespace fedcomp::cpu
