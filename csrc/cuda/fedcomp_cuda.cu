// CUDA kernels for topk_ef, sign_ef, sign_decode, sign_accumulate and sparse_accumulate. Framework-free:
// compiled by nvcc alone (no torch headers); csrc/cuda/fedcomp_cuda_torch.cu binds them to
// the fedcomp ops when torch has CUDA. Global-memory traffic per fp32 element is stated
// next to each kernel.
#include "fedcomp_cuda.cuh"

#include <algorithm>

#include "../common/fedcomp_math.h"

namespace fedcomp {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kTile = 1024;  // entries per block in the tiled kernels (4 per thread)
constexpr int kDigits[3] = {11, 10, 10};  // radix digits of the 31-bit key, most significant first

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ---------------------------------------------------------------------------------------------
// block statistics: one CUDA block per fedcomp block, fp64 tree reduction.
// Traffic: reads x and residual once (8 B/elem); writes 4 B per block.
// ---------------------------------------------------------------------------------------------
__global__ void block_stat_kernel(const float* __restrict__ x, const float* __restrict__ r, int64_t n, int64_t block,
                                  bool l2, float* __restrict__ out) {
  __shared__ double partial[kThreads];
  const int64_t b = blockIdx.x;
  const int64_t start = b * block;
  const int64_t count = min(block, n - start);
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < count; i += blockDim.x) {
    const float a = r ? x[start + i] + r[start + i] : x[start + i];
    acc += l2 ? static_cast<double>(a) * static_cast<double>(a) : static_cast<double>(fabsf(a));
  }
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double mean = partial[0] / static_cast<double>(count);
    out[b] = static_cast<float>(l2 ? sqrt(mean) : mean);
  }
}

// Bits and residual, one byte (8 entries) per thread.
// Traffic: reads x, residual (8 B) and the scale (cached); writes residual (4 B) and 1/8 B:
// 12.125 B/elem; 20.125 B/elem with block_stat_kernel before it.
__global__ void sign_codes_kernel(const float* __restrict__ x, float* __restrict__ r, const float* __restrict__ scales,
                                  int64_t n, int64_t block, uint8_t* __restrict__ packed) {
  const int64_t byte = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (byte * 8 >= n) return;
  uint32_t bits = 0;
  for (int j = 0; j < 8; ++j) {
    const int64_t i = byte * 8 + j;
    if (i >= n) break;
    const float a = r ? x[i] + r[i] : x[i];
    const uint32_t code = sign_code(a);
    bits |= code << j;
    if (r) r[i] = a - sign_value(code, scales[i / block]);
  }
  packed[byte] = static_cast<uint8_t>(bits);
}

// kAcc = false (sign_decode): out = scale_b * (+1 | -1).
//   Traffic: reads 1/8 B, writes 4 B per element: 4.125 B/elem (minimal).
// kAcc = true (sign_accumulate): out += alpha * that, the product rounded before the add
//   (__fmul_rn / __fadd_rn are never contracted into an FMA), so it equals decode-then-add.
//   Traffic: reads 1/8 B and out (4 B), writes 4 B: 8.125 B/elem, against 16.125 for decode-then-add.
template <bool kAcc>
__global__ void sign_decode_kernel(const uint8_t* __restrict__ packed, const float* __restrict__ scales, int64_t n,
                                   int64_t block, float alpha, float* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float v = sign_value((packed[i >> 3] >> (i & 7)) & 1u, scales[i / block]);
  out[i] = kAcc ? __fadd_rn(out[i], __fmul_rn(alpha, v)) : v;
}

// Traffic: reads index (8 B) and value (4 B), one 4-byte atomic read-modify-write per entry.
__global__ void sparse_accumulate_kernel(float* __restrict__ out, const int64_t* __restrict__ idx,
                                         const float* __restrict__ val, int64_t m, float alpha) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < m) atomicAdd(out + idx[j], alpha * val[j]);
}

// ---------------------------------------------------------------------------------------------
// top-k: keys, three radix histograms, count, scan, compaction. No host synchronisation.
// ---------------------------------------------------------------------------------------------
// a = x + r; residual <- a; keys <- abs_key(a). Traffic: 8 B read, 8 B written.
__global__ void topk_keys_kernel(const float* __restrict__ x, float* __restrict__ r, int64_t n,
                                 uint32_t* __restrict__ keys) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float a = x[i];
  if (r) {
    a = a + r[i];
    r[i] = a;
  }
  keys[i] = abs_key(a);
}

// Histogram of the digit below the prefix already selected (state[1]). Traffic: 4 B/elem read.
template <int kBits>
__global__ void histogram_kernel(const uint32_t* __restrict__ keys, int64_t n, int shift,
                                 const uint32_t* __restrict__ state, uint32_t* __restrict__ hist) {
  __shared__ uint32_t local[1 << kBits];
  for (int b = threadIdx.x; b < (1 << kBits); b += blockDim.x) local[b] = 0;
  __syncthreads();
  const int top = shift + kBits;
  const uint32_t prefix = state[1];
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint32_t key = keys[i];
    if (top >= 31 || (key >> top) == prefix) atomicAdd(&local[(key >> shift) & ((1u << kBits) - 1)], 1u);
  }
  __syncthreads();
  for (int b = threadIdx.x; b < (1 << kBits); b += blockDim.x)
    if (local[b]) atomicAdd(&hist[b], local[b]);
}

__global__ void init_state_kernel(uint32_t* state, uint32_t k) {
  state[0] = k;  // entries still to take
  state[1] = 0;  // key prefix selected so far
}

// One thread: walk the bins from the top until state[0] entries are covered.
template <int kBits>
__global__ void select_kernel(uint32_t* __restrict__ state, const uint32_t* __restrict__ hist) {
  if (threadIdx.x != 0) return;
  uint32_t rem = state[0];
  int b = (1 << kBits) - 1;
  while (b > 0 && hist[b] < rem) rem -= hist[b--];
  state[0] = rem;
  state[1] = (state[1] << kBits) | static_cast<uint32_t>(b);
}

__device__ __forceinline__ uint32_t block_sum(uint32_t v, uint32_t* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = blockDim.x / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  const uint32_t total = shared[0];
  __syncthreads();
  return total;
}

// Per tile: entries above the threshold and equal to it. Traffic: 4 B/elem read.
__global__ void count_kernel(const uint32_t* __restrict__ keys, int64_t n, const uint32_t* __restrict__ state,
                             uint32_t* __restrict__ counts, int64_t ntiles) {
  __shared__ uint32_t shared[kThreads];
  const uint32_t t = state[1];
  uint32_t greater = 0, equal = 0;
  for (int j = threadIdx.x; j < kTile; j += blockDim.x) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kTile + j;
    if (i < n) {
      greater += keys[i] > t;
      equal += keys[i] == t;
    }
  }
  greater = block_sum(greater, shared);
  equal = block_sum(equal, shared);
  if (threadIdx.x == 0) {
    counts[blockIdx.x] = greater;
    counts[ntiles + blockIdx.x] = equal;
  }
}

// One thread: exclusive scans over tiles (ntiles = n / 1024 entries: cheap serially).
__global__ void scan_kernel(const uint32_t* __restrict__ counts, int64_t ntiles, const uint32_t* __restrict__ state,
                            uint32_t* __restrict__ offsets) {
  if (threadIdx.x != 0) return;
  const uint32_t take_eq = state[0];
  uint32_t g = 0, e = 0;
  for (int64_t t = 0; t < ntiles; ++t) {
    offsets[t] = g + min(e, take_eq);
    offsets[ntiles + t] = e;
    g += counts[t];
    e += counts[ntiles + t];
  }
}

// Inclusive scan of one value per thread over the block (Hillis-Steele in shared memory);
// leaves the result in shared[threadIdx.x].
__device__ __forceinline__ void block_inclusive_scan(uint32_t v, uint32_t* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = 1; s < blockDim.x; s <<= 1) {
    const uint32_t add = threadIdx.x >= s ? shared[threadIdx.x - s] : 0u;
    __syncthreads();
    shared[threadIdx.x] += add;
    __syncthreads();
  }
}

// Writes the picks of a tile in index order (block-wide exclusive scan of the pick flags, in
// chunks of blockDim.x entries) and zeroes them in the residual. Traffic: 4 B/elem read plus
// the k picks.
__global__ void compact_kernel(const uint32_t* __restrict__ keys, const float* __restrict__ a,
                               float* __restrict__ r, int64_t n, const uint32_t* __restrict__ state,
                               const uint32_t* __restrict__ offsets, int64_t ntiles, float* __restrict__ values,
                               int64_t* __restrict__ indices) {
  __shared__ uint32_t scan_pick[kThreads];
  __shared__ uint32_t scan_eq[kThreads];
  const uint32_t t = state[1];
  const uint32_t take_eq = state[0];
  uint32_t base = offsets[blockIdx.x];
  uint32_t eq_base = offsets[ntiles + blockIdx.x];
  for (int chunk = 0; chunk < kTile; chunk += blockDim.x) {
    const int64_t i = static_cast<int64_t>(blockIdx.x) * kTile + chunk + threadIdx.x;
    const uint32_t key = i < n ? keys[i] : 0u;
    const bool valid = i < n;
    const uint32_t eq = valid && key == t;
    // inclusive scans of the tie flags, then of the pick flags
    block_inclusive_scan(eq, scan_eq);
    const uint32_t eq_rank = eq_base + scan_eq[threadIdx.x] - eq;
    const uint32_t pick = valid && (key > t || (eq && eq_rank < take_eq));
    block_inclusive_scan(pick, scan_pick);
    if (pick) {
      const uint32_t pos = base + scan_pick[threadIdx.x] - 1;
      values[pos] = a[i];
      indices[pos] = i;
      if (r) r[i] = 0.0f;
    }
    base += scan_pick[blockDim.x - 1];
    eq_base += scan_eq[blockDim.x - 1];
    __syncthreads();
  }
}

}  // namespace

size_t topk_ef_workspace_bytes(int64_t n) {
  const int64_t ntiles = ceil_div(n, kTile);
  return sizeof(uint32_t) * (n + (1 << 11) + 2 + 4 * ntiles);
}

cudaError_t topk_ef(const float* x, float* residual, int64_t n, int64_t k, float* values, int64_t* indices,
                    void* workspace, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  const int64_t ntiles = ceil_div(n, kTile);
  uint32_t* keys = static_cast<uint32_t*>(workspace);
  uint32_t* hist = keys + n;
  uint32_t* state = hist + (1 << 11);
  uint32_t* counts = state + 2;
  uint32_t* offsets = counts + 2 * ntiles;
  topk_keys_kernel<<<ceil_div(n, kThreads), kThreads, 0, stream>>>(x, residual, n, keys);
  if (k == 0) return cudaGetLastError();
  init_state_kernel<<<1, 1, 0, stream>>>(state, static_cast<uint32_t>(k));  // no host-to-device copy, no sync
  cudaError_t err = cudaSuccess;
  const int hist_blocks = static_cast<int>(std::min<int64_t>(ceil_div(n, kThreads), 1024));
  int shift = 31;
  for (int d = 0; d < 3; ++d) {
    shift -= kDigits[d];
    err = cudaMemsetAsync(hist, 0, sizeof(uint32_t) << kDigits[d], stream);
    if (err != cudaSuccess) return err;
    if (kDigits[d] == 11) {
      histogram_kernel<11><<<hist_blocks, kThreads, 0, stream>>>(keys, n, shift, state, hist);
      select_kernel<11><<<1, 32, 0, stream>>>(state, hist);
    } else {
      histogram_kernel<10><<<hist_blocks, kThreads, 0, stream>>>(keys, n, shift, state, hist);
      select_kernel<10><<<1, 32, 0, stream>>>(state, hist);
    }
  }
  count_kernel<<<ntiles, kThreads, 0, stream>>>(keys, n, state, counts, ntiles);
  scan_kernel<<<1, 32, 0, stream>>>(counts, ntiles, state, offsets);
  const float* a = residual ? residual : x;
  compact_kernel<<<ntiles, kThreads, 0, stream>>>(keys, a, residual, n, state, offsets, ntiles, values, indices);
  return cudaGetLastError();
}

cudaError_t sign_ef(const float* x, float* residual, int64_t n, int64_t block, bool l2, uint8_t* packed,
                    float* scales, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  block_stat_kernel<<<ceil_div(n, block), kThreads, 0, stream>>>(x, residual, n, block, l2, scales);
  sign_codes_kernel<<<ceil_div(ceil_div(n, 8), kThreads), kThreads, 0, stream>>>(x, residual, scales, n, block,
                                                                                   packed);
  return cudaGetLastError();
}

cudaError_t sign_decode(const uint8_t* packed, const float* scales, int64_t numel, int64_t block, float* out,
                        cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  sign_decode_kernel<false><<<ceil_div(numel, kThreads), kThreads, 0, stream>>>(packed, scales, numel, block, 1.f, out);
  return cudaGetLastError();
}

cudaError_t sign_accumulate(float* out, int64_t numel, const uint8_t* packed, const float* scales, int64_t block,
                            float alpha, cudaStream_t stream) {
  if (numel == 0) return cudaSuccess;
  sign_decode_kernel<true><<<ceil_div(numel, kThreads), kThreads, 0, stream>>>(packed, scales, numel, block, alpha,
                                                                               out);
  return cudaGetLastError();
}

cudaError_t sparse_accumulate(float* out, const int64_t* indices, const float* values, int64_t m, float alpha,
                              cudaStream_t stream) {
  if (m == 0) return cudaSuccess;
  sparse_accumulate_kernel<<<ceil_div(m, kThreads), kThreads, 0, stream>>>(out, indices, values, m, alpha);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fedcomp
