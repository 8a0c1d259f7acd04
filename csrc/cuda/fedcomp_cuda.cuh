// Framework-free CUDA kernels of fedcomp: launchers take raw pointers, sizes and a
// cudaStream_t, and return the launch status. The per-element math is shared with
// the CPU kernels through csrc/common/fedcomp_math.h. Element type: fp32.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace fedcomp {
namespace cuda {

// Scratch the top-k launcher needs (bytes), for n entries: keys, histogram, state, tile tables.
size_t topk_ef_workspace_bytes(int64_t n);

// Exact top-k by magnitude with error feedback (ties to the lower index, indices ascending).
// a = x + residual (residual may be null); residual <- a with the picks zeroed.
// values[k], indices[k] (int64) are written; workspace has topk_ef_workspace_bytes(n) bytes.
cudaError_t topk_ef(const float* x, float* residual, int64_t n, int64_t k, float* values, int64_t* indices,
                    void* workspace, cudaStream_t stream);

// 1-bit sign with per-block scales (mean |a|, or sqrt(mean a^2) when l2) and error feedback.
// packed[ceil(n/8)] bytes, scales[ceil(n/block)].
cudaError_t sign_ef(const float* x, float* residual, int64_t n, int64_t block, bool l2, uint8_t* packed,
                    float* scales, cudaStream_t stream);

// out[numel] = scale_b * (+1 | -1).
cudaError_t sign_decode(const uint8_t* packed, const float* scales, int64_t numel, int64_t block, float* out,
                        cudaStream_t stream);

// out[numel] += alpha * scale_b * (+1 | -1), the product rounded to fp32 before the add.
cudaError_t sign_accumulate(float* out, int64_t numel, const uint8_t* packed, const float* scales, int64_t block,
                            float alpha, cudaStream_t stream);

// out[indices[j]] += alpha * values[j] (fp32 atomics; exact for distinct indices).
cudaError_t sparse_accumulate(float* out, const int64_t* indices, const float* values, int64_t m, float alpha,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace fedcomp
