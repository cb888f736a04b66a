// Log-probs of taken tokens and per-position entropy, forward and backward.
// One row = one (b, t) position = `vocab` logits. Rows run in parallel; within a
// row, vectorized passes over the vocabulary.
#include <algorithm>
#include <cmath>

#include "core/thread_pool.h"
#include "core/validate.h"
#include "cpu/kernels.h"
#include "cpu/vec_math.h"

namespace ppo::cpu {

namespace {

// Partial float sums over blocks of this many elements, added into a double: the
// speed of float lanes with error bounded as for a 256-term float sum.
constexpr int64_t kBlock = 256;

// log p_v = (z_v - max) - log_sum, with z = logits / temperature. Keeping max and
// log_sum apart (rather than lse = max + log_sum) keeps full precision when the
// logits are large: z_v - max is exact-ish in float, log_sum is small.
// One valid (b, t) position: its logits and taken token, plus what an error message
// needs to name the entry in the whole batch.
struct LogitsRow {
  const float* logits;  // [vocab] of this row
  int32_t token;
  int64_t index;        // b * steps + t
  int64_t vocab;
  const float* all_logits;
  const int32_t* all_tokens;
};

LogitsRow logits_row(const float* logits, const int32_t* tokens, int64_t r, int64_t vocab) {
  return {logits + r * vocab, tokens[r], r, vocab, logits, tokens};
}

struct RowStats {
  float max;       // max_v z_v
  double log_sum;  // log sum_v exp(z_v - max)
  double entropy;  // -sum_v p_v log p_v (only when asked)
};

// max_v z_v, and (fused into the same pass, since the row is read from memory once
// here) the count of entries that are NaN or +inf and of those that are finite.
struct RowScan {
  float max;
  int32_t bad;     // NaN or +inf
  int32_t finite;  // neither NaN nor +-inf
};

PPO_CPU_MULTIVERSION
RowScan row_scan(const float* x, int64_t n, float inv_temp) {
  float lanes[kLanes];
  int32_t bad[kLanes] = {}, finite[kLanes] = {};
  for (int j = 0; j < kLanes; ++j) lanes[j] = -INFINITY;
  int64_t v = 0;
  for (; v + kLanes <= n; v += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const float xv = x[v + j];
      lanes[j] = std::max(lanes[j], xv * inv_temp);
      bad[j] += (xv != xv) | (xv == INFINITY);
      finite[j] += (xv - xv) == 0.0f;
    }
  }
  RowScan scan{-INFINITY, 0, 0};
  for (int j = 0; j < kLanes; ++j) {
    scan.max = std::max(scan.max, lanes[j]);
    scan.bad += bad[j];
    scan.finite += finite[j];
  }
  for (; v < n; ++v) {
    const float xv = x[v];
    scan.max = std::max(scan.max, xv * inv_temp);
    scan.bad += (xv != xv) | (xv == INFINITY);
    scan.finite += (xv - xv) == 0.0f;
  }
  return scan;
}

// Returns sum_v e_v and, via weighted, sum_v e_v (z_v - max), where e_v = exp(z_v - max).
// Terms with e_v == 0 (including z = -inf) contribute nothing to either sum.
PPO_CPU_MULTIVERSION
double row_exp_sums(const float* x, int64_t n, float inv_temp, float max, double* weighted) {
  double total = 0.0, total_w = 0.0;
  // Per block: a map loop (exp; vectorizes like any elementwise loop), then lane-wise
  // sums over the L1-resident results (vectorizes without reassociating one sum).
  alignas(64) float e[kBlock], et[kBlock];
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t len = std::min(n - start, kBlock);
    const float* xb = x + start;
    for (int64_t v = 0; v < len; ++v) {
      const float t = xb[v] * inv_temp - max;
      const float ev = fast_exp(t);
      e[v] = ev;
      et[v] = ev == 0.0f ? 0.0f : ev * t;
    }
    float s[kLanes] = {}, w[kLanes] = {};
    int64_t v = 0;
    for (; v + kLanes <= len; v += kLanes) {
      for (int j = 0; j < kLanes; ++j) {
        s[j] += e[v + j];
        w[j] += et[v + j];
      }
    }
    float block_s = 0.0f, block_w = 0.0f;
    for (int j = 0; j < kLanes; ++j) {
      block_s += s[j];
      block_w += w[j];
    }
    for (; v < len; ++v) {
      block_s += e[v];
      block_w += et[v];
    }
    total += block_s;
    total_w += block_w;
  }
  *weighted = total_w;
  return total;
}

// The checks of validate::logits_rows, done on the scan of the row: on a bad row,
// validate::logits_rows itself finds the entry and throws its precise error.
void check_row(const LogitsRow& row, const RowScan& scan) {
  if (scan.bad > 0 || scan.finite == 0 || !std::isfinite(row.logits[row.token])) {
    validate::logits_rows(row.all_logits, row.all_tokens, nullptr, row.index, row.index + 1,
                          row.vocab);
  }
}

RowStats row_stats(const LogitsRow& row, float inv_temp, bool want_entropy) {
  const float* logits = row.logits;
  const int64_t vocab = row.vocab;
  const RowScan scan = row_scan(logits, vocab, inv_temp);
  check_row(row, scan);
  RowStats st;
  st.max = scan.max;
  double weighted = 0.0;
  const double sum = row_exp_sums(logits, vocab, inv_temp, st.max, &weighted);
  st.log_sum = std::log(sum);
  // H = log S - E_p[z - max] = log S - (sum e (z - max)) / S
  st.entropy = want_entropy ? st.log_sum - weighted / sum : 0.0;
  return st;
}

// grad_v = (g_lp ([v == token] - p_v) - g_h p_v (log p_v + H)) * inv_temp
PPO_CPU_MULTIVERSION
void row_backward(const float* x, int64_t n, float inv_temp, float max, float log_sum,
                  float entropy, float g_lp, float g_h, float* grad) {
  for (int64_t v = 0; v < n; ++v) {
    float log_p = (x[v] * inv_temp - max) - log_sum;
    float p = fast_exp(log_p);
    float entropy_term = p == 0.0f ? 0.0f : p * (log_p + entropy);
    grad[v] = (-g_lp * p - g_h * entropy_term) * inv_temp;
  }
}


}  // namespace

void logprobs_forward(const LogprobsArgs& a) {
  const float inv_temp = 1.0f / a.temperature;
  const int64_t rows = a.batch * a.steps;
  parallel_for(
      rows,
      [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          if (a.mask && a.mask[r] == 0.0f) {
            a.logprobs[r] = 0.0f;
            if (a.entropy) a.entropy[r] = 0.0f;
            continue;
          }
          const LogitsRow row = logits_row(a.logits, a.tokens, r, a.vocab);
          RowStats st = row_stats(row, inv_temp, a.entropy != nullptr);
          a.logprobs[r] = static_cast<float>(double(row.logits[row.token] * inv_temp - st.max) - st.log_sum);
          if (a.entropy) a.entropy[r] = static_cast<float>(st.entropy);
        }
      },
      grain_for(a.vocab));
}

void logprobs_backward(const LogprobsBackwardArgs& a) {
  const float inv_temp = 1.0f / a.temperature;
  const int64_t rows = a.batch * a.steps;
  parallel_for(
      rows,
      [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          float* grad = a.grad_logits + r * a.vocab;
          const float g_lp = a.grad_logprobs ? a.grad_logprobs[r] : 0.0f;
          const float g_h = a.grad_entropy ? a.grad_entropy[r] : 0.0f;
          if (a.mask && a.mask[r] == 0.0f) {
            std::fill(grad, grad + a.vocab, 0.0f);
            continue;
          }
          const LogitsRow row = logits_row(a.logits, a.tokens, r, a.vocab);
          if (g_lp == 0.0f && g_h == 0.0f) {  // zero gradient: check the row, skip the math
            check_row(row, row_scan(row.logits, a.vocab, inv_temp));
            std::fill(grad, grad + a.vocab, 0.0f);
            continue;
          }
          RowStats st = row_stats(row, inv_temp, g_h != 0.0f);
          row_backward(row.logits, a.vocab, inv_temp, st.max, static_cast<float>(st.log_sum),
                       static_cast<float>(st.entropy), g_lp, g_h, grad);
          grad[a.tokens[r]] += g_lp * inv_temp;
        }
      },
      grain_for(a.vocab));
}

}  // namespace ppo::cpu
