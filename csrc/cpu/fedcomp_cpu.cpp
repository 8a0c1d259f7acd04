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
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>
#include <type_traits>
#include <vector>

#include "../common/fedcomp_math.h"

namespace fedcomp {
namespace {

using at::Tensor;

constexpr int64_t kChunk = 1 << 16;  // elements per work item
// Work items of the decodes (sign/qsgd decode and accumulate), whose entries are independent
// (any split gives the same bits): small enough that one client's model of a few 10^4
// entries, aggregated on the server, already spreads over the threads.
constexpr int64_t kDecodeChunk = 1 << 13;

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
template <bool kL2>
struct SignPolicy {
  static constexpr int bits() { return 1; }
  static constexpr bool kAux = false;
  static double term(float a) { return kL2 ? static_cast<double>(a) * a : std::fabs(static_cast<double>(a)); }
  static float finish(double s, int64_t cnt) {
    return kL2 ? static_cast<float>(std::sqrt(s / cnt)) : static_cast<float>(s / cnt);
  }
  static uint32_t code(float a, float /*scale*/, float /*aux*/) { return sign_code(a); }
  static float value(uint32_t c, float scale) { return sign_value(c, scale); }
};

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

struct QsgdPolicy {
  int levels;
  int width;
  uint64_t seed;
  static constexpr bool kAux = true;
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
};

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

template <bool kEF, typename scalar_t>
inline float load_a(const scalar_t* x, const scalar_t* r, int64_t i) {
  if constexpr (kEF) return to_f(x[i]) + to_f(r[i]);
  else return to_f(x[i]);
}

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
    if constexpr (std::is_same_v<Policy, QsgdPolicy> && std::is_same_v<scalar_t, float>) {
      qsgd_codes_f32(x + s, kEF ? r + s : nullptr, t - s, scale, p.levels, aux, codes);
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

// ===========================================================================
// Many clients at once: x and residual are [m, n] stacks and each row gets
// exactly the 1-D op. With at least as many rows as threads, the rows are the
// one parallel region (the kernels' own parallel_for calls then run inline,
// serially, inside it); with fewer, rows run one after another, each parallel
// inside. Chunking never depends on the thread count, so both give the same
// bits as m separate calls.
// ===========================================================================
template <typename F>
void for_rows(int64_t m, const F& row) {
  if (m >= at::get_num_threads()) {
    at::parallel_for(0, m, 1, [&](int64_t r0, int64_t r1) {
      for (int64_t i = r0; i < r1; ++i) row(i);
    });
  } else {
    for (int64_t i = 0; i < m; ++i) row(i);
  }
}

// The residual row of x's row i: rows[i] of a [K, n] residual when `rows` is given (the
// residuals of many keys kept in one buffer), else row i. Python checks that the rows are
// distinct; here, their count and range.
inline std::vector<int64_t> residual_rows(const std::optional<Tensor>& residual, at::OptionalIntArrayRef rows,
                                          int64_t m, int64_t n, const char* name) {
  std::vector<int64_t> out(m);
  for (int64_t i = 0; i < m; ++i) out[i] = i;
  if (!rows.has_value() || !residual) return out;
  TORCH_CHECK(static_cast<int64_t>(rows->size()) == m && residual->dim() == 2 && residual->size(1) == n &&
                  residual->is_contiguous(),
              "fedcomp::", name, ": with rows, residual must be a contiguous [K, n] tensor and rows hold one "
              "entry per row of x");
  for (int64_t i = 0; i < m; ++i) {
    out[i] = (*rows)[i];
    TORCH_CHECK(out[i] >= 0 && out[i] < residual->size(0), "fedcomp::", name, ": rows entry ", out[i],
                " out of range [0, ", residual->size(0), ")");
  }
  return out;
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

void sign_accumulate_many_cpu(const Tensor& out, at::TensorList packed, at::TensorList scales, int64_t block,
                              at::ArrayRef<double> alphas) {
  accumulate_many_cpu(out, packed, scales, block, alphas, SignPolicy<false>{}, "sign_accumulate_many");
}

void qsgd_accumulate_many_cpu(const Tensor& out, at::TensorList packed, at::TensorList norms, int64_t levels,
                              int64_t bucket, at::ArrayRef<double> alphas) {
  const int lv = static_cast<int>(levels);
  accumulate_many_cpu(out, packed, norms, bucket, alphas, QsgdPolicy{lv, qsgd_bits(lv), 0}, "qsgd_accumulate_many");
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
// sparse_accumulate: out[idx] += alpha * v, with no atomics, and duplicates
// accumulated in list order, as a serial loop would. Sorted indices (top-k
// and rand-k payloads) are split into equal runs of the list, each cut moved
// past a run of equal indices, so the work items touch disjoint entries.
// Otherwise each work item owns a slice of `out` and applies, in list order,
// the entries that fall in it.
// ===========================================================================
template <typename val_t, typename index_t>
void sparse_accumulate_impl(float* out, int64_t n, const index_t* idx, const val_t* val, int64_t m,
                            float alpha) {
  bool ascending = true;
  for (int64_t j = 0; j < m; ++j) {
    TORCH_CHECK_INDEX(idx[j] >= 0 && idx[j] < n, "fedcomp::sparse_accumulate: indices must lie in [0, ",
                      n, "), got ", static_cast<int64_t>(idx[j]), " at position ", j);
    ascending &= j == 0 || idx[j - 1] <= idx[j];
  }
  auto add = [&](int64_t j) { out[idx[j]] = out[idx[j]] + alpha * to_f(val[j]); };
  if (ascending) {
    const int64_t parts = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, m >> 12));
    std::vector<int64_t> cut(parts + 1, m);
    cut[0] = 0;
    for (int64_t p = 1; p < parts; ++p) {
      int64_t j = std::max(cut[p - 1], m * p / parts);
      while (j > 0 && j < m && idx[j] == idx[j - 1]) ++j;
      cut[p] = j;
    }
    at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        for (int64_t j = cut[p]; j < cut[p + 1]; ++j) add(j);
    });
    return;
  }
  // Every slice scans the whole list, so fan out only when the list is long.
  const int64_t slices = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, m >> 18));
  const int64_t width = ceil_div(n, slices);
  at::parallel_for(0, slices, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      const int64_t lo = s * width, hi = lo + width;
      for (int64_t j = 0; j < m; ++j)
        if (idx[j] >= lo && idx[j] < hi) add(j);
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

// fedcomp.wire.splitmix64: a 63-bit value for `counter` of the stream keyed by `seed` (the
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
// fedcomp.wire.round_keys), a = x[i] + residual row (rounded to x's dtype, stored in the row),
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

}  // namespace

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

}  // namespace fedcomp
