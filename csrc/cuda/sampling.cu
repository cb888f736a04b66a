// Next-token sampling on the GPU (core/engine_ops.h's SampleTokensArgs): for each active
// row, what model::sample_token_with_draw does on the CPU (model/sampling.h) with the
// draw u = uniforms[r] made by the caller's host Rng, plus the token's log-prob under the
// raw row (temperature 1, no penalty). Failures become the row's status, never an abort.
//
// One block of kSampleThreads threads per row (grid-striding over rows). Per row, every
// pass reads the row with thread t taking columns t, t + B, t + 2B, ... (B = block size):
//   1. the raw row: NaN/+inf check and max; then sum exp(x - max) in double for the
//      log-sum-exp (and, when the repetition penalty applies, a copy into scratch);
//   2. the penalty: thread j takes penalized entries j, j + B, ... and writes
//      scratch[id] = penalize(raw[id]). Computed from the raw value, the write is the
//      same however often the id repeats, so each distinct id is penalized once with no
//      deduplication (and no O(n^2) search for earlier repeats);
//   3. the penalized row's max and argmax (greedy ends here);
//   4. weights w_i = fast_exp((l_i - m) / T), computed as the CPU computes them (the same
//      float operations, none contracted into an FMA, so the weights are bit-identical),
//      summed in double; then one of two samplers:
//      - no truncation (top_k off, top_p == 1): inverse CDF over the ids in ascending
//        order. Warp w owns one contiguous segment of the row: a pass sums each segment
//        (giving each warp the mass before its segment), a second pass walks each
//        segment 32 ids at a time with a warp prefix scan and stops at the first id
//        whose running mass exceeds u * total. Two passes, no block barrier in the walk.
//      - top-k and/or top-p: the CPU walks the tokens in rank order (penalized logit
//        descending, ties lower id first). Every quantity it needs - the k-th token, the
//        nucleus boundary, the token where the cumulative mass exceeds u * kept - is "the
//        lowest-ranked token t whose upper set S(t) = {tokens ranked at or above t}
//        still has measure(S(t)) >= goal (or > goal)", measure being a count (top-k) or
//        the mass (top-p, the draw). The rank is one uint64 per token, (order-preserving
//        key of the logit) << 32 | (vocab - 1 - id), so the answer is found by a radix
//        search over that value, two bits per pass: each pass measures S for the three
//        candidate thresholds of the next digit in one read of the row. A pass also
//        counts the tokens left in the bracket the digits so far allow, and the search
//        stops as soon as one token remains: at most 16 + ceil(log2(vocab) / 2) passes
//        (16 for the logit's key, the rest only to break ties), usually fewer.
//
// Why a search instead of a sort: sorting 50k-256k (logit, id) pairs per row in one
// block needs the row plus its ids in a global buffer (scratch holds only the logits)
// and about log2(V)^2 / 2 block-wide merge steps, each with barriers; the search needs
// no extra memory, its passes are streaming reads of a row that stays in L2, and weights
// are only computed for tokens above the current threshold. The sums are deterministic:
// a measure is a per-thread sum in column order then a fixed shuffle tree, so the same
// set of tokens always gives the same double, which makes every measure monotone in the
// threshold and makes the search land exactly on a token.
//
// Costs per row (V = vocab, B = kSampleThreads): greedy 3 passes over the row (plus the
// penalty's O(n_penalized / B)); no truncation 5; with truncation 4 plus one search each
// for top-k (counting only, no exp), top-p and the draw. A pass is O(V / B) loads and
// compares per thread, the weights only for tokens above the current threshold, and one
// block reduction. Rows run in parallel, one block each.
//
// Agreement with the CPU: the same weights, ranking and rules (first token whose
// cumulative mass exceeds u * total; when rounding leaves none, the lowest-ranked kept
// token with a positive weight, or in ascending order the last id with one). The double
// sums are added in a different order than the CPU's, so a draw within ~1e-15 relative of
// a CDF boundary may pick the neighbouring token. -inf logits (weight 0) are never chosen.
// The draw is not checked on the device: u outside [0, 1) (which sample_token_with_draw
// rejects) still gives a token with a positive weight.
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <string>

#include "core/error.h"
#include "cuda/cuda_check.h"
#include "cuda/device_common.cuh"
#include "cuda/engine_kernels.h"

namespace ppo::cuda {
namespace {

// One block per row: 1024 threads (32 warps) so that a row gets a whole SM (batches of
// generation are small next to the SM count); launch bounds keep it at <= 64 registers.
constexpr int kSampleThreads = 1024;
constexpr int kSampleWarps = kSampleThreads / kWarpSize;
constexpr int64_t kMaxSampleBlocks = int64_t{1} << 20;

// ---- the CPU's weight, bit for bit ------------------------------------------------------

// cpu::fast_exp (cpu/vec_math.h) with each operation rounded as written (the __f*_rn
// intrinsics are never fused into FMAs), so it returns exactly the CPU's float.
__device__ __forceinline__ float fast_exp(float x) {
  const float kLog2e = 1.44269504088896341f;
  const float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  const bool underflow = x < -87.33654f;  // also true for -inf
  float xc = x > -87.33654f ? x : -87.33654f;
  xc = xc < 88.72283f ? xc : 88.72283f;
  const float kRound = 12582912.0f;
  const float n = __fsub_rn(__fadd_rn(__fmul_rn(xc, kLog2e), kRound), kRound);
  float r = __fsub_rn(xc, __fmul_rn(n, kLn2Hi));
  r = __fsub_rn(r, __fmul_rn(n, kLn2Lo));
  float p = 1.9875691500e-4f;
  p = __fadd_rn(__fmul_rn(p, r), 1.3981999507e-3f);
  p = __fadd_rn(__fmul_rn(p, r), 8.3334519073e-3f);
  p = __fadd_rn(__fmul_rn(p, r), 4.1665795894e-2f);
  p = __fadd_rn(__fmul_rn(p, r), 1.6666665459e-1f);
  p = __fadd_rn(__fmul_rn(p, r), 5.0000001201e-1f);
  p = __fadd_rn(__fadd_rn(__fmul_rn(__fmul_rn(p, r), r), r), 1.0f);  // p * r * r + r + 1
  const float scale = __int_as_float((static_cast<int>(n) + 127) << 23);
  const float result = underflow ? 0.0f : __fmul_rn(p, scale);
  return x != x ? x : result;
}

// w = exp((l - m) / T) as the CPU forms it: 1 at the max, 0 for -inf (and underflow).
__device__ __forceinline__ float weight(float l, float m, float T) {
  return fast_exp(__fdiv_rn(__fsub_rn(l, m), T));
}

// ---- the ranking ------------------------------------------------------------------------

// The rank of token i with penalized logit x as one integer: higher rank = earlier in the
// CPU's order (logit descending, lower id first among equal logits). High half: the
// float's order-preserving key (negative floats bit-inverted, positive ones with the sign
// bit set; -0 is folded onto +0 first since the two are equal logits); low half:
// vocab - 1 - i, so that among equal logits the lower id ranks higher. Distinct per token.
__device__ __forceinline__ uint64_t rank_of(float x, unsigned i, int vocab) {
  uint32_t bits = __float_as_uint(x);
  if ((bits << 1) == 0u) bits = 0u;  // -0 -> +0
  const uint32_t key = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(key) << 32) | (static_cast<unsigned>(vocab) - 1u - i);
}

__device__ __forceinline__ int id_of(uint64_t rank, int vocab) {
  return vocab - 1 - static_cast<int>(static_cast<uint32_t>(rank));
}

// ---- block reductions ---------------------------------------------------------------------

// The max logit and the lowest id holding it.
struct ArgMax {
  float value;
  int id;
};

// What one pass of the rank search measures.
struct PassTotals {
  double measure[3];               // measure of S(max(c_b, lo)) for the three thresholds
  unsigned long long bracket_min;  // lowest rank in the bracket (~0 when empty)
  unsigned bracket_count;          // tokens of the domain in the bracket
};

// __shfl_down_sync of each reduced type, member by member.
__device__ __forceinline__ double shfl_down(double v, int offset) {
  return __shfl_down_sync(kFullWarp, v, offset);
}
__device__ __forceinline__ float shfl_down(float v, int offset) {
  return __shfl_down_sync(kFullWarp, v, offset);
}
__device__ __forceinline__ unsigned long long shfl_down(unsigned long long v, int offset) {
  return __shfl_down_sync(kFullWarp, v, offset);
}
__device__ __forceinline__ ArgMax shfl_down(const ArgMax& v, int offset) {
  return ArgMax{__shfl_down_sync(kFullWarp, v.value, offset),
                __shfl_down_sync(kFullWarp, v.id, offset)};
}
__device__ __forceinline__ PassTotals shfl_down(const PassTotals& v, int offset) {
  PassTotals out;
#pragma unroll
  for (int k = 0; k < 3; ++k) out.measure[k] = __shfl_down_sync(kFullWarp, v.measure[k], offset);
  out.bracket_min = __shfl_down_sync(kFullWarp, v.bracket_min, offset);
  out.bracket_count = __shfl_down_sync(kFullWarp, v.bracket_count, offset);
  return out;
}

struct AddDouble {
  __device__ double operator()(double a, double b) const { return a + b; }
};
struct MaxFloat {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct MinRank {
  __device__ unsigned long long operator()(unsigned long long a, unsigned long long b) const {
    return a < b ? a : b;
  }
};
struct BetterOf {  // higher logit, then lower id
  __device__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    return (a.value > b.value || (a.value == b.value && a.id < b.id)) ? a : b;
  }
};
struct AddPassTotals {
  __device__ PassTotals operator()(const PassTotals& a, const PassTotals& b) const {
    PassTotals out;
#pragma unroll
    for (int k = 0; k < 3; ++k) out.measure[k] = a.measure[k] + b.measure[k];
    out.bracket_min = a.bracket_min < b.bracket_min ? a.bracket_min : b.bracket_min;
    out.bracket_count = a.bracket_count + b.bracket_count;
    return out;
  }
};

// Combines the values of all threads of the block in a fixed order (a shuffle tree per
// warp, then the warp totals in warp order) and returns the total to every thread, so
// the block can branch on it. Must be reached by every thread (it has two barriers);
// the second lets the caller reduce again right away. kSampleThreads is a multiple of 32.
template <typename T, typename Combine>
__device__ T block_reduce(T v, Combine combine) {
  __shared__ T warp_totals[kSampleWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = combine(v, shfl_down(v, offset));
  }
  if (lane == 0) warp_totals[warp] = v;
  __syncthreads();
  T total = warp_totals[0];
#pragma unroll 1
  for (int w = 1; w < kSampleWarps; ++w) total = combine(total, warp_totals[w]);
  __syncthreads();  // warp_totals is rewritten by the next reduction
  return total;
}

// ---- the rank search ----------------------------------------------------------------------

// One read of the row. The domain is {rank >= lo}. measure[b] sums, over the domain
// tokens with rank >= c[b] (c[0] <= c[1] <= c[2]), 1 (kCount) or the weight, in column
// order per thread then block_reduce's fixed tree: the same set always gives the same
// double (adding 0.0 for a token outside the set changes nothing), so the measures of
// the search are consistent across passes and monotone in the threshold. The bracket is
// [bracket_lo, bracket_lo + bracket_span].
template <bool kCount>
__device__ PassTotals rank_pass(const float* l, int vocab, float m, float T, uint64_t lo,
                                uint64_t bracket_lo, uint64_t bracket_span, uint64_t c0,
                                uint64_t c1, uint64_t c2) {
  PassTotals t;
  t.measure[0] = t.measure[1] = t.measure[2] = 0.0;
  t.bracket_min = ~0ull;
  t.bracket_count = 0;
  for (unsigned i = threadIdx.x; i < static_cast<unsigned>(vocab); i += kSampleThreads) {
    const float x = l[i];
    const uint64_t rank = rank_of(x, i, vocab);
    if (rank < lo || rank < bracket_lo) continue;  // in no set this pass measures
    if (rank - bracket_lo <= bracket_span) {
      ++t.bracket_count;
      t.bracket_min = rank < t.bracket_min ? rank : t.bracket_min;
    }
    if (rank >= c0) {  // the weight only for tokens that count (few, late in a search)
      const double v = kCount ? 1.0 : static_cast<double>(weight(x, m, T));
      t.measure[0] += v;
      if (rank >= c1) t.measure[1] += v;
      if (rank >= c2) t.measure[2] += v;
    }
  }
  return block_reduce(t, AddPassTotals{});
}

// measure of the whole domain {rank >= lo}, by the same arithmetic as the search's.
template <bool kCount>
__device__ double domain_measure(const float* l, int vocab, float m, float T, uint64_t lo) {
  return rank_pass<kCount>(l, vocab, m, T, lo, 0, ~0ull, lo, lo, lo).measure[0];
}

struct SearchResult {
  uint64_t rank;   // the token found
  double measure;  // measure of its upper set S(rank) within the domain
};

// The lowest-ranked token t of the domain {rank >= lo} whose upper set still satisfies
// measure(S(t)) >= goal (or > goal when strict), given that the whole domain does
// (lo_measure = domain_measure(lo)). Radix search over the rank, most significant digit
// first, two bits per pass: K holds the digits fixed so far; by induction S(max(K, lo))
// satisfies the goal and S(K + 4 * 2^s) does not, so the answer lies in the bracket
// [K, K + 4 * 2^s). A pass measures the three candidates K + b * 2^s (b = 1, 2, 3) and
// keeps the largest that satisfies the goal. Low-half digits at or above low_bits (even,
// 2^low_bits >= vocab) are always 0 and skipped. As soon as the bracket holds a single
// token of the domain, that token is the answer. Uniform: every thread returns the same.
template <bool kCount>
__device__ SearchResult search_rank(const float* l, int vocab, int low_bits, float m, float T,
                                    uint64_t lo, double goal, bool strict, double lo_measure) {
  uint64_t K = 0;
  double measure_K = lo_measure;  // measure of S(max(K, lo))
  for (int s = 62; s >= 0; s -= 2) {
    if (s < 32 && s >= low_bits) continue;
    const uint64_t span = s == 62 ? ~0ull : (uint64_t{4} << s) - 1;
    const PassTotals t =
        rank_pass<kCount>(l, vocab, m, T, lo, K, span, K | (uint64_t{1} << s),
                          K | (uint64_t{2} << s), K | (uint64_t{3} << s));
    // One token between a threshold that satisfies the goal and one that does not: it
    // is the answer, and S(it) is S(max(K, lo)).
    if (t.bracket_count == 1) return {t.bracket_min, measure_K};
    // The largest candidate meeting the goal (the measures fall as b rises).
    const auto meets = [&](double measure) { return strict ? measure > goal : measure >= goal; };
    const int b = meets(t.measure[2]) ? 3 : meets(t.measure[1]) ? 2 : meets(t.measure[0]) ? 1 : 0;
    if (b > 0) {
      K |= static_cast<uint64_t>(b) << s;
      measure_K = b == 3 ? t.measure[2] : b == 2 ? t.measure[1] : t.measure[0];
    }
  }
  return {K, measure_K};  // every digit fixed: K is the rank of a token
}

// The lowest-ranked token of the domain {rank >= lo} with a positive weight (the CPU's
// fallback when rounding leaves u * total at or beyond the last cumulative sum). The
// domain always holds the top token, whose weight is 1.
__device__ uint64_t lowest_positive_rank(const float* l, int vocab, float m, float T,
                                         uint64_t lo) {
  unsigned long long best = ~0ull;
  for (unsigned i = threadIdx.x; i < static_cast<unsigned>(vocab); i += kSampleThreads) {
    const float x = l[i];
    const uint64_t rank = rank_of(x, i, vocab);
    if (rank >= lo && rank < best && weight(x, m, T) > 0.0f) best = rank;
  }
  return block_reduce(best, MinRank{});
}

// top-k, then top-p within what it kept, then the draw, all in rank order.
__device__ int sample_ranked(const float* l, int vocab, int low_bits, float m, float T,
                             bool use_k, int64_t top_k, bool use_p, float top_p, double u) {
  uint64_t lo = 0;  // the kept tokens are {rank >= lo}
  double kept;      // their mass
  if (use_k) {
    // The k-th token: the lowest whose upper set still counts k tokens.
    lo = search_rank<true>(l, vocab, low_bits, m, T, 0, static_cast<double>(top_k), false,
                           static_cast<double>(vocab))
             .rank;
  }
  kept = domain_measure<false>(l, vocab, m, T, lo);
  if (use_p) {
    // The smallest prefix whose mass reaches top_p of the kept mass: it always exists
    // (top_p * kept <= kept) and holds the top token.
    const SearchResult nucleus = search_rank<false>(
        l, vocab, low_bits, m, T, lo, static_cast<double>(top_p) * kept, false, kept);
    lo = nucleus.rank;
    kept = nucleus.measure;
  }
  // The draw: the first token (in rank order) whose cumulative mass exceeds u * kept.
  const double target = u * kept;
  const uint64_t chosen =
      kept > target ? search_rank<false>(l, vocab, low_bits, m, T, lo, target, true, kept).rank
                    : lowest_positive_rank(l, vocab, m, T, lo);
  return id_of(chosen, vocab);
}

// No truncation: inverse CDF over the ids in ascending order. Warp w owns the segment
// [w * seg, (w + 1) * seg) of the row (seg a multiple of 32 ids).
__device__ int sample_ascending(const float* l, int vocab, float m, float T, double u) {
  __shared__ double segment_mass[kSampleWarps];
  __shared__ int segment_last[kSampleWarps];  // last id with a positive weight, or -1
  __shared__ int segment_hit[kSampleWarps];   // first id crossing the target, or INT_MAX
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t per_warp = (static_cast<int64_t>(vocab) + kSampleWarps - 1) / kSampleWarps;
  const int64_t seg = (per_warp + kWarpSize - 1) / kWarpSize * kWarpSize;
  const int64_t begin = warp * seg < vocab ? warp * seg : vocab;
  const int64_t end = begin + seg < vocab ? begin + seg : vocab;

  // Pass 1: each segment's mass.
  double mass = 0.0;
  int last = -1;
  for (int64_t i = begin + lane; i < end; i += kWarpSize) {
    const float w = weight(l[i], m, T);
    mass += static_cast<double>(w);
    if (w > 0.0f) last = static_cast<int>(i);
  }
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    mass += __shfl_down_sync(kFullWarp, mass, offset);
    last = max(last, __shfl_down_sync(kFullWarp, last, offset));
  }
  if (lane == 0) {
    segment_mass[warp] = mass;
    segment_last[warp] = last;
  }
  __syncthreads();
  double total = 0.0, base = 0.0;
  int last_positive = -1;
#pragma unroll 1
  for (int w = 0; w < kSampleWarps; ++w) {  // the same order in every thread
    if (w == warp) base = total;            // the mass of the segments before this one
    total += segment_mass[w];
    last_positive = max(last_positive, segment_last[w]);
  }
  const double target = u * total;

  // Pass 2: walk the segment 32 ids at a time (a warp-uniform loop, no block barrier)
  // until the running mass exceeds the target at an id with a positive weight (rounding
  // in the scan must not let a zero weight be chosen).
  int hit = INT_MAX;
  for (int64_t c = begin; c < end; c += kWarpSize) {
    const int64_t i = c + lane;
    const float w = i < end ? weight(l[i], m, T) : 0.0f;
    double inclusive = static_cast<double>(w);
#pragma unroll
    for (int offset = 1; offset < kWarpSize; offset *= 2) {
      const double up = __shfl_up_sync(kFullWarp, inclusive, offset);
      if (lane >= offset) inclusive += up;
    }
    const unsigned crossed = __ballot_sync(kFullWarp, w > 0.0f && base + inclusive > target);
    if (crossed != 0u) {
      hit = static_cast<int>(c) + __ffs(static_cast<int>(crossed)) - 1;
      break;
    }
    base += __shfl_sync(kFullWarp, inclusive, kWarpSize - 1);
  }
  if (lane == 0) segment_hit[warp] = hit;
  __syncthreads();
  int token = INT_MAX;
#pragma unroll 1
  for (int w = 0; w < kSampleWarps; ++w) token = min(token, segment_hit[w]);
  __syncthreads();  // the segment arrays are rewritten for the next row
  // None crossed (u * total at or beyond the last running sum): the last positive weight.
  return token != INT_MAX ? token : last_positive;
}

// One block per row (grid-striding). Every branch below depends only on the row's
// arguments or on block_reduce / __syncthreads_or results, so it is uniform across the
// block and every thread reaches every barrier.
__global__ void __launch_bounds__(kSampleThreads)
    sample_tokens_kernel(SampleTokensArgs a, int vocab, int low_bits, bool use_k, bool use_p) {
  const unsigned n = static_cast<unsigned>(vocab);
  const float T = a.temperature;
  const float penalty = a.repetition_penalty;
  for (int64_t r = blockIdx.x; r < a.rows; r += gridDim.x) {
    if (a.active != nullptr && a.active[r] == 0) continue;
    const float* raw = a.logits + r * vocab;
    float* processed = a.scratch + r * vocab;

    // 1. The raw row: NaN or +inf anywhere -> status 1; its max for the log-sum-exp.
    float raw_max = -INFINITY;
    bool bad = false;
    for (unsigned i = threadIdx.x; i < n; i += kSampleThreads) {
      const float x = raw[i];
      bad |= !(x < INFINITY);
      raw_max = fmaxf(raw_max, x);
    }
    bad = __syncthreads_or(bad) != 0;
    raw_max = block_reduce(raw_max, MaxFloat{});
    if (bad || raw_max == -INFINITY) {  // every logit -inf stays so after the penalty
      if (threadIdx.x == 0) a.status[r] = 1;
      continue;
    }

    // The penalty applies to this row (the same for every thread).
    const int n_penalized =
        (penalty != 1.0f && a.penalized != nullptr && a.penalized_count != nullptr)
            ? max(a.penalized_count[r], 0)
            : 0;
    const bool penalize = n_penalized > 0;

    // log-sum-exp of the raw row (sum in double), copying the row to scratch for the
    // penalty on the way.
    double sum_exp = 0.0;
    for (unsigned i = threadIdx.x; i < n; i += kSampleThreads) {
      const float x = raw[i];
      sum_exp += static_cast<double>(expf(x - raw_max));
      if (penalize) processed[i] = x;
    }
    sum_exp = block_reduce(sum_exp, AddDouble{});
    const double log_sum = log(sum_exp);

    // 2. The repetition penalty, from the raw values: repeats rewrite the same value.
    const float* l = raw;  // the penalized logits
    if (penalize) {
      __syncthreads();  // the copy above is complete before ids are overwritten
      const int32_t* ids = a.penalized + r * a.penalized_stride;
      bool overflow = false;
      for (unsigned j = threadIdx.x; j < static_cast<unsigned>(n_penalized);
           j += kSampleThreads) {
        const int32_t id = ids[j];
        if (id < 0 || id >= vocab) continue;
        const float x = raw[id];
        const float y = x < 0.0f ? __fmul_rn(x, penalty) : __fdiv_rn(x, penalty);
        overflow |= !(y < INFINITY);
        processed[id] = y;
      }
      // Also makes the writes visible to the whole block.
      if (__syncthreads_or(overflow) != 0) {
        if (threadIdx.x == 0) a.status[r] = 2;
        continue;
      }
      l = processed;
    }

    // 3. The penalized max and the lowest id holding it.
    ArgMax best{-INFINITY, INT_MAX};
    for (unsigned i = threadIdx.x; i < n; i += kSampleThreads) {
      const float x = l[i];
      if (x > best.value) best = ArgMax{x, static_cast<int>(i)};
    }
    best = block_reduce(best, BetterOf{});
    if (!(best.value > -INFINITY)) {  // every logit -inf after the penalty
      if (threadIdx.x == 0) a.status[r] = 1;
      continue;
    }

    // 4. The token.
    int token = best.id;
    if (!a.greedy) {
      const double u = a.uniforms[r];
      token = (use_k || use_p) ? sample_ranked(l, vocab, low_bits, best.value, T, use_k,
                                               a.top_k, use_p, a.top_p, u)
                               : sample_ascending(l, vocab, best.value, T, u);
    }

    // 5. Outputs: the log-prob under the raw row, as cpu::logprobs_forward forms it.
    if (threadIdx.x == 0) {
      a.tokens[r] = token;
      a.logprobs[r] =
          static_cast<float>(static_cast<double>(raw[token] - raw_max) - log_sum);
      a.status[r] = 0;
    }
  }
}

// Builds the message only on failure (this runs once per generated token).
[[noreturn]] void fail(const std::string& message, const char* name) {
  throw Error(ErrorCode::InvalidArgument, message, name);
}

void require_pointer(const void* p, const char* name) {
  if (p == nullptr) fail(std::string(name) + " must not be null", name);
}

}  // namespace

void sample_tokens(const SampleTokensArgs& a) {
  if (a.rows < 0) fail("rows must be >= 0, got " + std::to_string(a.rows), "rows");
  if (a.rows == 0) return;
  if (a.vocab < 1 || a.vocab > INT_MAX)
    fail("vocab must be in [1, 2^31 - 1], got " + std::to_string(a.vocab), "vocab");
  require_pointer(a.logits, "logits");
  require_pointer(a.scratch, "scratch");
  require_pointer(a.tokens, "tokens");
  require_pointer(a.logprobs, "logprobs");
  require_pointer(a.status, "status");
  if (!a.greedy) require_pointer(a.uniforms, "uniforms");
  if (a.penalized_stride < 0)
    fail("penalized_stride must be >= 0, got " + std::to_string(a.penalized_stride),
         "penalized_stride");
  if (!(std::isfinite(a.temperature) && a.temperature > 0.0f))
    fail("temperature must be finite and > 0, got " + std::to_string(a.temperature),
         "temperature");
  if (a.top_k < 0) fail("top_k must be >= 0 (0: off), got " + std::to_string(a.top_k), "top_k");
  if (!(a.top_p > 0.0f && a.top_p <= 1.0f))
    fail("top_p must be in (0, 1] (1: off), got " + std::to_string(a.top_p), "top_p");
  if (!(std::isfinite(a.repetition_penalty) && a.repetition_penalty > 0.0f))
    fail("repetition_penalty must be finite and > 0 (1: off), got " +
             std::to_string(a.repetition_penalty),
         "repetition_penalty");

  const int vocab = static_cast<int>(a.vocab);
  // Bits of the low half of a rank that can be nonzero (vocab - 1 < 2^low_bits), rounded
  // up to whole 2-bit digits.
  int low_bits = 0;
  while ((int64_t{1} << low_bits) < a.vocab) ++low_bits;
  low_bits = (low_bits + 1) & ~1;
  const bool use_k = a.top_k > 0 && a.top_k < a.vocab;
  const bool use_p = a.top_p < 1.0f;
  const unsigned blocks = static_cast<unsigned>(std::min(a.rows, kMaxSampleBlocks));
  sample_tokens_kernel<<<blocks, kSampleThreads>>>(a, vocab, low_bits, use_k, use_p);
  PPO_CUDA_CHECK_LAUNCH("sample_tokens_kernel");
}

}  // namespace ppo::cuda
