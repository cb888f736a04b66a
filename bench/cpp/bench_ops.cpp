// Benchmark of the RLHF kernels with no Node: each op on the CPU backend, and on
// CUDA when a GPU can be used, on a realistic batch. Prints the median of several
// runs in ms and the effective bandwidth (bytes the op must read and write / time).
// For the GPU the time covers the host-level call (staging copies included), as a
// user of core/ops.h sees it; the kernels alone are timed by the device-resident
// engine benchmarks that later issues add.
//   ./bench_ops [--runs N] [--batch B] [--steps T] [--vocab V] [--lp-batch N]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "core/ops.h"
#include "core/thread_pool.h"

using namespace ppo;

namespace {

int arg(int argc, char** argv, const char* name, int fallback) {
  for (int i = 1; i + 1 < argc; ++i)
    if (std::strcmp(argv[i], name) == 0) return std::atoi(argv[i + 1]);
  return fallback;
}

double median_ms(int runs, const std::function<void()>& fn) {
  fn();  // warm-up (first-touch of outputs, CUDA context)
  std::vector<double> t;
  for (int i = 0; i < runs; ++i) {
    auto t0 = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int runs = arg(argc, argv, "--runs", 7);
  const int64_t B = arg(argc, argv, "--batch", 64), T = arg(argc, argv, "--steps", 512);
  const int64_t V = arg(argc, argv, "--vocab", 32000), LB = arg(argc, argv, "--lp-batch", 16);
  const int64_t n = B * T, lp_rows = LB * T;

  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> logits(lp_rows * V), lp(n), ref(n), values(n), mask(n), scores(B);
  for (auto& x : logits) x = 2.0f * normal(rng);
  std::vector<int32_t> tokens(lp_rows);
  for (auto& t : tokens) t = static_cast<int32_t>(rng() % V);
  for (int64_t i = 0; i < n; ++i) {
    lp[i] = -2.0f + 0.5f * normal(rng);
    ref[i] = lp[i] + 0.05f * normal(rng);
    values[i] = 0.3f * normal(rng);
  }
  for (int64_t b = 0; b < B; ++b) {
    int64_t len = std::max<int64_t>(1, T / 4 + static_cast<int64_t>(rng() % (3 * T / 4)));
    for (int64_t t = 0; t < T; ++t) mask[b * T + t] = t < len ? 1.0f : 0.0f;
    scores[b] = normal(rng);
  }
  std::vector<float> out_lp(lp_rows), out_h(lp_rows), grad(lp_rows * V), g_lp(lp_rows, 0.01f);
  std::vector<float> o1(n), o2(n);

  std::printf("ppo-max bench_ops: %d CPU threads, median of %d runs\n", cpu_thread_count(), runs);
  std::printf("sequence ops %lld x %lld; logprobs %lld x %lld x vocab %lld\n\n", (long long)B,
              (long long)T, (long long)LB, (long long)T, (long long)V);
  std::printf("%-28s %-6s %10s %10s\n", "op", "device", "ms", "GB/s");

  std::vector<Device> devices = {Device::Cpu};
  if (cuda_available()) devices.push_back(Device::Cuda);
  else std::printf("(CUDA not measured: %s)\n", cuda_unavailable_reason().c_str());

  for (Device d : devices) {
    const char* dn = device_name(d);
    auto report = [&](const char* name, double bytes, const std::function<void()>& fn) {
      double ms = median_ms(runs, fn);
      std::printf("%-28s %-6s %10.3f %10.2f\n", name, dn, ms, bytes / (ms * 1e6));
    };
    LogprobsArgs la;
    la.batch = LB; la.steps = T; la.vocab = V; la.logits = logits.data(); la.tokens = tokens.data();
    la.logprobs = out_lp.data(); la.entropy = out_h.data();
    report("logprobs + entropy", 4.0 * lp_rows * V, [&] { logprobs_from_logits(d, la); });
    LogprobsBackwardArgs lb;
    lb.batch = LB; lb.steps = T; lb.vocab = V; lb.logits = logits.data(); lb.tokens = tokens.data();
    lb.grad_logprobs = g_lp.data(); lb.grad_logits = grad.data();
    report("logprobs backward", 8.0 * lp_rows * V, [&] { logprobs_backward(d, lb); });
    KlRewardsArgs ka;
    ka.batch = B; ka.steps = T; ka.logprobs = lp.data(); ka.ref_logprobs = ref.data();
    ka.scores = scores.data(); ka.mask = mask.data(); ka.kl_coef = 0.05f; ka.rewards = o1.data(); ka.kl = o2.data();
    report("KL-penalized rewards", 4.0 * n * 5, [&] { kl_penalized_rewards(d, ka); });
    GaeArgs ga;
    ga.batch = B; ga.steps = T; ga.rewards = o1.data(); ga.values = values.data(); ga.mask = mask.data();
    ga.gamma = 1.0f; ga.lambda = 0.95f;
    std::vector<float> adv(n), ret(n);
    ga.advantages = adv.data(); ga.returns = ret.data();
    report("GAE", 4.0 * n * 5, [&] { gae(d, ga); });
    WhitenArgs wa;
    wa.batch = B; wa.steps = T; wa.values = adv.data(); wa.mask = mask.data(); wa.out = o2.data();
    report("whiten", 4.0 * n * 3, [&] { whiten(d, wa); });
    PolicyLossArgs pa;
    pa.batch = B; pa.steps = T; pa.logprobs = ref.data(); pa.old_logprobs = lp.data();
    pa.advantages = adv.data(); pa.mask = mask.data(); pa.grad_logprobs = o2.data();
    report("policy loss", 4.0 * n * 5, [&] { policy_loss(d, pa); });
    ValueLossArgs va;
    va.batch = B; va.steps = T; va.values = values.data(); va.old_values = ret.data();
    va.returns = adv.data(); va.mask = mask.data(); va.grad_values = o2.data();
    report("value loss", 4.0 * n * 5, [&] { value_loss(d, va); });
  }
  return 0;
}
