// CPU kernels of top-k with error feedback (fedcomp::topk_ef, topk_ef_rows, topk_threshold_ef). Argument checking that users see (ValueError/TypeError naming the
// argument) happens in fedcomp/ops.py; the TORCH_CHECKs here guard the kernels against direct
// torch.ops calls.

#include <array>
#include <atomic>
#include <cstring>

#include "common.h"
#include "ops.h"

namespace fedcomp::cpu {
namespace {

using at::Tensor;

// ===========================================================================
// topk_ef: exact top-k by |a| with ties to the lower index, indices ascending.
//
// key = abs_key(a) (31 bits). Passes over memory (reading `a` means reading
// the residual buffer, which holds a after pass 1):
//   1. a = x + r, written back into r, and (n >= 2^14) the keys of every
//      16th entry, read back from L1, with a histogram of their top 11 bits
//      (2048 bins).
//      From this sample, a key lo_key low enough that, with a wide margin, at
//      least k entries lie at or above it.
//   2. one read of a that lists (key, index) of the entries at or above
//      lo_key, in index order (per chunk; the test of every key is
//      vectorised into byte flags, read back 8 at a time). If the list holds at least k entries,
//      the exact answer is in it: histograms of the listed keys, one radix
//      digit at a time, fix the k-th largest key, and one walk of the list
//      writes the output, sorted by index, and zeroes the picked entries of
//      r. Total: the add plus one read.
//   Fallback (the sample misled, k is a large share of n, or the list would
//   exceed candidate_cap(n), e.g. many equal magnitudes): the exact
//   histogram of every key, then one gather read as above, or, when the
//   boundary bin is itself too large, 10-bit histograms of the next key
//   digits among the keys that share the prefix (up to two reads) and one
//   compaction read whose per-chunk output offsets come from the histograms.
// The sample only decides how much work is done, never which entries are
// picked, so the result is exact and the same for any data order or thread
// count. Temporaries: 2048 counters per 64K-element chunk, n/16 sampled
// keys, buffers of size <= k, and a candidate list of at most
// candidate_cap(n) = n/32 + 64K entries (plus one chunk per thread); never a
// copy of x.
// ===========================================================================
constexpr int kTopBins = 2048;  // first digit: key >> 20

inline int64_t candidate_cap(int64_t n) { return n / 32 + 65536; }

// Per-digit totals over all chunks of the per-chunk histograms (row stride kTopBins).
inline std::vector<int64_t> column_totals(const std::vector<uint32_t>& hist, int64_t nchunks, int bins) {
  std::vector<int64_t> total(bins, 0);
  for (int64_t c = 0; c < nchunks; ++c)
    for (int d = 0; d < bins; ++d) total[d] += hist[c * kTopBins + d];
  return total;
}

// Chosen digit of a histogram: the highest bin `d` with
// count(bins > d) < need <= count(bins >= d). Updates need to the number
// still to take from bin d.
inline int pick_digit(const std::vector<int64_t>& total, int64_t& need) {
  int digit = static_cast<int>(total.size()) - 1;
  while (total[digit] < need) need -= total[digit--];
  return digit;
}

template <typename scalar_t, typename index_t>
void topk_multilevel(const scalar_t* a, scalar_t* r, int64_t n, int64_t need, uint32_t prefix,
                     std::vector<uint32_t>& hist, std::vector<int64_t>& above, scalar_t* out_v,
                     index_t* out_i) {
  const int64_t nchunks = ceil_div(n, kChunk);
  int shift = 20;
  bool split_ties = false;  // the full key is fixed and ties remain
  for (int dshift : {10, 0}) {
    std::fill(hist.begin(), hist.end(), 0u);
    const int pshift = shift;
    for_chunks(n, kChunk, [&](int64_t c, int64_t b, int64_t e) {
      uint32_t* h = hist.data() + c * kTopBins;
      for (int64_t i = b; i < e; ++i) {
        const uint32_t key = abs_key(to_f(a[i]));
        if ((key >> pshift) == prefix) ++h[(key >> dshift) & 1023];
      }
    });
    const std::vector<int64_t> total = column_totals(hist, nchunks, 1024);
    const int digit = pick_digit(total, need);
    for (int64_t c = 0; c < nchunks; ++c)
      for (int d = digit + 1; d < 1024; ++d) above[c] += hist[c * kTopBins + d];
    prefix = (prefix << 10) | static_cast<uint32_t>(digit);
    shift = dshift;
    if (need == total[digit]) {  // the whole bin is taken: no ties to split
      for (int64_t c = 0; c < nchunks; ++c) above[c] += hist[c * kTopBins + digit];
      break;
    }
    split_ties = dshift == 0;
  }
  // Each chunk's share of the tied keys (key == prefix) in index order, and
  // its output offset.
  std::vector<int64_t> ties(nchunks, 0), offset(nchunks + 1, 0);
  int64_t left = split_ties ? need : 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    ties[c] = std::min<int64_t>(left, hist[c * kTopBins + (prefix & 1023)]);
    left -= ties[c];
    offset[c + 1] = offset[c] + above[c] + ties[c];
  }
  // Picked: key > gt, or key == eq for the chunk's first ties[c] such keys.
  const int64_t lo = static_cast<int64_t>(prefix) << shift;
  const int64_t gt = split_ties ? lo : lo - 1;
  const int64_t eq = split_ties ? lo : -1;
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

// flag[j] = abs_key(a[j]) >= lo_key for fp32 entries: a loop that vectorises, in an AVX2 clone
// where the CPU has it (pass 2 of topk_ef tests every entry of the input).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void key_flags_f32(const float* a, int64_t len, uint32_t lo_key, uint8_t* flag) {
  for (int64_t j = 0; j < len; ++j) flag[j] = abs_key(a[j]) >= lo_key;
}

constexpr int64_t kSampleStride = 16;     // pass 1 histograms every 16th entry ...
constexpr int64_t kSampleMinN = 1 << 14;  // ... when n is at least this

// The sampled path's pass 2 and selection: the exact top-k among the entries
// with key >= lo_key, written to out_v/out_i with the picks zeroed in r.
// Returns false, having written nothing, when fewer than k entries or more
// than candidate_cap(n) lie at or above lo_key.
template <typename scalar_t, typename index_t>
bool topk_from_candidates(const scalar_t* a, scalar_t* r, int64_t n, int64_t k, uint32_t lo_key,
                          int64_t expected, scalar_t* out_v, index_t* out_i) {
  const int64_t nchunks = ceil_div(n, kChunk);
  const int64_t cap = candidate_cap(n);
  // Per chunk, in index order: key << 32 | (index - chunk start).
  std::vector<std::vector<uint64_t>> list(nchunks);
  std::atomic<int64_t> listed{0};
  std::atomic<bool> over{false};
  for_chunks(n, kChunk, [&](int64_t c, int64_t b, int64_t e) {
    if (over.load(std::memory_order_relaxed)) return;
    std::vector<uint64_t>& out = list[c];
    out.reserve(static_cast<size_t>(std::min<int64_t>(e - b, 2 * expected / nchunks + 64)));
    // Per sub-block: the test of every key as a byte flag (vectorised), then
    // 8 flags at a time as one word; most words are zero.
    alignas(64) uint8_t flag[1024 + 8];
    for (int64_t s = b; s < e; s += 1024) {
      const int64_t len = std::min<int64_t>(e - s, 1024);
      if constexpr (std::is_same_v<scalar_t, float>) {
        key_flags_f32(a + s, len, lo_key, flag);
      } else {
        for (int64_t j = 0; j < len; ++j) flag[j] = abs_key(to_f(a[s + j])) >= lo_key;
      }
      std::memset(flag + len, 0, 8);
      for (int64_t g = 0; g < len; g += 8) {
        uint64_t word;
        std::memcpy(&word, flag + g, 8);
        for (; word; word &= word - 1) {  // each flag byte is 0 or 1: its lowest bit is bit 8j
          const int64_t i = s + g + __builtin_ctzll(word) / 8;
          out.push_back(static_cast<uint64_t>(abs_key(to_f(a[i]))) << 32 | static_cast<uint64_t>(i - b));
        }
      }
    }
    if (listed.fetch_add(static_cast<int64_t>(out.size())) + static_cast<int64_t>(out.size()) > cap) over = true;
  });
  if (over || listed.load() < k) return false;

  // The k-th largest listed key T, one radix digit at a time (11, 10, 10
  // bits) over the keys still in play: all keys > T and the first (by index)
  // `ties` keys == T are picked.
  std::vector<uint32_t> keys;
  keys.reserve(static_cast<size_t>(listed.load()));
  for (const auto& l : list)
    for (uint64_t v : l) keys.push_back(static_cast<uint32_t>(v >> 32));
  int64_t need = k;
  uint32_t threshold = 0;
  for (const auto [shift, bins] : {std::pair{20, kTopBins}, std::pair{10, 1024}, std::pair{0, 1024}}) {
    std::vector<int64_t> count(bins, 0);
    for (uint32_t key : keys) ++count[(key >> shift) & (bins - 1)];
    const uint32_t digit = static_cast<uint32_t>(pick_digit(count, need));
    threshold |= digit << shift;
    keys.erase(std::remove_if(keys.begin(), keys.end(),
                              [&](uint32_t key) { return ((key >> shift) & (bins - 1)) != digit; }),
               keys.end());
  }
  int64_t ties = need;

  // Each chunk's output offset and share of the ties, then the output in
  // parallel: the list is in index order, so the output is too.
  std::vector<int64_t> offset(nchunks + 1, 0), tie_share(nchunks, 0), gt(nchunks, 0), eq(nchunks, 0);
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      for (uint64_t v : list[c]) {
        const uint32_t key = static_cast<uint32_t>(v >> 32);
        gt[c] += key > threshold;
        eq[c] += key == threshold;
      }
  });
  for (int64_t c = 0; c < nchunks; ++c) {
    tie_share[c] = std::min(ties, eq[c]);
    ties -= tie_share[c];
    offset[c + 1] = offset[c] + gt[c] + tie_share[c];
  }
  at::parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      int64_t pos = offset[c], tie_left = tie_share[c];
      const int64_t b = c * kChunk;
      const std::vector<uint64_t>& l = list[c];
      for (size_t j = 0; j < l.size(); ++j) {
        // the picks are about 1 % of the entries, a cache line apiece: fetch ahead
        if (j + 16 < l.size()) __builtin_prefetch(a + b + static_cast<int64_t>(l[j + 16] & 0xffffffffu), 1);
        const uint64_t v = l[j];
        const uint32_t key = static_cast<uint32_t>(v >> 32);
        if (key < threshold || (key == threshold && tie_left-- <= 0)) continue;
        const int64_t i = b + static_cast<int64_t>(v & 0xffffffffu);
        out_v[pos] = a[i];
        out_i[pos++] = static_cast<index_t>(i);
        if (r) r[i] = static_cast<scalar_t>(0);
      }
    }
  });
  return true;
}

template <typename scalar_t, typename index_t>
void topk_ef_impl(const scalar_t* x, scalar_t* r, int64_t n, int64_t k, scalar_t* out_v,
                  index_t* out_i) {
  const int64_t nchunks = ceil_div(n, kChunk);
  std::vector<uint32_t> hist(static_cast<size_t>(nchunks) * kTopBins);
  const scalar_t* a = r ? r : x;

  // Pass 1: a = x + r (stored in r) and the histogram of key >> 20 (of every
  // kSampleStride-th entry when `sampled`). The add runs over sub-blocks
  // first so it vectorises; the histogram then reads the sub-block back from L1.
  const bool sampled = n >= kSampleMinN && 2 * k <= candidate_cap(n);
  const int64_t step = sampled ? kSampleStride : 1;
  std::vector<uint32_t> sample_keys(sampled && k > 0 ? ceil_div(n, kSampleStride) : 0);
  for_chunks(n, kChunk, [&](int64_t c, int64_t b, int64_t e) {
    uint32_t* h = hist.data() + c * kTopBins;
    for (int64_t s = b; s < e; s += 1024) {
      const int64_t t = std::min(e, s + 1024);
      if (r)
        for (int64_t i = s; i < t; ++i) r[i] = static_cast<scalar_t>(to_f(x[i]) + to_f(r[i]));
      if (k == 0) continue;
      for (int64_t i = s; i < t; i += step) {
        const uint32_t key = abs_key(to_f(a[i]));
        ++h[key >> 20];
        if (sampled) sample_keys[i / kSampleStride] = key;
      }
    }
  });
  if (k == 0) return;

  if (sampled) {
    // lo_key: the sample holds the share of k it should at or above it, plus
    // 4 standard deviations and 16. Its bin comes from the histogram, its
    // next 10 bits from the sampled keys in that bin. List from there if the
    // list is expected to fit.
    const std::vector<int64_t> sample = column_totals(hist, nchunks, kTopBins);
    const int64_t m = static_cast<int64_t>(sample_keys.size());
    const double expect = static_cast<double>(k) * static_cast<double>(m) / static_cast<double>(n);
    int64_t want = static_cast<int64_t>(std::ceil(expect + 4.0 * std::sqrt(expect) + 16.0));
    if (want <= m) {
      const int bin = pick_digit(sample, want);  // want: now the number still to take from `bin`
      // the next 10 bits of the sampled keys in `bin`: per work item, then summed in order
      const int64_t pieces = ceil_div(m, kChunk);
      std::vector<uint32_t> part(static_cast<size_t>(pieces) * 1024, 0u);
      for_chunks(m, kChunk, [&](int64_t q, int64_t b, int64_t e) {
        uint32_t* h = part.data() + q * 1024;
        for (int64_t j = b; j < e; ++j) {
          const uint32_t key = sample_keys[j];
          if ((key >> 20) == static_cast<uint32_t>(bin)) ++h[(key >> 10) & 1023];
        }
      });
      std::vector<int64_t> sub(1024, 0);
      for (int64_t q = 0; q < pieces; ++q)
        for (int d = 0; d < 1024; ++d) sub[d] += part[q * 1024 + d];
      int64_t in_sub = want;
      const int digit = pick_digit(sub, in_sub);
      int64_t listed = 0;  // sampled keys at or above lo_key
      for (int d = bin + 1; d < kTopBins; ++d) listed += sample[d];
      for (int d = digit; d < 1024; ++d) listed += sub[d];
      const int64_t expected = listed * (n / m + 1);
      const uint32_t lo_key = static_cast<uint32_t>(bin) << 20 | static_cast<uint32_t>(digit) << 10;
      if (expected <= candidate_cap(n) && topk_from_candidates(a, r, n, k, lo_key, expected, out_v, out_i)) return;
    }
    // The sample misled: the exact histogram of every key (one more read).
    std::fill(hist.begin(), hist.end(), 0u);
    for_chunks(n, kChunk, [&](int64_t c, int64_t b, int64_t e) {
      uint32_t* h = hist.data() + c * kTopBins;
      for (int64_t i = b; i < e; ++i) ++h[abs_key(to_f(a[i])) >> 20];
    });
  }

  const std::vector<int64_t> total = column_totals(hist, nchunks, kTopBins);
  int64_t need = k;
  const int top = pick_digit(total, need);
  std::vector<int64_t> above(nchunks, 0), in_bin(nchunks, 0);
  for (int64_t c = 0; c < nchunks; ++c) {
    for (int d = top + 1; d < kTopBins; ++d) above[c] += hist[c * kTopBins + d];
    in_bin[c] = hist[c * kTopBins + top];
  }
  const uint32_t ubin = static_cast<uint32_t>(top);
  if (total[top] > candidate_cap(n)) {
    topk_multilevel(a, r, n, need, ubin, hist, above, out_v, out_i);
    return;
  }

  // Pass 2: gather the certain picks (bins > top) and the candidates (bin top).
  const int64_t certain = k - need;
  std::vector<int64_t> sure_off(nchunks + 1, 0), cand_off(nchunks + 1, 0);
  for (int64_t c = 0; c < nchunks; ++c) {
    sure_off[c + 1] = sure_off[c] + above[c];
    cand_off[c + 1] = cand_off[c] + in_bin[c];
  }
  std::vector<scalar_t> sure_v(certain), cand_v(total[top]);
  std::vector<int64_t> sure_i(certain), cand_i(total[top]);
  std::vector<uint32_t> cand_key(total[top]);
  const uint32_t lo_key = ubin << 20;
  for_chunks(n, kChunk, [&](int64_t c, int64_t b, int64_t e) {
    int64_t ps = sure_off[c], pc = cand_off[c];
    auto visit = [&](int64_t i) {
      const uint32_t key = abs_key(to_f(a[i]));
      if (key < lo_key) return;
      if ((key >> 20) > ubin) {
        sure_v[ps] = a[i];
        sure_i[ps++] = i;
        if (r) r[i] = static_cast<scalar_t>(0);
      } else {
        cand_v[pc] = a[i];
        cand_key[pc] = key;
        cand_i[pc++] = i;
      }
    };
    int64_t i = b;
    for (; i + 8 <= e; i += 8) {  // branch-free test of 8 keys; most groups hold none
      uint32_t hit = 0;
      for (int j = 0; j < 8; ++j) hit |= abs_key(to_f(a[i + j])) >= lo_key;
      if (hit)
        for (int j = 0; j < 8; ++j) visit(i + j);
    }
    for (; i < e; ++i) visit(i);
  });

  // Threshold among the candidates: the need-th largest key T; all keys > T
  // and the first (by index) `ties` keys == T are picked.
  std::vector<uint32_t> sorted_keys(cand_key);
  std::nth_element(sorted_keys.begin(), sorted_keys.begin() + (need - 1), sorted_keys.end(),
                   std::greater<>());
  const uint32_t threshold = sorted_keys[need - 1];
  int64_t ties = need;
  for (uint32_t key : cand_key) ties -= key > threshold;

  // Merge the two index-sorted lists into the output.
  int64_t ps = 0, pos = 0;
  for (size_t j = 0; j < cand_key.size(); ++j) {
    const bool picked = cand_key[j] > threshold || (cand_key[j] == threshold && ties-- > 0);
    if (!picked) continue;
    const int64_t i = cand_i[j];
    for (; ps < certain && sure_i[ps] < i; ++ps, ++pos) {
      out_v[pos] = sure_v[ps];
      out_i[pos] = static_cast<index_t>(sure_i[ps]);
    }
    out_v[pos] = cand_v[j];
    out_i[pos++] = static_cast<index_t>(i);
    if (r) r[i] = static_cast<scalar_t>(0);
  }
  for (; ps < certain; ++ps, ++pos) {
    out_v[pos] = sure_v[ps];
    out_i[pos] = static_cast<index_t>(sure_i[ps]);
  }
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

}  // namespace

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

// x is [n] (one client, the kernel parallel inside) or [m, n] (one row per client; the
// residual of row i is row rows[i] of residual when rows is given).
std::tuple<Tensor, Tensor> topk_ef_rows_cpu(const Tensor& x, const std::optional<Tensor>& residual, int64_t k,
                                            at::ScalarType index_dtype, at::OptionalIntArrayRef rows) {
  TORCH_CHECK((x.dim() == 1 || x.dim() == 2) && x.is_contiguous(), "fedcomp::topk_ef: x must be 1-D or 2-D contiguous");
  const bool stacked = x.dim() == 2;
  const int64_t m = stacked ? x.size(0) : 1, n = x.size(-1);
  TORCH_CHECK(k >= 0 && k <= n, "fedcomp::topk_ef: k out of range");
  const auto shape = stacked ? std::vector<int64_t>{m, k} : std::vector<int64_t>{k};
  Tensor values = at::empty(shape, x.options());
  Tensor indices = at::empty(shape, x.options().dtype(index_dtype));
  const std::vector<int64_t> rrow = residual_rows(residual, rows, m, n, "topk_ef_rows");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "topk_ef_cpu", [&] {
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* r = residual ? residual->data_ptr<scalar_t>() : nullptr;
    scalar_t* v = values.data_ptr<scalar_t>();
    for_rows(m, [&](int64_t i) {
      scalar_t* ri = r ? r + rrow[i] * n : nullptr;
      if (index_dtype == at::kInt)
        topk_ef_impl<scalar_t, int32_t>(xp + i * n, ri, n, k, v + i * k, indices.data_ptr<int32_t>() + i * k);
      else
        topk_ef_impl<scalar_t, int64_t>(xp + i * n, ri, n, k, v + i * k, indices.data_ptr<int64_t>() + i * k);
    });
  });
  return {values, indices};
}

std::tuple<Tensor, Tensor> topk_ef_cpu(const Tensor& x, const std::optional<Tensor>& residual, int64_t k,
                                       at::ScalarType index_dtype) {
  return topk_ef_rows_cpu(x, residual, k, index_dtype, std::nullopt);
}

}  // namespace fedcomp::cpu
