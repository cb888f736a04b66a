// LayerNorm and GELU on the CPU, forward and backward side by side (see layers.h for
// the contracts). Every hot loop is a PPO_CPU_MULTIVERSION function over a range of
// rows or elements; parallel_for splits the rows/elements across the pool.
//
// Determinism: per-row work (every output of the forward passes, grad_in, the GELU
// gradient) does not depend on which thread runs the row. The one cross-row reduction,
// LayerNorm's weight/bias gradient, sums rows into per-chunk partial buffers whose
// chunking depends only on `rows`, then adds the chunks in chunk order.
#include "cpu/layers.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <new>

#include "core/error.h"
#include "cpu/arg_checks.h"
#include "cpu/row_chunks.h"
#include "core/thread_pool.h"
#include "cpu/vec_math.h"

namespace ppo::cpu {
namespace {


// ================================ LayerNorm ==============================================

// Rows [begin, end) of the forward. Per row of C channels:
//   pass 1: mean in double (kLanes double accumulators, so the loop vectorizes and a row
//           of large values, e.g. 1e4 + noise, loses nothing to float rounding);
//   pass 2: biased variance sum (x - mean)^2 / C, in double (two-pass: no cancellation
//           of E[x^2] - E[x]^2 for large-mean rows);
//   pass 3: out = ((x - m_hi) - m_lo) * rstd * w + b in float, where m_hi + m_lo is the
//           double mean split into two floats: x - m_hi is exact when x is within a
//           factor 2 of the mean (Sterbenz), so large-mean rows keep float accuracy.
PPO_CPU_MULTIVERSION
void layernorm_forward_rows(int64_t begin, int64_t end, int64_t C, const float* __restrict in,
                            const float* __restrict weight, const float* __restrict bias,
                            float eps, float* __restrict out, float* __restrict mean,
                            float* __restrict rstd) {
  for (int64_t r = begin; r < end; ++r) {
    const float* x = in + r * C;
    float* y = out + r * C;

    double lanes[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes)
      for (int j = 0; j < kLanes; ++j) lanes[j] += static_cast<double>(x[c + j]);
    double sum = 0.0;
    for (int j = 0; j < kLanes; ++j) sum += lanes[j];
    for (; c < C; ++c) sum += static_cast<double>(x[c]);
    const double m = sum / static_cast<double>(C);

    double sq[kLanes] = {};
    c = 0;
    for (; c + kLanes <= C; c += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const double d = static_cast<double>(x[c + j]) - m;
        sq[j] += d * d;
      }
    double ss = 0.0;
    for (int j = 0; j < kLanes; ++j) ss += sq[j];
    for (; c < C; ++c) {
      const double d = static_cast<double>(x[c]) - m;
      ss += d * d;
    }
    const double var = ss / static_cast<double>(C);
    const double rs = 1.0 / std::sqrt(var + static_cast<double>(eps));

    const float m_hi = static_cast<float>(m);
    const float m_lo = static_cast<float>(m - static_cast<double>(m_hi));
    const float rsf = static_cast<float>(rs);
    for (c = 0; c < C; ++c) y[c] = (((x[c] - m_hi) - m_lo) * rsf) * weight[c] + bias[c];
    mean[r] = m_hi;
    rstd[r] = rsf;
  }
}

// Rows [begin, end) of the backward; pw/pb [C] are this chunk's partial weight/bias
// gradients (zeroed here, then summed over the chunk's rows in row order).
// With dn = w * dout (gradient w.r.t. xhat) and xhat = (x - mean) * rstd:
//   din = rstd * (dn - mean_c(dn) - xhat * mean_c(dn * xhat))
// The saved mean is a float; as in the forward, the part of the true mean that float
// dropped is recovered as m_lo = mean_c(x - m_hi) (x - m_hi exact for large-mean rows),
// so xhat = ((x - m_hi) - m_lo) * rstd, and, in the same pass,
//   sum_c dn * xhat = rstd * (sum_c dn (x - m_hi) - m_lo sum_c dn).
PPO_CPU_MULTIVERSION
void layernorm_backward_rows(int64_t begin, int64_t end, int64_t C,
                             const float* __restrict grad_out, const float* __restrict in,
                             const float* __restrict weight, const float* __restrict mean,
                             const float* __restrict rstd, float* __restrict grad_in,
                             float* __restrict pw, float* __restrict pb) {
  for (int64_t c = 0; c < C; ++c) pw[c] = 0.0f;
  for (int64_t c = 0; c < C; ++c) pb[c] = 0.0f;
  const float inv_c = static_cast<float>(1.0 / static_cast<double>(C));
  for (int64_t r = begin; r < end; ++r) {
    const float* g = grad_out + r * C;
    const float* x = in + r * C;
    float* gi = grad_in + r * C;
    const float m_hi = mean[r], rs = rstd[r];

    float s_dn[kLanes] = {}, s_dnd[kLanes] = {}, s_d[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= C; c += kLanes)
      for (int j = 0; j < kLanes; ++j) {
        const float dn = weight[c + j] * g[c + j];
        const float d = x[c + j] - m_hi;
        s_dn[j] += dn;
        s_dnd[j] += dn * d;
        s_d[j] += d;
      }
    float sum_dn = 0.0f, sum_dnd = 0.0f, sum_d = 0.0f;
    for (int j = 0; j < kLanes; ++j) {
      sum_dn += s_dn[j];
      sum_dnd += s_dnd[j];
      sum_d += s_d[j];
    }
    for (; c < C; ++c) {
      const float dn = weight[c] * g[c];
      const float d = x[c] - m_hi;
      sum_dn += dn;
      sum_dnd += dn * d;
      sum_d += d;
    }
    const float m_lo = sum_d * inv_c;
    const float dn_mean = sum_dn * inv_c;
    const float dnx_mean = rs * (sum_dnd - m_lo * sum_dn) * inv_c;

    for (c = 0; c < C; ++c) {
      const float xhat = ((x[c] - m_hi) - m_lo) * rs;
      const float dn = weight[c] * g[c];
      gi[c] += ((dn - dn_mean) - xhat * dnx_mean) * rs;
      pw[c] += xhat * g[c];
      pb[c] += g[c];
    }
  }
}

}  // namespace

// row_chunks.h: one chunk's partial at a time, so each grad[c] adds the chunks in order.
PPO_CPU_MULTIVERSION
void add_chunk_partials(int64_t begin, int64_t end, int64_t C, int64_t chunks, const float* __restrict partials,
                        float* __restrict grad) {
  for (int64_t k = 0; k < chunks; ++k) {
    const float* p = partials + k * C;
    for (int64_t c = begin; c < end; ++c) grad[c] += p[c];
  }
}

void layernorm_forward(int64_t rows, int64_t channels, const float* in, const float* weight,
                       const float* bias, float eps, float* out, float* mean, float* rstd) {
  if (!check_layernorm_forward(rows, channels, in, weight, bias, eps, out, mean, rstd)) return;
  parallel_for(
      rows,
      [&](int64_t begin, int64_t end) {
        layernorm_forward_rows(begin, end, channels, in, weight, bias, eps, out, mean, rstd);
      },
      grain_for(8 * channels));
}

void layernorm_backward(int64_t rows, int64_t channels, const float* grad_out, const float* in,
                        const float* weight, const float* mean, const float* rstd,
                        float* grad_in, float* grad_weight, float* grad_bias) {
  if (!check_layernorm_backward(rows, channels, grad_out, in, weight, mean, rstd, grad_in, grad_weight,
                                grad_bias))
    return;

  const RowChunks rc = row_chunks(rows);
  const int64_t chunks = rc.count, rows_per_chunk = rc.rows_per_chunk;
  // [chunks][C] weight partials, then [chunks][C] bias partials.
  const int64_t partial_size = chunks * channels;
  const std::unique_ptr<float[]> partials = chunk_partials(2 * partial_size, "layernorm_backward");
  float* pw = partials.get();
  float* pb = pw + partial_size;

  parallel_for(
      chunks,
      [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const int64_t r0 = k * rows_per_chunk, r1 = std::min(rows, r0 + rows_per_chunk);
          layernorm_backward_rows(r0, r1, channels, grad_out, in, weight, mean, rstd, grad_in,
                                  pw + k * channels, pb + k * channels);
        }
      },
      grain_for(12 * rows_per_chunk * channels));

  parallel_for(
      channels,
      [&](int64_t begin, int64_t end) {
        add_chunk_partials(begin, end, channels, chunks, pw, grad_weight);
        add_chunk_partials(begin, end, channels, chunks, pb, grad_bias);
      },
      grain_for(2 * chunks));
}

// ================================== GELU ===============================================
// GPT-2's gelu(x) = 0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3).
// Since 0.5 (1 + tanh(u)) = sigmoid(2u) = 1 / (1 + e^(-2u)), we compute
//   gelu(x) = x / (1 + e^(-2u))
// which is branch-free with fast_exp, vectorizes, and has no cancellation in either
// tail (1 + tanh(u) would lose all digits for u << 0). Where -2u > 80 (x < ~-9.6) the
// true gelu and gelu' are below ~1e-33 in magnitude; both are set to exactly 0 there
// (and where -2u < -80, gelu' to exactly 1; gelu = x / (1 + e) is already exact there)
// (a select, still branch-free), which keeps denormals out and gives the right limit
// for x -> -inf (fast_exp clamps its argument at 88.7, so x / (1 + e) alone would
// return x / 3.4e38, e.g. -0.3 at x = -1e38).
// Derivative, with s = sigmoid(2u) and 1 - s = e^(-2u) s (accurate when s ~ 1):
//   gelu'(x) = s + 2 x s (1 - s) du/dx,   du/dx = sqrt(2/pi) (1 + 3 * 0.044715 x^2).

constexpr float kGeluScale = 0.7978845608028654f;  // sqrt(2/pi)
constexpr float kGeluCubic = 0.044715f;
constexpr float kGeluTailCut = 80.0f;  // -2u beyond which gelu and gelu' are taken as 0

namespace {

PPO_CPU_MULTIVERSION
void gelu_forward_range(int64_t begin, int64_t end, const float* in, float* out) {
  // No __restrict: in-place (out == in) is allowed; each element is read before written.
  for (int64_t i = begin; i < end; ++i) {
    const float x = in[i];
    const float t = -2.0f * kGeluScale * (x + kGeluCubic * x * x * x);  // -2u
    const float y = x / (1.0f + fast_exp(t));
    out[i] = t > kGeluTailCut ? 0.0f : y;
  }
}

PPO_CPU_MULTIVERSION
void gelu_backward_range(int64_t begin, int64_t end, const float* __restrict in,
                         const float* __restrict grad_out, float* __restrict grad_in) {
  for (int64_t i = begin; i < end; ++i) {
    const float x = in[i];
    const float x2 = x * x;
    const float t = -2.0f * kGeluScale * (x + kGeluCubic * x2 * x);  // -2u
    const float du = kGeluScale * (1.0f + 3.0f * kGeluCubic * x2);
    const float e = fast_exp(t);
    const float s = 1.0f / (1.0f + e);
    const float s_one_minus_s = (e * s) * s;  // e * s <= 1: no overflow
    float d = s + 2.0f * x * du * s_one_minus_s;
    d = t > kGeluTailCut ? 0.0f : d;
    d = t < -kGeluTailCut ? 1.0f : d;  // x > ~9.6: 1 (and no inf * 0 once x^2 overflows)
    grad_in[i] += d * grad_out[i];
  }
}

}  // namespace

void gelu_forward(int64_t n, const float* in, float* out) {
  if (!check_gelu_forward(n, in, out)) return;
  parallel_for(
      n, [&](int64_t begin, int64_t end) { gelu_forward_range(begin, end, in, out); },
      grain_for(32));
}

void gelu_backward(int64_t n, const float* in, const float* grad_out, float* grad_in) {
  if (!check_gelu_backward(n, in, grad_out, grad_in)) return;
  parallel_for(
      n,
      [&](int64_t begin, int64_t end) { gelu_backward_range(begin, end, in, grad_out, grad_in); },
      grain_for(40));
}

}  // namespace ppo::cpu

// ============================ Embeddings, bias, residual ==================================
// The small kernels of the GPT-2 engine (contracts in layers.h). Forward passes and the
// elementwise ops split rows/elements over the pool; each output element is computed the
// same way whichever thread runs it. The two cross-row reductions:
//   - embedding_backward: threads split the CHANNELS; each thread walks all rows in row
//     order for its channel range, so repeated ids (the same wte/wpe row hit by several
//     rows) are summed in row order whatever the thread count, with no atomics and no
//     per-thread copies of the [vocab, C] gradient;
//   - bias_backward: per-chunk partial sums over fixed chunks of rows (the chunking of
//     layernorm_backward: a function of `rows` only), added in chunk order.

namespace ppo::cpu {
namespace {

// out[r, :] for rows [begin, end): wte[tokens[r], :] + wpe[positions[r], :], or 0 for a
// padding row (positions[r] < 0; tokens[r] is then not read: it may be garbage).
PPO_CPU_MULTIVERSION
void embedding_forward_rows(int64_t begin, int64_t end, int64_t C,
                            const int32_t* __restrict tokens,
                            const int32_t* __restrict positions, const float* __restrict wte,
                            const float* __restrict wpe, float* __restrict out) {
  for (int64_t r = begin; r < end; ++r) {
    float* y = out + r * C;
    const int32_t pos = positions[r];
    if (pos < 0) {
      for (int64_t c = 0; c < C; ++c) y[c] = 0.0f;
      continue;
    }
    const float* te = wte + static_cast<int64_t>(tokens[r]) * C;
    if (wpe == nullptr) {  // no learned positions (Llama: rotary positions come later)
      for (int64_t c = 0; c < C; ++c) y[c] = te[c];
      continue;
    }
    const float* pe = wpe + static_cast<int64_t>(pos) * C;
    for (int64_t c = 0; c < C; ++c) y[c] = te[c] + pe[c];
  }
}

// Channels [c0, c1) of the embedding gradient: for every non-padding row r, in row order,
//   grad_wte[tokens[r], c] += grad_out[r, c]  and  grad_wpe[positions[r], c] += grad_out[r, c].
// A thread owns its channel range in every row of grad_wte/grad_wpe, so no two threads
// touch the same element. grad_wpe may be nullptr (then only wte is updated).
PPO_CPU_MULTIVERSION
void embedding_backward_channels(int64_t c0, int64_t c1, int64_t rows, int64_t C,
                                 const float* __restrict grad_out,
                                 const int32_t* __restrict tokens,
                                 const int32_t* __restrict positions,
                                 float* __restrict grad_wte, float* __restrict grad_wpe) {
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t pos = positions[r];
    if (pos < 0) continue;
    const float* g = grad_out + r * C;
    float* te = grad_wte + static_cast<int64_t>(tokens[r]) * C;
    for (int64_t c = c0; c < c1; ++c) te[c] += g[c];
    if (grad_wpe != nullptr) {
      float* pe = grad_wpe + static_cast<int64_t>(pos) * C;
      for (int64_t c = c0; c < c1; ++c) pe[c] += g[c];
    }
  }
}

// out[r, c] += bias[c] for rows [begin, end).
PPO_CPU_MULTIVERSION
void add_bias_rows(int64_t begin, int64_t end, int64_t C, const float* __restrict bias,
                   float* __restrict out) {
  for (int64_t r = begin; r < end; ++r) {
    float* y = out + r * C;
    for (int64_t c = 0; c < C; ++c) y[c] += bias[c];
  }
}

// partial[c] = sum of grad_out[r, c] over rows [r0, r1), in row order, from 0.
PPO_CPU_MULTIVERSION
void bias_partial_rows(int64_t r0, int64_t r1, int64_t C, const float* __restrict grad_out,
                       float* __restrict partial) {
  for (int64_t c = 0; c < C; ++c) partial[c] = 0.0f;
  for (int64_t r = r0; r < r1; ++r) {
    const float* g = grad_out + r * C;
    for (int64_t c = 0; c < C; ++c) partial[c] += g[c];
  }
}

// No __restrict: out may equal a or b (each element is read before it is written); GCC
// vectorizes with a run-time overlap check.
PPO_CPU_MULTIVERSION
void add_range(int64_t begin, int64_t end, const float* a, const float* b, float* out) {
  for (int64_t i = begin; i < end; ++i) out[i] = a[i] + b[i];
}

PPO_CPU_MULTIVERSION
void accumulate_range(int64_t begin, int64_t end, const float* __restrict x,
                      float* __restrict y) {
  for (int64_t i = begin; i < end; ++i) y[i] += x[i];
}

}  // namespace

void embedding_forward(int64_t rows, int64_t channels, const int32_t* tokens,
                       const int32_t* positions, const float* wte, const float* wpe,
                       float* out) {
  if (!check_embedding_forward(rows, channels, tokens, positions, wte, out)) return;
  parallel_for(
      rows,
      [&](int64_t begin, int64_t end) {
        embedding_forward_rows(begin, end, channels, tokens, positions, wte, wpe, out);
      },
      grain_for(2 * channels));
}

void embedding_backward(int64_t rows, int64_t channels, const float* grad_out,
                        const int32_t* tokens, const int32_t* positions, float* grad_wte,
                        float* grad_wpe) {
  if (!check_embedding_backward(rows, channels, grad_out, tokens, positions, grad_wte)) return;
  // Channel ranges of at least 16 floats (one 64-byte cache line), so two threads rarely
  // write the same line of a gradient row; each channel costs 2 adds per row.
  parallel_for(
      channels,
      [&](int64_t begin, int64_t end) {
        embedding_backward_channels(begin, end, rows, channels, grad_out, tokens, positions,
                                    grad_wte, grad_wpe);
      },
      std::max<int64_t>(16, grain_for(2 * rows)));
}

void add_bias(int64_t rows, int64_t channels, const float* bias, float* out) {
  if (!check_add_bias(rows, channels, bias, out)) return;
  parallel_for(
      rows,
      [&](int64_t begin, int64_t end) { add_bias_rows(begin, end, channels, bias, out); },
      grain_for(channels));
}

void bias_backward(int64_t rows, int64_t channels, const float* grad_out, float* grad_bias) {
  if (!check_bias_backward(rows, channels, grad_out, grad_bias)) return;

  const RowChunks rc = row_chunks(rows);
  const int64_t chunks = rc.count, rows_per_chunk = rc.rows_per_chunk;
  const std::unique_ptr<float[]> partials = chunk_partials(chunks * channels, "bias_backward");
  float* p = partials.get();
  parallel_for(
      chunks,
      [&](int64_t begin, int64_t end) {
        for (int64_t k = begin; k < end; ++k) {
          const int64_t r0 = k * rows_per_chunk, r1 = std::min(rows, r0 + rows_per_chunk);
          bias_partial_rows(r0, r1, channels, grad_out, p + k * channels);
        }
      },
      grain_for(rows_per_chunk * channels));
  parallel_for(
      channels,
      [&](int64_t begin, int64_t end) {
        add_chunk_partials(begin, end, channels, chunks, p, grad_bias);
      },
      grain_for(chunks));
}

void add(int64_t n, const float* a, const float* b, float* out) {
  if (!check_add(n, a, b, out)) return;
  parallel_for(
      n, [&](int64_t begin, int64_t end) { add_range(begin, end, a, b, out); }, grain_for(1));
}

void accumulate(int64_t n, const float* x, float* y) {
  if (!check_accumulate(n, x, y)) return;
  parallel_for(
      n, [&](int64_t begin, int64_t end) { accumulate_range(begin, end, x, y); }, grain_for(1));
}

}  // namespace ppo::cpu
