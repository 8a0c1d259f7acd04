// The block quantizers' shared machinery (sign and QSGD are its two policies): statistics,
// code packing, dense decode and accumulation, for one tensor or a stack of rows.
#pragma once

#include <cmath>
#include <cstring>
#include <numeric>
#include <type_traits>

#include "common.h"

namespace fedcomp::cpu {

// ===========================================================================
// Block quantizers (sign, QSGD) share one traversal:
//   for each block b: stat_b = sum over the block of policy.term(a_i)  (fp64)
//                     scale_b = policy.finish(stat_b, n_b)
//                     code_i = policy.code(a_i, scale_b, aux_i) -> packed stream
//                     r_i    = a_i - policy.value(code_i, scale_b)
// Small blocks: one work item = a group of blocks whose first element is a
// multiple of 8 (so groups never share a packed byte); each block is read
// once from memory for its statistic and again from cache for the codes.
// Large blocks: the statistic is a parallel reduction over the block, then
// the codes are written in parallel. The fp64 sum always runs over
// kChunk-element pieces from the block start, 8 lanes each, combined in a
// fixed order, so the result does not depend on the thread count.
// ===========================================================================
//
// A Policy provides: bits() (code width), kAux and fill_aux(b, e, aux) (a per-entry extra input,
// QSGD's uniforms), term(a) and finish(sum, count) (the block's scale), code(a, scale, aux) and
// value(code, scale), and kCodesF32 with codes_f32(x, r, len, scale, aux, codes): a vectorised
// loop for fp32 inputs that gives the same bits as code/value entry by entry.

// fp64 statistic of a[b, e) with 8 interleaved accumulators combined in order.
template <bool kEF, typename scalar_t, typename Policy>
double piece_stat(const scalar_t* x, const scalar_t* r, int64_t b, int64_t e, const Policy& p) {
  double lane[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = b;
  for (; i + 8 <= e; i += 8)
    for (int j = 0; j < 8; ++j) lane[j] += p.term(load_a<kEF>(x, r, i + j));
  for (int j = 0; i < e; ++i, ++j) lane[j] += p.term(load_a<kEF>(x, r, i));
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// Appends w-bit codes to a little-endian bit stream starting at bit `bit`.
// The stream is zero-initialised, and a piece may share its first and last
// byte with its neighbours (written before or after, never concurrently), so
// partial bytes are OR-ed in.
struct BitWriter {
  uint8_t* out;
  uint64_t acc = 0;
  int nacc;
  BitWriter(uint8_t* packed, int64_t bit) : out(packed + (bit >> 3)), nacc(static_cast<int>(bit & 7)) {}
  void put(const uint32_t* codes, int64_t count, int w) {
    int64_t j = 0;
    if (8 % w == 0) {  // 1, 2, 4 or 8 bits: whole bytes of 8 / w codes once aligned
      for (; j < count && nacc != 0; ++j) push(codes[j], w);
      const int per = 8 / w;
      for (; j + per <= count; j += per) {
        uint32_t byte = 0;
        for (int t = 0; t < per; ++t) byte |= codes[j + t] << (t * w);
        *out++ |= static_cast<uint8_t>(byte);
      }
    }
    for (; j < count; ++j) push(codes[j], w);
  }
  void push(uint32_t code, int w) {
    acc |= static_cast<uint64_t>(code) << nacc;
    nacc += w;
    for (; nacc >= 8; nacc -= 8, acc >>= 8) *out++ |= static_cast<uint8_t>(acc);
  }
  void finish() {
    if (nacc > 0) *out |= static_cast<uint8_t>(acc);
  }
};

// Codes of a[b, e) (all in one block with `scale`) into the stream; r updated.
// The compute loop over a 256-entry sub-block has no cross-iteration
// dependency (it vectorises for the sign policy); packing follows.
template <bool kEF, typename scalar_t, typename Policy>
void piece_codes(const scalar_t* x, scalar_t* r, int64_t b, int64_t e, float scale,
                 const Policy& p, uint8_t* packed) {
  constexpr int64_t kSub = 256;
  uint32_t codes[kSub];
  float aux[kSub];  // per-entry extra input (QSGD's u_i); untouched by policies without one
  BitWriter writer(packed, b * p.bits());
  for (int64_t s = b; s < e; s += kSub) {
    const int64_t t = std::min(e, s + kSub);
    if constexpr (Policy::kAux) p.fill_aux(s, t, aux);
    if constexpr (Policy::kCodesF32 && std::is_same_v<scalar_t, float>) {  // the policy's vectorised loop
      p.codes_f32(x + s, kEF ? r + s : nullptr, t - s, scale, aux, codes);
      writer.put(codes, t - s, p.bits());
      continue;
    }
    for (int64_t i = s; i < t; ++i) {
      const float a = load_a<kEF>(x, r, i);
      const uint32_t c = p.code(a, scale, Policy::kAux ? aux[i - s] : 0.0f);
      codes[i - s] = c;
      if constexpr (kEF) r[i] = static_cast<scalar_t>(a - p.value(c, scale));
    }
    writer.put(codes, t - s, p.bits());
  }
  writer.finish();
}

// Blocks of at most kChunk entries go in work items of 8 / gcd(block, 8) blocks, so that
// an item starts on a multiple of 8 entries: items share no byte of the packed codes.
inline int64_t small_block_group(int64_t block) { return 8 / std::gcd<int64_t>(block, 8); }
inline int64_t small_block_groups(int64_t n, int64_t block) {
  return ceil_div(ceil_div(n, block), small_block_group(block));
}

// Work item g of a row whose blocks are at most kChunk entries: each block's scale, then
// its codes (and residual), all on one thread.
template <bool kEF, typename scalar_t, typename Policy>
void quantize_group(const scalar_t* x, scalar_t* r, int64_t n, int64_t block, const Policy& p,
                    uint8_t* packed, float* scales, int64_t g) {
  const int64_t group = small_block_group(block), nblocks = ceil_div(n, block);
  for (int64_t blk = g * group; blk < std::min(nblocks, (g + 1) * group); ++blk) {
    const int64_t b = blk * block, e = std::min(n, b + block);
    scales[blk] = p.finish(piece_stat<kEF>(x, r, b, e, p), e - b);
    piece_codes<kEF>(x, r, b, e, scales[blk], p, packed);
  }
}

// One row whose blocks are larger than kChunk: each block's statistic over kChunk pieces in
// parallel (combined in order), then its codes over pieces in parallel. Smaller blocks go
// through quantize_group, all rows' work items in one parallel region (quantize_cpu).
template <bool kEF, typename scalar_t, typename Policy>
void quantize_large_blocks(const scalar_t* x, scalar_t* r, int64_t n, int64_t block, const Policy& p,
                           uint8_t* packed, float* scales) {
  const int64_t nblocks = ceil_div(n, block);
  auto block_stat = [&](int64_t b, int64_t e) {
    if (e - b <= kChunk) return piece_stat<kEF>(x, r, b, e, p);  // a short last block
    const int64_t npieces = ceil_div(e - b, kChunk);
    std::vector<double> part(npieces, 0.0);
    at::parallel_for(0, npieces, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t q = p0; q < p1; ++q)
        part[q] = piece_stat<kEF>(x, r, b + q * kChunk, std::min(e, b + (q + 1) * kChunk), p);
    });
    double sum = 0;
    for (double v : part) sum += v;
    return sum;
  };
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const int64_t b = blk * block, e = std::min(n, b + block);
    const float scale = scales[blk] = p.finish(block_stat(b, e), e - b);
    // Interior piece edges sit on multiples of 8 elements: no shared bytes.
    const int64_t first_edge = std::min(e, (b + kChunk + 7) / 8 * 8);
    at::parallel_for(0, 1 + ceil_div(e - first_edge, kChunk), 1, [&](int64_t q0, int64_t q1) {
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t pb = q == 0 ? b : first_edge + (q - 1) * kChunk;
        const int64_t pe = q == 0 ? first_edge : std::min(e, pb + kChunk);
        piece_codes<kEF>(x, r, pb, pe, scale, p, packed);
      }
    });
  }
}

// Dense decode: each work item walks its range block by block (one scale per
// inner loop, no division per entry). Codes of 1, 2, 4 or 8 bits never straddle
// a byte: they index a per-block table of the 2^w values, computed once by the
// same p.value (so the bits are unchanged); wider codes go through a sequential
// bit reader. `Store` decides what happens to each value: DecodeStore writes it
// (sign_decode, qsgd_decode); AccumulateStore adds alpha times it into out (the
// *_accumulate ops). `prepare` runs once per table entry (for the accumulate:
// the product alpha * value, rounded to fp32, exactly what the per-entry
// formula rounds), `put` once per entry (built with -ffp-contract=off: no FMA).
struct DecodeStore {
  float* __restrict__ out;
  float prepare(float v) const { return v; }
  void put(int64_t i, float pv) const { out[i] = pv; }
};
struct AccumulateStore {
  float* __restrict__ out;
  float alpha;
  float prepare(float v) const { return alpha * v; }
  void put(int64_t i, float pv) const { out[i] = out[i] + pv; }
};

// Entries [i, t) from whole bytes of 8/W codes (i at a byte boundary), each through the
// block's table; returns where it stopped (fewer than 8/W entries before t).
template <int W, typename Store>
inline int64_t put_code_bytes(const uint8_t* packed, const float* lut, int64_t i, int64_t t, const Store& out) {
  constexpr int kPer = 8 / W;
  constexpr uint32_t kMask = (1u << W) - 1u;
  for (; i + kPer <= t; i += kPer) {
    const uint32_t byte = packed[(i * W) >> 3];
    for (int j = 0; j < kPer; ++j) out.put(i + j, lut[(byte >> (j * W)) & kMask]);
  }
  return i;
}

// 1-bit codes (sign.cpp): `words` 4-byte words of codes, 32 entries each, into out[0, 32 * words):
// entry j of a word is lo (bit 0) or hi (bit 1), stored or (add) added.
void sign_words(const uint8_t* packed, float lo, float hi, int64_t words, float* __restrict__ out, bool add);


// Entries [i, t) of 1-bit codes (i at a byte boundary) through `out`'s store: whole words by
// sign_words, the rest by the table; returns t.
template <typename Store>
inline int64_t put_sign_words(const uint8_t* packed, const float* lut, int64_t i, int64_t t, const Store& out) {
  const int64_t words = (t - i) / 32;
  sign_words(packed + (i >> 3), lut[0], lut[1], words, out.out + i, std::is_same_v<Store, AccumulateStore>);
  return put_code_bytes<1>(packed, lut, i + 32 * words, t, out);
}

// Entries [b, e) of one payload's stream through `store`. A range starts wherever the caller
// cuts (the sequential reader for odd widths starts its state at b).
template <typename Policy, typename Store>
void dequantize_range(const uint8_t* packed, const float* scales, int64_t b, int64_t e, int64_t block,
                      const Policy& p, const Store& store) {
  const int w = p.bits();
  const uint32_t mask = (1u << w) - 1u;
  const Store out = store;  // a local copy: its pointer and alpha stay in registers
  const uint8_t* in = packed + ((b * w) >> 3);
  int skip = static_cast<int>((b * w) & 7), nacc = 0;
  uint64_t acc = 0;
  for (int64_t s = b; s < e;) {
    const int64_t blk = s / block, t = std::min(e, (blk + 1) * block);
    const float scale = scales[blk];
    if (8 % w == 0) {  // 1, 2, 4 or 8 bits: a table of the block's 2^w (prepared) values
      float lut[256];
      for (uint32_t c = 0; c <= mask; ++c) lut[c] = out.prepare(p.value(c, scale));
      const int64_t slot = 8 / w - 1;  // codes per byte - 1 (a power of two minus one)
      int64_t i = s;
      auto one = [&](int64_t j) { out.put(j, lut[(packed[(j * w) >> 3] >> ((j & slot) * w)) & mask]); };
      for (; i < t && (i & slot); ++i) one(i);  // up to a byte boundary
      switch (w) {                              // then whole bytes, constant shifts
        case 1: i = put_sign_words(packed, lut, i, t, out); break;
        case 2: i = put_code_bytes<2>(packed, lut, i, t, out); break;
        case 4: i = put_code_bytes<4>(packed, lut, i, t, out); break;
        default: i = put_code_bytes<8>(packed, lut, i, t, out); break;
      }
      for (; i < t; ++i) one(i);
    } else {
      // other widths: a sequential bit reader (w is fixed per call, so its state from b holds)
      for (int64_t i = s; i < t; ++i) {
        while (nacc < w + skip) {
          acc |= static_cast<uint64_t>(*in++) << nacc;
          nacc += 8;
        }
        acc >>= skip;
        nacc -= skip;
        skip = 0;
        out.put(i, out.prepare(p.value(static_cast<uint32_t>(acc) & mask, scale)));
        acc >>= w;
        nacc -= w;
      }
    }
    s = t;
  }
}

template <typename Policy, typename Store>
void dequantize_blocks(const uint8_t* packed, const float* scales, int64_t n, int64_t block,
                       const Policy& p, const Store& store) {
  for_chunks(n, kDecodeChunk,
             [&](int64_t, int64_t b, int64_t e) { dequantize_range(packed, scales, b, e, block, p, store); });
}

template <typename Policy>
auto same(const Policy& p) {
  return [p](int64_t) { return p; };
}

// x is [n] or [m, n] (one row per client, each quantised exactly as a 1-D call);
// policy(i): the Policy of row i (QSGD's seed differs per row; sign's is the same).
template <typename PolicyOf>
std::tuple<Tensor, Tensor> quantize_cpu(const Tensor& x, const std::optional<Tensor>& residual,
                                        int64_t block, const PolicyOf& policy, const char* name,
                                        at::OptionalIntArrayRef rows = std::nullopt) {
  const auto p = policy(0);  // the code width (the same for every row)
  TORCH_CHECK((x.dim() == 1 || x.dim() == 2) && x.is_contiguous(), "fedcomp::", name,
              ": x must be 1-D or 2-D contiguous");
  TORCH_CHECK(block >= 1, "fedcomp::", name, ": block must be >= 1");
  const bool stacked = x.dim() == 2;
  const int64_t m = stacked ? x.size(0) : 1, n = x.size(-1);
  const int64_t nbytes = ceil_div(n * p.bits(), 8), nblocks = ceil_div(n, block);
  auto shape = [&](int64_t len) { return stacked ? std::vector<int64_t>{m, len} : std::vector<int64_t>{len}; };
  Tensor packed = at::zeros(shape(nbytes), x.options().dtype(at::kByte));
  Tensor scales = at::empty(shape(nblocks), x.options().dtype(at::kFloat));
  const std::vector<int64_t> rrow = residual_rows(residual, rows, m, n, name);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "quantize_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* r = residual ? residual->data_ptr<scalar_t>() : nullptr;
    uint8_t* pk = packed.data_ptr<uint8_t>();
    float* sc = scales.data_ptr<float>();
    if (block <= kChunk) {
      // every row's work items in one parallel region, evenly over the threads (rows
      // over threads would leave one thread idle for a row when m is odd); an item's bits
      // do not depend on which region or thread runs it
      const int64_t groups = small_block_groups(n, block);
      at::parallel_for(0, m * groups, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t i = t / groups;
          const auto pi = policy(i);
          if (r) quantize_group<true>(xp + i * n, r + rrow[i] * n, n, block, pi, pk + i * nbytes, sc + i * nblocks, t % groups);
          else quantize_group<false>(xp + i * n, r, n, block, pi, pk + i * nbytes, sc + i * nblocks, t % groups);
        }
      });
      return;
    }
    for_rows(m, [&](int64_t i) {
      if (r) quantize_large_blocks<true>(xp + i * n, r + rrow[i] * n, n, block, policy(i), pk + i * nbytes, sc + i * nblocks);
      else quantize_large_blocks<false>(xp + i * n, r, n, block, policy(i), pk + i * nbytes, sc + i * nblocks);
    });
  });
  return {packed, scales};
}

template <typename Policy>
void check_stream(const Tensor& packed, const Tensor& scales, int64_t numel, int64_t block, const Policy& p) {
  TORCH_CHECK(block >= 1 && packed.is_contiguous() && scales.is_contiguous() &&
                  packed.numel() == ceil_div(numel * p.bits(), 8) && scales.numel() == ceil_div(numel, block),
              "fedcomp: packed/scales length does not match numel");
}

template <typename Policy>
Tensor dequantize_cpu(const Tensor& packed, const Tensor& scales, int64_t numel, int64_t block,
                      const Policy& p) {
  check_stream(packed, scales, numel, block, p);
  Tensor out = at::empty({numel}, scales.options().dtype(at::kFloat));
  dequantize_blocks(packed.const_data_ptr<uint8_t>(), scales.const_data_ptr<float>(), numel, block, p,
                    DecodeStore{out.data_ptr<float>()});
  return out;
}

// out += alphas[j] * decode(payload j) for j = 0, 1, ... in one parallel region: each work item
// of kDecodeChunk entries adds every payload in turn, so `out` is read and written once for all
// of them (from cache after the first) and each entry receives the same additions, in the same
// order, as m accumulate_cpu calls: the same bits. Traffic: w/8 B of codes per payload and entry,
// 8 B of out per entry (m separate calls: 8 B of out per payload and entry).
template <typename Policy>
void accumulate_many_cpu(const Tensor& out, at::TensorList packed, at::TensorList scales, int64_t block,
                         at::ArrayRef<double> alphas, const Policy& p, const char* name) {
  TORCH_CHECK(out.dim() == 1 && out.is_contiguous() && out.scalar_type() == at::kFloat, "fedcomp::", name,
              ": out must be a contiguous 1-D float32 tensor");
  const size_t m = packed.size();
  TORCH_CHECK(scales.size() == m && alphas.size() == m, "fedcomp::", name,
              ": packed, scales and alphas must have one entry per payload");
  std::vector<const uint8_t*> pk(m);
  std::vector<const float*> sc(m);
  for (size_t j = 0; j < m; ++j) {
    check_stream(packed[j], scales[j], out.numel(), block, p);
    pk[j] = packed[j].const_data_ptr<uint8_t>();
    sc[j] = scales[j].const_data_ptr<float>();
  }
  float* o = out.data_ptr<float>();
  for_chunks(out.numel(), kDecodeChunk, [&](int64_t, int64_t b, int64_t e) {
    for (size_t j = 0; j < m; ++j)
      dequantize_range(pk[j], sc[j], b, e, block, p, AccumulateStore{o, static_cast<float>(alphas[j])});
  });
}

// out += alpha * decode, in one pass over the codes (no dense temporary). Traffic: reads w/8 B of
// codes and 4 B of out, writes 4 B per element.
template <typename Policy>
void accumulate_cpu(const Tensor& out, const Tensor& packed, const Tensor& scales, int64_t block, double alpha,
                    const Policy& p, const char* name) {
  accumulate_many_cpu(out, {packed}, {scales}, block, {alpha}, p, name);
}

}  // namespace fedcomp::cpu
