#!/usr/bin/env python3
"""Times numpy's float32 matmul (OpenBLAS sgemm) on the shapes of bench/cpp/bench_matmul.cpp,
with the same thread count, so the two tables give ppo's rate relative to the BLAS.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 bench/matmul_numpy.py [--runs N] [--threads T]

OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (set on some of our machines) force an older kernel
and cache model that slow a current OpenBLAS down: run with both unset (a warning is
printed when they are set). The thread count must be fixed before numpy is imported.
"""
import argparse
import os
import sys
import time

parser = argparse.ArgumentParser()
parser.add_argument("--runs", type=int, default=7)
parser.add_argument("--threads", type=int, default=2)
parser.add_argument("--filter", default="")
args = parser.parse_args()

os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
os.environ["OMP_NUM_THREADS"] = str(args.threads)
for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
    if var in os.environ:
        print(f"WARNING: {var}={os.environ[var]} is set; it slows current OpenBLAS builds. "
              f"Rerun with: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 {sys.argv[0]}",
              file=sys.stderr)

import numpy as np  # noqa: E402  (after the thread settings)


def engine_shapes(model, rows, width, vocab):
    """Same list and order as engine_shapes() in bench/cpp/bench_matmul.cpp:
    (name, transpose_a, transpose_b, m, n, k)."""
    shapes = []
    for name, fan_in, fan_out in (("qkv", width, 3 * width), ("attn_proj", width, width),
                                  ("mlp_fc", width, 4 * width), ("mlp_proj", 4 * width, width)):
        shapes.append((f"{model} {name} fwd", False, False, rows, fan_out, fan_in))
        shapes.append((f"{model} {name} dX", False, True, rows, fan_in, fan_out))
        shapes.append((f"{model} {name} dW", True, False, fan_in, fan_out, rows))
    shapes.append((f"{model} lm_head fwd", False, True, rows, vocab, width))
    shapes.append((f"{model} lm_head dX", False, False, rows, width, vocab))
    shapes.append((f"{model} lm_head dW", True, False, vocab, width, rows))
    return shapes


shapes = engine_shapes("gpt2-124M", 256, 768, 50257) + engine_shapes("small", 1024, 384, 8192)

try:
    blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
    blas_name = f"{blas.get('name')} {blas.get('version')}"
except Exception:  # older numpy
    blas_name = "?"
print(f"numpy {np.__version__} matmul float32  blas={blas_name}  threads={args.threads}  "
      f"runs={args.runs} (median)")
print(f"{'shape':<26} {'op':<3} {'m':>6} {'n':>6} {'k':>6} {'ms':>10} {'GFLOP/s':>9} {'best':>9}")
rng = np.random.default_rng(123)
total_flop = total_ms = 0.0
for name, ta, tb, m, n, k in shapes:
    if args.filter and args.filter not in name:
        continue
    # Stored layouts as in the C++ benchmark; .T views make numpy pass the transpose
    # flags to sgemm (no copy).
    a_stored = rng.standard_normal((k, m) if ta else (m, k), dtype=np.float32)
    b_stored = rng.standard_normal((n, k) if tb else (k, n), dtype=np.float32)
    a = a_stored.T if ta else a_stored
    b = b_stored.T if tb else b_stored
    c = np.empty((m, n), dtype=np.float32)
    np.matmul(a, b, out=c)  # warm-up
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    median = times[len(times) // 2]
    flop = 2.0 * m * n * k
    total_flop += flop
    total_ms += median
    op = ("T" if ta else "N") + ("T" if tb else "N")
    print(f"{name:<26} {op:<3} {m:>6} {n:>6} {k:>6} {median:>10.3f} {flop / (median * 1e6):>9.1f} "
          f"{flop / (times[0] * 1e6):>9.1f}")
print(f"{'all (sum of medians)':<26} {'':<3} {'':>6} {'':>6} {'':>6} {total_ms:>10.3f} "
      f"{total_flop / (total_ms * 1e6):>9.1f}")
