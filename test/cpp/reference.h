// Plain float64 reference implementations of every op in core/op_args.h, written from
// the math stated there (not from any kernel): simple loops, no parallelism, no tricks
// beyond the max-subtraction that keeps softmax finite. Inputs are doubles (tests pass
// the exact float inputs widened to double); a mask pointer of nullptr means "all valid".
//
// These are the oracles of the C++ tests; their gradients are themselves checked
// against central finite differences of the forward functions (test_logprobs.cpp,
// test_losses.cpp).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace ref {

inline bool valid(const double* mask, int64_t i) { return mask == nullptr || mask[i] != 0.0; }

// ---- log-probs and entropy -----------------------------------------------------------
// One row: z = logits / temperature, lse = log sum exp z,
// logp = z[token] - lse, H = -sum p log p (terms with p == 0, from -inf logits, are 0).
inline void logprobs_row(int64_t vocab, const double* logits, int32_t token,
                         double temperature, double* logp, double* entropy) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t v = 0; v < vocab; ++v) m = std::max(m, logits[v] / temperature);
  double s = 0.0;
  for (int64_t v = 0; v < vocab; ++v) s += std::exp(logits[v] / temperature - m);
  const double lse = m + std::log(s);
  double h = 0.0;
  for (int64_t v = 0; v < vocab; ++v) {
    const double lp = logits[v] / temperature - lse;
    const double p = std::exp(lp);
    if (p > 0.0) h -= p * lp;
  }
  if (logp) *logp = logits[token] / temperature - lse;
  if (entropy) *entropy = h;
}

// logprobs / entropy are [batch*steps]; masked positions get 0. entropy may be nullptr.
inline void logprobs(int64_t batch, int64_t steps, int64_t vocab, const double* logits,
                     const int32_t* tokens, const double* mask, double temperature,
                     double* logprobs_out, double* entropy_out) {
  for (int64_t i = 0; i < batch * steps; ++i) {
    if (!valid(mask, i)) {
      logprobs_out[i] = 0.0;
      if (entropy_out) entropy_out[i] = 0.0;
      continue;
    }
    double lp = 0.0, h = 0.0;
    logprobs_row(vocab, logits + i * vocab, tokens[i], temperature, &lp, &h);
    logprobs_out[i] = lp;
    if (entropy_out) entropy_out[i] = h;
  }
}

// The scalar objective whose gradient logprobs_backward computes, for one row:
// f = g_lp * logp + g_h * H.
inline double logprobs_row_objective(int64_t vocab, const double* logits, int32_t token,
                                     double temperature, double g_lp, double g_h) {
  double lp = 0.0, h = 0.0;
  logprobs_row(vocab, logits, token, temperature, &lp, &h);
  return g_lp * lp + g_h * h;
}

// Analytic gradient of sum_i g_lp[i] * logp[i] + g_h[i] * H[i] w.r.t. the logits.
// Derivation (z = x / T, p = softmax z, H = -sum p log p):
//   d logp_tok / d z_v = [v == tok] - p_v
//   d H / d z_v        = -p_v (log p_v + H)
// and d z / d x = 1 / T. Masked rows get 0; nullptr gradients are zeros.
inline void logprobs_backward(int64_t batch, int64_t steps, int64_t vocab,
                              const double* logits, const int32_t* tokens,
                              const double* mask, double temperature, const double* g_lp,
                              const double* g_h, double* grad_logits) {
  std::vector<double> lp(vocab);
  for (int64_t i = 0; i < batch * steps; ++i) {
    double* g = grad_logits + i * vocab;
    if (!valid(mask, i)) {
      for (int64_t v = 0; v < vocab; ++v) g[v] = 0.0;
      continue;
    }
    const double* x = logits + i * vocab;
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t v = 0; v < vocab; ++v) m = std::max(m, x[v] / temperature);
    double s = 0.0;
    for (int64_t v = 0; v < vocab; ++v) s += std::exp(x[v] / temperature - m);
    const double lse = m + std::log(s);
    double h = 0.0;
    for (int64_t v = 0; v < vocab; ++v) {
      lp[v] = x[v] / temperature - lse;
      const double p = std::exp(lp[v]);
      if (p > 0.0) h -= p * lp[v];
    }
    const double a = g_lp ? g_lp[i] : 0.0;
    const double b = g_h ? g_h[i] : 0.0;
    for (int64_t v = 0; v < vocab; ++v) {
      const double p = std::exp(lp[v]);
      const double onehot = (v == tokens[i]) ? 1.0 : 0.0;
      const double dh = p > 0.0 ? -p * (lp[v] + h) : 0.0;
      g[v] = (a * (onehot - p) + b * dh) / temperature;
    }
  }
}

// ---- KL-penalized rewards -------------------------------------------------------------
inline double kl_estimate(double d, int estimator) {
  switch (estimator) {
    case 1: return d;
    case 2: return 0.5 * d * d;
    default: return std::expm1(-d) + d;  // exp(-d) - 1 + d, without cancellation
  }
}

// estimator: 1, 2, 3 for k1, k2, k3. kl_out may be nullptr.
inline void kl_rewards(int64_t batch, int64_t steps, const double* logprobs,
                       const double* ref_logprobs, const double* scores, const double* mask,
                       double kl_coef, int estimator, double* rewards_out, double* kl_out) {
  for (int64_t b = 0; b < batch; ++b) {
    int64_t last = -1;
    for (int64_t t = 0; t < steps; ++t)
      if (valid(mask, b * steps + t)) last = t;
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t i = b * steps + t;
      double kl = 0.0, r = 0.0;
      if (valid(mask, i)) {
        kl = kl_estimate(logprobs[i] - ref_logprobs[i], estimator);
        r = -kl_coef * kl + (t == last ? scores[b] : 0.0);
      }
      rewards_out[i] = r;
      if (kl_out) kl_out[i] = kl;
    }
  }
}

// ---- moments ---------------------------------------------------------------------------
struct Moments {
  double count = 0.0, mean = 0.0, m2 = 0.0;
};

inline Moments moments(int64_t count, const double* values) {
  Moments m;
  m.count = static_cast<double>(count);
  if (count == 0) return m;
  double s = 0.0;
  for (int64_t i = 0; i < count; ++i) s += values[i];
  m.mean = s / count;
  double q = 0.0;
  for (int64_t i = 0; i < count; ++i) q += (values[i] - m.mean) * (values[i] - m.mean);
  m.m2 = q;
  return m;
}

inline double moments_std(const Moments& m) {
  return m.count < 2 ? 0.0 : std::sqrt(m.m2 / (m.count - 1));
}

// ---- normalize scores -----------------------------------------------------------------
inline void normalize(int64_t count, const double* values, double mean, double std,
                      bool subtract_mean, double eps, double clip, double* out) {
  for (int64_t i = 0; i < count; ++i) {
    double y = (values[i] - (subtract_mean ? mean : 0.0)) / (std + eps);
    if (clip > 0) y = std::min(std::max(y, -clip), clip);
    out[i] = y;
  }
}

// ---- GAE -------------------------------------------------------------------------------
// Over the valid positions of each row in order; the state after the last valid
// position is terminal (value 0). Masked positions get 0.
inline void gae(int64_t batch, int64_t steps, const double* rewards, const double* values,
                const double* mask, double gamma, double lambda, double* adv_out,
                double* ret_out) {
  for (int64_t b = 0; b < batch; ++b) {
    std::vector<int64_t> idx;
    for (int64_t t = 0; t < steps; ++t) {
      const int64_t i = b * steps + t;
      adv_out[i] = 0.0;
      ret_out[i] = 0.0;
      if (valid(mask, i)) idx.push_back(i);
    }
    double next_value = 0.0, next_adv = 0.0;
    for (int64_t k = static_cast<int64_t>(idx.size()) - 1; k >= 0; --k) {
      const int64_t i = idx[k];
      const double delta = rewards[i] + gamma * next_value - values[i];
      const double a = delta + gamma * lambda * next_adv;
      adv_out[i] = a;
      ret_out[i] = a + values[i];
      next_value = values[i];
      next_adv = a;
    }
  }
}

// ---- whiten ----------------------------------------------------------------------------
inline void whiten(int64_t batch, int64_t steps, const double* values, const double* mask,
                   bool shift_mean, double eps, double clip, double* out) {
  const int64_t n_all = batch * steps;
  int64_t n = 0;
  double s = 0.0;
  for (int64_t i = 0; i < n_all; ++i)
    if (valid(mask, i)) {
      ++n;
      s += values[i];
    }
  if (n == 0) {
    for (int64_t i = 0; i < n_all; ++i) out[i] = 0.0;
    return;
  }
  const double mean = s / n;
  double q = 0.0;
  for (int64_t i = 0; i < n_all; ++i)
    if (valid(mask, i)) q += (values[i] - mean) * (values[i] - mean);
  const double var = n < 2 ? 0.0 : q / (n - 1);
  const double denom = std::sqrt(var + eps);
  for (int64_t i = 0; i < n_all; ++i) {
    if (!valid(mask, i)) {
      out[i] = 0.0;
      continue;
    }
    double y = (values[i] - mean) / denom;
    if (!shift_mean) y += mean;
    if (clip > 0) y = std::min(std::max(y, -clip), clip);
    out[i] = y;
  }
}

// ---- clip ------------------------------------------------------------------------------
inline void clip(int64_t batch, int64_t steps, const double* values, const double* mask,
                 double c, double* out) {
  for (int64_t i = 0; i < batch * steps; ++i)
    out[i] = valid(mask, i) ? std::min(std::max(values[i], -c), c) : 0.0;
}

// ---- policy loss -----------------------------------------------------------------------
struct PolicyLoss {
  double loss = 0.0, clip_fraction = 0.0, approx_kl = 0.0;
  int64_t tokens = 0;
};

// grad_out may be nullptr.
inline PolicyLoss policy_loss(int64_t batch, int64_t steps, const double* logprobs,
                              const double* old_logprobs, const double* advantages,
                              const double* mask, double clip_eps, double* grad_out) {
  PolicyLoss r;
  const int64_t n_all = batch * steps;
  for (int64_t i = 0; i < n_all; ++i) r.tokens += valid(mask, i) ? 1 : 0;
  const double n = static_cast<double>(r.tokens);
  double loss = 0.0, clipped = 0.0, kl = 0.0;
  for (int64_t i = 0; i < n_all; ++i) {
    if (!valid(mask, i)) {
      if (grad_out) grad_out[i] = 0.0;
      continue;
    }
    const double d = logprobs[i] - old_logprobs[i];
    const double ratio = std::exp(d);
    const double a = advantages[i];
    const double rc = std::min(std::max(ratio, 1.0 - clip_eps), 1.0 + clip_eps);
    const double unclipped = -a * ratio;
    const double clipped_term = -a * rc;
    loss += std::max(unclipped, clipped_term);
    if (clipped_term > unclipped) clipped += 1.0;
    kl += (ratio - 1.0) - d;
    if (grad_out) grad_out[i] = unclipped >= clipped_term ? -a * ratio / n : 0.0;
  }
  if (r.tokens > 0) {
    r.loss = loss / n;
    r.clip_fraction = clipped / n;
    r.approx_kl = kl / n;
  }
  return r;
}

// ---- value loss ------------------------------------------------------------------------
struct ValueLoss {
  double loss = 0.0, clip_fraction = 0.0;
  int64_t tokens = 0;
};

inline ValueLoss value_loss(int64_t batch, int64_t steps, const double* values,
                            const double* old_values, const double* returns,
                            const double* mask, bool use_clip, double clip_eps,
                            double* grad_out) {
  ValueLoss r;
  const int64_t n_all = batch * steps;
  for (int64_t i = 0; i < n_all; ++i) r.tokens += valid(mask, i) ? 1 : 0;
  const double n = static_cast<double>(r.tokens);
  double loss = 0.0, clipped = 0.0;
  for (int64_t i = 0; i < n_all; ++i) {
    if (!valid(mask, i)) {
      if (grad_out) grad_out[i] = 0.0;
      continue;
    }
    const double v = values[i], ret = returns[i];
    const double u = (v - ret) * (v - ret);
    if (!use_clip) {
      loss += 0.5 * u;
      if (grad_out) grad_out[i] = (v - ret) / n;
      continue;
    }
    const double vc =
        std::min(std::max(v, old_values[i] - clip_eps), old_values[i] + clip_eps);
    const double c = (vc - ret) * (vc - ret);
    loss += 0.5 * std::max(u, c);
    if (c > u) clipped += 1.0;
    if (grad_out) grad_out[i] = u >= c ? (v - ret) / n : 0.0;
  }
  if (r.tokens > 0) {
    r.loss = loss / n;
    r.clip_fraction = clipped / n;
  }
  return r;
}

}  // namespace ref
