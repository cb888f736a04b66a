// The PPO-max trainer (trainer.h, ../shared/ppo-max.md): rollout, scoring, reward shaping
// with the KL penalty on running moments, GAE, and the clipped PPO update of policy and
// critic, each stage over whole buffers in one native call.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <limits>
#include <string>
#include <unordered_set>

#include "core/error.h"
#include "core/ops.h"
#include "model/sampling.h"
#include "trainer/trainer.h"

namespace ppo::trainer {
namespace {

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// splitmix64: derives the independent seeds of each rollout and update from one seed.
uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}
uint64_t derived_seed(uint64_t seed, uint64_t purpose, uint64_t counter) {
  return mix(seed ^ mix(purpose * 0x100000001B3ULL + counter));
}
constexpr uint64_t kRolloutSeed = 1, kUpdateSeed = 2, kCriticSeed = 3;

// Rows [begin, end) of a TokenBatch.
TokenBatch rows_of(const TokenBatch& b, int64_t begin, int64_t end) {
  return {end - begin, b.steps, b.tokens + begin * b.steps, b.lengths ? b.lengths + begin : nullptr};
}

int64_t row_length(const TokenBatch& b, int64_t r) { return b.lengths ? b.lengths[r] : b.steps; }

model::AdamWOptions adamw_for(const OptimizerOptions& o, int64_t next_step) {
  model::AdamWOptions a;
  a.lr = scheduled_lr(o, next_step);
  a.beta1 = o.beta1;
  a.beta2 = o.beta2;
  a.eps = o.eps;
  a.weight_decay = o.weight_decay;
  a.max_grad_norm = o.max_grad_norm;
  return a;
}

// A mini-batch gathered from an experience: rows `rows` of e, trimmed to their longest.
struct MiniBatch {
  int64_t batch = 0, steps = 0, tokens_n = 0;
  std::vector<int32_t> tokens, lengths;
  std::vector<float> mask, old_logprobs, old_values, advantages, returns;
  TokenBatch view() const { return {batch, steps, tokens.data(), lengths.data()}; }
};

MiniBatch gather(const Experience& e, const int64_t* rows, int64_t n) {
  MiniBatch m;
  m.batch = n;
  for (int64_t i = 0; i < n; ++i) m.steps = std::max<int64_t>(m.steps, e.lengths[rows[i]]);
  const int64_t T = m.steps, S = e.steps;
  m.tokens.assign(n * T, 0);
  m.lengths.resize(n);
  for (auto* v : {&m.mask, &m.old_logprobs, &m.old_values, &m.advantages, &m.returns}) v->assign(n * T, 0.0f);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = rows[i];
    m.lengths[i] = e.lengths[r];
    for (int64_t t = 0; t < e.lengths[r]; ++t) {
      const int64_t src = r * S + t, dst = i * T + t;
      m.tokens[dst] = e.tokens[src];
      m.mask[dst] = e.mask[src];
      m.old_logprobs[dst] = e.logprobs[src];
      m.old_values[dst] = e.values[src];
      m.advantages[dst] = e.advantages[src];
      m.returns[dst] = e.returns[src];
      if (e.mask[src] != 0.0f) ++m.tokens_n;
    }
  }
  return m;
}

// Shifts the critic's per-position outputs to the states before each response token:
// out[b, t] = values[b, t - 1] where mask[b, t] == 1, else 0.
void shift_values(int64_t B, int64_t T, const float* values, const float* mask, float* out) {
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = b * T + t;
      out[i] = (mask[i] != 0.0f && t >= 1) ? values[i - 1] : 0.0f;
    }
}

bool all_finite(const std::vector<float>& v) {
  for (float x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

struct Accumulator {
  Stats order;
  void add(const std::string& key, double v) {
    for (auto& kv : order)
      if (kv.first == key) {
        kv.second += v;
        return;
      }
    order.emplace_back(key, v);
  }
  Stats mean(double n) const {
    Stats out = order;
    for (auto& kv : out) kv.second /= std::max(n, 1.0);
    return out;
  }
};

void append(Stats& to, const Stats& from) { to.insert(to.end(), from.begin(), from.end()); }

}  // namespace

// ---- options -----------------------------------------------------------------------------------
void check_ppo_options(const PpoOptions& o) {
  auto in_range = [](double v, double lo, double hi, const char* name, bool lo_open = false) {
    const bool ok = std::isfinite(v) && (lo_open ? v > lo : v >= lo) && v <= hi;
    require(ok, ErrorCode::InvalidArgument,
            std::string(name) + " must be in " + (lo_open ? "(" : "[") + std::to_string(lo) + ", " +
                std::to_string(hi) + "], got " + std::to_string(v),
            name);
  };
  const double big = 1e30;
  require(o.max_new_tokens >= 1, ErrorCode::InvalidArgument,
          "maxNewTokens must be >= 1, got " + std::to_string(o.max_new_tokens), "maxNewTokens");
  in_range(o.temperature, 0.0, big, "temperature", true);
  in_range(o.top_p, 0.0, 1.0, "topP", true);
  in_range(o.repetition_penalty, 0.0, big, "repetitionPenalty", true);
  require(o.top_k >= 0, ErrorCode::InvalidArgument, "topK must be >= 0", "topK");
  in_range(o.kl_coef, 0.0, big, "klCoef");
  in_range(o.kl_target, 0.0, big, "klTarget");
  in_range(o.kl_horizon, 0.0, big, "klHorizon", true);
  in_range(o.reward_clip, 0.0, big, "rewardClip");
  require(!(o.reward_norm && o.reward_scaling), ErrorCode::InvalidArgument,
          "rewardNorm and rewardScaling are alternatives: turn one off", "rewardScaling");
  in_range(o.gamma, 0.0, 1.0, "gamma");
  in_range(o.lambda, 0.0, 1.0, "lam");
  in_range(o.advantage_clip, 0.0, big, "advantageClip");
  in_range(o.policy_clip, 0.0, big, "policyClip", true);
  in_range(o.value_clip, 0.0, big, "valueClip");
  in_range(o.value_loss_coef, 0.0, big, "valueLossCoef");
  in_range(o.entropy_coef, -big, big, "entropyCoef");
  in_range(o.ptx_coef, 0.0, big, "ptxCoef");
  in_range(o.ptx_batch_ratio, 0.0, big, "ptxBatchRatio", true);
  require(o.mini_batch_size >= 1, ErrorCode::InvalidArgument,
          "miniBatchSize must be >= 1, got " + std::to_string(o.mini_batch_size), "miniBatchSize");
  require(o.ppo_epochs >= 1, ErrorCode::InvalidArgument, "ppoEpochs must be >= 1, got " + std::to_string(o.ppo_epochs),
          "ppoEpochs");
  require(o.forward_batch_size >= 0, ErrorCode::InvalidArgument, "forwardBatchSize must be >= 0", "forwardBatchSize");
  check_optimizer(o.policy_optimizer, "policyOptimizer");
  check_optimizer(o.critic_optimizer, "criticOptimizer");
}

void check_experience(const Experience& e, int64_t vocab, int64_t n_positions) {
  const int64_t B = e.batch, T = e.steps;
  require(B >= 1 && T >= 2 && T <= n_positions, ErrorCode::ShapeMismatch,
          "experience: batch must be >= 1 and steps in [2, n_positions], got [" + std::to_string(B) + ", " +
              std::to_string(T) + "]",
          "experience");
  auto sized = [&](size_t n, size_t want, const char* name) {
    require(n == want, ErrorCode::ShapeMismatch,
            std::string("experience.") + name + " has " + std::to_string(n) + " elements, expected " +
                std::to_string(want),
            name);
  };
  const size_t BT = static_cast<size_t>(B * T), Bs = static_cast<size_t>(B);
  sized(e.tokens.size(), BT, "tokens");
  sized(e.lengths.size(), Bs, "lengths");
  sized(e.prompt_lengths.size(), Bs, "promptLengths");
  sized(e.response_lengths.size(), Bs, "responseLengths");
  sized(e.mask.size(), BT, "mask");
  sized(e.logprobs.size(), BT, "logprobs");
  sized(e.ref_logprobs.size(), BT, "refLogprobs");
  sized(e.values.size(), BT, "values");
  if (!e.entropy.empty()) sized(e.entropy.size(), BT, "entropy");
  if (!e.truncated.empty()) sized(e.truncated.size(), Bs, "truncated");
  for (int64_t b = 0; b < B; ++b) {
    const int64_t P = e.prompt_lengths[b], R = e.response_lengths[b], n = e.lengths[b];
    require(P >= 1 && R >= 1 && P + R == n && n <= T, ErrorCode::OutOfRange,
            "experience row " + std::to_string(b) + ": promptLengths + responseLengths must equal lengths (<= steps), got " +
                std::to_string(P) + " + " + std::to_string(R) + " vs " + std::to_string(n),
            "lengths");
    for (int64_t t = 0; t < T; ++t) {
      const int64_t i = b * T + t;
      const bool response = t >= P && t < n;
      require(e.mask[i] == (response ? 1.0f : 0.0f), ErrorCode::InvalidArgument,
              "experience.mask must be 1 exactly at the response tokens (row " + std::to_string(b) + ", step " +
                  std::to_string(t) + ")",
              "mask");
      if (t < n)
        require(e.tokens[i] >= 0 && e.tokens[i] < vocab, ErrorCode::OutOfRange,
                "experience.tokens[" + std::to_string(i) + "] = " + std::to_string(e.tokens[i]) +
                    " is outside the vocabulary",
                "tokens");
    }
  }
  if (e.scored) sized(e.scores.size(), Bs, "scores");
  if (e.shaped) {
    sized(e.normalized_scores.size(), Bs, "normalizedScores");
    sized(e.rewards.size(), BT, "rewards");
    sized(e.kl.size(), BT, "kl");
    sized(e.advantages.size(), BT, "advantages");
    sized(e.returns.size(), BT, "returns");
  }
}



// ---- the trainer ---------------------------------------------------------------------------------
struct PpoTrainer::Impl {
  std::shared_ptr<Model> policy, reference, critic, reward;
  PpoOptions o;
  PpoState st;
  // ptx data: [rows, steps] + mask
  int64_t ptx_rows = 0, ptx_steps = 0;
  std::vector<int32_t> ptx_tokens, ptx_lengths;
  std::vector<float> ptx_mask;

  std::vector<int32_t> stop_tokens() const {
    if (!o.stop_tokens.empty()) return o.stop_tokens;
    return {static_cast<int32_t>(policy->config().eos_token_id)};
  }
  int64_t chunk_rows(int64_t B) const { return o.forward_batch_size > 0 ? std::min(o.forward_batch_size, B) : B; }

  // ---- rollout --------------------------------------------------------------------------------
  Experience rollout(const TokenBatch& prompts, const Progress& progress) {
    require(prompts.batch >= 1, ErrorCode::InvalidArgument, "rollout needs at least one prompt", "prompts");
    const int64_t ctx = policy->config().n_positions;
    for (int64_t b = 0; b < prompts.batch; ++b) {
      const int64_t P = row_length(prompts, b);
      require(P >= 1, ErrorCode::InvalidArgument, "prompt " + std::to_string(b) + " is empty", "prompts");
      require(P + o.max_new_tokens <= ctx, ErrorCode::OutOfRange,
              "prompt " + std::to_string(b) + " has " + std::to_string(P) + " tokens: with maxNewTokens " +
                  std::to_string(o.max_new_tokens) + " it exceeds the context of " + std::to_string(ctx) +
                  " positions",
              "prompts");
    }
    const int64_t B = prompts.batch, chunk = chunk_rows(B);
    // Generation, chunk by chunk (each chunk its own seed, derived from the rollout count).
    std::vector<model::GenerateResult> gens;
    int64_t steps = 0, done = 0;
    for (int64_t c0 = 0; c0 < B; c0 += chunk) {
      const int64_t c1 = std::min(B, c0 + chunk);
      TokenBatch part = rows_of(prompts, c0, c1);
      model::GenerateOptions g;
      g.max_new_tokens = o.max_new_tokens;
      g.temperature = o.temperature;
      g.top_k = o.top_k;
      g.top_p = o.top_p;
      g.repetition_penalty = o.repetition_penalty;
      g.penalize_prompt = false;
      g.stop_tokens = stop_tokens();
      g.seed = derived_seed(o.seed, kRolloutSeed, static_cast<uint64_t>(st.rollouts) * 1000003ULL + c0);
      if (progress) {
        // (rows done before this chunk + this chunk's share) of the whole rollout
        const int64_t before = done, rows = c1 - c0;
        g.progress = [&progress, before, rows, B](int64_t d, int64_t total) {
          progress("generate", before * total + rows * d, B * total);
        };
      }
      gens.push_back(policy->generate(part, g));
      const model::GenerateResult& r = gens.back();
      for (int64_t i = 0; i < r.batch; ++i) steps = std::max<int64_t>(steps, row_length(part, i) + r.lengths[i]);
      done = c1;
    }
    Experience e;
    e.batch = B;
    e.steps = steps;
    e.tokens.assign(B * steps, 0);
    e.lengths.resize(B);
    e.prompt_lengths.resize(B);
    e.response_lengths.resize(B);
    e.truncated.resize(B);
    e.mask.assign(B * steps, 0.0f);
    int64_t row = 0;
    for (size_t gi = 0; gi < gens.size(); ++gi) {
      const model::GenerateResult& r = gens[gi];
      for (int64_t i = 0; i < r.batch; ++i, ++row) {
        const int64_t P = row_length(prompts, row), R = r.lengths[i];
        std::memcpy(&e.tokens[row * steps], prompts.tokens + row * prompts.steps, sizeof(int32_t) * P);
        for (int64_t t = 0; t < R; ++t) {
          e.tokens[row * steps + P + t] = r.tokens[i * r.max_new_tokens + t];
          e.mask[row * steps + P + t] = 1.0f;
        }
        e.prompt_lengths[row] = static_cast<int32_t>(P);
        e.response_lengths[row] = static_cast<int32_t>(R);
        e.lengths[row] = static_cast<int32_t>(P + R);
        e.truncated[row] = r.stopped[i] ? 0 : 1;
      }
    }
    evaluate(e, progress);
    ++st.rollouts;
    return e;
  }

  // Step 4: rollout log-probs and entropy (policy), reference log-probs, values.
  void evaluate(Experience& e, const Progress& progress) {
    const int64_t B = e.batch, T = e.steps, chunk = chunk_rows(B);
    e.logprobs.assign(B * T, 0.0f);
    e.entropy.assign(B * T, 0.0f);
    e.ref_logprobs.assign(B * T, 0.0f);
    e.values.assign(B * T, 0.0f);
    std::vector<float> raw_values;
    for (int64_t c0 = 0; c0 < B; c0 += chunk) {
      const int64_t c1 = std::min(B, c0 + chunk), n = c1 - c0;
      TokenBatch part{n, T, e.tokens.data() + c0 * T, e.lengths.data() + c0};
      const float* mask = e.mask.data() + c0 * T;
      model::ForwardRequest pol;
      pol.logprobs = e.logprobs.data() + c0 * T;
      pol.entropy = e.entropy.data() + c0 * T;
      pol.target_mask = mask;
      policy->forward(part, pol);
      model::ForwardRequest ref;
      ref.logprobs = e.ref_logprobs.data() + c0 * T;
      ref.target_mask = mask;
      reference->forward(part, ref);
      raw_values.assign(n * T, 0.0f);
      model::ForwardRequest val;
      val.values = raw_values.data();
      critic->forward(part, val);
      shift_values(n, T, raw_values.data(), mask, e.values.data() + c0 * T);
      if (progress) progress("evaluate", c1, B);
    }
  }

  // ---- scores ----------------------------------------------------------------------------------
  void score(Experience& e) {
    require(reward != nullptr, ErrorCode::InvalidArgument,
            "this trainer has no reward model: pass the scores (a reward function) instead", "reward");
    TokenBatch all{e.batch, e.steps, e.tokens.data(), e.lengths.data()};
    e.scores = score_sequences(*reward, all, chunk_rows(e.batch));
    for (int64_t b = 0; b < e.batch; ++b)
      require(std::isfinite(e.scores[b]), ErrorCode::NonFinite,
              "the reward model's score of sample " + std::to_string(b) + " is not finite", "scores");
    e.scored = true;
    e.shaped = false;
  }

  void set_scores(Experience& e, const float* scores) {
    require(scores != nullptr, ErrorCode::InvalidArgument, "scores must not be null", "scores");
    for (int64_t b = 0; b < e.batch; ++b)
      require(std::isfinite(scores[b]), ErrorCode::NonFinite,
              "score " + std::to_string(b) + " is not finite (" + std::to_string(scores[b]) + ")", "scores");
    e.scores.assign(scores, scores + e.batch);
    e.scored = true;
    e.shaped = false;
  }

  // ---- shaping (steps 3, 5, 6) -----------------------------------------------------------------------
  void normalize(Experience& e, bool update_moments) {
    const int64_t B = e.batch;
    if (update_moments && (o.reward_norm || o.reward_scaling)) {
      const Moments batch = batch_moments(Device::Cpu, {B, e.scores.data()});
      const Moments merged = merge_moments({st.moments.count, st.moments.mean, st.moments.m2}, batch);
      st.moments = {merged.count, merged.mean, merged.m2};
    }
    e.normalized_scores.assign(B, 0.0f);
    const Moments m{st.moments.count, st.moments.mean, st.moments.m2};
    const bool normalize_on = (o.reward_norm || o.reward_scaling) && m.count >= 2;
    NormalizeScoresArgs a;
    a.count = B;
    a.values = e.scores.data();
    a.mean = normalize_on ? m.mean : 0.0;
    a.std = normalize_on ? moments_std(m) : 1.0;
    a.subtract_mean = normalize_on && o.reward_norm;
    a.eps = normalize_on ? 1e-8f : 0.0f;
    a.clip = static_cast<float>(o.reward_clip);
    a.out = e.normalized_scores.data();
    normalize_scores(Device::Cpu, a);
  }

  void rewards_and_advantages(Experience& e) {
    const int64_t B = e.batch, T = e.steps;
    e.rewards.assign(B * T, 0.0f);
    e.kl.assign(B * T, 0.0f);
    KlRewardsArgs k;
    k.batch = B;
    k.steps = T;
    k.logprobs = e.logprobs.data();
    k.ref_logprobs = e.ref_logprobs.data();
    k.scores = e.normalized_scores.data();
    k.mask = e.mask.data();
    k.kl_coef = static_cast<float>(st.kl_coef);
    k.estimator = o.kl_estimator;
    k.rewards = e.rewards.data();
    k.kl = e.kl.data();
    kl_penalized_rewards(Device::Cpu, k);
    e.advantages.assign(B * T, 0.0f);
    e.returns.assign(B * T, 0.0f);
    GaeArgs g;
    g.batch = B;
    g.steps = T;
    g.rewards = e.rewards.data();
    g.values = e.values.data();
    g.mask = e.mask.data();
    g.gamma = static_cast<float>(o.gamma);
    g.lambda = static_cast<float>(o.lambda);
    g.advantages = e.advantages.data();
    g.returns = e.returns.data();
    gae(Device::Cpu, g);
  }

  Stats shape(Experience& e, bool update_moments) {
    require(e.scored, ErrorCode::InvalidArgument, "shape: the experience has no scores yet (score it first)",
            "experience");
    check_experience(e, policy->config().vocab_size, policy->config().n_positions);
    normalize(e, update_moments);
    rewards_and_advantages(e);
    e.shaped = true;
    return experience_stats(e);
  }

  // ---- the update (step 7) ---------------------------------------------------------------------------
  // One mini-batch: forward, losses and backward of policy and critic (gradients left in
  // the models). Returns false when something turned non-finite.
  bool minibatch(MiniBatch& m, model::Rng& rng, Accumulator& acc, bool train_policy) {
    const int64_t B = m.batch, T = m.steps, BT = B * T;
    // advantages: optional whitening and clipping over the mini-batch
    if (train_policy && o.advantage_norm) {
      std::vector<float> w(BT);
      WhitenArgs a;
      a.batch = B;
      a.steps = T;
      a.values = m.advantages.data();
      a.mask = m.mask.data();
      a.out = w.data();
      whiten(Device::Cpu, a);
      m.advantages.swap(w);
    }
    if (train_policy && o.advantage_clip > 0) {
      std::vector<float> c(BT);
      ClipArgs a;
      a.batch = B;
      a.steps = T;
      a.values = m.advantages.data();
      a.mask = m.mask.data();
      a.clip = static_cast<float>(o.advantage_clip);
      a.out = c.data();
      clip_masked(Device::Cpu, a);
      m.advantages.swap(c);
    }
    if (train_policy) {
      std::vector<float> lp(BT), ent(BT), grad_lp(BT), grad_ent(BT, 0.0f);
      model::ForwardRequest f;
      f.logprobs = lp.data();
      f.entropy = ent.data();
      f.target_mask = m.mask.data();
      f.retain = true;
      policy->forward(m.view(), f);
      if (!all_finite(lp) || !all_finite(ent)) return false;
      PolicyLossArgs pl;
      pl.batch = B;
      pl.steps = T;
      pl.logprobs = lp.data();
      pl.old_logprobs = m.old_logprobs.data();
      pl.advantages = m.advantages.data();
      pl.mask = m.mask.data();
      pl.clip_eps = static_cast<float>(o.policy_clip);
      pl.grad_logprobs = grad_lp.data();
      const PolicyLossResult r = policy_loss(Device::Cpu, pl);
      double ent_sum = 0;
      const double n = std::max<int64_t>(m.tokens_n, 1);
      for (int64_t i = 0; i < BT; ++i)
        if (m.mask[i] != 0.0f) {
          ent_sum += ent[i];
          grad_ent[i] = static_cast<float>(-o.entropy_coef / n);
        }
      const double entropy = ent_sum / n;
      model::BackwardRequest bw;
      bw.grad_logprobs = grad_lp.data();
      bw.grad_entropy = o.entropy_coef != 0.0 ? grad_ent.data() : nullptr;
      policy->backward(bw);
      double ptx_loss = 0.0;
      if (o.ptx_coef > 0.0 && ptx_rows > 0) {
        const int64_t k = std::max<int64_t>(1, std::llround(static_cast<double>(B) * o.ptx_batch_ratio));
        std::vector<int64_t> pick(k);
        int64_t steps = 0;
        for (int64_t i = 0; i < k; ++i) {
          pick[i] = static_cast<int64_t>(rng.next_u64() % static_cast<uint64_t>(ptx_rows));
          steps = std::max<int64_t>(steps, ptx_lengths[pick[i]]);
        }
        std::vector<int32_t> tok(k * steps, 0), len(k);
        std::vector<float> tm(k * steps, 0.0f);
        for (int64_t i = 0; i < k; ++i) {
          len[i] = ptx_lengths[pick[i]];
          for (int64_t t = 0; t < len[i]; ++t) {
            tok[i * steps + t] = ptx_tokens[pick[i] * ptx_steps + t];
            tm[i * steps + t] = ptx_mask[pick[i] * ptx_steps + t];
          }
        }
        model::ForwardRequest pf;
        pf.lm_loss = true;
        pf.target_mask = tm.data();
        pf.retain = true;
        const model::ForwardResult pr = policy->forward({k, steps, tok.data(), len.data()}, pf);
        ptx_loss = pr.lm_loss;
        if (!std::isfinite(ptx_loss)) return false;
        if (pr.lm_tokens > 0) {
          model::BackwardRequest pb;
          pb.lm_loss_scale = o.ptx_coef;
          policy->backward(pb);
        }
      }
      if (!std::isfinite(r.loss) || !std::isfinite(entropy)) return false;
      acc.add("policy_loss", r.loss);
      acc.add("entropy", entropy);
      acc.add("clip_fraction", r.clip_fraction);
      acc.add("approx_kl", r.approx_kl);
      acc.add("ptx_loss", ptx_loss);
    }
    // critic
    std::vector<float> raw(BT), v(BT), grad_v(BT), grad_raw(BT, 0.0f);
    model::ForwardRequest cf;
    cf.values = raw.data();
    cf.retain = true;
    critic->forward(m.view(), cf);
    if (!all_finite(raw)) return false;
    shift_values(B, T, raw.data(), m.mask.data(), v.data());
    ValueLossArgs vl;
    vl.batch = B;
    vl.steps = T;
    vl.values = v.data();
    vl.old_values = m.old_values.data();
    vl.returns = m.returns.data();
    vl.mask = m.mask.data();
    vl.use_clip = o.value_clip > 0.0;
    vl.clip_eps = static_cast<float>(o.value_clip > 0.0 ? o.value_clip : 1.0);
    vl.grad_values = grad_v.data();
    const ValueLossResult vr = value_loss(Device::Cpu, vl);
    if (!std::isfinite(vr.loss)) return false;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 1; t < T; ++t)
        grad_raw[b * T + t - 1] = static_cast<float>(o.value_loss_coef * grad_v[b * T + t]);
    model::BackwardRequest cb;
    cb.grad_values = grad_raw.data();
    critic->backward(cb);
    acc.add("value_loss", vr.loss);
    acc.add("value_clip_fraction", vr.clip_fraction);
    return true;
  }

  // Policy (optional) and critic optimizer steps after a mini-batch; false if non-finite.
  bool optimizer_steps(bool train_policy, Accumulator& acc) {
    const double pn = train_policy ? policy->grad_norm() : 0.0, cn = critic->grad_norm();
    if (!std::isfinite(pn) || !std::isfinite(cn)) return false;
    if (train_policy) {
      const model::AdamWOptions a = adamw_for(o.policy_optimizer, policy->optimizer_steps() + 1);
      const model::StepResult r = policy->step(a);
      acc.add("policy_grad_norm", r.grad_norm);
      acc.add("policy_lr", a.lr);
      policy->zero_grad();
    }
    const model::AdamWOptions a = adamw_for(o.critic_optimizer, critic->optimizer_steps() + 1);
    const model::StepResult r = critic->step(a);
    acc.add("critic_grad_norm", r.grad_norm);
    acc.add("critic_lr", a.lr);
    critic->zero_grad();
    return true;
  }

  // Back to the undo points passes() took (on each model's device: no host copies).
  void restore(bool train_policy) {
    if (train_policy) {
      policy->zero_grad();
      policy->restore_state();
    }
    critic->zero_grad();
    critic->restore_state();
  }

  // Passes over e in shuffled mini-batches (policy and critic, or the critic alone).
  // Returns the mean stats, or skipped = 1 with both models restored.
  Stats passes(const Experience& e, int64_t epochs, bool train_policy, uint64_t seed, const Progress& progress) {
    if (train_policy) policy->snapshot_state();
    critic->snapshot_state();
    if (train_policy) policy->zero_grad();
    critic->zero_grad();
    model::Rng rng(seed, 0);
    const int64_t B = e.batch, mb = std::min(o.mini_batch_size, B);
    const int64_t per_epoch = (B + mb - 1) / mb;
    std::vector<int64_t> order(B);
    Accumulator acc;
    int64_t n = 0;
    bool ok = true;
    for (int64_t epoch = 0; epoch < epochs && ok; ++epoch) {
      for (int64_t i = 0; i < B; ++i) order[i] = i;
      for (int64_t i = B - 1; i > 0; --i) {
        const int64_t j = static_cast<int64_t>(rng.next_u64() % static_cast<uint64_t>(i + 1));
        std::swap(order[i], order[j]);
      }
      for (int64_t s = 0; s < B && ok; s += mb) {
        MiniBatch m = gather(e, order.data() + s, std::min(mb, B - s));
        if (m.tokens_n == 0) continue;
        try {
          ok = minibatch(m, rng, acc, train_policy) && optimizer_steps(train_policy, acc);
        } catch (const Error& err) {
          // The arguments were checked before the passes began: a NonFinite error here
          // comes from the models' own state (NaN weights or activations): skip the update.
          // Any other failure leaves both models as they were, then propagates.
          if (err.code() != ErrorCode::NonFinite) {
            restore(train_policy);
            throw;
          }
          ok = false;
        } catch (...) {
          restore(train_policy);
          throw;
        }
        ++n;
        if (progress) progress(train_policy ? "update" : "critic", epoch * per_epoch + s / mb + 1, epochs * per_epoch);
      }
    }
    Stats out;
    if (!ok) {
      restore(train_policy);
      out.emplace_back("skipped", 1.0);
      out.emplace_back("minibatches", 0.0);
      return out;
    }
    out = acc.mean(static_cast<double>(n));
    out.emplace_back("skipped", 0.0);
    out.emplace_back("minibatches", static_cast<double>(n));
    return out;
  }

  Stats update(const Experience& e, const Progress& progress) {
    require(e.shaped, ErrorCode::InvalidArgument,
            "update: the experience has no advantages yet (score and shape it first)", "experience");
    check_experience(e, policy->config().vocab_size, policy->config().n_positions);
    bool finite = all_finite(e.logprobs) && all_finite(e.values) && all_finite(e.advantages) &&
                  all_finite(e.returns);
    Stats out;
    if (!finite) {
      out.emplace_back("skipped", 1.0);
      out.emplace_back("minibatches", 0.0);
    } else {
      out = passes(e, o.ppo_epochs, true, derived_seed(o.seed, kUpdateSeed, static_cast<uint64_t>(st.updates)),
                   progress);
    }
    const bool skipped = out.end() != std::find_if(out.begin(), out.end(), [](const auto& kv) {
                           return kv.first == "skipped" && kv.second != 0.0;
                         });
    if (!skipped && o.kl_target > 0.0) {
      double kl_sum = 0.0;
      for (int64_t i = 0; i < e.batch * e.steps; ++i) kl_sum += e.kl[i];
      const double klbar = kl_sum / static_cast<double>(e.batch);
      const double err = std::clamp(klbar / o.kl_target - 1.0, -0.2, 0.2);
      st.kl_coef *= 1.0 + err * static_cast<double>(e.batch) / o.kl_horizon;
    }
    ++st.updates;
    out.emplace_back("kl_coef", st.kl_coef);
    return out;
  }

  Stats pretrain_critic(Experience& e, int64_t count, const Progress& progress) {
    require(e.shaped, ErrorCode::InvalidArgument,
            "pretrain_critic: the experience has no rewards yet (score and shape it first)", "experience");
    require(count >= 1, ErrorCode::OutOfRange, "passes must be >= 1", "passes");
    check_experience(e, policy->config().vocab_size, policy->config().n_positions);
    Stats last;
    double first_loss = std::numeric_limits<double>::quiet_NaN();
    for (int64_t p = 0; p < count; ++p) {
      // Values of the current critic, then GAE with them (the rewards are fixed).
      const int64_t B = e.batch, T = e.steps, chunk = chunk_rows(B);
      std::vector<float> raw;
      for (int64_t c0 = 0; c0 < B; c0 += chunk) {
        const int64_t n = std::min(B, c0 + chunk) - c0;
        raw.assign(n * T, 0.0f);
        model::ForwardRequest val;
        val.values = raw.data();
        critic->forward({n, T, e.tokens.data() + c0 * T, e.lengths.data() + c0}, val);
        shift_values(n, T, raw.data(), e.mask.data() + c0 * T, e.values.data() + c0 * T);
      }
      rewards_and_advantages(e);
      last = passes(e, 1, false,
                    derived_seed(o.seed, kCriticSeed, static_cast<uint64_t>(st.critic_pretrain_steps)), progress);
      ++st.critic_pretrain_steps;
      double loss = 0.0;
      for (const auto& kv : last)
        if (kv.first == "value_loss") loss = kv.second;
      if (p == 0) first_loss = loss;
      for (const auto& kv : last)
        if (kv.first == "skipped" && kv.second != 0.0) p = count;  // stop: something turned non-finite
    }
    last.emplace_back("value_loss_first", first_loss);
    last.emplace_back("critic_pretrain_steps", static_cast<double>(st.critic_pretrain_steps));
    const Stats ev = experience_stats(e);
    for (const auto& kv : ev)
      if (kv.first == "explained_variance") last.push_back(kv);
    return last;
  }

  // ---- statistics -----------------------------------------------------------------------------
  Stats experience_stats(const Experience& e) const {
    const int64_t B = e.batch, T = e.steps;
    Stats s;
    auto mean_std = [&](const std::vector<float>& v, const char* m, const char* sd) {
      double sum = 0, sq = 0;
      for (float x : v) sum += x;
      const double mu = v.empty() ? 0.0 : sum / v.size();
      for (float x : v) sq += (x - mu) * (x - mu);
      s.emplace_back(m, mu);
      s.emplace_back(sd, v.size() > 1 ? std::sqrt(sq / (v.size() - 1)) : 0.0);
    };
    if (e.scored) mean_std(e.scores, "reward_raw_mean", "reward_raw_std");
    if (e.shaped) mean_std(e.normalized_scores, "reward_norm_mean", "reward_norm_std");
    // token-level sums over the response positions
    double n = 0, lp = 0, lpr = 0, k1 = 0, ent = 0, kl_est = 0, val = 0, ret = 0, adv = 0, adv2 = 0, err = 0;
    double rsum = 0;
    for (int64_t i = 0; i < B * T; ++i) {
      if (e.mask[i] == 0.0f) continue;
      ++n;
      lp += e.logprobs[i];
      lpr += e.ref_logprobs[i];
      k1 += e.logprobs[i] - e.ref_logprobs[i];
      if (!e.entropy.empty()) ent += e.entropy[i];
      val += e.values[i];
      if (e.shaped) {
        kl_est += e.kl[i];
        ret += e.returns[i];
        adv += e.advantages[i];
        adv2 += static_cast<double>(e.advantages[i]) * e.advantages[i];
        err += (static_cast<double>(e.values[i]) - e.returns[i]) * (e.values[i] - e.returns[i]);
        rsum += e.rewards[i];
      }
    }
    const double nn = std::max(n, 1.0);
    s.emplace_back("kl_mean", k1 / nn);
    s.emplace_back("kl_sum_mean", k1 / B);
    if (e.shaped) s.emplace_back("kl_penalty_mean", kl_est / nn);
    s.emplace_back("kl_coef", st.kl_coef);
    s.emplace_back("perplexity", std::exp(-lp / nn));
    s.emplace_back("ref_perplexity", std::exp(-lpr / nn));
    s.emplace_back("entropy_mean", ent / nn);
    double len = 0, trunc = 0, rep = 0, rep_n = 0;
    for (int64_t b = 0; b < B; ++b) {
      len += e.response_lengths[b];
      if (!e.truncated.empty()) trunc += e.truncated[b];
      if (e.response_lengths[b] >= 3) {
        rep += repeated_ngram_fraction(&e.tokens[b * T + e.prompt_lengths[b]], e.response_lengths[b], 3);
        ++rep_n;
      }
    }
    s.emplace_back("response_length_mean", len / B);
    s.emplace_back("truncated_fraction", trunc / B);
    s.emplace_back("repetition", rep_n > 0 ? rep / rep_n : 0.0);
    s.emplace_back("response_tokens", n);
    s.emplace_back("values_mean", val / nn);
    if (e.shaped) {
      s.emplace_back("rewards_sum_mean", rsum / B);
      s.emplace_back("returns_mean", ret / nn);
      const double am = adv / nn;
      s.emplace_back("advantages_mean", am);
      s.emplace_back("advantages_std", n > 1 ? std::sqrt(std::max(0.0, (adv2 - n * am * am) / (n - 1))) : 0.0);
      s.emplace_back("value_error", err / nn);
      // explained variance: 1 - Var(R - V) / Var(R) over the response tokens
      double rm = ret / nn, dm = 0, vr = 0, vd = 0;
      for (int64_t i = 0; i < B * T; ++i)
        if (e.mask[i] != 0.0f) dm += e.returns[i] - e.values[i];
      dm /= nn;
      for (int64_t i = 0; i < B * T; ++i)
        if (e.mask[i] != 0.0f) {
          vr += (e.returns[i] - rm) * (e.returns[i] - rm);
          const double d = e.returns[i] - e.values[i] - dm;
          vd += d * d;
        }
      s.emplace_back("explained_variance", vr > 0 ? 1.0 - vd / vr : 0.0);
    }
    return s;
  }
};

PpoTrainer::PpoTrainer(std::shared_ptr<Model> policy, std::shared_ptr<Model> reference,
                       std::shared_ptr<Model> critic, std::shared_ptr<Model> reward, const PpoOptions& options)
    : impl_(new Impl) {
  require(policy && reference && critic, ErrorCode::InvalidArgument,
          "the PPO trainer needs a policy, a reference and a critic model", "models");
  require(policy->trainable(), ErrorCode::InvalidArgument, "the policy must be trainable", "policy");
  require(critic->trainable(), ErrorCode::InvalidArgument, "the critic must be trainable", "critic");
  require(policy.get() != critic.get() && policy.get() != reference.get() && critic.get() != reference.get() &&
              (!reward || (reward.get() != policy.get() && reward.get() != critic.get())),
          ErrorCode::InvalidArgument,
          "policy, reference, critic and reward model must be distinct models (the reference is a frozen copy)",
          "models");
  require(critic->config().value_head, ErrorCode::InvalidArgument, "the critic needs a value head", "critic");
  const int64_t V = policy->config().vocab_size;
  auto same_vocab = [V](const Model& m, const char* name) {
    require(m.config().vocab_size == V, ErrorCode::ShapeMismatch,
            std::string("the ") + name + "'s vocabulary (" + std::to_string(m.config().vocab_size) +
                ") differs from the policy's (" + std::to_string(V) + ")",
            name);
  };
  same_vocab(*reference, "reference");
  same_vocab(*critic, "critic");
  require(critic->config().n_positions >= policy->config().n_positions &&
              reference->config().n_positions >= policy->config().n_positions,
          ErrorCode::ShapeMismatch, "the reference and critic need at least the policy's context length", "models");
  if (reward) {
    same_vocab(*reward, "reward model");
    require(reward->config().value_head, ErrorCode::InvalidArgument, "the reward model needs a value head", "reward");
    require(reward->config().n_positions >= policy->config().n_positions, ErrorCode::ShapeMismatch,
            "the reward model needs at least the policy's context length", "reward");
  }
  check_ppo_options(options);
  impl_->policy = std::move(policy);
  impl_->reference = std::move(reference);
  impl_->critic = std::move(critic);
  impl_->reward = std::move(reward);
  impl_->o = options;
  impl_->st.kl_coef = options.kl_coef;
}

PpoTrainer::~PpoTrainer() = default;

const PpoOptions& PpoTrainer::options() const { return impl_->o; }
void PpoTrainer::set_options(const PpoOptions& options) {
  check_ppo_options(options);
  if (options.kl_coef != impl_->o.kl_coef || options.kl_target != impl_->o.kl_target)
    impl_->st.kl_coef = options.kl_coef;
  impl_->o = options;
}
const PpoState& PpoTrainer::state() const { return impl_->st; }
void PpoTrainer::set_state(const PpoState& s) {
  require(std::isfinite(s.kl_coef) && s.kl_coef >= 0 && s.moments.count >= 0 && s.moments.m2 >= 0 &&
              std::isfinite(s.moments.mean) && std::isfinite(s.moments.m2) && s.rollouts >= 0 && s.updates >= 0 &&
              s.critic_pretrain_steps >= 0,
          ErrorCode::InvalidArgument, "trainer state: counts must be >= 0 and every number finite", "state");
  impl_->st = s;
}

void PpoTrainer::set_ptx_data(const TokenBatch& data, const float* target_mask) {
  Impl& m = *impl_;
  const int64_t V = m.policy->config().vocab_size;
  require(data.batch >= 1 && data.steps >= 2 && data.steps <= m.policy->config().n_positions,
          ErrorCode::InvalidArgument, "ptx data needs rows of 2 to n_positions tokens", "ptx");
  m.ptx_rows = data.batch;
  m.ptx_steps = data.steps;
  m.ptx_tokens.assign(data.tokens, data.tokens + data.batch * data.steps);
  m.ptx_lengths.resize(data.batch);
  m.ptx_mask.assign(data.batch * data.steps, 0.0f);
  for (int64_t b = 0; b < data.batch; ++b) {
    const int64_t n = row_length(data, b);
    require(n >= 2 && n <= data.steps, ErrorCode::OutOfRange,
            "ptx row " + std::to_string(b) + " needs at least 2 tokens", "ptx");
    m.ptx_lengths[b] = static_cast<int32_t>(n);
    for (int64_t t = 0; t < n; ++t) {
      const int32_t tok = data.tokens[b * data.steps + t];
      require(tok >= 0 && tok < V, ErrorCode::OutOfRange,
              "ptx token " + std::to_string(tok) + " (row " + std::to_string(b) + ") is outside the vocabulary",
              "ptx");
      const float w = target_mask ? target_mask[b * data.steps + t] : 1.0f;
      require(w == 0.0f || w == 1.0f, ErrorCode::InvalidArgument, "the ptx target mask must be 0/1", "ptx");
      m.ptx_mask[b * data.steps + t] = t >= 1 ? w : 0.0f;
    }
  }
}

Experience PpoTrainer::rollout(const TokenBatch& prompts, const Progress& progress) {
  return impl_->rollout(prompts, progress);
}
void PpoTrainer::score(Experience& e) { impl_->score(e); }
void PpoTrainer::set_scores(Experience& e, const float* scores) { impl_->set_scores(e, scores); }
Stats PpoTrainer::shape(Experience& e, bool update_moments) { return impl_->shape(e, update_moments); }
Stats PpoTrainer::update(const Experience& e, const Progress& progress) { return impl_->update(e, progress); }
Stats PpoTrainer::pretrain_critic(Experience& e, int64_t passes, const Progress& progress) {
  return impl_->pretrain_critic(e, passes, progress);
}
Stats PpoTrainer::experience_stats(const Experience& e) const { return impl_->experience_stats(e); }

Stats PpoTrainer::step_with_scores(Experience& e, const float* scores, const Progress& progress) {
  const auto t0 = Clock::now();
  if (scores) set_scores(e, scores);
  else if (!e.scored) score(e);
  const double score_s = seconds_since(t0);
  Stats s = shape(e, true);
  const auto t1 = Clock::now();
  const Stats u = update(e, progress);
  const double update_s = seconds_since(t1);
  // The update's kl_coef is the one after the controller; drop shape's (before).
  s.erase(std::remove_if(s.begin(), s.end(), [](const auto& kv) { return kv.first == "kl_coef"; }), s.end());
  append(s, u);
  double tokens = 0;
  for (int64_t b = 0; b < e.batch; ++b) tokens += e.lengths[b];
  const PpoState& st = impl_->st;
  s.emplace_back("reward_moments_mean", st.moments.mean);
  s.emplace_back("reward_moments_std", moments_std({st.moments.count, st.moments.mean, st.moments.m2}));
  s.emplace_back("seconds_score", score_s);
  s.emplace_back("seconds_update", update_s);
  s.emplace_back("update_tokens_per_second", update_s > 0 ? tokens * impl_->o.ppo_epochs / update_s : 0.0);
  return s;
}

Stats PpoTrainer::step(const TokenBatch& prompts, const Progress& progress, Experience* experience) {
  const auto t0 = Clock::now();
  Experience e = rollout(prompts, progress);
  const double rollout_s = seconds_since(t0);
  Stats s = step_with_scores(e, nullptr, progress);
  double generated = 0;
  for (int64_t b = 0; b < e.batch; ++b) generated += e.response_lengths[b];
  s.emplace_back("seconds_rollout", rollout_s);
  s.emplace_back("rollout_tokens_per_second", rollout_s > 0 ? generated / rollout_s : 0.0);
  if (experience) *experience = std::move(e);
  return s;
}

}  // namespace ppo::trainer
