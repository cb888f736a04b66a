// CUDA parity of the Llama-family layers: every function of cuda/llama_kernels.h
// (ppo::cuda::rmsnorm_forward, ..., swiglu_backward) runs on random inputs next to its CPU
// twin of cpu/llama_layers.h (ppo::cpu::...) and the two are compared.
//
//   - Inputs are random, of several shapes, odd and non-multiple-of-tile sizes included;
//     RoPE runs on padding rows (positions -1) and on a GQA-like fused row
//     [8 q heads | 2 k heads | 2 v heads] of width 12 * head_size, head_size 2, 64 and 128.
//   - Outputs are POISONED before each run (device buffers filled from a NaN host vector),
//     so an element an op leaves unwritten fails. Accumulating outputs (the backward
//     gradients) start from a random nonzero buffer, identical on both sides. RoPE works in
//     place: its buffer is the input, and every element it must not touch (padding rows,
//     columns outside the rotated heads) must come back bit-unchanged.
//   - Every op runs twice on the GPU and must give bit-identical outputs (memcmp): the
//     kernels use no floating-point atomics.
//   - Each tolerance is stated where it is used, with the reason.
//   - The argument checks are the CPU's (cpu/llama_layers.h, check_*): the GPU entry points
//     must refuse the same bad arguments with the same code and argument name.
//
// Exits 77 (ctest: skipped) when ppo::cuda_available() is false. For checking this file
// itself on a machine without a GPU, PPO_PARITY_SELF_TEST=1 runs everything with the CPU
// functions standing in for the CUDA ones (and host memory for device memory).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

#include "core/backend.h"
#include "core/engine_ops.h"
#include "core/error.h"
#include "cpu/llama_layers.h"
#ifdef PPO_WITH_CUDA
#include "cuda/llama_kernels.h"
#endif
#include "test_framework.h"
#include "test_util.h"
#include "engine_test_util.h"

using ppo::Device;
using ppo::EngineOps;
using ppo::ErrorCode;

namespace {

using et::Buf;
using et::check_bits;
using et::check_close;
using et::check_bits_where;

// ---- the two sets of functions -------------------------------------------------------------

struct LlamaFns {
  void (*rmsnorm_forward)(int64_t, int64_t, const float*, const float*, float, float*, float*);
  void (*rmsnorm_backward)(int64_t, int64_t, const float*, const float*, const float*,
                           const float*, float*, float*);
  void (*rope_forward)(int64_t, int64_t, int64_t, int64_t, int64_t, const int32_t*, float, float,
                       float*);
  void (*rope_backward)(int64_t, int64_t, int64_t, int64_t, int64_t, const int32_t*, float, float,
                        float*);
  void (*swiglu_forward)(int64_t, int64_t, const float*, float*);
  void (*swiglu_backward)(int64_t, int64_t, const float*, const float*, float*);
};

const LlamaFns kCpuFns = {&ppo::cpu::rmsnorm_forward, &ppo::cpu::rmsnorm_backward,
                          &ppo::cpu::rope_forward,    &ppo::cpu::rope_backward,
                          &ppo::cpu::swiglu_forward,  &ppo::cpu::swiglu_backward};
#ifdef PPO_WITH_CUDA
const LlamaFns kCudaFns = {&ppo::cuda::rmsnorm_forward, &ppo::cuda::rmsnorm_backward,
                           &ppo::cuda::rope_forward,    &ppo::cuda::rope_backward,
                           &ppo::cuda::swiglu_forward,  &ppo::cuda::swiglu_backward};
#endif

// A side of the comparison: the functions and the memory they work on (host memory for the
// CPU functions, device memory for the CUDA ones).
struct Side {
  const LlamaFns* fns;
  const EngineOps* mem;
};

bool g_self_test = false;  // PPO_PARITY_SELF_TEST=1
Side g_gpu{nullptr, nullptr};

Side cpu_side() { return Side{&kCpuFns, &ppo::cpu_engine_ops()}; }
Side gpu_side() { return g_gpu; }

// ---- buffers -------------------------------------------------------------------------------


// ---- comparisons ---------------------------------------------------------------------------



// Named outputs of one op run; the runs on the CPU and twice on the GPU.
using Outs = std::map<std::string, std::vector<float>>;
struct Runs {
  Outs cpu, gpu;
};

// Runs `f(side)` on the CPU and twice on the GPU; the GPU runs must be bit-identical.
template <typename F>
Runs run3(const std::string& what, F f) {
  Runs r;
  r.cpu = f(cpu_side());
  r.gpu = f(gpu_side());
  const Outs again = f(gpu_side());
  for (const auto& kv : r.gpu)
    check_bits(kv.second, again.at(kv.first), what + " " + kv.first + " (GPU run twice)");
  return r;
}

// Positions [rows]: mostly in [0, max_pos], about 1 in 5 padding (-1).
std::vector<int32_t> random_positions(tu::Rng& rng, int64_t rows, int64_t max_pos) {
  std::vector<int32_t> p(static_cast<size_t>(rows));
  for (auto& x : p)
    x = tu::rand_int(rng, 0, 4) == 0 ? -1 : static_cast<int32_t>(tu::rand_int(rng, 0, max_pos));
  return p;
}

std::string shape(int64_t a, int64_t b) { return "[" + std::to_string(a) + "," + std::to_string(b) + "]"; }

// ---- RMSNorm -------------------------------------------------------------------------------

struct RmsCase {
  int64_t rows, C;
  float eps;
};

// Rows of mixed scales (1, 1e3, 1e-3) and, when eps > 0, one all-zero row (rstd =
// 1/sqrt(eps), out = 0).
std::vector<float> rms_input(tu::Rng& rng, int64_t rows, int64_t C, float eps) {
  std::vector<float> x = tu::normal(rng, rows * C);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t kind = tu::rand_int(rng, 0, 5);
    const float s = kind == 0 ? 1e3f : kind == 1 ? 1e-3f : 1.0f;
    for (int64_t c = 0; c < C; ++c) x[r * C + c] *= s;
  }
  if (eps > 0.0f && rows > 2)
    for (int64_t c = 0; c < C; ++c) x[(rows / 2) * C + c] = 0.0f;
  return x;
}

const RmsCase kRmsCases[] = {{1, 1, 1e-5f},     {1, 7, 1e-6f},    {3, 33, 1e-5f},
                             {17, 64, 1e-6f},   {9, 255, 1e-5f},  {70, 513, 1e-5f},
                             {33, 1024, 1e-6f}, {5, 4097, 1e-5f}, {1000, 48, 1e-5f},
                             {513, 100, 0.0f}};

TEST(llama_rmsnorm_forward) {
  tu::Rng rng(101);
  for (const RmsCase& k : kRmsCases) {
    const std::string what = "rmsnorm_forward " + shape(k.rows, k.C);
    const std::vector<float> x = rms_input(rng, k.rows, k.C, k.eps);
    const std::vector<float> w = tu::normal(rng, k.C, 1.0, 0.5);
    const Runs r = run3(what, [&](Side s) {
      Buf<float> dx(*s.mem, x), dw(*s.mem, w);
      Buf<float> out(*s.mem, tu::poisoned(k.rows * k.C)), rstd(*s.mem, tu::poisoned(k.rows));
      s.fns->rmsnorm_forward(k.rows, k.C, dx.p(), dw.p(), k.eps, out.p(), rstd.p());
      return Outs{{"out", out.get()}, {"rstd", rstd.get()}};
    });
    // rstd: the sum of squares is in double on both sides (only its summation order
    // differs, ~1e-16 relative), rounded once to float: at most 1 float ulp apart.
    const std::vector<float>& rw = r.cpu.at("rstd");
    check_close(r.gpu.at("rstd"), rw, [&](size_t i) { return 1.2e-7 * std::fabs(rw[i]); },
                what + " rstd");
    // out = (x * rstd) * w, two float multiplies on both sides: with rstd at most 1 ulp
    // apart, a few float ulps (1e-5 relative is ample), 1e-6 absolute for tiny outputs.
    const std::vector<float>& ow = r.cpu.at("out");
    check_close(r.gpu.at("out"), ow, [&](size_t i) { return 1e-6 + 1e-5 * std::fabs(ow[i]); },
                what + " out");
  }
}

TEST(llama_rmsnorm_backward) {
  tu::Rng rng(102);
  for (const RmsCase& k : kRmsCases) {
    const std::string what = "rmsnorm_backward " + shape(k.rows, k.C);
    const float eps = k.eps > 0.0f ? k.eps : 1e-6f;  // no rstd = inf rows here
    const std::vector<float> x = rms_input(rng, k.rows, k.C, eps);
    const std::vector<float> w = tu::normal(rng, k.C, 1.0, 0.5);
    const std::vector<float> g = tu::normal(rng, k.rows * k.C);
    const std::vector<float> gi0 = tu::normal(rng, k.rows * k.C);
    const std::vector<float> gw0 = tu::normal(rng, k.C);
    // The forward's rstd, from the CPU, fed to both sides.
    std::vector<float> y(x.size()), rstd(static_cast<size_t>(k.rows));
    ppo::cpu::rmsnorm_forward(k.rows, k.C, x.data(), w.data(), eps, y.data(), rstd.data());

    const Runs r = run3(what, [&](Side s) {
      Buf<float> dg(*s.mem, g), dx(*s.mem, x), dw(*s.mem, w), drs(*s.mem, rstd);
      Buf<float> gi(*s.mem, gi0), gw(*s.mem, gw0);
      s.fns->rmsnorm_backward(k.rows, k.C, dg.p(), dx.p(), dw.p(), drs.p(), gi.p(), gw.p());
      return Outs{{"grad_in", gi.get()}, {"grad_weight", gw.get()}};
    });

    // Magnitudes of the terms, in double: grad_in[r, c] = gi0 + rs * (w g - x coef), coef =
    // rs^2 mean_c(w g x); grad_weight[c] = gw0 + sum_r g x rs.
    std::vector<double> mag_in(x.size()), mag_w(static_cast<size_t>(k.C));
    for (int64_t c = 0; c < k.C; ++c) mag_w[c] = std::fabs(static_cast<double>(gw0[c]));
    for (int64_t row = 0; row < k.rows; ++row) {
      const double rs = rstd[row];
      double dot = 0.0;
      for (int64_t c = 0; c < k.C; ++c)
        dot += static_cast<double>(w[c]) * g[row * k.C + c] * x[row * k.C + c];
      const double coef = rs * rs * dot / static_cast<double>(k.C);
      for (int64_t c = 0; c < k.C; ++c) {
        const size_t i = static_cast<size_t>(row * k.C + c);
        mag_in[i] = std::fabs(static_cast<double>(gi0[i])) +
                    std::fabs(rs * w[c] * g[i]) + std::fabs(rs * x[i] * coef);
        mag_w[c] += std::fabs(static_cast<double>(g[i]) * x[i] * rs);
      }
    }
    // grad_in: float arithmetic on both sides (the row's dot product in float lanes on the
    // CPU, in double on the GPU, coef rounded to float), the two terms may cancel: a few
    // float ulps of the terms' magnitude, 1e-5 relative to it, plus 1e-6 absolute.
    check_close(r.gpu.at("grad_in"), r.cpu.at("grad_in"),
                [&](size_t i) { return 1e-6 + 1e-5 * mag_in[i]; }, what + " grad_in");
    // grad_weight: a sum over up to 1000 rows, float chunk partials on the CPU, double on
    // the GPU: the CPU's rounding error grows with the number of terms added (~rows_per_chunk
    // + chunks float roundings of the running sum): 2e-5 of sum |terms| covers it.
    check_close(r.gpu.at("grad_weight"), r.cpu.at("grad_weight"),
                [&](size_t c) { return 1e-6 + 2e-5 * mag_w[c]; }, what + " grad_weight");
  }
}

// ---- RoPE ----------------------------------------------------------------------------------

// Heads rotated by one call: `heads` heads of head_size starting at column col_offset.
struct RopeCall {
  int64_t col_offset, heads;
};

struct RopeCase {
  std::string name;
  int64_t rows, row_stride, head_size;
  std::vector<RopeCall> calls;
  float theta, scaling;
  int64_t max_pos;
};

std::vector<RopeCase> rope_cases() {
  std::vector<RopeCase> cases;
  // GQA-like fused rows [8 q heads | 2 k heads | 2 v heads]: q and k rotated, v not.
  for (int64_t hs : {2, 64, 128}) {
    for (int64_t rows : {1, 13, 37}) {
      const bool big = rows == 13;
      cases.push_back(RopeCase{"gqa hs " + std::to_string(hs) + " rows " + std::to_string(rows),
                               rows, 12 * hs, hs, {{0, 8}, {8 * hs, 2}},
                               big ? 500000.0f : 10000.0f, big ? 8.0f : 1.0f,
                               big ? 131071 : 4095});
    }
  }
  // Plain contiguous heads, an odd number of pairs per head (head_size 6).
  cases.push_back(RopeCase{"contiguous hs 6", 19, 18, 6, {{0, 3}}, 10000.0f, 1.0f, 300});
  // An offset that is not a multiple of anything, columns left over at both ends.
  cases.push_back(RopeCase{"offset 7 stride 50", 23, 50, 16, {{7, 2}}, 10000.0f, 2.5f, 2047});
  // Many rows, few positions (the CPU's table path), head_size 128.
  cases.push_back(RopeCase{"many rows", 300, 256, 128, {{0, 2}}, 10000.0f, 1.0f, 31});
  return cases;
}

// Rotated columns of one row (mask [row_stride]), and the pair partner of each rotated
// column: partner[c] is the other element of c's (x1, x2) pair.
void rope_layout(const RopeCase& k, std::vector<bool>* rotated, std::vector<int64_t>* partner) {
  rotated->assign(static_cast<size_t>(k.row_stride), false);
  partner->assign(static_cast<size_t>(k.row_stride), -1);
  const int64_t half = k.head_size / 2;
  for (const RopeCall& call : k.calls)
    for (int64_t h = 0; h < call.heads; ++h)
      for (int64_t i = 0; i < half; ++i) {
        const int64_t a = call.col_offset + h * k.head_size + i, b = a + half;
        (*rotated)[a] = (*rotated)[b] = true;
        (*partner)[a] = b;
        (*partner)[b] = a;
      }
}

void check_rope_case(tu::Rng& rng, const RopeCase& k, bool backward) {
  const std::string what =
      std::string(backward ? "rope_backward " : "rope_forward ") + k.name;
  const std::vector<int32_t> pos = random_positions(rng, k.rows, k.max_pos);
  std::vector<float> x0 = tu::normal(rng, k.rows * k.row_stride);
  for (int64_t r = 0; r < k.rows; r += 5)  // some rows of larger scale
    for (int64_t c = 0; c < k.row_stride; ++c) x0[r * k.row_stride + c] *= 100.0f;

  const Runs r = run3(what, [&](Side s) {
    Buf<int32_t> dpos(*s.mem, pos);
    Buf<float> dx(*s.mem, x0);
    for (const RopeCall& call : k.calls) {
      (backward ? s.fns->rope_backward : s.fns->rope_forward)(
          k.rows, k.row_stride, call.col_offset, call.heads, k.head_size, dpos.p(), k.theta,
          k.scaling, dx.p());
    }
    return Outs{{"x", dx.get()}};
  });

  std::vector<bool> rotated;
  std::vector<int64_t> partner;
  rope_layout(k, &rotated, &partner);
  const int64_t W = k.row_stride;
  auto untouched = [&](size_t i) {
    const int64_t row = static_cast<int64_t>(i) / W, col = static_cast<int64_t>(i) % W;
    return pos[row] < 0 || !rotated[col];
  };
  // Padding rows and the columns outside the rotated heads: bit-unchanged, on both sides.
  check_bits_where(r.gpu.at("x"), x0, untouched, what + " untouched elements (GPU)");
  check_bits_where(r.cpu.at("x"), x0, untouched, what + " untouched elements (CPU)");
  // Rotated pairs: the angle is computed identically (the same inv_freq floats,
  // (float)pos / scaling * inv_freq in float without contraction), but the device's
  // cosf/sinf are within 2 ulp, not always the host's value, and the CPU's rotation may be
  // an FMA in its AVX2/AVX-512 clone: |diff| <= a few ulps of 1 times |x1| + |x2|, so
  // 2e-6 * (|x1| + |x2|).
  const std::vector<float>& want = r.cpu.at("x");
  check_close(r.gpu.at("x"), want,
              [&](size_t i) {
                const int64_t row = static_cast<int64_t>(i) / W, col = static_cast<int64_t>(i) % W;
                if (untouched(i)) return 0.0;
                const size_t j = static_cast<size_t>(row * W + partner[col]);
                return 2e-6 * (std::fabs(static_cast<double>(x0[i])) + std::fabs(static_cast<double>(x0[j])));
              },
              what + " x");
}

TEST(llama_rope_forward) {
  tu::Rng rng(103);
  for (const RopeCase& k : rope_cases()) check_rope_case(rng, k, false);
}

TEST(llama_rope_backward) {
  tu::Rng rng(104);
  for (const RopeCase& k : rope_cases()) check_rope_case(rng, k, true);
}

// backward(forward(x)) = x up to rounding on the GPU (the transposed rotation is the
// inverse): a check of the pair of kernels against each other, independent of the CPU.
TEST(llama_rope_round_trip) {
  tu::Rng rng(105);
  for (const RopeCase& k : rope_cases()) {
    const std::vector<int32_t> pos = random_positions(rng, k.rows, k.max_pos);
    const std::vector<float> x0 = tu::normal(rng, k.rows * k.row_stride);
    const Side s = gpu_side();
    Buf<int32_t> dpos(*s.mem, pos);
    Buf<float> dx(*s.mem, x0);
    for (const RopeCall& call : k.calls)
      s.fns->rope_forward(k.rows, k.row_stride, call.col_offset, call.heads, k.head_size,
                          dpos.p(), k.theta, k.scaling, dx.p());
    for (const RopeCall& call : k.calls)
      s.fns->rope_backward(k.rows, k.row_stride, call.col_offset, call.heads, k.head_size,
                           dpos.p(), k.theta, k.scaling, dx.p());
    std::vector<bool> rotated;
    std::vector<int64_t> partner;
    rope_layout(k, &rotated, &partner);
    const int64_t W = k.row_stride;
    // c^2 + s^2 = 1 within a few ulps and four float roundings: 1e-6 * (|x1| + |x2|).
    check_close(dx.get(), x0,
                [&](size_t i) {
                  const int64_t row = static_cast<int64_t>(i) / W, col = static_cast<int64_t>(i) % W;
                  if (pos[row] < 0 || !rotated[col]) return 0.0;
                  const size_t j = static_cast<size_t>(row * W + partner[col]);
                  return 1e-6 * (std::fabs(static_cast<double>(x0[i])) + std::fabs(static_cast<double>(x0[j])));
                },
                "rope round trip " + k.name);
  }
}

// ---- SwiGLU --------------------------------------------------------------------------------

const int64_t kSwigluShapes[][2] = {{1, 1}, {2, 3}, {7, 100}, {33, 257}, {64, 1024}, {3, 5000}};

// gate_up [rows, 2H]: gates of scale 3 with the special values sprinkled in (0, the
// tails around +-88 where the CPU cuts, huge values where exp(-x) would overflow), up of
// scale 1.
std::vector<float> swiglu_input(tu::Rng& rng, int64_t rows, int64_t H) {
  std::vector<float> gu = tu::normal(rng, rows * 2 * H);
  const float specials[] = {0.0f,   -0.0f,   1e-30f, -1e-30f, 20.0f,   -20.0f, 87.0f,
                            -87.0f, 87.5f,   -87.5f, 88.5f,   -88.5f, 89.0f,  -89.0f,
                            100.0f, -100.0f, 1e4f,   -1e4f,   1e30f,  -1e30f};
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < H; ++j) {
      float& gate = gu[r * 2 * H + j];
      gate *= 3.0f;
      if (tu::rand_int(rng, 0, 7) == 0)
        gate = specials[tu::rand_int(rng, 0, static_cast<int64_t>(std::size(specials)) - 1)];
    }
  return gu;
}

// silu(x) and silu'(x) in double (for the tolerance's scale only).
double silu_d(double x) { return x / (1.0 + std::exp(-x)); }
double dsilu_d(double x) {
  const double s = 1.0 / (1.0 + std::exp(-x));
  return s + x * s * (1.0 - s);
}

TEST(llama_swiglu_forward) {
  tu::Rng rng(106);
  for (const auto& sh : kSwigluShapes) {
    const int64_t rows = sh[0], H = sh[1];
    const std::string what = "swiglu_forward " + shape(rows, H);
    const std::vector<float> gu = swiglu_input(rng, rows, H);
    const Runs r = run3(what, [&](Side s) {
      Buf<float> dgu(*s.mem, gu), out(*s.mem, tu::poisoned(rows * H));
      s.fns->swiglu_forward(rows, H, dgu.p(), out.p());
      return Outs{{"out", out.get()}};
    });
    // silu(g) * u: exp within 2 ulp on both sides (CUDA's expf, the CPU's fast_exp), then
    // a division and two multiplies: a few float ulps, 1e-5 relative; 1e-6 absolute for
    // the tail below -87.3 where the CPU's exp is 0 and the device's a subnormal.
    const std::vector<float>& want = r.cpu.at("out");
    check_close(r.gpu.at("out"), want, [&](size_t i) { return 1e-6 + 1e-5 * std::fabs(want[i]); },
                what + " out");
  }
}

TEST(llama_swiglu_backward) {
  tu::Rng rng(107);
  for (const auto& sh : kSwigluShapes) {
    const int64_t rows = sh[0], H = sh[1];
    const std::string what = "swiglu_backward " + shape(rows, H);
    const std::vector<float> gu = swiglu_input(rng, rows, H);
    const std::vector<float> go = tu::normal(rng, rows * H);
    const std::vector<float> dgu0 = tu::normal(rng, rows * 2 * H);
    const Runs r = run3(what, [&](Side s) {
      Buf<float> dgu(*s.mem, gu), dgo(*s.mem, go), grad(*s.mem, dgu0);
      s.fns->swiglu_backward(rows, H, dgu.p(), dgo.p(), grad.p());
      return Outs{{"grad_gate_up", grad.get()}};
    });
    // Each element is init + one product (d gate = dout * up * silu', d up = dout * silu):
    // a few float ulps of the added term plus one rounding of the sum: 1e-5 relative to
    // |init| + |term| (the term's scale in double), plus 1e-6 absolute.
    std::vector<double> mag(dgu0.size());
    for (int64_t row = 0; row < rows; ++row)
      for (int64_t j = 0; j < H; ++j) {
        const size_t ig = static_cast<size_t>(row * 2 * H + j), iu = ig + static_cast<size_t>(H);
        const double x = gu[ig], u = gu[iu], d = go[static_cast<size_t>(row * H + j)];
        const double ds = x > 88.0 ? 1.0 : x < -88.0 ? 0.0 : dsilu_d(x);
        const double sl = x < -88.0 ? 0.0 : silu_d(x);
        mag[ig] = std::fabs(static_cast<double>(dgu0[ig])) + std::fabs(d * u * ds);
        mag[iu] = std::fabs(static_cast<double>(dgu0[iu])) + std::fabs(d * sl);
      }
    check_close(r.gpu.at("grad_gate_up"), r.cpu.at("grad_gate_up"),
                [&](size_t i) { return 1e-6 + 1e-5 * mag[i]; }, what + " grad_gate_up");
  }
}

// ---- argument checks -----------------------------------------------------------------------

// The GPU entry points refuse what the CPU's refuse, naming the same argument, before
// touching any memory; empty inputs are no-ops that accept null pointers.
TEST(llama_argument_checks) {
  tu::Rng rng(108);
  for (const Side& s : {cpu_side(), gpu_side()}) {
    const LlamaFns& f = *s.fns;
    Buf<float> a(*s.mem, tu::normal(rng, 64));
    float* p = a.p();
    Buf<int32_t> pos(*s.mem, std::vector<int32_t>(4, 0));
    const int32_t* pp = pos.p();

    CHECK_THROWS_CODE(f.rmsnorm_forward(-1, 4, p, p, 1e-5f, p, p), ErrorCode::InvalidArgument, "rows");
    CHECK_THROWS_CODE(f.rmsnorm_forward(2, 0, p, p, 1e-5f, p, p), ErrorCode::InvalidArgument, "channels");
    CHECK_THROWS_CODE(f.rmsnorm_forward(2, 4, p, p, tu::kNaN, p, p), ErrorCode::InvalidArgument, "eps");
    CHECK_THROWS_CODE(f.rmsnorm_forward(2, 4, p, p, -1.0f, p, p), ErrorCode::InvalidArgument, "eps");
    CHECK_THROWS_CODE(f.rmsnorm_forward(2, 4, p, nullptr, 1e-5f, p, p), ErrorCode::InvalidArgument, "weight");
    CHECK_THROWS_CODE(f.rmsnorm_forward(2, 4, p, p, 1e-5f, p, nullptr), ErrorCode::InvalidArgument, "rstd");
    CHECK_NO_THROW(f.rmsnorm_forward(0, 4, nullptr, nullptr, 1e-5f, nullptr, nullptr));

    CHECK_THROWS_CODE(f.rmsnorm_backward(2, -4, p, p, p, p, p, p), ErrorCode::InvalidArgument, "channels");
    CHECK_THROWS_CODE(f.rmsnorm_backward(2, 4, p, p, p, nullptr, p, p), ErrorCode::InvalidArgument, "rstd");
    CHECK_THROWS_CODE(f.rmsnorm_backward(2, 4, p, p, p, p, p, nullptr), ErrorCode::InvalidArgument, "grad_weight");
    CHECK_NO_THROW(f.rmsnorm_backward(2, 0, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr));

    CHECK_THROWS_CODE(f.rope_forward(4, 16, 0, 2, 7, pp, 1e4f, 1.0f, p), ErrorCode::InvalidArgument, "head_size");
    CHECK_THROWS_CODE(f.rope_forward(4, 16, 0, 2, 0, pp, 1e4f, 1.0f, p), ErrorCode::InvalidArgument, "head_size");
    CHECK_THROWS_CODE(f.rope_forward(4, 16, 2, 2, 8, pp, 1e4f, 1.0f, p), ErrorCode::InvalidArgument, "row_stride");
    CHECK_THROWS_CODE(f.rope_forward(4, 16, 0, 2, 8, pp, 0.0f, 1.0f, p), ErrorCode::InvalidArgument, "theta");
    CHECK_THROWS_CODE(f.rope_forward(4, 16, 0, 2, 8, pp, 1e4f, tu::kInf, p), ErrorCode::InvalidArgument, "scaling");
    CHECK_THROWS_CODE(f.rope_forward(4, 16, -1, 2, 8, pp, 1e4f, 1.0f, p), ErrorCode::InvalidArgument, "col_offset");
    CHECK_THROWS_CODE(f.rope_forward(4, 16, 0, 2, 8, nullptr, 1e4f, 1.0f, p), ErrorCode::InvalidArgument, "positions");
    CHECK_THROWS_CODE(f.rope_forward(4, 16, 0, 2, 8, pp, 1e4f, 1.0f, nullptr), ErrorCode::InvalidArgument, "x");
    CHECK_THROWS_CODE(f.rope_backward(4, 16, 0, 2, 8, pp, 1e4f, 1.0f, nullptr), ErrorCode::InvalidArgument, "grad");
    CHECK_NO_THROW(f.rope_forward(0, 16, 0, 2, 8, nullptr, 1e4f, 1.0f, nullptr));
    CHECK_NO_THROW(f.rope_backward(4, 16, 0, 0, 8, nullptr, 1e4f, 1.0f, nullptr));

    CHECK_THROWS_CODE(f.swiglu_forward(-2, 4, p, p), ErrorCode::InvalidArgument, "rows");
    CHECK_THROWS_CODE(f.swiglu_forward(2, 4, p, nullptr), ErrorCode::InvalidArgument, "out");
    CHECK_THROWS_CODE(f.swiglu_backward(2, -4, p, p, p), ErrorCode::InvalidArgument, "hidden");
    CHECK_THROWS_CODE(f.swiglu_backward(2, 4, p, nullptr, p), ErrorCode::InvalidArgument, "grad_out");
    CHECK_NO_THROW(f.swiglu_backward(0, 4, nullptr, nullptr, nullptr));
    // The side is still usable after its refusals.
    CHECK_NO_THROW(s.mem->synchronize());
  }
}

}  // namespace

int main(int argc, char** argv) {
  const char* self = std::getenv("PPO_PARITY_SELF_TEST");
  if (self && std::string(self) == "1") {
    std::printf("PPO_PARITY_SELF_TEST=1: the CPU functions stand in for CUDA\n");
    g_self_test = true;
    g_gpu = Side{&kCpuFns, &ppo::cpu_engine_ops()};
    return tf::run_all(argc, argv);
  }
  if (!ppo::cuda_available())
    return tf::skip_file("CUDA is not available: " + ppo::cuda_unavailable_reason());
#ifdef PPO_WITH_CUDA
  g_gpu = Side{&kCudaFns, &ppo::engine_ops_for(Device::Cuda)};
  return tf::run_all(argc, argv);
#else
  return tf::skip_file("this test binary was built without PPO_WITH_CUDA");
#endif
}
