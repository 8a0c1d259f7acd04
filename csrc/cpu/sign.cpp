// CPU kernels of sign quantisation (fedcomp::sign_ef, sign_ef_rows, sign_decode, sign_accumulate,
// sign_accumulate_many, sign_majority). Argument checking that users see (ValueError/TypeError naming the
// argument) happens in fedcomp/ops.py; the TORCH_CHECKs here guard the kernels against direct
// torch.ops calls.

#include "block_quant.h"
#include "ops.h"

namespace fedcomp::cpu {
namespace {

using at::Tensor;

template <bool kL2>
struct SignPolicy {
  static constexpr int bits() { return 1; }
  static constexpr bool kAux = false;
  static constexpr bool kCodesF32 = false;  // the generic loop vectorises already
  static void codes_f32(const float*, float*, int64_t, float, const float*, uint32_t*) {}
  static double term(float a) { return kL2 ? static_cast<double>(a) * a : std::fabs(static_cast<double>(a)); }
  static float finish(double s, int64_t cnt) {
    return kL2 ? static_cast<float>(std::sqrt(s / cnt)) : static_cast<float>(s / cnt);
  }
  static uint32_t code(float a, float /*scale*/, float /*aux*/) { return sign_code(a); }
  static float value(uint32_t c, float scale) { return sign_value(c, scale); }
};

}  // namespace

// 1-bit codes (sign): `words` 4-byte words of codes, 32 entries each, into out[0, 32 * words):
// entry j of a word takes bit j's prepared value, lo (bit 0) or hi (bit 1), picked by an
// integer mask (the same bits as the table lookup of put_code_bytes, with no branch), then
// stored or (add) added. In an AVX2 clone the loop vectorises; the table lookup does not.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void sign_words(const uint8_t* packed, float lo, float hi, int64_t words, float* __restrict__ out, bool add) {
  const uint32_t lo_bits = float_bits(lo), hi_bits = float_bits(hi);
  for (int64_t w = 0; w < words; ++w) {
    const uint8_t* b = packed + 4 * w;  // entry j is bit j of the little-endian word
    const uint32_t word = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<uint32_t>(b[3]) << 24);
    float* o = out + 32 * w;
    float v[32];
    for (int j = 0; j < 32; ++j) {
      const uint32_t m = 0u - ((word >> j) & 1u);
      const uint32_t bits = (m & hi_bits) | (~m & lo_bits);
      std::memcpy(&v[j], &bits, sizeof(float));
    }
    if (add) {
      for (int j = 0; j < 32; ++j) o[j] = o[j] + v[j];
    } else {
      for (int j = 0; j < 32; ++j) o[j] = v[j];
    }
  }
}

void sign_accumulate_many_cpu(const Tensor& out, at::TensorList packed, at::TensorList scales, int64_t block,
                              at::ArrayRef<double> alphas) {
  accumulate_many_cpu(out, packed, scales, block, alphas, SignPolicy<false>{}, "sign_accumulate_many");
}

std::tuple<Tensor, Tensor> sign_ef_cpu(const Tensor& x, const std::optional<Tensor>& residual,
                                       int64_t block, bool l2) {
  return l2 ? quantize_cpu(x, residual, block, same(SignPolicy<true>{}), "sign_ef")
            : quantize_cpu(x, residual, block, same(SignPolicy<false>{}), "sign_ef");
}

std::tuple<Tensor, Tensor> sign_ef_rows_cpu(const Tensor& x, const std::optional<Tensor>& residual,
                                            int64_t block, bool l2, at::OptionalIntArrayRef rows) {
  return l2 ? quantize_cpu(x, residual, block, same(SignPolicy<true>{}), "sign_ef_rows", rows)
            : quantize_cpu(x, residual, block, same(SignPolicy<false>{}), "sign_ef_rows", rows);
}

Tensor sign_decode_cpu(const Tensor& packed, const Tensor& scales, int64_t numel, int64_t block) {
  return dequantize_cpu(packed, scales, numel, block, SignPolicy<false>{});
}

void sign_accumulate_cpu(const Tensor& out, const Tensor& packed, const Tensor& scales, int64_t block,
                         double alpha) {
  accumulate_cpu(out, packed, scales, block, alpha, SignPolicy<false>{}, "sign_accumulate");
}

// ===========================================================================
// sign_majority: per bit, 2 * (number of rows with the bit set) >= rows.
// Reads the [m, nbytes] stack once, column tiles in parallel.
// ===========================================================================
Tensor sign_majority_cpu(const Tensor& stack) {
  TORCH_CHECK(stack.dim() == 2 && stack.is_contiguous() && stack.size(0) >= 1,
              "fedcomp::sign_majority: packed_stack must be a contiguous [m >= 1, nbytes] uint8 tensor");
  const int64_t m = stack.size(0), nbytes = stack.size(1);
  Tensor out = at::empty({nbytes}, stack.options());
  const uint8_t* in = stack.const_data_ptr<uint8_t>();
  uint8_t* o = out.data_ptr<uint8_t>();
  constexpr int64_t kTile = 1024;
  for_chunks(nbytes, kTile, [&](int64_t, int64_t b, int64_t e) {
    int32_t count[kTile * 8] = {};
    for (int64_t row = 0; row < m; ++row) {
      const uint8_t* src = in + row * nbytes;
      for (int64_t j = b; j < e; ++j)
        for (int t = 0; t < 8; ++t) count[(j - b) * 8 + t] += (src[j] >> t) & 1;
    }
    for (int64_t j = b; j < e; ++j) {
      uint8_t byte = 0;
      for (int t = 0; t < 8; ++t) byte |= static_cast<uint8_t>((2 * count[(j - b) * 8 + t] >= m) << t);
      o[j] = byte;
    }
  });
  return out;
}

}  // namespace fedcomp::cpu
