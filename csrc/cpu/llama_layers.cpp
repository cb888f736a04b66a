// RMSNorm, RoPE and SwiGLU on the CPU, forward and backward side by side (see
// llama_layers.h for the contracts). Every hot loop is a PPO_CPU_MULTIVERSION function over
// a range of rows; parallel_for splits the rows across the pool.
//
// Determinism: per-row work (every forward output, grad_in, the rotations, the SwiGLU
// gradients) does not depend on which thread runs the row. The one cross-row reduction,
// RMSNorm's weight gradient, sums rows into per-chunk partial buffers whose chunking
// depends only on `rows`, then adds the chunks in chunk order (as layernorm_backward).
#include "cpu/llama_layers.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <new>
#include <vector>

#include "core/error.h"
#include "core/thread_pool.h"
#include "cpu/arg_checks.h"
#include "cpu/row_chunks.h"
#include "cpu/vec_math.h"

namespace ppo::cpu {
namespace {

// ================================ RMSNorm ================================================

// Rows [begin, end) of the forward. Per row of C channels: the sum of squares in double
// (kLanes double accumulators, so the loop vectorizes; a float square is exact in double),
// rstd = 1 / sqrt(ms + eps) in double rounded once to float, then out = (x * rstd) * w.
PPO_CPU_MULTIVERSION
void rmsnorm_forward_rows(int64_t begin, int64_t end, int64_t C, const float* __restrict in,
                          const float* __restrict weight, float eps, float* __restrict out,
                          float* __restrict rstd) {
  for (int64_t r = begin; r < end; ++r) {
    const float* x = in + r * C;
    float* y = out + r * C;

    double lanes[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const double v = static_cast<double>(x[c + j]);
        lanes[j] += v * v;
      }
    double ss = 0.0;
    for (int j = 0; j < kLanes; ++j) ss += lanes[j];
    for (; c < C; ++c) {
      const double v = static_cast<double>(x[c]);
      ss += v * v;
    }
    const double ms = ss / static_cast<double>(C);
    const float rs = static_cast<float>(1.0 / std::sqrt(ms + static_cast<double>(eps)));
    for (c = 0; c < C; ++c) y[c] = (x[c] * rs) * weight[c];
    rstd[r] = rs;
  }
}

// Rows [begin, end) of the backward; pw [C] is this chunk's partial weight gradient
// (zeroed here, then summed over the chunk's rows in row order). With xhat = x * rstd and
// y = xhat * w:
//   din = rstd * (w dout - x * rstd^2 * mean_c(w dout x))
//   dw  = sum_r dout * xhat
// The row sum is kept in kLanes float accumulators (vectorizes), as layernorm_backward.
PPO_CPU_MULTIVERSION
void rmsnorm_backward_rows(int64_t begin, int64_t end, int64_t C,
                           const float* __restrict grad_out, const float* __restrict in,
                           const float* __restrict weight, const float* __restrict rstd,
                           float* __restrict grad_in, float* __restrict pw) {
  for (int64_t c = 0; c < C; ++c) pw[c] = 0.0f;
  const double inv_c = 1.0 / static_cast<double>(C);
  for (int64_t r = begin; r < end; ++r) {
    const float* g = grad_out + r * C;
    const float* x = in + r * C;
    float* gi = grad_in + r * C;
    const float rs = rstd[r];

    float lanes[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes)
      for (int j = 0; j < kLanes; ++j) lanes[j] += (weight[c + j] * g[c + j]) * x[c + j];
    float dot = 0.0f;
    for (int j = 0; j < kLanes; ++j) dot += lanes[j];
    for (; c < C; ++c) dot += (weight[c] * g[c]) * x[c];
    const float coef = static_cast<float>(static_cast<double>(rs) * rs * dot * inv_c);

    for (c = 0; c < C; ++c) {
      gi[c] += rs * (weight[c] * g[c] - x[c] * coef);
      pw[c] += (x[c] * rs) * g[c];
    }
  }
}

// ================================== RoPE =================================================
// A row's rotation depends on its position only through the half = head_size / 2 pairs
// (cos, sin) of its angles, shared by all its heads. They are computed once per row (or,
// when the batch repeats positions, once per position into a table) by rope_trig, the one
// place that evaluates the contract's angle, so both ways give the same bits. The
// rotation itself is then a vectorizable loop over the heads.

// cs[i] = cosf(angle_i), sn[i] = sign * sinf(angle_i), angle_i = ((float)pos / scaling) *
// inv_freq[i]. sign = -1 gives the transposed rotation (sinf is odd, so this is exactly the
// rotation by -angle, and x1 c - x2 (-s) is exactly x1 c + x2 s).
void rope_trig(int32_t pos, float scaling, float sign, int64_t half,
               const float* __restrict inv_freq, float* __restrict cs, float* __restrict sn) {
  const float p = static_cast<float>(pos) / scaling;
  for (int64_t i = 0; i < half; ++i) {
    const float angle = p * inv_freq[i];
    cs[i] = std::cos(angle);
    sn[i] = sign * std::sin(angle);
  }
}

// One head's pairs: a[i] = a c - b s, b[i] = b c + a s (a, b: the two halves of the head).
__attribute__((always_inline)) inline void rope_rotate(int64_t half, float* __restrict a,
                                                       float* __restrict b,
                                                       const float* __restrict cs,
                                                       const float* __restrict sn) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = a[i], x2 = b[i];
    a[i] = x1 * cs[i] - x2 * sn[i];
    b[i] = x2 * cs[i] + x1 * sn[i];
  }
}

// Rotates the heads of one row (row points at column col_offset).
PPO_CPU_MULTIVERSION
void rope_rotate_row(float* row, int64_t heads, int64_t head_size, const float* cs,
                     const float* sn) {
  const int64_t half = head_size / 2;
  for (int64_t h = 0; h < heads; ++h) {
    float* a = row + h * head_size;
    rope_rotate(half, a, a + half, cs, sn);
  }
}

// Both directions: sign = +1 forward, -1 backward (see rope_trig).
void rope_apply(int64_t rows, int64_t row_stride, int64_t col_offset, int64_t heads,
                int64_t head_size, const int32_t* positions, float theta, float scaling,
                float sign, float* x) {
  const int64_t half = head_size / 2;
  std::vector<float> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) inv_freq[i] = rope_inv_freq(theta, i, head_size);
  const float* freq = inv_freq.data();

  // A table of (cos, sin) per position 0..max_pos costs less trigonometry than one row at
  // a time when there are fewer positions than non-padding rows (a batch of sequences
  // shares positions 0..T-1); its size is then below rows * head_size floats.
  int64_t max_pos = -1, valid_rows = 0;
  for (int64_t r = 0; r < rows; ++r) {
    max_pos = std::max<int64_t>(max_pos, positions[r]);
    valid_rows += positions[r] >= 0 ? 1 : 0;
  }
  if (valid_rows == 0) return;
  const int64_t n_pos = max_pos + 1;
  const int64_t rotate_cost = 3 * heads * head_size;
  std::unique_ptr<float[]> table;
  if (n_pos < valid_rows) table.reset(new (std::nothrow) float[n_pos * head_size]);
  if (table != nullptr) {
    // table[p * head_size + i] = cos, table[p * head_size + half + i] = sin.
    float* t = table.get();
    parallel_for(
        n_pos,
        [&](int64_t begin, int64_t end) {
          for (int64_t p = begin; p < end; ++p)
            rope_trig(static_cast<int32_t>(p), scaling, sign, half, freq, t + p * head_size,
                      t + p * head_size + half);
        },
        grain_for(50 * half));
    parallel_for(
        rows,
        [&](int64_t begin, int64_t end) {
          for (int64_t r = begin; r < end; ++r) {
            const int32_t pos = positions[r];
            if (pos < 0) continue;
            const float* cs = t + static_cast<int64_t>(pos) * head_size;
            rope_rotate_row(x + r * row_stride + col_offset, heads, head_size, cs, cs + half);
          }
        },
        grain_for(rotate_cost));
    return;
  }
  parallel_for(
      rows,
      [&](int64_t begin, int64_t end) {
        std::vector<float> buf(static_cast<size_t>(head_size));
        float* cs = buf.data();
        float* sn = cs + half;
        for (int64_t r = begin; r < end; ++r) {
          const int32_t pos = positions[r];
          if (pos < 0) continue;
          rope_trig(pos, scaling, sign, half, freq, cs, sn);
          rope_rotate_row(x + r * row_stride + col_offset, heads, head_size, cs, sn);
        }
      },
      grain_for(rotate_cost + 50 * half));
}

// ================================= SwiGLU ================================================
// sigmoid(x) from e = exp(-|x|) in (0, 1] only (no overflow for any x):
//   s = 1 / (1 + e);  sigmoid(x) = s (x >= 0) or e s (x < 0);  sigmoid (1 - sigmoid) = e s^2.
// silu(x) = x sigmoid(x); silu'(x) = sigmoid(x) + x sigmoid(x) (1 - sigmoid(x)).
// Below x = -88, e underflows in fast_exp (exactly 0 for x < -87.3) and |silu| < 6e-37:
// silu and silu' are set to 0 there, so that -inf gives 0 rather than -inf * 0 = NaN;
// above x = 88, silu' is set to 1 (its exact value rounds to 1 beyond x ~ 20), so that
// +inf gives 1 rather than inf * 0.
constexpr float kSiluTailCut = 88.0f;

PPO_CPU_MULTIVERSION
void swiglu_forward_rows(int64_t begin, int64_t end, int64_t H, const float* gate_up,
                         float* __restrict out) {
  for (int64_t r = begin; r < end; ++r) {
    const float* g = gate_up + r * 2 * H;
    const float* u = g + H;
    float* y = out + r * H;
    for (int64_t k = 0; k < H; ++k) {
      const float x = g[k];
      const float e = fast_exp(-std::fabs(x));
      const float s = 1.0f / (1.0f + e);
      const float sig = x >= 0.0f ? s : e * s;
      float silu = x * sig;
      silu = x < -kSiluTailCut ? 0.0f : silu;
      y[k] = silu * u[k];
    }
  }
}

// One row of the backward: dg/du are the gate/up halves of the row's gradient.
__attribute__((always_inline)) inline void swiglu_backward_row(
    int64_t H, const float* __restrict g, const float* __restrict u,
    const float* __restrict go, float* __restrict dg, float* __restrict du) {
  for (int64_t k = 0; k < H; ++k) {
    const float x = g[k];
    const float e = fast_exp(-std::fabs(x));
    const float s = 1.0f / (1.0f + e);
    const float sig = x >= 0.0f ? s : e * s;
    float silu = x * sig;
    silu = x < -kSiluTailCut ? 0.0f : silu;
    float ds = sig + x * ((e * s) * s);
    ds = x < -kSiluTailCut ? 0.0f : ds;
    ds = x > kSiluTailCut ? 1.0f : ds;
    dg[k] += (go[k] * u[k]) * ds;
    du[k] += go[k] * silu;
  }
}

PPO_CPU_MULTIVERSION
void swiglu_backward_rows(int64_t begin, int64_t end, int64_t H, const float* gate_up,
                          const float* grad_out, float* grad_gate_up) {
  for (int64_t r = begin; r < end; ++r) {
    const float* g = gate_up + r * 2 * H;
    float* dg = grad_gate_up + r * 2 * H;
    swiglu_backward_row(H, g, g + H, grad_out + r * H, dg, dg + H);
  }
}

}  // namespace

// ---- RMSNorm ---------------------------------------------------------------------------

void rmsnorm_forward(int64_t rows, int64_t channels, const float* in, const float* weight,
                     float eps, float* out, float* rstd) {
  if (!check_rmsnorm_forward(rows, channels, in, weight, eps, out, rstd)) return;
  parallel_for(
      rows,
      [&](int64_t begin, int64_t end) {
        rmsnorm_forward_rows(begin, end, channels, in, weight, eps, out, rstd);
      },
      grain_for(4 * channels));
}

void rmsnorm_backward(int64_t rows, int64_t channels, const float* grad_out, const float* in,
                      const float* weight, const float* rstd, float* grad_in,
                      float* grad_weight) {
  if (!check_rmsnorm_backward(rows, channels, grad_out, in, weight, rstd, grad_in, grad_weight))
    return;

  // The chunking of layernorm_backward's weight gradient (row_chunks.h).
  const RowChunks rc = row_chunks(rows);
  const int64_t chunks = rc.count, rows_per_chunk = rc.rows_per_chunk;
  const std::unique_ptr<float[]> partials = chunk_partials(chunks * channels, "rmsnorm_backward");
  float* pw = partials.get();

  parallel_for(
      chunks,
      [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const int64_t r0 = k * rows_per_chunk, r1 = std::min(rows, r0 + rows_per_chunk);
          rmsnorm_backward_rows(r0, r1, channels, grad_out, in, weight, rstd, grad_in,
                                pw + k * channels);
        }
      },
      grain_for(9 * rows_per_chunk * channels));

  parallel_for(
      channels,
      [&](int64_t begin, int64_t end) {
        add_chunk_partials(begin, end, channels, chunks, pw, grad_weight);
      },
      grain_for(chunks));
}

// ---- RoPE ------------------------------------------------------------------------------

void rope_forward(int64_t rows, int64_t row_stride, int64_t col_offset, int64_t heads,
                  int64_t head_size, const int32_t* positions, float theta, float scaling,
                  float* x) {
  if (!check_rope(rows, row_stride, col_offset, heads, head_size, positions, theta, scaling, x,
                  "x"))
    return;
  rope_apply(rows, row_stride, col_offset, heads, head_size, positions, theta, scaling, 1.0f, x);
}

void rope_backward(int64_t rows, int64_t row_stride, int64_t col_offset, int64_t heads,
                   int64_t head_size, const int32_t* positions, float theta, float scaling,
                   float* grad) {
  if (!check_rope(rows, row_stride, col_offset, heads, head_size, positions, theta, scaling,
                  grad, "grad"))
    return;
  rope_apply(rows, row_stride, col_offset, heads, head_size, positions, theta, scaling, -1.0f,
             grad);
}

// ---- SwiGLU ----------------------------------------------------------------------------

void swiglu_forward(int64_t rows, int64_t hidden, const float* gate_up, float* out) {
  if (!check_swiglu_forward(rows, hidden, gate_up, out)) return;
  parallel_for(
      rows,
      [&](int64_t begin, int64_t end) { swiglu_forward_rows(begin, end, hidden, gate_up, out); },
      grain_for(30 * hidden));
}

void swiglu_backward(int64_t rows, int64_t hidden, const float* gate_up, const float* grad_out,
                     float* grad_gate_up) {
  if (!check_swiglu_backward(rows, hidden, gate_up, grad_out, grad_gate_up)) return;
  parallel_for(
      rows,
      [&](int64_t begin, int64_t end) {
        swiglu_backward_rows(begin, end, hidden, gate_up, grad_out, grad_gate_up);
      },
      grain_for(40 * hidden));
}

}  // namespace ppo::cpu
