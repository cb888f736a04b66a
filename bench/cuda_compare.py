#!/usr/bin/env python3
"""Our CUDA engine against PyTorch on the same GPU, in one table, then our kernels alone:

  ours     BUILD_DIR/bench_model --device cuda --json (bench/cpp/bench_model.cpp): GPT-2
           models built on the GPU (ModelOptions{Device::Cuda}), float32 with our TF32
           tensor-core matmul (PPO_CUDA_MATMUL picks another path);
  PyTorch  bench/model_torch.py --device cuda --json under this python (or --torch-python):
           the same model and shapes, float32 with TF32 matmuls (allow_tf32), attention by
           scaled_dot_product_attention where torch has it (the backend it used is printed),
           fused AdamW; with --bf16 (default on) also under bfloat16 autocast;
  kernels  BUILD_DIR/bench_cuda --json (bench/cpp/bench_cuda.cpp): each CUDA kernel alone
           against the GPU's measured ceilings (its own table, printed as it is).

Configs (both benches, --config all on CUDA): small (6/384/6, vocab 8192; train 8 x 128,
generation batch 8), gpt2 (124M; train 4 x 64, generation 4), gpt2-512 (124M; train 8 x 512,
generation 8), gpt2-1024 (124M; train 8 x 1024, generation 64). By name only (not in
all): llama-100m (Llama family, 12/768, 12 query over 4 key/value heads, SwiGLU 2048, vocab
32000, tied head; train 4 x 64, generation 4) and llama-100m-512 (train 8 x 512, generation
8). Measures: training-step tokens/s (forward + LM loss, backward, AdamW, zero_grad) and
greedy-generation tokens/s (16-token prompt, 64 new tokens). ratio = ours / PyTorch (above
1: ours is faster).

    python3 bench/cuda_compare.py [--build-dir build-native] [--runs R] [--config all|NAME]
                                  [--no-bf16] [--skip-torch] [--skip-kernels] [--verbose]

Needs only python3 (and torch for the PyTorch column) on the GPU machine. A bench that
exits 77 (no usable GPU) is reported as skipped; if ours is skipped this exits 77 too.
"""
import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--build-dir", default="build-native",
                    help="directory holding bench_model and bench_cuda (relative to the repo root "
                         "unless absolute)")
parser.add_argument("--runs", type=int, default=5)
parser.add_argument("--config", default="all",
                    choices=["small", "gpt2", "gpt2-512", "gpt2-1024", "llama-100m", "llama-100m-512", "all"],
                    help="all: the four GPT-2 configs; the llama ones by name only")
parser.add_argument("--torch-python", default=sys.executable)
parser.add_argument("--no-bf16", action="store_true", help="skip PyTorch's bfloat16 autocast run")
parser.add_argument("--skip-torch", action="store_true")
parser.add_argument("--skip-kernels", action="store_true", help="do not run bench_cuda")
parser.add_argument("--verbose", action="store_true", help="print each benchmark's own output")
args = parser.parse_args()

SKIPPED = 77


def run(cmd, fatal=True, quiet=False):
    """(return code, stdout + stderr) of cmd run from the repo root. A failure other than the
    skip code prints the output, then exits when `fatal`."""
    print("$ " + " ".join(cmd), flush=True)
    try:
        p = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as e:
        if fatal:
            sys.exit(f"cannot run {cmd[0]}: {e}")
        print(f"  cannot run {cmd[0]}: {e}")
        return -1, ""
    if (args.verbose and not quiet) or p.returncode not in (0, SKIPPED):
        print(p.stdout)
    if p.returncode == SKIPPED:
        print("  skipped: " + (p.stdout.strip().splitlines() or ["(no message)"])[-1])
    elif p.returncode != 0:
        if fatal:
            sys.exit(f"command failed ({p.returncode}): {' '.join(cmd)}")
        print(f"  failed ({p.returncode}); going on without it")
    return p.returncode, p.stdout


def last_json(text):
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    sys.exit("no JSON line in the output")


def binary(name):
    d = args.build_dir if os.path.isabs(args.build_dir) else os.path.join(ROOT, args.build_dir)
    path = os.path.join(d, name)
    if not os.access(path, os.X_OK):
        sys.exit(f"{path} not found: build it (cmake -S . -B {args.build_dir} -DPPO_CUDA=ON && "
                 f"cmake --build {args.build_dir} --target {name}) or pass --build-dir")
    return path


def fmt(x, width=11):
    return f"{x:{width}.1f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def ratio(a, b):
    return f"{a / b:7.2f}" if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b else f"{'-':>7}"


def main():
    common = ["--config", args.config, "--runs", str(args.runs), "--json"]
    rc, out = run([binary("bench_model"), "--device", "cuda"] + common)
    if rc == SKIPPED:
        sys.exit(SKIPPED)
    ours = last_json(out)
    torch = None
    if not args.skip_torch:
        cmd = [args.torch_python, os.path.join("bench", "model_torch.py"), "--device", "cuda"] + common
        if not args.no_bf16:
            cmd.append("--bf16")
        rc, out = run(cmd, fatal=False)
        if rc == 0:
            torch = last_json(out)

    print()
    print(f"ours: float32, CUDA matmul path {ours.get('cuda_matmul_path', '?')}"
          + (f"; PyTorch {torch['version']} on {torch['gpu']}: float32+TF32 attention={torch['attention']}"
             + (f" gqa={torch['attention_gqa']}" if "attention_gqa" in torch else "")
             + (f", bf16 autocast attention={torch['attention_bf16']}" if "attention_bf16" in torch else "")
             + (f" gqa={torch['attention_gqa_bf16']}" if "attention_gqa_bf16" in torch else "")
             if torch else ""))
    print("ratio = ours / PyTorch tokens per second; above 1: ours is faster")
    have16 = bool(torch and torch.get("configs_bf16"))
    w = max([10] + [len(name) for name in ours["configs"]])  # llama-100m-512 is wider
    hdr = f"{'config':<{w}} {'measure':<16} {'batch':>9} {'ours tok/s':>11} {'torch tf32':>11} {'ratio':>7}"
    if have16:
        hdr += f" {'torch bf16':>11} {'ratio':>7}"
    print(hdr)
    for name, r in ours["configs"].items():
        t = (torch or {}).get("configs", {}).get(name, {})
        t16 = (torch or {}).get("configs_bf16", {}).get(name, {})
        rows = [("train step", "train_tokens_per_s",
                 f"{r.get('train_batch', '-')}x{r.get('train_steps', '-')}"),
                ("generate", "gen_tokens_per_s", f"{r.get('gen_batch', '-')}")]
        for label, key, batch in rows:
            if key not in r:
                continue
            a, b = r[key], t.get(key)
            line = f"{name:<{w}} {label:<16} {batch:>9} {fmt(a)} {fmt(b)} {ratio(a, b)}"
            if have16:
                b16 = t16.get(key)
                line += f" {fmt(b16)} {ratio(a, b16)}"
            print(line)
    print()
    print(f"{'config':<{w}} {'measure':<16} {'ours ms':>11} {'torch ms':>11}")
    for name, r in ours["configs"].items():
        t = (torch or {}).get("configs", {}).get(name, {})
        for label, key in (("train step", "train_step_ms"), ("generate", "gen_ms")):
            if key in r:
                print(f"{name:<{w}} {label:<16} {fmt(r[key])} {fmt(t.get(key))}")

    if not args.skip_kernels:
        print()
        # Exit 1 when some kernels failed: its output (printed by run) says which.
        rc, out = run([binary("bench_cuda"), "--runs", str(args.runs), "--json"], fatal=False,
                      quiet=True)
        if rc == 0:
            print("\n".join(line for line in out.splitlines() if not line.lstrip().startswith("{")))


if __name__ == "__main__":
    main()
