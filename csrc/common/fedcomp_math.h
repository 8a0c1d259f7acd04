// Per-element math shared by the CPU kernels (csrc/cpu) and the CUDA kernels
// (csrc/cuda). Everything here is a pure function of its arguments, written
// once as __host__ __device__ inline code, so the CPU test suite exercises the
// exact arithmetic that the GPU kernels run. No torch headers: this file must
// compile with nvcc alone.
//
// Floating-point rule: every formula is written as the reference
// (fedcomp/reference.py) evaluates it, one IEEE fp32 operation at a time, and
// the kernels are built with -ffp-contract=off (nvcc: --fmad=false) so no
// multiply-add is fused behind our back. That is what makes codes and values
// bit-identical across backends.
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#define FEDCOMP_HD __host__ __device__ __forceinline__
#else
#define FEDCOMP_HD inline
#endif

namespace fedcomp {

FEDCOMP_HD uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

// Order-preserving key of |a|: clearing the IEEE sign bit leaves a
// non-negative float whose bit pattern, read as an unsigned integer, sorts
// exactly like the magnitude. +Inf (0x7f800000) sorts above every finite
// value and NaN (0x7fc00000 and up) above +Inf, so non-finite entries are
// always selected first and never hidden in the error-feedback residual.
FEDCOMP_HD uint32_t abs_key(float a) { return float_bits(a) & 0x7fffffffu; }

// Sign bit of the 1-bit quantizer: 1 for a >= 0 (so -0.0 gives 1), 0 for
// a < 0 and for NaN.
FEDCOMP_HD uint32_t sign_code(float a) { return a >= 0.0f ? 1u : 0u; }

// Decoded value of a sign code: scale * (+1 | -1). Multiplying by +-1 is
// exact, so this equals the reference's `scale * sgn`.
FEDCOMP_HD float sign_value(uint32_t code, float scale) {
  return code ? scale : -scale;
}

// ---------------------------------------------------------------------------
// Philox4x32-10, the counter-based generator that Triton's tl.randint uses
// (same constants, same round structure, key = (seed_lo, seed_hi),
// counter = (i_lo, i_hi, 0, 0)). The reference implements it with int64
// tensors; all three backends therefore draw the same u_i for element i.
// ---------------------------------------------------------------------------
struct Philox4 {
  uint32_t v[4];
};

FEDCOMP_HD uint32_t mulhi32(uint32_t a, uint32_t b) {
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
}

// One Philox4x32 round of the counter (c0, c1, c2, c3) under the round key
// (k0, k1), and the key schedule between rounds. Shared by philox4x32_10 and
// the CPU's 8-counter version (philox_uniform_lanes).
FEDCOMP_HD void philox_round(uint32_t& c0, uint32_t& c1, uint32_t& c2, uint32_t& c3, uint32_t k0, uint32_t k1) {
  const uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  const uint32_t p0 = c0, p2 = c2;
  c0 = mulhi32(kRoundB, p2) ^ c1 ^ k0;
  c2 = mulhi32(kRoundA, p0) ^ c3 ^ k1;
  c1 = kRoundB * p2;
  c3 = kRoundA * p0;
}

FEDCOMP_HD void philox_next_key(uint32_t& k0, uint32_t& k1) {
  k0 += 0x9E3779B9u;
  k1 += 0xBB67AE85u;
}

FEDCOMP_HD Philox4 philox4x32_10(uint64_t seed, uint64_t counter) {
  uint32_t c0 = static_cast<uint32_t>(counter), c1 = static_cast<uint32_t>(counter >> 32);
  uint32_t c2 = 0, c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    philox_round(c0, c1, c2, c3, k0, k1);
    philox_next_key(k0, k1);
  }
  return Philox4{{c0, c1, c2, c3}};
}

// u in [0, 1) from the top 24 bits of a Philox word: exact in fp32. Element i
// of a QSGD call uses word i % 4 of Philox(seed, i / 4), so one Philox call
// serves four consecutive elements (tl.randint4x on the GPU).
FEDCOMP_HD float uniform24_word(uint32_t word) {
  return static_cast<float>(word >> 8) * 5.9604644775390625e-08f;
}


// Sample position j of topk_threshold_ef: a 64-bit draw reduced mod n.
FEDCOMP_HD uint64_t sample_position(uint64_t seed, uint64_t j, uint64_t n) {
  const Philox4 p = philox4x32_10(seed, j);
  return ((static_cast<uint64_t>(p.v[1]) << 32) | p.v[0]) % n;
}

// ---------------------------------------------------------------------------
// QSGD with `levels` = L: code = L + sign(a) * q, q = min(L, floor(L*|a|/norm + u)),
// which takes 2L+1 values and is stored in qsgd_bits(L) bits. Where
// L*|a|/norm + u is not finite (an all-zero bucket: 0/0; or a NaN/Inf in the
// bucket) q = 0; the bucket's norm then carries the NaN/Inf so the decoded
// bucket is NaN and the fault stays visible.
// ---------------------------------------------------------------------------
FEDCOMP_HD int qsgd_bits(int levels) {
  int w = 1;
  while ((1u << w) < static_cast<uint32_t>(2 * levels + 1)) ++w;
  return w;
}

FEDCOMP_HD uint32_t qsgd_code(float a, float norm, int levels, float u) {
  float t = static_cast<float>(levels) * fabsf(a);
  t = t / norm;
  t = t + u;
  // min(L, floor(t)): t >= 0, so below L truncation is floor (no libm call; |a| can exceed
  // the fp32-rounded norm by an ulp, hence the clamp). NaN or Inf: q = 0. Written with
  // selects, not branches, so that a loop over entries vectorises.
  const bool finite = fabsf(t) <= 3.402823466e+38f;
  const float lv = static_cast<float>(levels);
  const float clamped = t < lv ? t : lv;
  const int q = static_cast<int>(finite ? clamped : 0.0f);
  return static_cast<uint32_t>(a < 0.0f ? levels - q : levels + q);
}

FEDCOMP_HD float qsgd_value(uint32_t code, float norm, int levels) {
  float v = static_cast<float>(static_cast<int>(code) - levels) * norm;
  return v / static_cast<float>(levels);
}

}  // namespace fedcomp
