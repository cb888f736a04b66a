#!/usr/bin/env python3
"""Runs the engine benchmarks side by side and prints the ratios in one table:

  ours     bench_model (bench/cpp/bench_model.cpp): ./build-cmake/bench_model or
           ./build-native/bench_model, or --ours PATH
  PyTorch  bench/model_torch.py under /usr/bin/python3 (or --torch-python)
  BLAS     numpy's float32 matmul (OpenBLAS sgemm) under python3 (or --blas-python),
           timed here on exactly the (op, m, n, k) list bench_model reports

  python3 bench/engine_compare.py [--config small|gpt2|llama-100m|llama-100m-512|all]
                                  [--threads N] [--runs R]
                                  [--rounds K] [--torch-blas-dir DIR|none] [--skip-torch]
                                  [--skip-blas] [--ours PATH] [--verbose]

--config all: small and gpt2; the Llama-family llama-100m (train 4 x 64, generation 4) and
llama-100m-512 (train 8 x 512, generation 8) run by name only.

Ratios: ours / PyTorch tokens per second (training step, greedy generation), and
ours / BLAS GFLOP/s per matmul call (and per config over all calls: the sum of FLOPs
over the sum of median times); BLAS is the better of --threads threads and one thread. Above 1 means ours is faster. (bench/matmul_numpy.py
times bench_matmul's list, whose forward is NN; the engine's dense forward is NT since
its weights are [out, in]: hence our own timing of the engine's calls here.)

Debian's torch calls the system libblas.so.3 for its float32 matmuls; when that is the
reference BLAS (no OpenBLAS installed) PyTorch is 10-20x slower than it should be. So by
default the PyTorch run gets LD_LIBRARY_PATH pointing at the first directory of
--torch-blas-dir / the usual OpenBLAS locations that holds a libblas.so.3 (the header
line of the torch table names the library actually loaded, and its measured sgemm rate).
--torch-blas-dir none runs torch as installed.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--config", default="all", choices=["small", "gpt2", "llama-100m", "llama-100m-512", "all"],
                    help="all: small and gpt2; the llama configs by name only")
parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
parser.add_argument("--runs", type=int, default=5)
parser.add_argument("--ours", default="", help="path of the bench_model binary")
parser.add_argument("--torch-python", default="/usr/bin/python3")
parser.add_argument("--torch-blas-dir", default="",
                    help="directory holding an OpenBLAS libblas.so.3 for torch ('none': as installed)")
parser.add_argument("--blas-python", default="python3", help="python whose numpy times the BLAS")
parser.add_argument("--rounds", type=int, default=1,
                    help="run everything this many times, keeping each figure's best round "
                         "(use 2-3 on a shared machine)")
parser.add_argument("--skip-torch", action="store_true")
parser.add_argument("--skip-blas", action="store_true")
parser.add_argument("--verbose", action="store_true", help="print each benchmark's own output")
args = parser.parse_args()

OPENBLAS_DIRS = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread",
    "/usr/lib64/openblas-pthreads",
]


def run(cmd, env_updates=None, env_remove=()):
    env = dict(os.environ)
    env.update(env_updates or {})
    for k in env_remove:
        env.pop(k, None)
    print("$ " + " ".join(f"{k}={v}" for k, v in (env_updates or {}).items()) + (" " if env_updates else "")
          + " ".join(cmd), flush=True)
    p = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if args.verbose or p.returncode != 0:
        print(p.stdout)
    if p.returncode != 0:
        sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}")
    return p.stdout


def last_json(text):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    sys.exit("no JSON line in the output")


def find_ours():
    if args.ours:
        return args.ours
    # The most recently built of the usual build directories' binaries.
    found = [p for p in (os.path.join(ROOT, d, "bench_model") for d in ("build-cmake", "build-native", "build"))
             if os.access(p, os.X_OK)]
    if found:
        return max(found, key=os.path.getmtime)
    sys.exit("bench_model not found: build it (cmake --build build-native --target bench_model) "
             "or pass --ours PATH")


def torch_blas_dir():
    if args.torch_blas_dir == "none":
        return None
    for d in ([args.torch_blas_dir] if args.torch_blas_dir else []) + OPENBLAS_DIRS:
        if d and os.path.exists(os.path.join(d, "libblas.so.3")):
            return d
    if args.torch_blas_dir:
        sys.exit(f"--torch-blas-dir {args.torch_blas_dir}: no libblas.so.3 there")
    print("WARNING: no OpenBLAS libblas.so.3 found: PyTorch runs with the system libblas "
          "(likely the slow reference BLAS); its numbers understate PyTorch", file=sys.stderr)
    return None


# Times numpy float32 matmul on a JSON list of {name, op, m, n, k} read from stdin; prints
# {name: median GFLOP/s}. Stored layouts as ppo::cpu::matmul's (A [k, m] when op[0] == "T",
# B [n, k] when op[1] == "T"); .T views make numpy hand the transpose flags to sgemm.
NUMPY_TIMER = r"""
import json, sys, time
import numpy as np
shapes, runs = json.load(sys.stdin)
rng = np.random.default_rng(123)
out = {}
for e in shapes:
    m, n, k, op = e["m"], e["n"], e["k"], e["op"]
    a = rng.standard_normal((k, m) if op[0] == "T" else (m, k), dtype=np.float32)
    b = rng.standard_normal((n, k) if op[1] == "T" else (k, n), dtype=np.float32)
    a = a.T if op[0] == "T" else a
    b = b.T if op[1] == "T" else b
    c = np.empty((m, n), dtype=np.float32)
    np.matmul(a, b, out=c)
    t = []
    for _ in range(runs):
        t0 = time.perf_counter()
        np.matmul(a, b, out=c)
        t.append(time.perf_counter() - t0)
    t.sort()
    med = t[len(t) // 2] if len(t) % 2 else 0.5 * (t[len(t) // 2 - 1] + t[len(t) // 2])
    out[e["name"]] = 2.0 * m * n * k / (med * 1e9)
print(json.dumps(out))
"""


def time_blas(shapes):
    """{name: (GFLOP/s, threads)}: the better of OpenBLAS with --threads threads and with one
    thread, per call. (On our 2-core VMs, multi-threaded OpenBLAS stalls for whole 4 ms
    scheduler ticks on small products such as the decoding step's: a caller would run those
    on one thread, so the yardstick does too.)"""
    runs = max(args.runs, 7)
    best = {}
    for threads in sorted({args.threads, 1}, reverse=True):
        env = dict(os.environ)
        env["OPENBLAS_NUM_THREADS"] = env["OMP_NUM_THREADS"] = str(threads)
        for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
            env.pop(k, None)
        print(f"$ OPENBLAS_NUM_THREADS={threads} {args.blas_python} -c <numpy matmul timer> "
              f"({len(shapes)} calls, {runs} runs)", flush=True)
        p = subprocess.run([args.blas_python, "-c", NUMPY_TIMER], cwd=ROOT, env=env, text=True,
                           input=json.dumps([shapes, runs]), stdout=subprocess.PIPE)
        if p.returncode != 0:
            sys.exit(f"numpy matmul timer failed ({p.returncode})")
        for name, gflops in json.loads(p.stdout).items():
            if name not in best or gflops > best[name][0]:
                best[name] = (gflops, threads)
    return best


def ratio(a, b):
    return f"{a / b:6.2f}" if a and b else "     -"


def better(key, a, b):
    """The better of two measurements of `key`: the lower time, the higher rate."""
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b) if key.endswith("ms") else max(a, b)


def merge_configs(acc, new):
    """Keeps, per config and per timing key, the best value seen over the rounds."""
    if acc is None:
        return new
    for name, r in new["configs"].items():
        cur = acc["configs"].setdefault(name, r)
        for key, v in r.items():
            if key.endswith(("_ms", "_per_s")):
                cur[key] = better(key, cur.get(key), v)
    return acc


def main():
    common = ["--config", args.config, "--runs", str(args.runs), "--json"]
    ours = torch = None
    blas = {}
    torch_env = {}
    if not args.skip_torch:
        d = torch_blas_dir()
        if d:
            torch_env = {"LD_LIBRARY_PATH": d + (":" + os.environ["LD_LIBRARY_PATH"]
                                                 if os.environ.get("LD_LIBRARY_PATH") else "")}
    # Rounds: ours, PyTorch, BLAS in turn, --rounds times; each figure is the best of the
    # rounds (load from other processes only ever slows a run down).
    for rnd in range(args.rounds):
        if args.rounds > 1:
            print(f"-- round {rnd + 1} of {args.rounds}", flush=True)
        got = last_json(run([find_ours()] + common, {"PPO_MAX_THREADS": str(args.threads)}))
        if ours is None:
            ours = got
        else:
            merge_configs(ours, got)
            by_name = {e["name"]: e for e in got.get("matmul", [])}
            for e in ours.get("matmul", []):
                g = by_name.get(e["name"])
                if g and g["gflops_per_s"] > e["gflops_per_s"]:
                    e.update(g)
        if not args.skip_torch:
            torch = merge_configs(torch, last_json(run(
                [args.torch_python, "bench/model_torch.py", "--threads", str(args.threads)] + common,
                torch_env, env_remove=("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"))))
        if not args.skip_blas and ours.get("matmul"):
            for name, v in time_blas([{k: e[k] for k in ("name", "op", "m", "n", "k")}
                                      for e in ours["matmul"]]).items():
                if name not in blas or v[0] > blas[name][0]:
                    blas[name] = v

    print()
    print(f"ours: {ours['threads']} threads, matmul {ours['matmul_isa']}"
          + (f"; PyTorch {torch['version']}: {torch['threads']} threads, blas {torch['blas'].split(',')[0]} "
             f"(sgemm probe {torch['sgemm_probe_gflops_per_s']:.0f} GFLOP/s)" if torch else ""))
    print("speedup = PyTorch time / our time (rates: ours / PyTorch); above 1: ours is faster")
    w = max([7] + [len(name) for name in ours["configs"]])  # llama-100m-512 is wider
    print(f"{'config':<{w}} {'measure':<22} {'ours':>10} {'PyTorch':>10} {'speedup':>8}")
    for name, r in ours["configs"].items():
        t = (torch or {}).get("configs", {}).get(name, {})
        rows = [("train tokens/s", "train_tokens_per_s"), ("train step ms", "train_step_ms"),
                ("train step best ms", "train_step_best_ms"), ("train GFLOP/s", "train_gflops_per_s"),
                ("generate tokens/s", "gen_tokens_per_s"), ("generate ms", "gen_ms"),
                ("generate best ms", "gen_best_ms")]
        for label, key in rows:
            if key not in r:
                continue
            a, b = r[key], t.get(key)
            # For times, ours/PT > 1 should still mean "ours is faster": invert.
            rr = ratio(b, a) if key.endswith("ms") else ratio(a, b)
            print(f"{name:<{w}} {label:<22} {a:>10.1f} {(f'{b:10.1f}' if b else '         -')} {rr:>8}")
    if ours.get("matmul"):
        print()
        wm = max([26] + [len(e["name"]) for e in ours["matmul"]])  # "llama-100m-512 decode ..."
        print(f"{'matmul call':<{wm}} {'op':<3} {'ours GF/s':>10} {'BLAS GF/s':>10} {'BLAS thr':>8} {'ours/BLAS':>10}")
        totals = {}
        for e in ours["matmul"]:
            b, thr = blas.get(e["name"], (None, None))
            print(f"{e['name']:<{wm}} {e['op']:<3} {e['gflops_per_s']:>10.1f} "
                  f"{(f'{b:10.1f}' if b else '         -')} {thr or '-':>8} {ratio(e['gflops_per_s'], b):>10}")
            tag = " ".join(e["name"].split()[:2]) if " decode " in e["name"] else e["name"].split()[0]
            flop = 2.0 * e["m"] * e["n"] * e["k"]
            tot = totals.setdefault(tag, [0.0, 0.0, 0.0])
            tot[0] += flop
            tot[1] += e["ms"]
            if b:
                tot[2] += flop / (b * 1e6)
        for tag, (flop, ms, blas_ms) in totals.items():
            a, b = flop / (ms * 1e6), (flop / (blas_ms * 1e6) if blas_ms else None)
            print(f"{tag + ' all':<{wm}} {'':<3} {a:>10.1f} {(f'{b:10.1f}' if b else '         -')} {'':>8} {ratio(a, b):>10}")


if __name__ == "__main__":
    main()
