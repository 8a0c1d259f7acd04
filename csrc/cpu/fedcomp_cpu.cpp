// Fused CPU kernels for the fedcomp ops. The schemas are declared in Python
// (fedcomp/_library.py); this file only implements them for the CPU dispatch
// key. Argument checking that users see (ValueError/TypeError naming the
// argument) happens in fedcomp/ops.py; the TORCH_CHECKs here guard the
// kernels against direct torch.ops calls.
//
// Every kernel works in chunks whose boundaries do not depend on the thread
// count, so results are identical whatever at::get_num_threads() says.

#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/types.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <numeric>
#include <vector>

#include "../common/fedcomp_math.h"

namespace fedcomp {
namespace {

using at::Tensor;

constexpr int64_t kChunk = 1 << 16;  // elements per work item

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

// ===========================================================================
// topk_ef: exact top-k by |a| with ties to the lower index, indices ascending.
//
// Memory passes (n = numel, reading `a` means reading the residual buffer,
// which holds a after pass 1):
//   1. a = x + r, written back into r; 11-bit histogram of key >> 20, per chunk.
//   2..3. only while the boundary bin still holds more keys than are needed:
//      10-bit histogram of the next key bits among keys that share the prefix.
//   4. compaction: write values/indices of the picked entries and zero them
//      in r. Each chunk's output offset is known from its own histograms, so
//      the output comes out sorted by index without a sort or a merge.
// No temporary of size n: the histograms are 2048 counters per chunk.
// ===========================================================================
struct RadixLevel {
  int shift;  // key bits below this level's digit
  int bins;   // 2048 for the first level, 1024 after
};
constexpr std::array<RadixLevel, 3> kLevels{{{20, 2048}, {10, 1024}, {0, 1024}}};

template <typename scalar_t, typename index_t>
void topk_ef_impl(const scalar_t* x, scalar_t* r, int64_t n, int64_t k, scalar_t* out_v,
                  index_t* out_i) {
  const int64_t nchunks = ceil_div(n, kChunk);
  std::vector<uint32_t> hist(static_cast<size_t>(nchunks) * 2048);
  // Number of picked entries in each chunk that are strictly above the
  // threshold, accumulated level by level.
  std::vector<int64_t> above(nchunks, 0);
  const scalar_t* a = r ? r : x;

  // Pass 1 (fused with the add): histogram of the top 11 key bits.
  for_chunks(n, kChunk, [&](int64_t c, int64_t b, int64_t e) {
    uint32_t* h = hist.data() + c * 2048;
    if (r) {
      for (int64_t i = b; i < e; ++i) {
        const scalar_t s = static_cast<scalar_t>(to_f(x[i]) + to_f(r[i]));
        r[i] = s;
        ++h[abs_key(to_f(s)) >> 20];
      }
    } else {
      for (int64_t i = b; i < e; ++i) ++h[abs_key(to_f(x[i])) >> 20];
    }
  });
  if (k == 0) return;

  // Resolve the threshold digit by digit. `prefix` holds the key bits fixed
  // so far; `need` how many entries are still to be taken from keys that
  // start with `prefix`.
  int64_t need = k;
  uint32_t prefix = 0;
  int shift = 32;
  bool exact_tie_split = false;  // true when the full 31-bit key is fixed and ties remain
  for (size_t level = 0; level < kLevels.size(); ++level) {
    const int bins = kLevels[level].bins;
    const int dshift = kLevels[level].shift;
    if (level > 0) {
      std::fill(hist.begin(), hist.end(), 0u);
      const uint32_t want = prefix;
      const int pshift = shift;
      for_chunks(n, kChunk, [&](int64_t c, int64_t b, int64_t e) {
        uint32_t* h = hist.data() + c * 2048;
        for (int64_t i = b; i < e; ++i) {
          const uint32_t key = abs_key(to_f(a[i]));
          if ((key >> pshift) == want) ++h[(key >> dshift) & (bins - 1)];
        }
      });
    }
    std::vector<int64_t> total(bins, 0);
    for (int64_t c = 0; c < nchunks; ++c)
      for (int d = 0; d < bins; ++d) total[d] += hist[c * 2048 + d];
    int digit = bins - 1;
    while (total[digit] < need) need -= total[digit--];
    for (int64_t c = 0; c < nchunks; ++c)
      for (int d = digit + 1; d < bins; ++d) above[c] += hist[c * 2048 + d];
    prefix = (prefix << (shift - dshift)) | static_cast<uint32_t>(digit);
    shift = dshift;
    if (need == total[digit]) {  // the whole bin is taken: no ties to split
      for (int64_t c = 0; c < nchunks; ++c) above[c] += hist[c * 2048 + digit];
      break;
    }
    exact_tie_split = (level + 1 == kLevels.size());
  }

  // Per-chunk share of the tied keys (key == prefix), in index order, and
  // per-chunk output offsets.
  std::vector<int64_t> ties(nchunks, 0), offset(nchunks + 1, 0);
  if (exact_tie_split) {
    int64_t left = need;
    for (int64_t c = 0; c < nchunks; ++c) {
      ties[c] = std::min<int64_t>(left, hist[c * 2048 + (prefix & 1023)]);
      left -= ties[c];
    }
  }
  for (int64_t c = 0; c < nchunks; ++c) offset[c + 1] = offset[c] + above[c] + ties[c];
  // Picked: key > gt, or key == eq for the chunk's first ties[c] such keys.
  const int64_t lo = static_cast<int64_t>(prefix) << shift;
  const int64_t gt = exact_tie_split ? lo : lo - 1;
  const int64_t eq = exact_tie_split ? lo : -1;

  for_chunks(n, kChunk, [&](int64_t c, int64_t b, int64_t e) {
    int64_t pos = offset[c];
    const int64_t end = offset[c + 1];
    int64_t tie_left = ties[c];
    for (int64_t i = b; i < e && pos < end; ++i) {
      const int64_t key = abs_key(to_f(a[i]));
      if (key > gt || (key == eq && tie_left > 0)) {
        if (key == eq) --tie_left;
        out_v[pos] = a[i];
        out_i[pos] = static_cast<index_t>(i);
        ++pos;
        if (r) r[i] = static_cast<scalar_t>(0);
      }
    }
  });
}

std::tuple<Tensor, Tensor> topk_ef_cpu(const Tensor& x, const std::optional<Tensor>& residual,
                                       int64_t k, at::ScalarType index_dtype) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "fedcomp::topk_ef: x must be 1-D contiguous");
  TORCH_CHECK(k >= 0 && k <= x.numel(), "fedcomp::topk_ef: k out of range");
  const int64_t n = x.numel();
  Tensor values = at::empty({k}, x.options());
  Tensor indices = at::empty({k}, x.options().dtype(index_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_ef_cpu", [&] {
    scalar_t* r = residual ? residual->data_ptr<scalar_t>() : nullptr;
    if (index_dtype == at::kInt) {
      topk_ef_impl<scalar_t, int32_t>(x.const_data_ptr<scalar_t>(), r, n, k,
                                      values.data_ptr<scalar_t>(), indices.data_ptr<int32_t>());
    } else {
      topk_ef_impl<scalar_t, int64_t>(x.const_data_ptr<scalar_t>(), r, n, k,
                                      values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>());
    }
  });
  return {values, indices};
}

// ===========================================================================
// topk_threshold_ef: threshold from a Philox sample, then a fixed-capacity
// compaction in index order. Two passes: count per chunk, then write
// (the second also stores a into r). No host synchronisation is needed by
// the caller: count is returned as a tensor.
// ===========================================================================
template <typename scalar_t>
int64_t topk_threshold_impl(const scalar_t* x, scalar_t* r, int64_t n, int64_t k,
                            int64_t capacity, int64_t sample_size, uint64_t seed,
                            scalar_t* out_v, int64_t* out_i) {
  auto a_at = [&](int64_t i) {
    return r ? static_cast<scalar_t>(to_f(x[i]) + to_f(r[i])) : x[i];
  };
  int64_t threshold = int64_t{1} << 40;  // above every key: nothing is picked
  if (k > 0 && n > 0) {
    std::vector<uint32_t> sample(sample_size);
    for (int64_t j = 0; j < sample_size; ++j)
      sample[j] = abs_key(to_f(a_at(static_cast<int64_t>(sample_position(seed, j, n)))));
    const int64_t m = ceil_div(k * sample_size, n);
    std::nth_element(sample.begin(), sample.begin() + (m - 1), sample.end(), std::greater<>());
    threshold = sample[m - 1];
  }
  const int64_t nchunks = ceil_div(n, kChunk);
  std::vector<int64_t> offset(nchunks + 1, 0);
  for_chunks(n, kChunk, [&](int64_t c, int64_t b, int64_t e) {
    int64_t cnt = 0;
    for (int64_t i = b; i < e; ++i) cnt += abs_key(to_f(a_at(i))) >= threshold;
    offset[c + 1] = cnt;
  });
  for (int64_t c = 0; c < nchunks; ++c) offset[c + 1] += offset[c];
  for_chunks(n, kChunk, [&](int64_t c, int64_t b, int64_t e) {
    int64_t pos = offset[c];
    for (int64_t i = b; i < e; ++i) {
      const scalar_t s = a_at(i);
      const bool keep = abs_key(to_f(s)) >= threshold && pos < capacity;
      if (keep) {
        out_v[pos] = s;
        out_i[pos] = i;
        ++pos;
      }
      if (r) r[i] = keep ? static_cast<scalar_t>(0) : s;
    }
  });
  return std::min(offset[nchunks], capacity);
}

std::tuple<Tensor, Tensor, Tensor> topk_threshold_ef_cpu(const Tensor& x,
                                                         const std::optional<Tensor>& residual,
                                                         int64_t k, int64_t capacity,
                                                         int64_t sample_size, int64_t seed) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "fedcomp::topk_threshold_ef: x must be 1-D contiguous");
  TORCH_CHECK(k >= 0 && k <= x.numel() && capacity >= 0 && sample_size >= 1,
              "fedcomp::topk_threshold_ef: bad k, capacity or sample_size");
  Tensor values = at::zeros({capacity}, x.options());
  Tensor indices = at::zeros({capacity}, x.options().dtype(at::kLong));
  int64_t count = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_threshold_ef_cpu", [&] {
    count = topk_threshold_impl<scalar_t>(
        x.const_data_ptr<scalar_t>(), residual ? residual->data_ptr<scalar_t>() : nullptr,
        x.numel(), k, capacity, sample_size, static_cast<uint64_t>(seed),
        values.data_ptr<scalar_t>(), indices.data_ptr<int64_t>());
  });
  return {values, indices, at::scalar_tensor(count, x.options().dtype(at::kLong))};
}

// ===========================================================================
// Block quantizers (sign, QSGD) share one traversal:
//   for each block b: stat_b = sum over the block of policy.term(a_i)  (fp64)
//                     scale_b = policy.finish(stat_b, n_b)
//                     code_i = policy.code(a_i, scale_b, i)  -> packed stream
//                     r_i    = a_i - policy.value(code_i, scale_b)
// Small blocks: one work item = a group of blocks whose first element is a
// multiple of 8 (so groups never share a packed byte); each block is read
// once from memory for its statistic and again from cache for the codes.
// Large blocks: the statistic is a parallel reduction over the block, then
// the codes are written in parallel. The fp64 sum always runs over
// kChunk-element pieces from the block start, 8 lanes each, combined in a
// fixed order, so the result does not depend on the thread count.
// ===========================================================================
struct SignPolicy {
  bool l2;
  static constexpr int bits() { return 1; }
  double term(float a) const { return l2 ? static_cast<double>(a) * a : std::fabs(static_cast<double>(a)); }
  float finish(double s, int64_t cnt) const {
    return l2 ? static_cast<float>(std::sqrt(s / cnt)) : static_cast<float>(s / cnt);
  }
  uint32_t code(float a, float /*scale*/, int64_t /*i*/) const { return sign_code(a); }
  float value(uint32_t c, float scale) const { return sign_value(c, scale); }
};

struct QsgdPolicy {
  int levels;
  int width;
  uint64_t seed;
  int bits() const { return width; }
  double term(float a) const { return static_cast<double>(a) * a; }
  float finish(double s, int64_t /*cnt*/) const { return static_cast<float>(std::sqrt(s)); }
  uint32_t code(float a, float norm, int64_t i) const {
    return qsgd_code(a, norm, levels, uniform24(seed, static_cast<uint64_t>(i)));
  }
  float value(uint32_t c, float norm) const { return qsgd_value(c, norm, levels); }
};

template <typename scalar_t>
inline float load_a(const scalar_t* x, const scalar_t* r, int64_t i) {
  return r ? to_f(x[i]) + to_f(r[i]) : to_f(x[i]);
}

// fp64 statistic of a[b, e) with 8 interleaved accumulators combined in order.
template <typename scalar_t, typename Policy>
double piece_stat(const scalar_t* x, const scalar_t* r, int64_t b, int64_t e, const Policy& p) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = b;
  for (; i + 8 <= e; i += 8)
    for (int j = 0; j < 8; ++j) lane[j] += p.term(load_a(x, r, i + j));
  for (int j = 0; i < e; ++i, ++j) lane[j] += p.term(load_a(x, r, i));
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// Write the codes of a[b, e) (all in one block with `scale`) into the packed
// stream and update r. Bytes that [b, e) covers only in part are OR-ed into
// the zero-initialised stream.
template <typename scalar_t, typename Policy>
void piece_codes(const scalar_t* x, scalar_t* r, int64_t b, int64_t e, float scale,
                 const Policy& p, uint8_t* packed) {
  const int w = p.bits();
  int64_t bit = b * w;
  uint8_t* out = packed + (bit >> 3);
  int nacc = static_cast<int>(bit & 7);
  uint64_t acc = 0;
  bool first = true;
  for (int64_t i = b; i < e; ++i) {
    const float a = load_a(x, r, i);
    const uint32_t c = p.code(a, scale, i);
    if (r) r[i] = static_cast<scalar_t>(a - p.value(c, scale));
    acc |= static_cast<uint64_t>(c) << nacc;
    nacc += w;
    while (nacc >= 8) {
      if (first) *out++ |= static_cast<uint8_t>(acc); else *out++ = static_cast<uint8_t>(acc);
      first = false;
      acc >>= 8;
      nacc -= 8;
    }
  }
  if (nacc > 0) *out |= static_cast<uint8_t>(acc);
}

template <typename scalar_t, typename Policy>
void quantize_blocks(const scalar_t* x, scalar_t* r, int64_t n, int64_t block, const Policy& p,
                     uint8_t* packed, float* scales) {
  const int64_t nblocks = ceil_div(n, block);
  auto block_stat = [&](int64_t b, int64_t e, bool parallel) {
    if (e - b <= kChunk) return piece_stat(x, r, b, e, p);
    const int64_t npieces = ceil_div(e - b, kChunk);
    std::vector<double> part(npieces, 0.0);
    auto run = [&](int64_t p0, int64_t p1) {
      for (int64_t q = p0; q < p1; ++q)
        part[q] = piece_stat(x, r, b + q * kChunk, std::min(e, b + (q + 1) * kChunk), p);
    };
    if (parallel) at::parallel_for(0, npieces, 1, run); else run(0, npieces);
    double s = 0;
    for (double v : part) s += v;
    return s;
  };
  if (block <= kChunk) {
    const int64_t group = 8 / std::gcd<int64_t>(block, 8);  // blocks per work item
    at::parallel_for(0, ceil_div(nblocks, group), 1, [&](int64_t g0, int64_t g1) {
      for (int64_t blk = g0 * group; blk < std::min(nblocks, g1 * group); ++blk) {
        const int64_t b = blk * block, e = std::min(n, b + block);
        scales[blk] = p.finish(block_stat(b, e, false), e - b);
        piece_codes(x, r, b, e, scales[blk], p, packed);
      }
    });
  } else {
    for (int64_t blk = 0; blk < nblocks; ++blk) {
      const int64_t b = blk * block, e = std::min(n, b + block);
      const float scale = scales[blk] = p.finish(block_stat(b, e, true), e - b);
      // Interior piece edges sit on multiples of 8 elements: no shared bytes.
      const int64_t first_edge = std::min(e, (b + kChunk + 7) / 8 * 8);
      at::parallel_for(0, 1 + ceil_div(e - first_edge, kChunk), 1, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {
          const int64_t pb = q == 0 ? b : first_edge + (q - 1) * kChunk;
          const int64_t pe = q == 0 ? first_edge : std::min(e, pb + kChunk);
          piece_codes(x, r, pb, pe, scale, p, packed);
        }
      });
    }
  }
}

template <typename Policy>
void dequantize_blocks(const uint8_t* packed, const float* scales, int64_t n, int64_t block,
                       const Policy& p, float* out) {
  const int w = p.bits();
  const uint32_t mask = (w == 32) ? 0xffffffffu : ((1u << w) - 1u);
  for_chunks(n, kChunk, [&](int64_t, int64_t b, int64_t e) {
    int64_t bit = b * w;
    const uint8_t* in = packed + (bit >> 3);
    int nacc = 0;
    uint64_t acc = 0;
    int skip = static_cast<int>(bit & 7);
    for (int64_t i = b; i < e; ++i) {
      while (nacc < w + skip) {
        acc |= static_cast<uint64_t>(*in++) << nacc;
        nacc += 8;
      }
      acc >>= skip;
      nacc -= skip;
      skip = 0;
      const uint32_t c = static_cast<uint32_t>(acc) & mask;
      acc >>= w;
      nacc -= w;
      out[i] = p.value(c, scales[i / block]);
    }
  });
}

template <typename Policy>
std::tuple<Tensor, Tensor> quantize_cpu(const Tensor& x, const std::optional<Tensor>& residual,
                                        int64_t block, const Policy& p, const char* name) {
  TORCH_CHECK(x.dim() == 1 && x.is_contiguous(), "fedcomp::", name, ": x must be 1-D contiguous");
  TORCH_CHECK(block >= 1, "fedcomp::", name, ": block must be >= 1");
  const int64_t n = x.numel();
  Tensor packed = at::zeros({ceil_div(n * p.bits(), 8)}, x.options().dtype(at::kByte));
  Tensor scales = at::empty({ceil_div(n, block)}, x.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_cpu", [&] {
    quantize_blocks<scalar_t>(x.const_data_ptr<scalar_t>(),
                              residual ? residual->data_ptr<scalar_t>() : nullptr, n, block, p,
                              packed.data_ptr<uint8_t>(), scales.data_ptr<float>());
  });
  return {packed, scales};
}

template <typename Policy>
Tensor dequantize_cpu(const Tensor& packed, const Tensor& scales, int64_t numel, int64_t block,
                      const Policy& p) {
  TORCH_CHECK(packed.numel() == ceil_div(numel * p.bits(), 8) && scales.numel() == ceil_div(numel, block),
              "fedcomp: packed/scales length does not match numel");
  Tensor out = at::empty({numel}, scales.options().dtype(at::kFloat));
  dequantize_blocks(packed.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(), numel, block, p,
                    out.data_ptr<float>());
  return out;
}

std::tuple<Tensor, Tensor> sign_ef_cpu(const Tensor& x, const std::optional<Tensor>& residual,
                                       int64_t block, bool l2) {
  return quantize_cpu(x, residual, block, SignPolicy{l2}, "sign_ef");
}

Tensor sign_decode_cpu(const Tensor& packed, const Tensor& scales, int64_t numel, int64_t block) {
  return dequantize_cpu(packed, scales, numel, block, SignPolicy{false});
}

std::tuple<Tensor, Tensor> qsgd_cpu(const Tensor& x, const std::optional<Tensor>& residual,
                                    int64_t levels, int64_t bucket, int64_t seed) {
  const int lv = static_cast<int>(levels);
  return quantize_cpu(x, residual, bucket, QsgdPolicy{lv, qsgd_bits(lv), static_cast<uint64_t>(seed)},
                      "qsgd");
}

Tensor qsgd_decode_cpu(const Tensor& packed, const Tensor& norms, int64_t numel, int64_t levels,
                       int64_t bucket) {
  const int lv = static_cast<int>(levels);
  return dequantize_cpu(packed, norms, numel, bucket, QsgdPolicy{lv, qsgd_bits(lv), 0});
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

// ===========================================================================
// sparse_accumulate: out[idx] += alpha * v. Each work item owns a slice of
// `out` and applies, in list order, the entries that fall in it: no atomics,
// and duplicates accumulate in the same order as a serial loop.
// ===========================================================================
template <typename val_t, typename index_t>
void sparse_accumulate_impl(float* out, int64_t n, const index_t* idx, const val_t* val, int64_t m,
                            float alpha) {
  for (int64_t j = 0; j < m; ++j)
    TORCH_CHECK_INDEX(idx[j] >= 0 && idx[j] < n, "fedcomp::sparse_accumulate: indices must lie in [0, ",
                      n, "), got ", static_cast<int64_t>(idx[j]), " at position ", j);
  const int64_t slices = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, m / 4096));
  const int64_t width = ceil_div(n, slices);
  at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t lo = s * width, hi = lo + width;
      for (int64_t j = 0; j < m; ++j) {
        const int64_t i = idx[j];
        if (i >= lo && i < hi) out[i] = out[i] + alpha * to_f(val[j]);
      }
    }
  });
}

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

}  // namespace

TORCH_LIBRARY_IMPL(fedcomp, CPU, m) {
  m.impl("topk_ef", &topk_ef_cpu);
  m.impl("topk_threshold_ef", &topk_threshold_ef_cpu);
  m.impl("sign_ef", &sign_ef_cpu);
  m.impl("sign_decode", &sign_decode_cpu);
  m.impl("sign_majority", &sign_majority_cpu);
  m.impl("qsgd", &qsgd_cpu);
  m.impl("qsgd_decode", &qsgd_decode_cpu);
  m.impl("sparse_accumulate", &sparse_accumulate_cpu);
}

}  // namespace fedcomp
