// A float64 GPT-2 written independently from the architecture, in the plainest loops
// (per row, per head, per key): the reference the engine's and the trainers' tests
// compare against. Shared by test_gpt.cpp and the trainer tests.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "model/config.h"
#include "model/gpt.h"
#include "model/params.h"
#include "test_util.h"

namespace gpt_ref {

using namespace ppo::model;

// ---- the float64 reference ------------------------------------------------------------------
// Everything in double, in the plainest loops: per row of tokens, per head, per key.
struct Ref {
  const ModelConfig& cfg;
  const ParameterLayout& lay;
  const std::vector<double>& p;

  const double* at(int64_t off) const { return p.data() + off; }

  // y = LayerNorm(x) over C.
  void layernorm(const double* x, const double* w, const double* b, double* y) const {
    const int64_t C = cfg.n_embd;
    double m = 0, v = 0;
    for (int64_t i = 0; i < C; ++i) m += x[i];
    m /= C;
    for (int64_t i = 0; i < C; ++i) v += (x[i] - m) * (x[i] - m);
    v /= C;
    const double r = 1.0 / std::sqrt(v + cfg.layer_norm_epsilon);
    for (int64_t i = 0; i < C; ++i) y[i] = (x[i] - m) * r * w[i] + b[i];
  }
  // y [out] = W [out, in] x + b
  static void dense(const double* x, const double* W, const double* b, int64_t in, int64_t out, double* y) {
    for (int64_t o = 0; o < out; ++o) {
      double s = b ? b[o] : 0.0;
      for (int64_t i = 0; i < in; ++i) s += W[o * in + i] * x[i];
      y[o] = s;
    }
  }
  static double gelu(double x) {
    return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (x + 0.044715 * x * x * x)));
  }

  // Final hidden states [n, C] of one sequence of n tokens.
  std::vector<double> hidden(const int32_t* tok, int64_t n) const {
    const int64_t C = cfg.n_embd, H = cfg.n_head, hs = C / H;
    std::vector<double> x(n * C);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t i = 0; i < C; ++i) x[t * C + i] = at(lay.wte)[tok[t] * C + i] + at(lay.wpe)[t * C + i];
    std::vector<double> ln(n * C), qkv(n * 3 * C), y(n * C), tmp(4 * C), fc(4 * C);
    for (const BlockOffsets& o : lay.blocks) {
      for (int64_t t = 0; t < n; ++t) {
        layernorm(&x[t * C], at(o.ln_1_weight), at(o.ln_1_bias), &ln[t * C]);
        dense(&ln[t * C], at(o.attn_weight), at(o.attn_bias), C, 3 * C, &qkv[t * 3 * C]);
      }
      for (int64_t t = 0; t < n; ++t)
        for (int64_t h = 0; h < H; ++h) {
          std::vector<double> s(t + 1);
          double mx = -1e300;
          for (int64_t u = 0; u <= t; ++u) {
            double d = 0;
            for (int64_t i = 0; i < hs; ++i) d += qkv[t * 3 * C + h * hs + i] * qkv[u * 3 * C + C + h * hs + i];
            s[u] = d / std::sqrt(static_cast<double>(hs));
            mx = std::max(mx, s[u]);
          }
          double z = 0;
          for (int64_t u = 0; u <= t; ++u) z += (s[u] = std::exp(s[u] - mx));
          for (int64_t i = 0; i < hs; ++i) {
            double acc = 0;
            for (int64_t u = 0; u <= t; ++u) acc += s[u] / z * qkv[u * 3 * C + 2 * C + h * hs + i];
            y[t * C + h * hs + i] = acc;
          }
        }
      for (int64_t t = 0; t < n; ++t) {
        dense(&y[t * C], at(o.attn_proj_weight), at(o.attn_proj_bias), C, C, tmp.data());
        for (int64_t i = 0; i < C; ++i) x[t * C + i] += tmp[i];
        layernorm(&x[t * C], at(o.ln_2_weight), at(o.ln_2_bias), tmp.data());
        dense(tmp.data(), at(o.fc_weight), at(o.fc_bias), C, 4 * C, fc.data());
        for (auto& v : fc) v = gelu(v);
        dense(fc.data(), at(o.fc_proj_weight), at(o.fc_proj_bias), 4 * C, C, tmp.data());
        for (int64_t i = 0; i < C; ++i) x[t * C + i] += tmp[i];
      }
    }
    std::vector<double> out(n * C);
    for (int64_t t = 0; t < n; ++t) layernorm(&x[t * C], at(lay.ln_f_weight), at(lay.ln_f_bias), &out[t * C]);
    return out;
  }

  std::vector<double> logits_row(const double* h) const {
    std::vector<double> z(cfg.vocab_size);
    dense(h, at(lay.wte), nullptr, cfg.n_embd, cfg.vocab_size, z.data());
    return z;
  }
};

struct RefOutputs {
  std::vector<double> logits, logprobs, entropy, values;
  double lm_loss = 0;
  int64_t lm_tokens = 0;
};

RefOutputs ref_forward(const Ref& ref, int64_t B, int64_t T, const std::vector<int32_t>& tokens,
                       const std::vector<int32_t>& lengths, const std::vector<float>* target_mask) {
  const int64_t C = ref.cfg.n_embd, V = ref.cfg.vocab_size;
  RefOutputs out;
  out.logits.assign(B * T * V, 0);
  out.logprobs.assign(B * T, 0);
  out.entropy.assign(B * T, 0);
  out.values.assign(B * T, 0);
  double nll = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = lengths[b];
    const std::vector<double> h = ref.hidden(&tokens[b * T], n);
    for (int64_t t = 0; t < n; ++t) {
      const std::vector<double> z = ref.logits_row(&h[t * C]);
      for (int64_t v = 0; v < V; ++v) out.logits[(b * T + t) * V + v] = z[v];
      if (ref.cfg.value_head) {
        double s = 0;
        for (int64_t i = 0; i < C; ++i) s += h[t * C + i] * ref.at(ref.lay.value_head)[i];
        out.values[b * T + t] = s;
      }
      if (t + 1 < n && (!target_mask || (*target_mask)[b * T + t + 1] != 0.0f)) {
        double mx = -1e300, zs = 0, ent = 0;
        for (double v : z) mx = std::max(mx, v);
        for (double v : z) zs += std::exp(v - mx);
        const double lse = mx + std::log(zs);
        for (double v : z) ent -= std::exp(v - lse) * (v - lse);
        const double lp = z[tokens[b * T + t + 1]] - lse;
        out.logprobs[b * T + t + 1] = lp;
        out.entropy[b * T + t + 1] = ent;
        nll -= lp;
        ++out.lm_tokens;
      }
    }
  }
  out.lm_loss = out.lm_tokens ? nll / out.lm_tokens : 0.0;
  return out;
}

// ---- tiny models shared by the engine's and the trainers' tests -------------------------
// A config small enough for finite differences over every parameter (4,224 with the head).
inline ModelConfig tiny_config(bool value_head = true, int64_t n_positions = 12) {
  ModelConfig c;
  c.vocab_size = 23;
  c.n_positions = n_positions;
  c.n_embd = 12;
  c.n_layer = 2;
  c.n_head = 3;
  c.layer_norm_epsilon = 1e-5;
  c.value_head = value_head;
  c.bos_token_id = c.eos_token_id = 22;
  return c;
}

inline std::vector<double> params_double(const Model& m) {
  return std::vector<double>(m.params(), m.params() + m.parameter_count());
}

// Gives the model non-trivial LayerNorm parameters and biases (GPT-2's init makes them 1
// and 0) and O(1) weights, so that every parameter has a gradient worth checking.
inline void perturb(Model& m, uint64_t seed) {
  tu::Rng rng(seed);
  float* p = m.mutable_params();
  for (const ParamTensor& t : m.layout().tensors) {
    const bool small = t.kind == ParamKind::Norm || t.kind == ParamKind::Bias;
    for (int64_t i = 0; i < t.numel; ++i) {
      if (small) p[t.offset + i] += static_cast<float>(tu::rand_uniform(rng, -0.3, 0.3));
      else p[t.offset + i] = static_cast<float>(tu::rand_uniform(rng, -0.4, 0.4));
    }
  }
}

}  // namespace gpt_ref
