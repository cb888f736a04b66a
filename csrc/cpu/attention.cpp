// Causal self-attention on the CPU (multi-head, and grouped-query: H query heads sharing
// KVH kv heads): forward, backward and the KV-cache decode step (see attention.h for the
// contracts). llm.c's math, arranged so that every hot loop streams contiguous 16-float
// slices into independent vector accumulators:
//
//   scores   Each (b, h) gathers its kv head's keys transposed, KT [hs, ld] (KT[i, s] =
//            k_s[i], zero past the valid keys, ld a multiple of 16; consecutive heads of
//            one group on a thread gather once). The scores of a row are then
//            acc[s] += q[i] * KT[i, s] over i, 16 keys per vector: no horizontal sums, and
//            each score is one chain over i in ascending order.
//   softmax  scaled, max-subtracted, fast_exp; the max and the sum in kLanes lanes over
//            the row padded with -inf to whole lane blocks (exp(-inf) = 0 exactly).
//   values   out = sum_s p[s] v_s: acc[i] += p[s] * v_s[i], s ascending.
// All three are one kernel shape (tile_rows / tile_row below): weighted sums of the rows
// of a streamed matrix, 4 output rows at a time sharing each loaded slice.
//
// The backward has the same shapes: d_att[t, s] = dout_t . v_s is the score kernel on
// VT [hs, ld]; d_q_t = scale sum_s d_preatt[t, s] k_s is a value sum along a row of
// d_preatt (kept in a [T, T] scratch); d_v_s = sum_{t >= s} att[t, s] dout_t and
// d_k_s = scale sum_{t >= s} d_preatt[t, s] q_t are value sums down a column (weights
// read with a stride of T), t ascending.
//
// Memory: the forward uses O(T * hs) scratch per thread (KT and 4 rows of scores), never
// T * T; the backward adds a [T, T] d_preatt per thread.
//
// Determinism: the forward and decode split the work over (b, h) only; each (b, h) owns
// the columns h*hs..(h+1)*hs of every row of out and the att rows of its head (decode
// writes the new cache rows before the split). The backward splits over (b, g), g a kv
// head: the item runs the query heads of g's group in ascending order, each adding its
// d_q to its own columns and its terms of d_k / d_v to g's columns, which no other item
// touches. So no two threads touch one element, and every sum runs in an order that
// depends on nothing but the shapes (the grouping of rows and columns into tiles never
// changes an element's chain of operations). With KVH == H the groups are single heads
// and every operation is the former multi-head kernels'. The decode step runs the same
// kernels as the forward on the same (gathered) operands, so a decode output has the
// same bits as the forward's output at that position.
#include "cpu/attention.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>

#include "core/error.h"
#include "cpu/arg_checks.h"
#include "core/thread_pool.h"
#include "cpu/vec_math.h"

#define PPO_ATTN_INLINE inline __attribute__((always_inline))

namespace ppo::cpu {
namespace {

// ---- the vector types ------------------------------------------------------------------
// The accumulators are GCC/Clang vector-extension values, not float arrays: GCC keeps a
// float array of accumulators that several loops share in memory (a store and a reload
// per step), while a vector value lives in a register - provided the instruction set has
// registers of that width (a 64-byte vector on AVX2 has no machine mode and lives on the
// stack). Hence one vector type per instruction set, chosen at run time (see Isa): vf16
// for AVX-512, vf8 for AVX2, vf4 for SSE2 and other CPUs (NEON). Vectors are passed by
// reference only (by value they would change the ABI between targets: -Wpsabi).
typedef float vf4 __attribute__((vector_size(4 * sizeof(float))));
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef float vf16 __attribute__((vector_size(16 * sizeof(float))));

template <class V>
constexpr int kVecLanes = static_cast<int>(sizeof(V) / sizeof(float));

template <class V>
PPO_ATTN_INLINE void load_vec(const float* p, V& v) {
  std::memcpy(&v, p, sizeof v);
}

// out[0, lanes) = v, or out += alpha * v.
template <class V>
PPO_ATTN_INLINE void store_vec(float* out, const V& v, const float* alpha) {
  V r = v;
  if (alpha) {
    V o;
    load_vec(out, o);
    r = o + *alpha * v;
  }
  std::memcpy(out, &r, sizeof r);
}

// ---- the tile kernels ------------------------------------------------------------------
// For the rows r and columns c of a tile:
//   acc_r[c] = sum_{j in [lo_r, hi_r)} w_r[j * ws] * m[j * ld + c],   j ascending,
// then out_r[c] = acc_r[c] (alpha == nullptr) or out_r[c] += *alpha * acc_r[c].
// Every acc_r[c] is the same chain of multiply-adds (acc += w * m) in every tile shape and
// vector width, so how rows and columns are grouped into tiles never changes a result
// (only the instruction set can: with or without fused multiply-add). The scores
// (weights q, matrix KT), the value sums (weights p, matrix V) and every sum of the
// backward are these kernels.
//
// Tiles are kRows rows x kW * CH columns (kW = 16 floats), or one row x 64 columns: 4 rows
// share each slice loaded from the streamed matrix, and the tile's accumulators (8
// registers: AVX-512 with CH = 2, AVX2 with CH = 1) are enough independent chains to keep
// the fma units busy.
constexpr int64_t kW = kLanes;
constexpr int kRows = 4;

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// kRows rows x CH * 16 columns. Each row's range in order: its own leading part
// [lo_r, slo), the stretch [slo, shi) shared by all rows (one slice load serves all of
// them), its own trailing part.
template <class V, int CH>
PPO_ATTN_INLINE void tile_rows(const int64_t* lo, const int64_t* hi, const float* const* w,
                               int64_t ws, const float* __restrict m, int64_t ld,
                               const float* alpha, float* const* out) {
  constexpr int L = kVecLanes<V>, NV = CH * static_cast<int>(kW) / L;
  static_assert(kRows == 4, "the leading/trailing parts below are written out for 4 rows");
  int64_t slo = lo[0], shi = hi[0];
  for (int r = 1; r < kRows; ++r) {
    slo = std::max(slo, lo[r]);
    shi = std::min(shi, hi[r]);
  }
  if (slo > shi) shi = slo;  // nothing shared: the leading and trailing parts cover all

  V acc[kRows][NV];
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  auto own = [&](V (&a)[NV], int r, int64_t j0, int64_t j1) {
    for (int64_t j = j0; j < j1; ++j) {
      const float wj = w[r][j * ws];
      const float* row = m + j * ld;
#pragma GCC unroll 16
      for (int v = 0; v < NV; ++v) {
        V x;
        load_vec(row + v * L, x);
        a[v] += wj * x;
      }
    }
  };
  own(acc[0], 0, lo[0], std::min(slo, hi[0]));
  own(acc[1], 1, lo[1], std::min(slo, hi[1]));
  own(acc[2], 2, lo[2], std::min(slo, hi[2]));
  own(acc[3], 3, lo[3], std::min(slo, hi[3]));
  const float *w0 = w[0], *w1 = w[1], *w2 = w[2], *w3 = w[3];
  for (int64_t j = slo; j < shi; ++j) {
    const float* row = m + j * ld;
    const float x0 = w0[j * ws], x1 = w1[j * ws], x2 = w2[j * ws], x3 = w3[j * ws];
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      V x;
      load_vec(row + v * L, x);
      acc[0][v] += x0 * x;
      acc[1][v] += x1 * x;
      acc[2][v] += x2 * x;
      acc[3][v] += x3 * x;
    }
  }
  own(acc[0], 0, std::max(shi, lo[0]), hi[0]);
  own(acc[1], 1, std::max(shi, lo[1]), hi[1]);
  own(acc[2], 2, std::max(shi, lo[2]), hi[2]);
  own(acc[3], 3, std::max(shi, lo[3]), hi[3]);
#pragma GCC unroll 4
  for (int r = 0; r < kRows; ++r)
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) store_vec(out[r] + v * L, acc[r][v], alpha);
}

// One row x NC columns (NC = 64: four or more independent chains; NC = 16: one slice).
template <class V, int NC>
PPO_ATTN_INLINE void tile_row(int64_t lo, int64_t hi, const float* w, int64_t ws,
                              const float* __restrict m, int64_t ld, const float* alpha,
                              float* out) {
  constexpr int L = kVecLanes<V>, NV = NC / L;
  V acc[NV];
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) acc[v] = V{};
  for (int64_t j = lo; j < hi; ++j) {
    const float wj = w[j * ws];
    const float* row = m + j * ld;
#pragma GCC unroll 16
    for (int v = 0; v < NV; ++v) {
      V x;
      load_vec(row + v * L, x);
      acc[v] += wj * x;
    }
  }
#pragma GCC unroll 16
  for (int v = 0; v < NV; ++v) store_vec(out + v * L, acc[v], alpha);
}

// One row x `width` < 16 columns (head sizes that are not a multiple of 16).
PPO_ATTN_INLINE void tile_narrow(int64_t lo, int64_t hi, const float* w, int64_t ws,
                                 const float* __restrict m, int64_t ld, int64_t width,
                                 const float* alpha, float* out) {
  float acc[kW] = {};
  for (int64_t j = lo; j < hi; ++j) {
    const float wj = w[j * ws];
    const float* row = m + j * ld;
    for (int64_t c = 0; c < width; ++c) acc[c] += wj * row[c];
  }
  for (int64_t c = 0; c < width; ++c) out[c] = alpha ? out[c] + *alpha * acc[c] : acc[c];
}

// The sums over all columns c < width of R rows (R = kRows or 1), tile by tile: kRows
// rows go CH * 16 columns at a time, then 16; one row 64 columns at a time, then 16; then
// the narrow rest.
template <class V, int CH, int R>
PPO_ATTN_INLINE void rows_sum(const int64_t* lo, const int64_t* hi, const float* const* w,
                              int64_t ws, const float* m, int64_t ld, int64_t width,
                              const float* alpha, float* const* out) {
  static_assert(R == kRows || R == 1, "tiles are kRows rows or one row");
  int64_t c0 = 0;
  if constexpr (R == kRows) {
    float* o[kRows];
    for (; c0 + CH * kW <= width; c0 += CH * kW) {
      for (int r = 0; r < kRows; ++r) o[r] = out[r] + c0;
      tile_rows<V, CH>(lo, hi, w, ws, m + c0, ld, alpha, o);
    }
    if constexpr (CH > 1) {
      for (; c0 + kW <= width; c0 += kW) {
        for (int r = 0; r < kRows; ++r) o[r] = out[r] + c0;
        tile_rows<V, 1>(lo, hi, w, ws, m + c0, ld, alpha, o);
      }
    }
  } else {
    for (; c0 + 4 * kW <= width; c0 += 4 * kW)
      tile_row<V, 4 * kW>(lo[0], hi[0], w[0], ws, m + c0, ld, alpha, out[0] + c0);
  }
  for (int r = 0; r < R; ++r) {  // what is left: 16-column tiles, then the narrow rest
    int64_t c = c0;
    for (; c + kW <= width; c += kW)
      tile_row<V, kW>(lo[r], hi[r], w[r], ws, m + c, ld, alpha, out[r] + c);
    if (c < width) tile_narrow(lo[r], hi[r], w[r], ws, m + c, ld, width - c, alpha, out[r] + c);
  }
}

// ---- softmax ---------------------------------------------------------------------------

// Sum / max of kLanes lanes by a fixed pairwise tree (lanes[j] op= lanes[j + half]):
// short dependency chains, and vectorizable.
PPO_ATTN_INLINE float lanes_sum(float (&v)[kLanes]) {
#pragma GCC unroll 8
  for (int half = kLanes / 2; half >= 1; half /= 2)
#pragma GCC unroll 16
    for (int j = 0; j < half; ++j) v[j] += v[j + half];
  return v[0];
}
PPO_ATTN_INLINE float lanes_max(float (&v)[kLanes]) {
#pragma GCC unroll 8
  for (int half = kLanes / 2; half >= 1; half /= 2)
#pragma GCC unroll 16
    for (int j = 0; j < half; ++j) v[j] = v[j + half] > v[j] ? v[j + half] : v[j];
  return v[0];
}

// In place: x[0, n) = softmax(scale * x), max-subtracted. The row is processed in whole
// lane blocks: x[n, round_up(n, kLanes)) must be readable (any finite value) and ends as
// 0 (the scaled scores there are replaced by -inf, whose exp is exactly 0). Lane j of the
// max and of the sum takes s = j mod kLanes.
PPO_ATTN_INLINE void softmax_row(int64_t n, float scale, float* __restrict x) {
  const int64_t n_pad = round_up(n, kLanes);
  float mx[kLanes];
  for (int j = 0; j < kLanes; ++j) mx[j] = -INFINITY;
  for (int64_t s = 0; s < n_pad; s += kLanes)
#pragma GCC unroll 1  // kept a loop for the vectorizer: fully unrolled, the selects stay scalar
    for (int j = 0; j < kLanes; ++j) {
      const float z = s + j < n ? scale * x[s + j] : -INFINITY;
      x[s + j] = z;
      mx[j] = z > mx[j] ? z : mx[j];
    }
  const float m = lanes_max(mx);

  float sum[kLanes] = {};
  for (int64_t s = 0; s < n_pad; s += kLanes)
#pragma GCC unroll 1
    for (int j = 0; j < kLanes; ++j) {
      const float e = fast_exp(x[s + j] - m);  // -inf padding: exactly 0
      x[s + j] = e;
      sum[j] += e;
    }
  const float inv = 1.0f / lanes_sum(sum);
  for (int64_t s = 0; s < n_pad; s += kLanes)
#pragma GCC unroll 1
    for (int j = 0; j < kLanes; ++j) x[s + j] *= inv;
}

// Softmax backward of one row: dp[s] = p[s] * (da[s] - sum_u p[u] da[u]), s < n; the sum
// in kLanes lanes (the tail in lanes 0..), combined by the tree.
PPO_ATTN_INLINE void softmax_backward_row(int64_t n, const float* __restrict p,
                                          const float* __restrict da, float* __restrict dp) {
  float lanes[kLanes] = {};
  int64_t s = 0;
  for (; s + kLanes <= n; s += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] += p[s + j] * da[s + j];
  for (int j = 0; s + j < n; ++j) lanes[j] += p[s + j] * da[s + j];
  const float dot = lanes_sum(lanes);
  for (s = 0; s < n; ++s) dp[s] = p[s] * (da[s] - dot);
}

// mt[i * ld + s] = src[s * src_ld + i] for s < n, i < hs; columns [n, ld) set to 0, so
// whole 16-column score tiles read finite values.
PPO_ATTN_INLINE void gather_transposed(int64_t n, int64_t hs, const float* __restrict src,
                                       int64_t src_ld, int64_t ld, float* __restrict mt) {
  for (int64_t s = 0; s < n; ++s) {
    const float* row = src + s * src_ld;
    for (int64_t i = 0; i < hs; ++i) mt[i * ld + s] = row[i];
  }
  for (int64_t i = 0; i < hs; ++i)
    for (int64_t s = n; s < ld; ++s) mt[i * ld + s] = 0.0f;
}

// ---- one (b, h) of each op -------------------------------------------------------------

// One (b, h): its valid length, and the q of row t at q + t * ld, the k and v of its kv
// head (g = h / (H / KVH)) at k + t * ld and v + t * ld (ld = (H + 2 KVH) hs, the qkv row);
// od = H hs is the row stride of out and grad_out.
struct Head {
  int64_t len, T, hs, ld, od;
  float scale;
  const float* q;
  const float* k;
  const float* v;
};

// R query rows t0..t0+R-1 of the forward: p_r [round_up(T, kW)] gets row t0 + r's
// probabilities, out_r its output. kt: KT [hs, ld].
template <class V, int CH, int R>
PPO_ATTN_INLINE void forward_rows(const Head& hd, int64_t t0, const float* kt, int64_t ld,
                                  float* const* p, float* const* out) {
  int64_t lo[R], hi_k[R], hi_v[R];
  const float* x[R];
  const float* pw[R];
  for (int r = 0; r < R; ++r) {
    lo[r] = 0, hi_k[r] = hd.hs, hi_v[r] = t0 + r + 1;
    x[r] = hd.q + (t0 + r) * hd.ld;
    pw[r] = p[r];
  }
  // Scores of keys 0..t0+R-1 (later keys of the earlier rows are computed and ignored).
  rows_sum<V, CH, R>(lo, hi_k, x, 1, kt, ld, round_up(t0 + R, kW), nullptr, p);
  for (int r = 0; r < R; ++r) softmax_row(t0 + r + 1, hd.scale, p[r]);
  rows_sum<V, CH, R>(lo, hi_v, pw, 1, hd.v, hd.ld, hd.hs, nullptr, out);
}

// Forward of one head: out rows t < len (this head's columns) and, when att_bh, att rows
// t < len. Scratch: kt [hs, round_up(T, kW)], p kRows rows of round_up(T, kW). gather:
// false when kt already holds this head's keys (the previous head of the same kv head
// and sequence gathered them).
template <class V, int CH>
PPO_ATTN_INLINE void forward_head(const Head& hd, bool gather, float* kt, float* p,
                                  float* out_bh, float* att_bh) {
  const int64_t len = hd.len, T = hd.T, p_ld = round_up(T, kW), ld = round_up(len, kW);
  if (gather) gather_transposed(len, hd.hs, hd.k, hd.ld, ld, kt);
  float* pr[kRows];
  float* o[kRows];
  for (int r = 0; r < kRows; ++r) pr[r] = p + r * p_ld;
  for (int64_t t0 = 0; t0 < len;) {
    const int rows = len - t0 >= kRows ? kRows : 1;
    for (int r = 0; r < rows; ++r) o[r] = out_bh + (t0 + r) * hd.od;
    if (rows == kRows)
      forward_rows<V, CH, kRows>(hd, t0, kt, ld, pr, o);
    else
      forward_rows<V, CH, 1>(hd, t0, kt, ld, pr, o);
    if (att_bh)
      for (int r = 0; r < rows; ++r) {
        const int64_t t = t0 + r;
        float* a = att_bh + t * T;
        for (int64_t s = 0; s <= t; ++s) a[s] = pr[r][s];
        for (int64_t s = t + 1; s < T; ++s) a[s] = 0.0f;
      }
    t0 += rows;
  }
}

// Backward rows t0..t0+R-1: d_att (the score kernel on VT), d_preatt rows (kept in dpre
// [T, T] for the column sums), d_q. gq: the q part of row 0 of this head in grad_qkv.
template <class V, int CH, int R>
PPO_ATTN_INLINE void backward_rows(const Head& hd, int64_t t0, const float* go,
                                   const float* att_bh, const float* vt, int64_t ld,
                                   float* const* da, float* dpre, float* gq) {
  const int64_t T = hd.T;
  int64_t lo[R], hi_i[R], hi_s[R];
  const float* x[R];
  const float* dp[R];
  float* g[R];
  for (int r = 0; r < R; ++r) {
    const int64_t t = t0 + r;
    lo[r] = 0, hi_i[r] = hd.hs, hi_s[r] = t + 1;
    x[r] = go + t * hd.od;
    dp[r] = dpre + t * T;
    g[r] = gq + t * hd.ld;
  }
  rows_sum<V, CH, R>(lo, hi_i, x, 1, vt, ld, round_up(t0 + R, kW), nullptr, da);  // dout_t . v_s
  for (int r = 0; r < R; ++r)
    softmax_backward_row(t0 + r + 1, att_bh + (t0 + r) * T, da[r], dpre + (t0 + r) * T);
  rows_sum<V, CH, R>(lo, hi_s, dp, 1, hd.k, hd.ld, hd.hs, &hd.scale, g);  // d_q_t
}

// Backward columns (keys) s0..s0+R-1: this query head's terms of d_v_s and d_k_s (added
// to the kv head's rows at gk, gv: row 0 of its k and v parts in grad_qkv), sums over the
// query rows t in [s, len) of a column of att / d_preatt.
template <class V, int CH, int R>
PPO_ATTN_INLINE void backward_cols(const Head& hd, int64_t s0, const float* go,
                                   const float* att_bh, const float* dpre, float* gk_bh,
                                   float* gv_bh) {
  const int64_t T = hd.T;
  int64_t lo[R], hi[R];
  const float* pa[R];
  const float* dpa[R];
  float* gk[R];
  float* gv[R];
  for (int r = 0; r < R; ++r) {
    const int64_t s = s0 + r;
    lo[r] = s, hi[r] = hd.len;  // query rows t in [s, len)
    pa[r] = att_bh + s;         // att[t, s] at pa[r][t * T]
    dpa[r] = dpre + s;
    gk[r] = gk_bh + s * hd.ld;
    gv[r] = gv_bh + s * hd.ld;
  }
  const float one = 1.0f;
  rows_sum<V, CH, R>(lo, hi, pa, T, go, hd.od, hd.hs, &one, gv);           // sum_t att dout_t
  rows_sum<V, CH, R>(lo, hi, dpa, T, hd.q, hd.ld, hd.hs, &hd.scale, gk);  // sum_t dpre q_t
}

// Backward of one query head (len >= 1), accumulating into grad_qkv: gq, gk, gv are row 0
// of this head's q part and of its kv head's k and v parts. Scratch: vt [hs, round_up(T,
// kW)], da kRows rows of round_up(T, kW), dpre [T, T]. gather: false when vt already holds
// the kv head's values (gathered for an earlier query head of its group).
template <class V, int CH>
PPO_ATTN_INLINE void backward_head(const Head& hd, bool gather, const float* go,
                                   const float* att_bh, float* gq, float* gk, float* gv,
                                   float* vt, float* da, float* dpre) {
  const int64_t len = hd.len, ld = round_up(len, kW), da_ld = round_up(hd.T, kW);
  if (gather) gather_transposed(len, hd.hs, hd.v, hd.ld, ld, vt);
  float* dar[kRows];
  for (int r = 0; r < kRows; ++r) dar[r] = da + r * da_ld;
  // Rows first (d_preatt of every row is needed by the column sums), then columns.
  for (int64_t t0 = 0; t0 < len;) {
    if (len - t0 >= kRows) {
      backward_rows<V, CH, kRows>(hd, t0, go, att_bh, vt, ld, dar, dpre, gq);
      t0 += kRows;
    } else {
      backward_rows<V, CH, 1>(hd, t0, go, att_bh, vt, ld, dar, dpre, gq);
      t0 += 1;
    }
  }
  for (int64_t s0 = 0; s0 < len;) {
    if (len - s0 >= kRows) {
      backward_cols<V, CH, kRows>(hd, s0, go, att_bh, dpre, gk, gv);
      s0 += kRows;
    } else {
      backward_cols<V, CH, 1>(hd, s0, go, att_bh, dpre, gk, gv);
      s0 += 1;
    }
  }
}

// One decode query (q) of one head over cache rows 0..n-1 (k rows at kc + s * cl, v rows
// at vc + s * cl, cl = KVH hs): the forward's one-row path on the same gathered operands,
// hence the same bits as the forward's row n - 1. Scratch: kt [hs, round_up(n, kW)], p
// the same. gather: false when kt already holds these keys (same sequence and kv head).
template <class V, int CH>
PPO_ATTN_INLINE void decode_head(int64_t n, int64_t hs, float scale, int64_t cl, bool gather,
                                 const float* q, const float* kc, const float* vc, float* kt,
                                 float* p, float* out) {
  const int64_t ld = round_up(n, kW);
  if (gather) gather_transposed(n, hs, kc, cl, ld, kt);
  const int64_t lo[1] = {0}, hi_k[1] = {hs}, hi_v[1] = {n};
  const float* x[1] = {q};
  const float* pw[1] = {p};
  float* pr[1] = {p};
  float* o[1] = {out};
  rows_sum<V, CH, 1>(lo, hi_k, x, 1, kt, ld, ld, nullptr, pr);
  softmax_row(n, scale, p);
  rows_sum<V, CH, 1>(lo, hi_v, pw, 1, vc, cl, hs, nullptr, o);
}

// ---- instruction sets ------------------------------------------------------------------
// Each head function is compiled three times on x86-64 - for AVX-512 (vf16 vectors,
// 32-column tiles), AVX2 + FMA (vf8) and the SSE2 baseline (vf4) - and the one for this
// CPU is picked once, as matmul.cpp does. (PPO_CPU_MULTIVERSION's target_clones cannot
// serve here: the vector width must differ between the versions.) Elsewhere (e.g. ARM
// NEON, 128-bit registers) the portable vf4 version is the only one.
#if defined(__x86_64__) && defined(__GNUC__)
#define PPO_ATTN_X86 1
#else
#define PPO_ATTN_X86 0
#endif

enum class Isa { Avx512, Avx2, Portable };

// PPO_ATTENTION_ISA=avx2|portable caps the choice (to test and time the fallbacks on a
// newer CPU, like PPO_MATMUL_ISA); it never selects a version the CPU lacks.
Isa isa() {
  static const Isa chosen = [] {
    const char* forced = std::getenv("PPO_ATTENTION_ISA");
    const std::string cap = forced ? forced : "";
#if PPO_ATTN_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && cap != "avx2" && cap != "portable")
      return Isa::Avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cap != "portable")
      return Isa::Avx2;
#endif
    return Isa::Portable;
  }();
  return chosen;
}

// name_avx512 / name_avx2 / name_portable wrappers of name<V, CH>, and name_dispatch.
#if PPO_ATTN_X86
#define PPO_ATTN_VERSIONS(name, params, args)                                              \
  __attribute__((target("avx512f"))) void name##_avx512 params { name<vf16, 2> args; }    \
  __attribute__((target("avx2,fma"))) void name##_avx2 params { name<vf8, 1> args; }      \
  void name##_portable params { name<vf4, 1> args; }                                       \
  void name##_dispatch params {                                                            \
    switch (isa()) {                                                                       \
      case Isa::Avx512: name##_avx512 args; break;                                         \
      case Isa::Avx2: name##_avx2 args; break;                                             \
      case Isa::Portable: name##_portable args; break;                                     \
    }                                                                                      \
  }
#else
#define PPO_ATTN_VERSIONS(name, params, args) \
  void name##_dispatch params { name<vf4, 1> args; }
#endif

PPO_ATTN_VERSIONS(forward_head,
                  (const Head& hd, bool gather, float* kt, float* p, float* out_bh,
                   float* att_bh),
                  (hd, gather, kt, p, out_bh, att_bh))
PPO_ATTN_VERSIONS(backward_head,
                  (const Head& hd, bool gather, const float* go, const float* att_bh, float* gq,
                   float* gk, float* gv, float* vt, float* da, float* dpre),
                  (hd, gather, go, att_bh, gq, gk, gv, vt, da, dpre))
PPO_ATTN_VERSIONS(decode_head,
                  (int64_t n, int64_t hs, float scale, int64_t cl, bool gather, const float* q,
                   const float* kc, const float* vc, float* kt, float* p, float* out),
                  (n, hs, scale, cl, gather, q, kc, vc, kt, p, out))

// ---- validation and scratch -------------------------------------------------------------


// lengths[b] in [0, T] for every b (nullptr: all T).
void require_lengths(int64_t B, int64_t T, const int32_t* lengths) {
  if (!lengths) return;
  for (int64_t b = 0; b < B; ++b)
    require(lengths[b] >= 0 && lengths[b] <= T, ErrorCode::InvalidArgument,
            "lengths[" + std::to_string(b) + "] = " + std::to_string(lengths[b]) +
                " is outside [0, T = " + std::to_string(T) + "]",
            "lengths");
}

int64_t length_of(const int32_t* lengths, int64_t b, int64_t T) {
  return lengths ? static_cast<int64_t>(lengths[b]) : T;
}

float head_scale(int64_t hs) {
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(hs)));
}

// `count` floats of scratch, or ppo::Error(OutOfMemory).
std::unique_ptr<float[]> scratch(int64_t count, const char* what) {
  std::unique_ptr<float[]> p(
      new (std::nothrow) float[static_cast<size_t>(std::max<int64_t>(count, 1))]);
  require(p != nullptr, ErrorCode::OutOfMemory,
          std::string(what) + ": cannot allocate " + std::to_string(count) +
              " floats of scratch");
  return p;
}

}  // namespace

// ---- forward ---------------------------------------------------------------------------

void attention_forward(int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t hs,
                       const int32_t* lengths, const float* qkv, float* att, float* out) {
  require_size(B, "B");
  require_size(T, "T");
  require_heads(H, KVH, hs, B * T > 0);
  if (B == 0 || T == 0) return;
  require_data(qkv, "qkv");
  require_data(out, "out");
  require_lengths(B, T, lengths);

  const int64_t G = H / KVH, ld = (H + 2 * KVH) * hs, od = H * hs, ld_max = round_up(T, kW);
  const float scale = head_scale(hs);
  parallel_for(
      B * H,
      [&](int64_t begin, int64_t end) {
        // Per chunk, O(T * hs), never T * T: KT [hs, ld_max] and kRows rows of scores.
        std::unique_ptr<float[]> buf = scratch((hs + kRows) * ld_max, "attention_forward");
        float* kt = buf.get();
        float* p = kt + hs * ld_max;
        int64_t in_kt = -1;  // the (b, kv head) whose keys kt holds
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / H, h = item % H, g = h / G;
          const float* row0 = qkv + b * T * ld;
          const Head hd{length_of(lengths, b, T), T, hs, ld, od, scale, row0 + h * hs,
                        row0 + (H + g) * hs, row0 + (H + KVH + g) * hs};
          float* out_bh = out + b * T * od + h * hs;
          float* att_bh = att ? att + item * T * T : nullptr;
          const int64_t kv_item = b * KVH + g;
          forward_head_dispatch(hd, kv_item != in_kt, kt, p, out_bh, att_bh);
          in_kt = kv_item;
          for (int64_t t = hd.len; t < T; ++t) {  // padding rows: written as 0
            std::memset(out_bh + t * od, 0, hs * sizeof(float));
            if (att_bh) std::memset(att_bh + t * T, 0, T * sizeof(float));
          }
        }
      },
      grain_for(2 * T * T * hs + 1));
}

// ---- backward --------------------------------------------------------------------------

void attention_backward(int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t hs,
                        const int32_t* lengths, const float* grad_out, const float* qkv,
                        const float* att, float* grad_qkv) {
  require_size(B, "B");
  require_size(T, "T");
  require_heads(H, KVH, hs, B * T > 0);
  if (B == 0 || T == 0) return;
  require_data(grad_out, "grad_out");
  require_data(qkv, "qkv");
  require_data(att, "att");
  require_data(grad_qkv, "grad_qkv");
  require_lengths(B, T, lengths);

  const int64_t G = H / KVH, ld = (H + 2 * KVH) * hs, od = H * hs, ld_max = round_up(T, kW);
  const float scale = head_scale(hs);
  // Work items are (b, kv head): the group's query heads, in ascending order, add their
  // terms to the kv head's d_k and d_v rows, which no other item writes.
  parallel_for(
      B * KVH,
      [&](int64_t begin, int64_t end) {
        // Per chunk: VT [hs, ld_max], kRows rows of d_att, d_preatt [T, T].
        std::unique_ptr<float[]> buf =
            scratch((hs + kRows) * ld_max + T * T, "attention_backward");
        float* vt = buf.get();
        float* da = vt + hs * ld_max;
        float* dpre = da + kRows * ld_max;
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / KVH, g = item % KVH, len = length_of(lengths, b, T);
          if (len == 0) continue;
          const float* row0 = qkv + b * T * ld;
          float* grow0 = grad_qkv + b * T * ld;
          for (int64_t j = 0; j < G; ++j) {
            const int64_t h = g * G + j;
            const Head hd{len, T, hs, ld, od, scale, row0 + h * hs, row0 + (H + g) * hs,
                          row0 + (H + KVH + g) * hs};
            backward_head_dispatch(hd, j == 0, grad_out + b * T * od + h * hs,
                                   att + (b * H + h) * T * T, grow0 + h * hs,
                                   grow0 + (H + g) * hs, grow0 + (H + KVH + g) * hs, vt, da,
                                   dpre);
          }
        }
      },
      grain_for(4 * T * T * hs * G + 1));
}

// ---- the KV cache ----------------------------------------------------------------------

void kv_cache_store(int64_t B, int64_t T, int64_t H, int64_t KVH, int64_t hs,
                    const int32_t* lengths, const float* qkv, int64_t cache_T, float* k_cache,
                    float* v_cache) {
  require_size(B, "B");
  require_size(T, "T");
  require_heads(H, KVH, hs, B * T > 0);
  require(cache_T >= T, ErrorCode::InvalidArgument,
          "cache_T (" + std::to_string(cache_T) + ") must be >= T (" + std::to_string(T) + ")",
          "cache_T");
  if (B == 0 || T == 0) return;
  require_data(qkv, "qkv");
  require_data(k_cache, "k_cache");
  require_data(v_cache, "v_cache");
  require_lengths(B, T, lengths);
  const int64_t ld = (H + 2 * KVH) * hs, cl = KVH * hs;  // qkv row, cache row
  parallel_for(
      B * T,
      [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          const int64_t b = r / T, t = r % T;
          if (t >= length_of(lengths, b, T)) continue;
          const float* row = qkv + r * ld;
          std::memcpy(k_cache + (b * cache_T + t) * cl, row + H * hs, cl * sizeof(float));
          std::memcpy(v_cache + (b * cache_T + t) * cl, row + (H + KVH) * hs,
                      cl * sizeof(float));
        }
      },
      grain_for(2 * cl));
}

void attention_decode(int64_t B, int64_t H, int64_t KVH, int64_t hs, const int32_t* positions,
                      const float* qkv, int64_t cache_T, float* k_cache, float* v_cache,
                      float* out) {
  require_size(B, "B");
  require_heads(H, KVH, hs, B > 0);
  require_size(cache_T, "cache_T");
  if (B == 0) return;
  require_data(positions, "positions");
  int64_t max_pos = -1;
  for (int64_t b = 0; b < B; ++b) {
    require(positions[b] < cache_T, ErrorCode::InvalidArgument,
            "positions[" + std::to_string(b) + "] = " + std::to_string(positions[b]) +
                " must be < cache_T = " + std::to_string(cache_T),
            "positions");
    max_pos = std::max<int64_t>(max_pos, positions[b]);
  }
  require_data(qkv, "qkv");
  require_data(out, "out");
  if (max_pos >= 0) {
    require_data(k_cache, "k_cache");
    require_data(v_cache, "v_cache");
  }

  const int64_t G = H / KVH, ld = (H + 2 * KVH) * hs, od = H * hs, cl = KVH * hs;
  const int64_t ld_max = round_up(max_pos + 1, kW);
  const float scale = head_scale(hs);
  // The new k and v rows first (a kv head's row is read by all the query heads of its
  // group, which may run on other threads), then the (b, h) items.
  for (int64_t b = 0; b < B; ++b) {
    const int64_t pos = positions[b];
    if (pos < 0) continue;  // finished sequence: cache untouched
    const float* row = qkv + b * ld;
    std::memcpy(k_cache + (b * cache_T + pos) * cl, row + H * hs, cl * sizeof(float));
    std::memcpy(v_cache + (b * cache_T + pos) * cl, row + (H + KVH) * hs, cl * sizeof(float));
  }
  parallel_for(
      B * H,
      [&](int64_t begin, int64_t end) {
        std::unique_ptr<float[]> buf = scratch((hs + 1) * ld_max, "attention_decode");
        float* kt = buf.get();
        float* p = kt + hs * ld_max;
        int64_t in_kt = -1;  // the (b, kv head) whose keys kt holds
        for (int64_t item = begin; item < end; ++item) {
          const int64_t b = item / H, h = item % H, g = h / G;
          const int64_t pos = positions[b];
          float* o = out + b * od + h * hs;
          if (pos < 0) {  // finished sequence: out row 0
            std::memset(o, 0, hs * sizeof(float));
            continue;
          }
          const float* kc = k_cache + b * cache_T * cl + g * hs;  // rows at stride cl
          const float* vc = v_cache + b * cache_T * cl + g * hs;
          const int64_t kv_item = b * KVH + g;
          decode_head_dispatch(pos + 1, hs, scale, cl, kv_item != in_kt, qkv + b * ld + h * hs,
                               kc, vc, kt, p, o);
          in_kt = kv_item;
        }
      },
      grain_for(4 * (max_pos + 1) * hs + 1));
}

const char* attention_isa() {
  switch (isa()) {
    case Isa::Avx512: return "avx512f";
    case Isa::Avx2: return "avx2+fma";
    case Isa::Portable: break;
  }
  return "portable";
}

}  // namespace ppo::cpu
