// CPU kernels of QSGD (fedcomp::qsgd, qsgd_rows, qsgd_decode, qsgd_accumulate, qsgd_accumulate_many). Argument checking that users see (ValueError/TypeError naming the
// argument) happens in fedcomp/ops.py; the TORCH_CHECKs here guard the kernels against direct
// torch.ops calls.

#include "block_quant.h"
#include "ops.h"

namespace fedcomp::cpu {
namespace {

using at::Tensor;

// QSGD's uniforms for counters [c, c + 8 * groups): u[4 * t + j] = word j of
// Philox(seed, c + t), as uniform24_word. philox4x32_10's rounds
// (philox_round), applied to 8 counters side by side so that the 32x32 -> 64
// multiplies vectorise; on x86-64 an AVX2 clone is picked at load time where
// the CPU has it (3.7x faster than one counter at a time on the development
// machine). Integer arithmetic only: every clone gives the same bits.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void philox_uniform_lanes(uint64_t seed, uint64_t c, int64_t groups, float* u) {
  for (int64_t g = 0; g < groups; ++g) {
    uint32_t c0[8], c1[8], c2[8], c3[8];
    for (int l = 0; l < 8; ++l) {
      const uint64_t t = c + 8 * static_cast<uint64_t>(g) + l;
      c0[l] = static_cast<uint32_t>(t);
      c1[l] = static_cast<uint32_t>(t >> 32);
      c2[l] = 0;
      c3[l] = 0;
    }
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int round = 0; round < 10; ++round) {
      for (int l = 0; l < 8; ++l) philox_round(c0[l], c1[l], c2[l], c3[l], k0, k1);
      philox_next_key(k0, k1);
    }
    float* o = u + 32 * g;
    for (int l = 0; l < 8; ++l) {
      o[4 * l] = uniform24_word(c0[l]);
      o[4 * l + 1] = uniform24_word(c1[l]);
      o[4 * l + 2] = uniform24_word(c2[l]);
      o[4 * l + 3] = uniform24_word(c3[l]);
    }
  }
}

// QSGD codes of a[j] = x[j] (+ r[j] when r is given), j < len, fp32, with the
// residual updated: the same per-entry formulas as piece_codes, in a loop with
// no branches that vectorises, in an AVX2 clone where the CPU has it.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void qsgd_codes_f32(const float* x, float* r, int64_t len, float norm, int levels, const float* __restrict u,
                    uint32_t* __restrict codes) {
  if (r) {
    for (int64_t j = 0; j < len; ++j) {
      const float a = x[j] + r[j];
      const uint32_t c = qsgd_code(a, norm, levels, u[j]);
      codes[j] = c;
      r[j] = a - qsgd_value(c, norm, levels);
    }
  } else {
    for (int64_t j = 0; j < len; ++j) codes[j] = qsgd_code(x[j], norm, levels, u[j]);
  }
}

struct QsgdPolicy {
  int levels;
  int width;
  uint64_t seed;
  static constexpr bool kAux = true;
  static constexpr bool kCodesF32 = true;
  int bits() const { return width; }
  static double term(float a) { return static_cast<double>(a) * a; }
  static float finish(double s, int64_t /*cnt*/) { return static_cast<float>(std::sqrt(s)); }
  // u_i for i in [b, e): word i % 4 of Philox(seed, i / 4). Whole groups of
  // 32 entries (8 counters) go through philox_uniform_lanes; a head up to the
  // next multiple of 4 and the tail, one counter at a time.
  void fill_aux(int64_t b, int64_t e, float* u) const {
    auto one_by_one = [&](int64_t from, int64_t to) {
      for (int64_t i = from; i < to;) {
        const Philox4 w = philox4x32_10(seed, static_cast<uint64_t>(i) >> 2);
        for (int j = static_cast<int>(i & 3); j < 4 && i < to; ++j, ++i) u[i - b] = uniform24_word(w.v[j]);
      }
    };
    const int64_t body = std::min(e, (b + 3) & ~int64_t{3});
    one_by_one(b, body);
    const int64_t groups = (e - body) / 32;
    philox_uniform_lanes(seed, static_cast<uint64_t>(body) >> 2, groups, u + (body - b));
    one_by_one(body + 32 * groups, e);
  }
  uint32_t code(float a, float norm, float u) const { return qsgd_code(a, norm, levels, u); }
  float value(uint32_t c, float norm) const { return qsgd_value(c, norm, levels); }
  void codes_f32(const float* x, float* r, int64_t len, float norm, const float* u, uint32_t* codes) const {
    qsgd_codes_f32(x, r, len, norm, levels, u, codes);
  }
};

}  // namespace

void qsgd_accumulate_many_cpu(const Tensor& out, at::TensorList packed, at::TensorList norms, int64_t levels,
                              int64_t bucket, at::ArrayRef<double> alphas) {
  const int lv = static_cast<int>(levels);
  accumulate_many_cpu(out, packed, norms, bucket, alphas, QsgdPolicy{lv, qsgd_bits(lv), 0}, "qsgd_accumulate_many");
}

// Many clients' updates, x [m, n], one Philox seed per row: row i is exactly qsgd(x[i], seed=seeds[i]).
std::tuple<Tensor, Tensor> qsgd_rows_cpu(const Tensor& x, const std::optional<Tensor>& residual, int64_t levels,
                                         int64_t bucket, at::IntArrayRef seeds, at::OptionalIntArrayRef rows) {
  TORCH_CHECK(x.dim() == 2 && static_cast<int64_t>(seeds.size()) == x.size(0),
              "fedcomp::qsgd_rows: x must be [m, n] with one seed per row");
  const int lv = static_cast<int>(levels);
  auto policy = [&](int64_t i) { return QsgdPolicy{lv, qsgd_bits(lv), static_cast<uint64_t>(seeds[i])}; };
  return quantize_cpu(x, residual, bucket, policy, "qsgd_rows", rows);
}

std::tuple<Tensor, Tensor> qsgd_cpu(const Tensor& x, const std::optional<Tensor>& residual,
                                    int64_t levels, int64_t bucket, int64_t seed) {
  const int lv = static_cast<int>(levels);
  return quantize_cpu(x, residual, bucket, same(QsgdPolicy{lv, qsgd_bits(lv), static_cast<uint64_t>(seed)}),
                      "qsgd");
}

Tensor qsgd_decode_cpu(const Tensor& packed, const Tensor& norms, int64_t numel, int64_t levels,
                       int64_t bucket) {
  const int lv = static_cast<int>(levels);
  return dequantize_cpu(packed, norms, numel, bucket, QsgdPolicy{lv, qsgd_bits(lv), 0});
}

void qsgd_accumulate_cpu(const Tensor& out, const Tensor& packed, const Tensor& norms, int64_t levels,
                         int64_t bucket, double alpha) {
  const int lv = static_cast<int>(levels);
  accumulate_cpu(out, packed, norms, bucket, alpha, QsgdPolicy{lv, qsgd_bits(lv), 0}, "qsgd_accumulate");
}

}  // namespace fedcomp::cpu
