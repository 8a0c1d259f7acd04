// CPU kernels of rand-k (fedcomp::randk_positions, randk_ef_rows). Argument checking that users see (ValueError/TypeError naming the
// argument) happens in fedcomp/ops.py; the TORCH_CHECKs here guard the kernels against direct
// torch.ops calls.

#include "common.h"
#include "ops.h"

namespace fedcomp::cpu {
namespace {

using at::Tensor;

// ===========================================================================
// randk_positions: the first k values of a 4-round Feistel permutation of
// [0, 2^(2h)) (h = half the bits of n) that fall in [0, n), sorted; the same
// integer arithmetic as fedcomp/reference.py (products stay below 2^62).
// The permutation is evaluated 64 values at a time in a loop that vectorises
// (each product is 31 x 32 bits: one 32x32 -> 64 multiply, in an AVX2 clone
// where the CPU has it); the picks are sorted through a bitmap of [0, n) when
// that is small next to k, else by std::sort.
// ===========================================================================
inline uint64_t feistel_round(uint64_t r, uint64_t key, uint64_t mask) {
  constexpr uint64_t kM31 = (uint64_t{1} << 31) - 1, kM62 = (uint64_t{1} << 62) - 1;
  uint64_t h = (static_cast<uint64_t>(static_cast<uint32_t>((r ^ key) & kM31)) * 0x5BD1E995u) & kM62;
  h ^= h >> 29;
  h = (static_cast<uint64_t>(static_cast<uint32_t>(h & kM31)) * 0x2C1B3C6Du) & kM62;
  return (h ^ (h >> 31)) & mask;
}

constexpr int kFeistelBlock = 64;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void feistel_block(uint64_t v0, int half, uint64_t mask, const uint64_t* key, uint64_t* w) {
  for (int j = 0; j < kFeistelBlock; ++j) {
    const uint64_t v = v0 + static_cast<uint64_t>(j);
    uint64_t left = v >> half, right = v & mask;
    for (int r = 0; r < 4; ++r) {
      const uint64_t next = left ^ feistel_round(right, key[r], mask);
      left = right;
      right = next;
    }
    w[j] = (left << half) | right;
  }
}

// fedcomp._host.splitmix64: a 63-bit value for `counter` of the stream keyed by `seed` (the
// SplitMix64 finaliser; every product wraps mod 2^64, as the Python masks it).
inline uint64_t splitmix64(uint64_t seed, uint64_t counter) {
  uint64_t z = seed * 0x9E3779B97F4A7C15ull + (counter + 1) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return (z ^ (z >> 31)) >> 1;
}

// The k positions for one row's four round keys, written sorted to o[0, k).
void randk_positions_into(const int64_t* round_keys, int64_t k, int64_t n, int64_t* o) {
  uint64_t key[4];
  for (int r = 0; r < 4; ++r) key[r] = static_cast<uint64_t>(round_keys[r]);
  const uint64_t top = static_cast<uint64_t>(std::max<int64_t>(n - 1, 1));
  const int half = std::max(1, (64 - __builtin_clzll(top) + 1) / 2);
  const uint64_t mask = (uint64_t{1} << half) - 1;
  const int64_t words = ceil_div(n, 64);
  const bool bitmap = words <= 16 * k + 4096;
  std::vector<uint64_t> bits(bitmap ? words : 0, 0);
  uint64_t w[kFeistelBlock];
  int64_t found = 0;
  // A permutation of [0, 2^(2h)) covers [0, n), so this ends before v leaves the domain (values
  // past the k-th pick in the last block are computed and ignored).
  for (uint64_t v = 0; found < k; v += kFeistelBlock) {
    feistel_block(v, half, mask, key, w);
    for (int j = 0; j < kFeistelBlock && found < k; ++j) {
      if (w[j] >= static_cast<uint64_t>(n)) continue;
      if (bitmap) bits[w[j] >> 6] |= uint64_t{1} << (w[j] & 63);
      else o[found] = static_cast<int64_t>(w[j]);
      ++found;
    }
  }
  if (!bitmap) {
    std::sort(o, o + k);
    return;
  }
  int64_t pos = 0;
  for (int64_t i = 0; i < words && pos < k; ++i)
    for (uint64_t b = bits[i]; b; b &= b - 1) o[pos++] = i * 64 + __builtin_ctzll(b);
}

}  // namespace

Tensor randk_positions_cpu(const Tensor& round_keys, int64_t k, int64_t n) {
  TORCH_CHECK(round_keys.dim() == 1 && round_keys.numel() == 4 && round_keys.scalar_type() == at::kLong &&
                  k >= 0 && k <= n && n < (int64_t{1} << 62),
              "fedcomp::randk_positions: round_keys must be [4] int64 and 0 <= k <= n < 2^62");
  const Tensor keys = round_keys.contiguous();
  Tensor out = at::empty({k}, keys.options());
  randk_positions_into(keys.const_data_ptr<int64_t>(), k, n, out.data_ptr<int64_t>());
  return out;
}

// randk_ef_rows: per row i, the positions of seeds[i] (round keys splitmix64(seed, 0..3), as
// fedcomp._host.round_keys), a = x[i] + residual row (rounded to x's dtype, stored in the row),
// values = a[positions], then the positions zeroed: the rand-k compressor's steps in one call
// for all rows (one parallel region over rows, or over the add when there are fewer rows than
// threads).
std::tuple<Tensor, Tensor> randk_ef_rows_cpu(const Tensor& x, const std::optional<Tensor>& residual,
                                             at::IntArrayRef seeds, int64_t k, at::OptionalIntArrayRef rows) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "fedcomp::randk_ef_rows: x must be 2-D contiguous");
  const int64_t m = x.size(0), n = x.size(1);
  TORCH_CHECK(static_cast<int64_t>(seeds.size()) == m && k >= 0 && k <= n,
              "fedcomp::randk_ef_rows: seeds must hold one seed per row of x and 0 <= k <= n");
  std::vector<int64_t> keys(4 * m);
  for (int64_t i = 0; i < m; ++i) {
    TORCH_CHECK(seeds[i] >= 0, "fedcomp::randk_ef_rows: seeds must be in [0, 2^63)");
    for (int r = 0; r < 4; ++r)
      keys[4 * i + r] = static_cast<int64_t>(splitmix64(static_cast<uint64_t>(seeds[i]), static_cast<uint64_t>(r)));
  }
  Tensor values = at::empty({m, k}, x.options());
  Tensor positions = at::empty({m, k}, x.options().dtype(at::kLong));
  const std::vector<int64_t> rrow = residual_rows(residual, rows, m, n, "randk_ef_rows");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "randk_ef_rows_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* r = residual ? residual->data_ptr<scalar_t>() : nullptr;
    scalar_t* v = values.data_ptr<scalar_t>();
    int64_t* pos = positions.data_ptr<int64_t>();
    const int64_t* kp = keys.data();
    for_rows(m, [&](int64_t i) {  // rows in parallel, or (fewer rows than threads) the add
      int64_t* p = pos + i * k;
      randk_positions_into(kp + 4 * i, k, n, p);
      const scalar_t* xi = xp + i * n;
      scalar_t* vi = v + i * k;
      if (!r) {
        for (int64_t j = 0; j < k; ++j) vi[j] = xi[p[j]];
        return;
      }
      scalar_t* ri = r + rrow[i] * n;
      for_chunks(n, kChunk, [&](int64_t, int64_t b, int64_t e) {
        for (int64_t j = b; j < e; ++j) ri[j] = static_cast<scalar_t>(to_f(xi[j]) + to_f(ri[j]));
      });
      for (int64_t j = 0; j < k; ++j) {
        vi[j] = ri[p[j]];
        ri[p[j]] = static_cast<scalar_t>(0);
      }
    });
  });
  return {values, positions};
}

}  // namespace fedcomp::cpu
