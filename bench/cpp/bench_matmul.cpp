// Benchmark of ppo::cpu::matmul on the GPT engine's shapes: every dense layer's forward
// product and its two backward products, for GPT-2 124M (width 768, vocab 50257,
// batch 4 x 64 tokens = 256 rows) and the small config (width 384, vocab 8192,
// 8 x 128 = 1024 rows). Prints the median of several runs in ms and GFLOP/s
// (2 m n k / time), and the best run's GFLOP/s (steadier on a shared machine).
// bench/matmul_numpy.py times OpenBLAS on the same list.
// --set decode (or all: both lists): generation's decode step, where each dense layer
// multiplies the batch's few new rows (m = 4 for GPT-2 124M, 8 for the small config) by
// the full weight matrix stored [out, in] (NT); these are bound by reading B, so the
// "B GB/s" column (bytes of B read once / median time) is the figure to compare with the
// memory bandwidth. (Repeated runs find B in cache when it fits; in generation it comes
// from memory.) The default list (train) is the one bench/matmul_numpy.py mirrors.
//   ./bench_matmul [--runs N] [--filter SUBSTRING] [--set train|decode|all]
// Threads: the ppo pool's (PPO_MAX_THREADS, else all hardware threads).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "cpu/matmul.h"

namespace {

struct Shape {
  std::string name;
  bool ta, tb;  // C[m,n] = op(A)[m,k] op(B)[k,n]; A stored [k,m] if ta, B stored [n,k] if tb
  int64_t m, n, k;
};

// A linear layer Y[rows, out] = X[rows, in] W[in, out] and its backward products
// dX = dY W^T (NT) and dW = X^T dY (TN). The LM head uses the tied embedding
// wte[vocab, width]: logits = X wte^T (NT), dX = dlogits wte (NN), dwte = dlogits^T X (TN).
std::vector<Shape> engine_shapes(const std::string& model, int64_t rows, int64_t width, int64_t vocab) {
  std::vector<Shape> s;
  struct Layer {
    const char* name;
    int64_t in, out;
  };
  const Layer layers[] = {{"qkv", width, 3 * width},
                          {"attn_proj", width, width},
                          {"mlp_fc", width, 4 * width},
                          {"mlp_proj", 4 * width, width}};
  for (const Layer& l : layers) {
    s.push_back({model + " " + l.name + " fwd", false, false, rows, l.out, l.in});
    s.push_back({model + " " + l.name + " dX", false, true, rows, l.in, l.out});
    s.push_back({model + " " + l.name + " dW", true, false, l.in, l.out, rows});
  }
  s.push_back({model + " lm_head fwd", false, true, rows, vocab, width});
  s.push_back({model + " lm_head dX", false, false, rows, width, vocab});
  s.push_back({model + " lm_head dW", true, false, vocab, width, rows});
  return s;
}

// The decode step's products: Y[rows, out] = X[rows, in] W^T, W stored [out, in]
// (linear_forward), and the LM head logits = X wte^T.
std::vector<Shape> decode_shapes(const std::string& model, int64_t rows, int64_t width, int64_t vocab) {
  const std::string tag = model + " decode m" + std::to_string(rows) + " ";
  return {{tag + "qkv", false, true, rows, 3 * width, width},
          {tag + "attn_proj", false, true, rows, width, width},
          {tag + "mlp_fc", false, true, rows, 4 * width, width},
          {tag + "mlp_proj", false, true, rows, width, 4 * width},
          {tag + "lm_head", false, true, rows, vocab, width}};
}

const char* op_name(const Shape& s) {
  return s.ta ? (s.tb ? "TT" : "TN") : (s.tb ? "NT" : "NN");
}

}  // namespace

int main(int argc, char** argv) {
  int runs = 7;
  std::string filter, set = "train";
  for (int i = 1; i + 1 < argc; ++i) {
    if (std::strcmp(argv[i], "--runs") == 0) runs = std::max(1, std::atoi(argv[i + 1]));
    if (std::strcmp(argv[i], "--filter") == 0) filter = argv[i + 1];
    if (std::strcmp(argv[i], "--set") == 0) set = argv[i + 1];
  }
  if (set != "train" && set != "decode" && set != "all") {
    std::fprintf(stderr, "--set must be train, decode or all\n");
    return 2;
  }
  std::vector<Shape> shapes;
  auto add = [&](const std::vector<Shape>& more) { shapes.insert(shapes.end(), more.begin(), more.end()); };
  if (set != "decode") {
    add(engine_shapes("gpt2-124M", 256, 768, 50257));
    add(engine_shapes("small", 1024, 384, 8192));
  }
  if (set != "train") {
    add(decode_shapes("gpt2-124M", 4, 768, 50257));
    add(decode_shapes("small", 8, 384, 8192));
  }

  std::printf("ppo::cpu::matmul  kernel=%s  threads=%d  runs=%d (median)\n",
              ppo::cpu::matmul_isa(), ppo::cpu_thread_count(), runs);
  std::printf("%-32s %-3s %6s %6s %6s %10s %9s %9s %9s\n", "shape", "op", "m", "n", "k", "ms", "GFLOP/s",
              "best", "B GB/s");
  std::mt19937 rng(123);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  double total_flop = 0.0, total_ms = 0.0;
  for (const Shape& s : shapes) {
    if (!filter.empty() && s.name.find(filter) == std::string::npos) continue;
    const int64_t lda = s.ta ? s.m : s.k, ldb = s.tb ? s.k : s.n;
    std::vector<float> a(static_cast<size_t>(s.m * s.k)), b(static_cast<size_t>(s.k * s.n)),
        c(static_cast<size_t>(s.m * s.n), 0.0f);
    for (float& x : a) x = normal(rng);
    for (float& x : b) x = normal(rng);
    auto call = [&] {
      ppo::cpu::matmul(s.ta, s.tb, s.m, s.n, s.k, 1.0f, a.data(), lda, b.data(), ldb, 0.0f,
                       c.data(), s.n);
    };
    call();  // warm-up: first touch of C, packing buffers
    std::vector<double> ms;
    for (int r = 0; r < runs; ++r) {
      auto t0 = std::chrono::steady_clock::now();
      call();
      ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(ms.begin(), ms.end());
    const double median = ms[ms.size() / 2];
    const double flop = 2.0 * s.m * s.n * s.k;
    total_flop += flop;
    total_ms += median;
    const double b_bytes = 4.0 * s.k * s.n;
    std::printf("%-32s %-3s %6lld %6lld %6lld %10.3f %9.1f %9.1f %9.1f\n", s.name.c_str(), op_name(s),
                static_cast<long long>(s.m), static_cast<long long>(s.n),
                static_cast<long long>(s.k), median, flop / (median * 1e6), flop / (ms[0] * 1e6),
                b_bytes / (median * 1e6));
  }
  std::printf("%-32s %-3s %6s %6s %6s %10.3f %9.1f\n", "all (sum of medians)", "", "", "", "",
              total_ms, total_flop / (total_ms * 1e6));
  return 0;
}
