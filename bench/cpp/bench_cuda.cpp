// Benchmark of the transformer engine's CUDA kernels alone (cuda/engine_kernels.h), on
// device buffers, with no Model, no host staging and no copies: each kernel is timed with
// cudaEvents around N back-to-back calls (N picked from a probe call so that one run lasts
// about 20 ms), and the figure is the median over --runs runs (after one warm-up call) of
// the per-call time. Each figure is printed next to the matching ceiling measured in the
// same process, on the same GPU:
//
//   * memcpy   device-to-device cudaMemcpy of a 1 GiB buffer: GB/s counting the bytes read
//              plus the bytes written (2 x 1 GiB per copy). The ceiling of the memory-bound
//              kernels.
//   * tf32     a kernel that issues back-to-back wmma m16n16k8 TF32 mma_sync on register
//              fragments (8 independent accumulators per warp, no memory traffic), one
//              wave of as many blocks as fit on the GPU at once: the warp-level tensor-core
//              peak (2*16*16*8 FLOPs per mma). The ceiling of the tf32 matmul path (and of
//              the cublas path, whatever math mode it picks). On Hopper, wgmma reaches
//              more than mma_sync: this is the peak of the instructions our kernels use,
//              not the datasheet figure.
//   * bf16     the same with wmma m16n16k16 bfloat16 (2*16*16*16 FLOPs per mma, float
//              accumulation): the ceiling of the bf16 path.
//   * fp32     a kernel of independent FMAs (8 chains per thread, 2 FLOPs per FMA): the
//              CUDA-core peak, the ceiling of the fp32 matmul path and of attention (the
//              fused attention kernels' own ceiling; one that uses tensor cores may exceed 1).
//
// Kernels (GPT-2 124M: C = 768, H = 12, hs = 64, V = 50257, 12 layers):
//   * matmul, every path (tf32, bf16, fp32, cublas where the build has cuBLAS, else "n/a")
//     on the training step's products at B x T = 8 x 512 and 8 x 1024 (4096 and 8192
//     rows), in the engine's layouts (model/gpt.cpp; weights stored [out, in]):
//       fwd  y = x W^T     NT  m = rows, n = out, k = in        (beta 0)
//       dX   dx = dy W     NN  m = rows, n = in,  k = out       (beta 0)
//       dW   dW += dy^T x  TN  m = out,  n = in,  k = rows      (beta 1: accumulates)
//     for qkv (768 -> 2304), attn_proj (768 -> 768), mlp_fc (768 -> 3072), mlp_proj
//     (3072 -> 768) and the tied LM head (768 -> 50257, on the B * (T - 1) positions that
//     have a next token). FLOPs 2 m n k; TFLOP/s. "all" rows: the sum of FLOPs over the
//     sum of median times of a row count's products.
//   * memory-bound kernels, GB/s = bytes / time, with R = 8 * 1024 rows, C = 768, 4-byte
//     floats and int32 ids (the minimum traffic each kernel must do; small vectors counted):
//       layernorm fwd   4 * (2RC + 2C + 2R)        in read, out written, weight+bias read,
//                                                  mean+rstd written
//       layernorm bwd   4 * (4RC + 2R + 5C)        grad_out + in read, grad_in read+written
//                                                  (+=), mean+rstd read, weight read,
//                                                  grad_weight+grad_bias read+written
//       gelu fwd        4 * 2n, n = R * 4C         in read, out written
//       gelu bwd        4 * 4n                     in + grad_out read, grad_in read+written
//       adamw_update    4 * 7P, P = 124,439,808    param, grad, m, v read; param, m, v written
//       sum_of_squares  4 * P                      (includes its host read of the result)
//       embedding fwd   4 * (3RC + 2R)             the wte and wpe rows read, out written, ids
//       embedding bwd   4 * (RC + 2R + 2UC + 2TC)  grad_out and ids read; the U distinct
//                                                  token rows of grad_wte and the T rows of
//                                                  grad_wpe read+written
//   * fused causal attention at B = 8, H = 12, hs = 64 (C = 768), T = 512 and 1024, all rows
//     full length. FLOP convention (the FlashAttention one): forward = 4 * B * H * T^2 *
//     hs / 2, i.e. the two products (q k^T and p v, 2 * T^2 * hs each per head) counted on
//     the causal half only; backward = 2.5 x forward (five such products: the recomputed
//     q k^T, dV, dP, dQ, dK). TFLOP/s.
//   * sample_tokens on [rows, 50257] logits, rows 8 (and 64, the generation batch of
//     bench_model's gpt2-1024 config): greedy, top-p 0.9, top-k 50; microseconds per call.
//
//   ./bench_cuda [--runs N] [--json] [--skip-matmul]
// --runs: timed runs per kernel (default 5); --json: one JSON line at the end. Exits 77
// (with a message) where CUDA cannot be used, so it can run anywhere (ctest's skip code).
// Compiled as CUDA (it holds its own peak kernels).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/engine_ops.h"
#include "core/error.h"
#include "core/json.h"
#include "cuda/cuda_check.h"
#include "cuda/engine_kernels.h"

namespace {

namespace json = ppo::json;

// GPT-2 124M.
constexpr int64_t kC = 768, kH = 12, kV = 50257, kL = 12, kP = 1024;
// Its parameter count: wte + wpe + L * (two LayerNorms 4C, qkv 3C^2 + 3C, attn proj C^2 + C,
// fc 4C^2 + 4C, fc proj 4C^2 + C) + ln_f 2C = V C + P C + L (12 C^2 + 13 C) + 2 C.
constexpr int64_t kParams = kV * kC + kP * kC + kL * (12 * kC * kC + 13 * kC) + 2 * kC;
static_assert(kParams == 124439808, "GPT-2 124M has 124,439,808 parameters");

int g_runs = 5;
constexpr double kTargetRunMs = 20.0;  // one timed run: about this long (N calls)
constexpr int kMaxReps = 1000;

// ---- timing ---------------------------------------------------------------------------------

struct Events {
  cudaEvent_t start = nullptr, stop = nullptr;
  Events() {
    PPO_CUDA_CHECK(cudaEventCreate(&start));
    PPO_CUDA_CHECK(cudaEventCreate(&stop));
  }
  ~Events() {
    (void)cudaEventDestroy(start);
    (void)cudaEventDestroy(stop);
  }
  Events(const Events&) = delete;
  Events& operator=(const Events&) = delete;
  // ms of `reps` calls of fn on the default stream.
  double time(const std::function<void()>& fn, int reps) {
    PPO_CUDA_CHECK(cudaEventRecord(start, 0));
    for (int i = 0; i < reps; ++i) fn();
    PPO_CUDA_CHECK(cudaEventRecord(stop, 0));
    PPO_CUDA_CHECK(cudaEventSynchronize(stop));
    PPO_CUDA_CHECK(cudaGetLastError());
    float ms = 0.0f;
    PPO_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    return ms;
  }
};

struct Timing {
  double median_ms = 0.0, best_ms = 0.0;  // per call
  int reps = 0;                           // calls per timed run
};

// One warm-up call, one probe call (picks N so that a run lasts ~kTargetRunMs), then
// g_runs runs of N calls, each timed with events: the median and best per-call times.
Timing time_gpu(const std::function<void()>& fn) {
  Events ev;
  fn();
  PPO_CUDA_CHECK(cudaDeviceSynchronize());
  PPO_CUDA_CHECK(cudaGetLastError());
  const double probe = ev.time(fn, 1);
  const int reps = static_cast<int>(
      std::min<double>(kMaxReps, std::max(1.0, std::floor(kTargetRunMs / std::max(probe, 1e-4)))));
  std::vector<double> ms;
  for (int r = 0; r < g_runs; ++r) ms.push_back(ev.time(fn, reps) / reps);
  std::sort(ms.begin(), ms.end());
  const size_t n = ms.size();
  Timing t;
  t.median_ms = n % 2 ? ms[n / 2] : 0.5 * (ms[n / 2 - 1] + ms[n / 2]);
  t.best_ms = ms[0];
  t.reps = reps;
  return t;
}

// ---- device data ------------------------------------------------------------------------------

__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// x[i] uniform in [lo, hi), from a hash of (seed, i).
__global__ void fill_uniform_kernel(float* x, int64_t n, uint64_t seed, float lo, float hi) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float u = static_cast<float>(mix64(seed * 0x100000001B3ull ^ static_cast<uint64_t>(i)) >> 40) *
                    (1.0f / 16777216.0f);
    x[i] = lo + (hi - lo) * u;
  }
}

void fill_uniform(float* x, int64_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  if (n == 0) return;
  const int64_t blocks = std::min<int64_t>((n + 255) / 256, 65536);
  fill_uniform_kernel<<<static_cast<unsigned>(blocks), 256>>>(x, n, seed, lo, hi);
  PPO_CUDA_CHECK_LAUNCH("fill_uniform_kernel");
}

template <typename T>
void upload(T* dst, const std::vector<T>& src) {
  PPO_CUDA_CHECK(cudaMemcpy(dst, src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice));
}

// ---- the ceilings --------------------------------------------------------------------------------

constexpr int kPeakThreads = 256;  // 8 warps per block
constexpr int kPeakAcc = 8;        // independent accumulators (chains) per warp / thread
constexpr int kPeakSlots = 64;     // the results land in a small ring (never read)

// Back-to-back TF32 mma_sync on register fragments: iters * kPeakAcc mmas per warp.
__global__ void __launch_bounds__(kPeakThreads) peak_tf32_kernel(int iters, float av, float bv,
                                                                 float* out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[kPeakAcc];
  wmma::fill_fragment(a, wmma::__float_to_tf32(av));
  wmma::fill_fragment(b, wmma::__float_to_tf32(bv));
#pragma unroll
  for (int j = 0; j < kPeakAcc; ++j) wmma::fill_fragment(acc[j], 0.0f);
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < kPeakAcc; ++j) wmma::mma_sync(acc[j], a, b, acc[j]);
  }
#pragma unroll
  for (int j = 1; j < kPeakAcc; ++j)
    for (int t = 0; t < acc[0].num_elements; ++t) acc[0].x[t] += acc[j].x[t];
  const int slot = (blockIdx.x * (kPeakThreads / 32) + threadIdx.x / 32) % kPeakSlots;
  wmma::store_matrix_sync(out + slot * 256, acc[0], 16, wmma::mem_row_major);
#else
  if (iters < 0) out[0] = av + bv;  // no tensor-core TF32 before sm_80
#endif
}

// The same with bfloat16 m16n16k16.
__global__ void __launch_bounds__(kPeakThreads) peak_bf16_kernel(int iters, float av, float bv,
                                                                 float* out) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kPeakAcc];
  wmma::fill_fragment(a, __float2bfloat16(av));
  wmma::fill_fragment(b, __float2bfloat16(bv));
#pragma unroll
  for (int j = 0; j < kPeakAcc; ++j) wmma::fill_fragment(acc[j], 0.0f);
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < kPeakAcc; ++j) wmma::mma_sync(acc[j], a, b, acc[j]);
  }
#pragma unroll
  for (int j = 1; j < kPeakAcc; ++j)
    for (int t = 0; t < acc[0].num_elements; ++t) acc[0].x[t] += acc[j].x[t];
  const int slot = (blockIdx.x * (kPeakThreads / 32) + threadIdx.x / 32) % kPeakSlots;
  wmma::store_matrix_sync(out + slot * 256, acc[0], 16, wmma::mem_row_major);
#else
  if (iters < 0) out[0] = av + bv;
#endif
}

// Independent FP32 FMAs: iters * kPeakAcc per thread, no memory traffic in the loop.
__global__ void __launch_bounds__(kPeakThreads) peak_fma_kernel(int iters, float av, float bv,
                                                                float* out) {
  float x[kPeakAcc];
#pragma unroll
  for (int j = 0; j < kPeakAcc; ++j) x[j] = threadIdx.x * 1e-3f + j;
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < kPeakAcc; ++j) x[j] = fmaf(x[j], av, bv);
  }
  float s = 0.0f;
#pragma unroll
  for (int j = 0; j < kPeakAcc; ++j) s += x[j];
  out[(blockIdx.x * kPeakThreads + threadIdx.x) % (kPeakSlots * 256)] = s;
}

using PeakKernel = void (*)(int, float, float, float*);

// TFLOP/s of one wave of `kernel` (as many blocks as fit on every SM at once, so no tail),
// flop_per_unit FLOPs per mma (per warp) or per FMA (per thread).
struct Peak {
  double tflops = 0.0, ms = 0.0;
};

Peak measure_peak(PeakKernel kernel, int iters, double flop_per_unit, bool per_warp, int sms,
                  float* out) {
  int per_sm = 0;
  PPO_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kPeakThreads, 0));
  const int blocks = std::max(1, per_sm) * sms;
  const Timing t = time_gpu([&] {
    kernel<<<blocks, kPeakThreads>>>(iters, 1.0f, 0.5f, out);
    PPO_CUDA_CHECK_LAUNCH("peak kernel");
  });
  const double units = static_cast<double>(blocks) * (per_warp ? kPeakThreads / 32 : kPeakThreads) *
                       static_cast<double>(iters) * kPeakAcc;
  Peak p;
  p.ms = t.median_ms;
  p.tflops = units * flop_per_unit / (t.median_ms * 1e9);
  return p;
}

struct Ceilings {
  double memcpy_gbs = 0.0, tf32 = 0.0, bf16 = 0.0, fp32 = 0.0;  // GB/s; TFLOP/s
};

// ---- results ----------------------------------------------------------------------------------

struct Entry {
  std::string section, name, detail;  // e.g. "matmul", "8192 qkv fwd", "NT 8192x2304x768"
  std::string path;                   // matmul path ("" elsewhere)
  bool ok = false;
  std::string error;                  // "n/a" or the error's message when !ok
  double ms = 0.0, best_ms = 0.0;
  int reps = 0;
  std::string unit;                   // "TFLOP/s", "GB/s", "us"
  double value = 0.0;                 // in `unit`
  std::string ceiling;                // "memcpy", "tf32", "bf16", "fp32" or ""
  double fraction = NAN;              // value / ceiling
  int64_t m = 0, n = 0, k = 0;        // matmuls
  double flop = 0.0, bytes = 0.0;
};

std::vector<Entry> g_entries;
int g_failures = 0;

double ceiling_value(const Ceilings& c, const std::string& name) {
  if (name == "memcpy") return c.memcpy_gbs;
  if (name == "tf32") return c.tf32;
  if (name == "bf16") return c.bf16;
  if (name == "fp32") return c.fp32;
  return 0.0;
}

// Times fn and records the entry: `flop` (TFLOP/s), else `bytes` (GB/s), else us per call.
// A ppo::Error is recorded (and, except CudaUnavailable, counted as a failure) instead of
// ending the benchmark.
void run_entry(Entry e, const Ceilings& c, const std::function<void()>& fn) {
  try {
    const Timing t = time_gpu(fn);
    e.ok = true;
    e.ms = t.median_ms, e.best_ms = t.best_ms, e.reps = t.reps;
    if (e.flop > 0.0) {
      e.unit = "TFLOP/s", e.value = e.flop / (t.median_ms * 1e9);
    } else if (e.bytes > 0.0) {
      e.unit = "GB/s", e.value = e.bytes / (t.median_ms * 1e6);
    } else {
      e.unit = "us", e.value = t.median_ms * 1e3;
    }
    const double cv = ceiling_value(c, e.ceiling);
    if (cv > 0.0 && e.unit != "us") e.fraction = e.value / cv;
  } catch (const ppo::Error& err) {
    e.ok = false;
    if (err.code() == ppo::ErrorCode::CudaUnavailable) {
      e.error = "n/a";
    } else {
      e.error = err.what();
      ++g_failures;
      std::fprintf(stderr, "bench_cuda: %s %s: %s (%s)\n", e.section.c_str(), e.name.c_str(),
                   err.what(), ppo::error_code_name(err.code()));
    }
    (void)cudaDeviceSynchronize();
    (void)cudaGetLastError();
  }
  g_entries.push_back(std::move(e));
}

// ---- matmul ---------------------------------------------------------------------------------------

const char* const kPaths[] = {"tf32", "bf16", "fp32", "cublas"};

std::string path_ceiling(const std::string& path) {
  if (path == "bf16") return "bf16";
  if (path == "fp32") return "fp32";
  return "tf32";  // tf32, and cublas (tensor cores or not: its best case)
}

void bench_matmuls(const Ceilings& c) {
  struct Layer {
    const char* name;
    int64_t in, out;
  };
  const Layer layers[] = {{"qkv", kC, 3 * kC}, {"attn_proj", kC, kC}, {"mlp_fc", kC, 4 * kC},
                          {"mlp_proj", 4 * kC, kC}, {"lm_head", kC, kV}};
  const int64_t B = 8;
  for (const int64_t T : {int64_t{512}, int64_t{1024}}) {
    const int64_t rows = B * T;
    for (const Layer& l : layers) {
      const int64_t r = std::strcmp(l.name, "lm_head") == 0 ? B * (T - 1) : rows;
      struct Op {
        const char* what;
        bool ta, tb;
        int64_t m, n, k;
        float beta;
      };
      const Op ops[] = {{"fwd", false, true, r, l.out, l.in, 0.0f},
                        {"dX", false, false, r, l.in, l.out, 0.0f},
                        {"dW", true, false, l.out, l.in, r, 1.0f}};
      for (const Op& op : ops) {
        const int64_t lda = op.ta ? op.m : op.k, ldb = op.tb ? op.k : op.n;
        PPO_DEVICE_BUFFER(float, a, static_cast<size_t>(op.m * op.k));
        PPO_DEVICE_BUFFER(float, bm, static_cast<size_t>(op.k * op.n));
        PPO_DEVICE_BUFFER(float, cm, static_cast<size_t>(op.m * op.n));
        fill_uniform(a.get(), op.m * op.k, 11);
        fill_uniform(bm.get(), op.k * op.n, 12);
        PPO_CUDA_CHECK(cudaMemset(cm.get(), 0, static_cast<size_t>(op.m * op.n) * sizeof(float)));
        for (const char* path : kPaths) {
          Entry e;
          e.section = "matmul";
          e.name = std::to_string(rows) + " " + l.name + " " + op.what;
          e.detail = std::string(op.ta ? "T" : "N") + (op.tb ? "T" : "N");
          e.path = path;
          e.m = op.m, e.n = op.n, e.k = op.k;
          e.flop = 2.0 * op.m * op.n * op.k;
          e.ceiling = path_ceiling(path);
          run_entry(e, c, [&] {
            ppo::cuda::matmul_on_path(path, op.ta, op.tb, op.m, op.n, op.k, 1.0f, a.get(), lda,
                                      bm.get(), ldb, op.beta, cm.get(), op.n);
          });
          // dW accumulates (beta 1): start each path from 0 so values stay bounded.
          PPO_CUDA_CHECK(cudaMemset(cm.get(), 0, static_cast<size_t>(op.m * op.n) * sizeof(float)));
        }
      }
    }
  }
}

// ---- memory-bound kernels ----------------------------------------------------------------------------

void bench_memory_bound(const Ceilings& c) {
  const int64_t B = 8, T = 1024, R = B * T, C = kC;
  const double f = 4.0;  // bytes per float / int32
  auto entry = [&](const std::string& name, const std::string& detail, double bytes) {
    Entry e;
    e.section = "memory";
    e.name = name, e.detail = detail, e.bytes = bytes, e.ceiling = "memcpy";
    return e;
  };
  const std::string rc = "R=" + std::to_string(R) + " C=" + std::to_string(C);
  {  // LayerNorm
    PPO_DEVICE_BUFFER(float, in, R * C);
    PPO_DEVICE_BUFFER(float, out, R * C);
    PPO_DEVICE_BUFFER(float, w, C);
    PPO_DEVICE_BUFFER(float, b, C);
    PPO_DEVICE_BUFFER(float, mean, R);
    PPO_DEVICE_BUFFER(float, rstd, R);
    PPO_DEVICE_BUFFER(float, gout, R * C);
    PPO_DEVICE_BUFFER(float, gin, R * C);
    PPO_DEVICE_BUFFER(float, gw, C);
    PPO_DEVICE_BUFFER(float, gb, C);
    fill_uniform(in.get(), R * C, 21, -2.0f, 2.0f);
    fill_uniform(w.get(), C, 22, 0.5f, 1.5f);
    fill_uniform(b.get(), C, 23);
    fill_uniform(gout.get(), R * C, 24);
    PPO_CUDA_CHECK(cudaMemset(gin.get(), 0, R * C * sizeof(float)));
    PPO_CUDA_CHECK(cudaMemset(gw.get(), 0, C * sizeof(float)));
    PPO_CUDA_CHECK(cudaMemset(gb.get(), 0, C * sizeof(float)));
    run_entry(entry("layernorm fwd", rc, f * (2.0 * R * C + 2.0 * C + 2.0 * R)), c, [&] {
      ppo::cuda::layernorm_forward(R, C, in.get(), w.get(), b.get(), 1e-5f, out.get(), mean.get(),
                                   rstd.get());
    });
    run_entry(entry("layernorm bwd", rc, f * (4.0 * R * C + 2.0 * R + 5.0 * C)), c, [&] {
      ppo::cuda::layernorm_backward(R, C, gout.get(), in.get(), w.get(), mean.get(), rstd.get(),
                                    gin.get(), gw.get(), gb.get());
    });
  }
  {  // GELU on the MLP's hidden activations [R, 4C]
    const int64_t n = R * 4 * C;
    PPO_DEVICE_BUFFER(float, in, n);
    PPO_DEVICE_BUFFER(float, out, n);
    PPO_DEVICE_BUFFER(float, gout, n);
    PPO_DEVICE_BUFFER(float, gin, n);
    fill_uniform(in.get(), n, 31, -3.0f, 3.0f);
    fill_uniform(gout.get(), n, 32);
    PPO_CUDA_CHECK(cudaMemset(gin.get(), 0, n * sizeof(float)));
    const std::string d = "n=" + std::to_string(n);
    run_entry(entry("gelu fwd", d, f * 2.0 * n), c,
              [&] { ppo::cuda::gelu_forward(n, in.get(), out.get()); });
    run_entry(entry("gelu bwd", d, f * 4.0 * n), c,
              [&] { ppo::cuda::gelu_backward(n, in.get(), gout.get(), gin.get()); });
  }
  {  // AdamW and the gradient norm over GPT-2 124M's parameters
    const int64_t n = kParams;
    PPO_DEVICE_BUFFER(float, p, n);
    PPO_DEVICE_BUFFER(float, g, n);
    PPO_DEVICE_BUFFER(float, m, n);
    PPO_DEVICE_BUFFER(float, v, n);
    fill_uniform(p.get(), n, 41, -0.05f, 0.05f);
    fill_uniform(g.get(), n, 42, -1e-3f, 1e-3f);
    PPO_CUDA_CHECK(cudaMemset(m.get(), 0, n * sizeof(float)));
    PPO_CUDA_CHECK(cudaMemset(v.get(), 0, n * sizeof(float)));
    const std::string d = "P=" + std::to_string(n);
    int64_t step = 0;
    run_entry(entry("adamw_update", d, f * 7.0 * n), c, [&] {
      ppo::cuda::adamw_update(n, p.get(), g.get(), m.get(), v.get(), 1e-4f, 0.9f, 0.999f, 1e-8f,
                              0.0f, ++step);
    });
    double sink = 0.0;
    run_entry(entry("sum_of_squares", d + " (+ host read)", f * n), c,
              [&] { sink += ppo::cuda::sum_of_squares(n, g.get()); });
    if (!std::isfinite(sink)) std::fprintf(stderr, "bench_cuda: sum_of_squares gave %g\n", sink);
  }
  {  // Embeddings: B x T tokens, positions 0..T-1 per row
    PPO_DEVICE_BUFFER(float, wte, kV * C);
    PPO_DEVICE_BUFFER(float, wpe, kP * C);
    PPO_DEVICE_BUFFER(float, out, R * C);
    PPO_DEVICE_BUFFER(float, gout, R * C);
    PPO_DEVICE_BUFFER(float, gwte, kV * C);
    PPO_DEVICE_BUFFER(float, gwpe, kP * C);
    PPO_DEVICE_BUFFER(int32_t, tokens, R);
    PPO_DEVICE_BUFFER(int32_t, positions, R);
    fill_uniform(wte.get(), kV * C, 51, -0.1f, 0.1f);
    fill_uniform(wpe.get(), kP * C, 52, -0.1f, 0.1f);
    fill_uniform(gout.get(), R * C, 53);
    PPO_CUDA_CHECK(cudaMemset(gwte.get(), 0, kV * C * sizeof(float)));
    PPO_CUDA_CHECK(cudaMemset(gwpe.get(), 0, kP * C * sizeof(float)));
    std::mt19937 rng(54);
    std::uniform_int_distribution<int32_t> tok(0, static_cast<int32_t>(kV - 1));
    std::vector<int32_t> ht(R), hp(R);
    for (int64_t i = 0; i < R; ++i) ht[i] = tok(rng), hp[i] = static_cast<int32_t>(i % T);
    upload(tokens.get(), ht);
    upload(positions.get(), hp);
    const double U = static_cast<double>(std::set<int32_t>(ht.begin(), ht.end()).size());
    run_entry(entry("embedding fwd", rc, f * (3.0 * R * C + 2.0 * R)), c, [&] {
      ppo::cuda::embedding_forward(R, C, tokens.get(), positions.get(), wte.get(), wpe.get(),
                                   out.get());
    });
    run_entry(entry("embedding bwd", rc + " U=" + std::to_string(static_cast<int64_t>(U)),
                    f * (1.0 * R * C + 2.0 * R + 2.0 * U * C + 2.0 * T * C)),
              c, [&] {
                ppo::cuda::embedding_backward(R, C, gout.get(), tokens.get(), positions.get(),
                                              gwte.get(), gwpe.get());
              });
  }
}

// ---- attention ------------------------------------------------------------------------------------------

void bench_attention(const Ceilings& c) {
  const int64_t B = 8, H = kH, C = kC, hs = C / H;
  for (const int64_t T : {int64_t{512}, int64_t{1024}}) {
    const int64_t saved_n = ppo::cuda::attention_saved_floats(B, T, H);
    PPO_DEVICE_BUFFER(float, qkv, B * T * 3 * C);
    PPO_DEVICE_BUFFER(float, out, B * T * C);
    PPO_DEVICE_BUFFER(float, saved, std::max<int64_t>(saved_n, 1));
    PPO_DEVICE_BUFFER(float, gout, B * T * C);
    PPO_DEVICE_BUFFER(float, gqkv, B * T * 3 * C);
    PPO_DEVICE_BUFFER(int32_t, lengths, B);
    fill_uniform(qkv.get(), B * T * 3 * C, 61);
    fill_uniform(gout.get(), B * T * C, 62);
    PPO_CUDA_CHECK(cudaMemset(gqkv.get(), 0, B * T * 3 * C * sizeof(float)));
    upload(lengths.get(), std::vector<int32_t>(B, static_cast<int32_t>(T)));
    // Causal: the two products on the T^2/2 half.
    const double fwd_flop = 4.0 * B * H * static_cast<double>(T) * T * hs / 2.0;
    const std::string d = "B=8 H=12 hs=64 T=" + std::to_string(T);
    Entry f;
    f.section = "attention", f.name = "attention fwd T=" + std::to_string(T), f.detail = d;
    f.flop = fwd_flop, f.ceiling = "fp32";
    run_entry(f, c, [&] {
      ppo::cuda::attention_forward(B, T, H, H, hs, lengths.get(), qkv.get(), saved.get(), out.get());
    });
    Entry b = f;
    b.name = "attention bwd T=" + std::to_string(T), b.flop = 2.5 * fwd_flop;
    run_entry(b, c, [&] {
      ppo::cuda::attention_backward(B, T, H, H, hs, lengths.get(), gout.get(), qkv.get(), out.get(),
                                    saved.get(), gqkv.get());
    });
  }
}

// ---- sampling --------------------------------------------------------------------------------------------

void bench_sampling(const Ceilings& c) {
  const int64_t V = kV;
  for (const int64_t rows : {int64_t{8}, int64_t{64}}) {
    PPO_DEVICE_BUFFER(float, logits, rows * V);
    PPO_DEVICE_BUFFER(float, scratch, rows * V);
    PPO_DEVICE_BUFFER(int32_t, penalized, rows);
    PPO_DEVICE_BUFFER(int32_t, penalized_count, rows);
    PPO_DEVICE_BUFFER(int32_t, active, rows);
    PPO_DEVICE_BUFFER(double, uniforms, rows);
    PPO_DEVICE_BUFFER(int32_t, tokens, rows);
    PPO_DEVICE_BUFFER(float, logprobs, rows);
    PPO_DEVICE_BUFFER(int32_t, status, rows);
    fill_uniform(logits.get(), rows * V, 71, -8.0f, 8.0f);
    upload(penalized.get(), std::vector<int32_t>(rows, 0));
    upload(penalized_count.get(), std::vector<int32_t>(rows, 0));
    upload(active.get(), std::vector<int32_t>(rows, 1));
    std::vector<double> u(rows);
    for (int64_t r = 0; r < rows; ++r) u[r] = (r + 0.5) / rows;
    upload(uniforms.get(), u);
    ppo::SampleTokensArgs args;
    args.rows = rows, args.vocab = V;
    args.logits = logits.get(), args.scratch = scratch.get();
    args.penalized = penalized.get(), args.penalized_count = penalized_count.get();
    args.penalized_stride = 1;
    args.active = active.get(), args.uniforms = uniforms.get();
    args.tokens = tokens.get(), args.logprobs = logprobs.get(), args.status = status.get();
    struct Mode {
      const char* name;
      bool greedy;
      float top_p;
      int64_t top_k;
    };
    const Mode modes[] = {{"greedy", true, 1.0f, 0}, {"top-p 0.9", false, 0.9f, 0},
                          {"top-k 50", false, 1.0f, 50}};
    for (const Mode& m : modes) {
      ppo::SampleTokensArgs a = args;
      a.greedy = m.greedy, a.top_p = m.top_p, a.top_k = m.top_k;
      Entry e;
      e.section = "sampling";
      e.name = "sample_tokens " + std::string(m.name);
      e.detail = "rows=" + std::to_string(rows) + " V=" + std::to_string(V);
      run_entry(e, c, [&] { ppo::cuda::sample_tokens(a); });
    }
  }
}

// ---- report -----------------------------------------------------------------------------------------------

std::string fraction_text(const Entry& e) {
  if (!std::isfinite(e.fraction)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.0f%%", 100.0 * e.fraction);
  return buf;
}

void print_matmul_table(const Ceilings& c) {
  std::printf("\nmatmul (TFLOP/s, %% of the path's ceiling: tf32/cublas vs %.1f, bf16 vs %.1f, "
              "fp32 vs %.1f TFLOP/s)\n",
              c.tf32, c.bf16, c.fp32);
  std::printf("%-22s %-2s %6s %6s %6s", "shape", "op", "m", "n", "k");
  for (const char* p : kPaths) std::printf(" %15s", p);
  std::printf("\n");
  // Rows in first-seen order of names; cells by path.
  std::vector<std::string> names;
  for (const Entry& e : g_entries)
    if (e.section == "matmul" && std::find(names.begin(), names.end(), e.name) == names.end())
      names.push_back(e.name);
  // Totals per (row count, path): sum of FLOPs / sum of times.
  std::vector<std::string> groups;
  std::vector<std::vector<double>> gflop, gms;
  std::vector<std::vector<bool>> gok;
  const size_t np = sizeof(kPaths) / sizeof(kPaths[0]);
  for (const std::string& name : names) {
    const Entry* first = nullptr;
    for (const Entry& e : g_entries)
      if (e.section == "matmul" && e.name == name) {
        first = &e;
        break;
      }
    std::printf("%-22s %-2s %6lld %6lld %6lld", name.c_str(), first->detail.c_str(),
                static_cast<long long>(first->m), static_cast<long long>(first->n),
                static_cast<long long>(first->k));
    const std::string group = name.substr(0, name.find(' '));
    size_t gi = std::find(groups.begin(), groups.end(), group) - groups.begin();
    if (gi == groups.size()) {
      groups.push_back(group);
      gflop.emplace_back(np, 0.0), gms.emplace_back(np, 0.0), gok.emplace_back(np, true);
    }
    for (size_t p = 0; p < np; ++p) {
      const Entry* cell = nullptr;
      for (const Entry& e : g_entries)
        if (e.section == "matmul" && e.name == name && e.path == kPaths[p]) cell = &e;
      if (cell != nullptr && cell->ok) {
        char buf[48];
        std::snprintf(buf, sizeof buf, "%.1f (%s)", cell->value, fraction_text(*cell).c_str());
        std::printf(" %15s", buf);
        gflop[gi][p] += cell->flop, gms[gi][p] += cell->ms;
      } else {
        std::printf(" %15s", cell != nullptr && cell->error == "n/a" ? "n/a" : "error");
        gok[gi][p] = false;
      }
    }
    std::printf("\n");
  }
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    std::printf("%-22s %-2s %6s %6s %6s", (groups[gi] + " rows all").c_str(), "", "", "", "");
    for (size_t p = 0; p < np; ++p) {
      if (!gok[gi][p] || gms[gi][p] <= 0.0) {
        std::printf(" %15s", "-");
        continue;
      }
      const double tf = gflop[gi][p] / (gms[gi][p] * 1e9);
      const double cv = ceiling_value(c, path_ceiling(kPaths[p]));
      char buf[48];
      std::snprintf(buf, sizeof buf, "%.1f (%.0f%%)", tf, cv > 0.0 ? 100.0 * tf / cv : 0.0);
      std::printf(" %15s", buf);
    }
    std::printf("\n");
  }
}

void print_section(const char* title, const char* section) {
  bool any = false;
  for (const Entry& e : g_entries) any = any || e.section == section;
  if (!any) return;
  std::printf("\n%s\n%-26s %-28s %11s %11s %8s %8s\n", title, "kernel", "shape", "us/call",
              "figure", "unit", "of ceil");
  for (const Entry& e : g_entries) {
    if (e.section != section) continue;
    if (!e.ok) {
      std::printf("%-26s %-28s %11s %11s\n", e.name.c_str(), e.detail.c_str(),
                  e.error == "n/a" ? "n/a" : "error", "-");
      continue;
    }
    std::printf("%-26s %-28s %11.1f %11.1f %8s %8s\n", e.name.c_str(), e.detail.c_str(),
                e.ms * 1e3, e.value, e.unit.c_str(),
                (fraction_text(e) + (e.ceiling.empty() ? "" : " " + e.ceiling)).c_str());
  }
}

json::Value num_or_null(double x) { return std::isfinite(x) ? json::Value::number(x) : json::Value(); }

}  // namespace

int main(int argc, char** argv) {
  bool as_json = false, matmuls = true;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--runs" && i + 1 < argc) {
      g_runs = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--json") {
      as_json = true;
    } else if (a == "--skip-matmul") {
      matmuls = false;
    } else {
      std::fprintf(stderr, "usage: %s [--runs N] [--json] [--skip-matmul]\n", argv[0]);
      return 2;
    }
  }
  if (!ppo::cuda_available()) {
    std::fprintf(stderr, "bench_cuda: CUDA cannot be used here (%s): skipped\n",
                 ppo::cuda_unavailable_reason().c_str());
    return 77;
  }
  try {
    int dev = 0;
    PPO_CUDA_CHECK(cudaGetDevice(&dev));
    cudaDeviceProp prop{};
    PPO_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
    const int sms = prop.multiProcessorCount;
    std::printf("ppo CUDA kernels  device=%s (sm_%d%d, %d SMs, %.1f GiB)  default matmul path=%s  "
                "runs=%d (median; each run = N calls timed with cudaEvents, ~%.0f ms)\n",
                prop.name, prop.major, prop.minor, sms,
                static_cast<double>(prop.totalGlobalMem) / (1024.0 * 1024.0 * 1024.0),
                ppo::cuda::matmul_path(), g_runs, kTargetRunMs);

    // ---- ceilings
    Ceilings c;
    {
      const int64_t bytes = int64_t{1} << 30;
      PPO_DEVICE_BUFFER(char, src, bytes);
      PPO_DEVICE_BUFFER(char, dst, bytes);
      PPO_CUDA_CHECK(cudaMemset(src.get(), 1, bytes));
      const Timing t = time_gpu([&] {
        PPO_CUDA_CHECK(cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice, 0));
      });
      c.memcpy_gbs = 2.0 * bytes / (t.median_ms * 1e6);
    }
    {
      PPO_DEVICE_BUFFER(float, out, kPeakSlots * 256);
      if (prop.major >= 8) {
        c.tf32 = measure_peak(peak_tf32_kernel, 4096, 2.0 * 16 * 16 * 8, true, sms, out.get()).tflops;
        c.bf16 = measure_peak(peak_bf16_kernel, 4096, 2.0 * 16 * 16 * 16, true, sms, out.get()).tflops;
      }
      c.fp32 = measure_peak(peak_fma_kernel, 16384, 2.0, false, sms, out.get()).tflops;
    }
    std::printf("ceilings: memcpy D2D %.1f GB/s (read + write)  tf32 mma_sync %.1f TFLOP/s  "
                "bf16 mma_sync %.1f TFLOP/s  fp32 FMA %.1f TFLOP/s\n",
                c.memcpy_gbs, c.tf32, c.bf16, c.fp32);
    if (prop.major < 8) std::printf("(no TF32/BF16 tensor cores before sm_80: those ceilings are 0)\n");
    std::printf("attention FLOPs: forward 4*B*H*T^2*hs/2 (causal half), backward 2.5 x forward; "
                "attention vs the fp32 FMA peak\n");

    if (matmuls) bench_matmuls(c);
    bench_memory_bound(c);
    bench_attention(c);
    bench_sampling(c);

    if (matmuls) print_matmul_table(c);
    print_section("memory-bound kernels (GB/s of bytes read + written; ceiling memcpy)", "memory");
    print_section("fused causal attention (TFLOP/s)", "attention");
    print_section("sampling (us per call)", "sampling");
    if (g_failures > 0) std::printf("\n%d kernel(s) failed (see stderr)\n", g_failures);

    if (as_json) {
      json::Value out = json::Value::object();
      out.set("impl", json::Value::string("ppo"));
      out.set("device", json::Value::string(prop.name));
      out.set("sm", json::Value::integer(prop.major * 10 + prop.minor));
      out.set("sms", json::Value::integer(sms));
      out.set("matmul_path", json::Value::string(ppo::cuda::matmul_path()));
      out.set("runs", json::Value::integer(g_runs));
      json::Value ce = json::Value::object();
      ce.set("memcpy_gb_per_s", num_or_null(c.memcpy_gbs));
      ce.set("tf32_tflops_per_s", num_or_null(c.tf32));
      ce.set("bf16_tflops_per_s", num_or_null(c.bf16));
      ce.set("fp32_tflops_per_s", num_or_null(c.fp32));
      out.set("ceilings", std::move(ce));
      json::Value list = json::Value::array();
      for (const Entry& e : g_entries) {
        json::Value j = json::Value::object();
        j.set("section", json::Value::string(e.section));
        j.set("name", json::Value::string(e.name));
        j.set("detail", json::Value::string(e.detail));
        if (!e.path.empty()) j.set("path", json::Value::string(e.path));
        if (e.section == "matmul") {
          j.set("m", json::Value::integer(e.m));
          j.set("n", json::Value::integer(e.n));
          j.set("k", json::Value::integer(e.k));
        }
        j.set("ok", json::Value::boolean(e.ok));
        if (e.ok) {
          j.set("ms", json::Value::number(e.ms));
          j.set("best_ms", json::Value::number(e.best_ms));
          j.set("reps", json::Value::integer(e.reps));
          j.set("value", num_or_null(e.value));
          j.set("unit", json::Value::string(e.unit));
          if (!e.ceiling.empty()) j.set("ceiling", json::Value::string(e.ceiling));
          j.set("fraction", num_or_null(e.fraction));
        } else {
          j.set("error", json::Value::string(e.error));
        }
        list.push_back(std::move(j));
      }
      out.set("kernels", std::move(list));
      std::printf("%s\n", json::dump(out).c_str());
    }
  } catch (const ppo::Error& e) {
    std::fprintf(stderr, "bench_cuda: %s (%s, argument '%s')\n", e.what(),
                 ppo::error_code_name(e.code()), e.argument().c_str());
    return 1;
  }
  return g_failures > 0 ? 1 : 0;
}
