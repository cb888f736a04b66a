#!/usr/bin/env python3
"""The PyTorch yardstick of the GPT-2 engine: the same model in float32 (idiomatic torch.nn:
nn.Linear, nn.LayerNorm, nn.GELU(approximate="tanh"), tied LM head, nanoGPT-style attention
with matmul + masked softmax since torch 1.13 has no scaled_dot_product_attention),
timed on the CPU like bench/cpp/bench_model.cpp times ours:

  * one training step: forward, LM loss (mean next-token cross-entropy; the LM head runs on
    the batch * (steps - 1) positions that have a next token, as our engine does), backward,
    torch.optim.AdamW step (lr 1e-4, no weight decay; zero_grad(set_to_none=True));
  * greedy generation with a KV cache (preallocated [batch, heads, prompt+new, head_size]
    per layer): a 16-token prompt, 64 new tokens, the log-prob of each chosen token
    computed as our generate() does; tokens/s = batch * 64 / (prefill + 64 steps).

Configs: small (6 layers, width 384, 6 heads, vocab 8192, context 256; train batch 8 x 128,
generation batch 8) and gpt2 (GPT-2 124M: 12/768/12, vocab 50257, context 1024; train
batch 4 x 64, generation batch 4). Times are medians of --runs runs after one warm-up.

FLOPs (printed): forward = 2 * tokens * (12 * L * C^2 + C * V) + 4 * L * B * T^2 * C,
i.e. the dense layers and the LM head (2 FLOPs per multiply-add), plus the two attention
products (q k^T and att v) counted as full T x T squares although causal attention needs
only half; a training step = 3 x forward. Biases, LayerNorm, GELU, softmax and AdamW are
not counted; tokens = B * T also for the LM head (which runs on B * (T - 1) rows).

    /usr/bin/python3 bench/model_torch.py [--config small|gpt2|all] [--threads N] [--runs R] [--json]

--threads sets torch.set_num_threads and, before torch is imported, OMP_NUM_THREADS and
OPENBLAS_NUM_THREADS (default: the CPUs this process may run on). --json prints one
JSON line (after the table) for bench/engine_compare.py.

Which BLAS torch's float32 matmul calls matters more than anything else here: Debian's
torch calls the system libblas.so.3, which is the slow reference BLAS unless OpenBLAS
provides it. The table header names the libblas that was loaded and a measured sgemm
rate; run with LD_LIBRARY_PATH pointing at an OpenBLAS libblas.so.3 directory (e.g.
/usr/lib/x86_64-linux-gnu/openblas-pthread) for a fair yardstick.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--config", default="all", choices=["small", "gpt2", "all"])
parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
parser.add_argument("--runs", type=int, default=0,
                    help="timed runs per measurement (default: 5 for small, 3 for gpt2)")
parser.add_argument("--json", action="store_true", help="also print one JSON line")
parser.add_argument("--skip-generate", action="store_true")
parser.add_argument("--skip-train", action="store_true")
args = parser.parse_args()

os.environ["OMP_NUM_THREADS"] = str(args.threads)
os.environ["OPENBLAS_NUM_THREADS"] = str(args.threads)
# torch's OpenMP threads spin-wait between parallel regions by default; with OpenBLAS's own
# pthreads also spinning, the two pools fight over the cores (we measured generation 9x
# slower on 2 cores). Passive waiting is torch's best setting here; an explicit
# OMP_WAIT_POLICY in the environment is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
    if var in os.environ:
        print(f"WARNING: {var}={os.environ[var]} is set; it slows current OpenBLAS builds",
              file=sys.stderr)

import torch  # noqa: E402  (after the thread settings)
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

torch.set_num_threads(args.threads)

CONFIGS = {
    # n_layer, n_embd, n_head, vocab, n_positions, train (batch, steps), gen batch
    "small": dict(n_layer=6, n_embd=384, n_head=6, vocab_size=8192, n_positions=256,
                  train_batch=8, train_steps=128, gen_batch=8, runs=5),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                 train_batch=4, train_steps=64, gen_batch=4, runs=3),
}
PROMPT_TOKENS, NEW_TOKENS = 16, 64


# ---- the model ------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, n_positions):
        super().__init__()
        self.n_head, self.n_embd = n_head, n_embd
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        mask = torch.tril(torch.ones(n_positions, n_positions, dtype=torch.bool))
        self.register_buffer("causal", mask.view(1, 1, n_positions, n_positions), persistent=False)

    def forward(self, x, cache=None, pos=0):
        """x [B, T, C]. cache: (k, v), each [B, H, capacity, hs], written at [pos, pos + T);
        attention then runs over positions [0, pos + T)."""
        B, T, C = x.shape
        hs = C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # [B, H, T, hs]
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)
        if cache is not None:
            kc, vc = cache
            kc[:, :, pos:pos + T] = k
            vc[:, :, pos:pos + T] = v
            k, v = kc[:, :, :pos + T], vc[:, :, :pos + T]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # [B, H, T, pos + T]
        if T > 1:  # one new query sees every cached position: no mask needed
            att = att.masked_fill(~self.causal[:, :, pos:pos + T, :pos + T], float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, n_positions):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(n_embd, n_head, n_positions)
        self.ln_2 = nn.LayerNorm(n_embd, eps=1e-5)
        self.mlp = MLP(n_embd)

    def forward(self, x, cache=None, pos=0):
        x = x + self.attn(self.ln_1(x), cache, pos)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, n_layer, n_embd, n_head, vocab_size, n_positions):
        super().__init__()
        self.n_layer, self.n_embd, self.n_head = n_layer, n_embd, n_head
        self.wte = nn.Embedding(vocab_size, n_embd)
        self.wpe = nn.Embedding(n_positions, n_embd)
        self.h = nn.ModuleList([Block(n_embd, n_head, n_positions) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd, eps=1e-5)
        # GPT-2's initialization (as our engine's Model(config, seed)).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))
            elif name.endswith(".weight") and p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)

    def hidden(self, idx, caches=None, pos=0):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(pos, pos + T))
        for l, block in enumerate(self.h):
            x = block(x, None if caches is None else caches[l], pos)
        return self.ln_f(x)

    def lm_head(self, h):
        return F.linear(h, self.wte.weight)  # tied to the token embedding

    def lm_loss(self, idx):
        h = self.hidden(idx)[:, :-1]  # positions that have a next token
        logits = self.lm_head(h)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1))

    @torch.inference_mode()
    def generate_greedy(self, prompt, new_tokens):
        B, T0 = prompt.shape
        hs = self.n_embd // self.n_head
        caches = [(torch.empty(B, self.n_head, T0 + new_tokens, hs),
                   torch.empty(B, self.n_head, T0 + new_tokens, hs)) for _ in range(self.n_layer)]
        out = torch.empty(B, new_tokens, dtype=torch.long)
        logprobs = torch.empty(B, new_tokens)
        h = self.hidden(prompt, caches, 0)[:, -1]  # prefill; only the last position's logits
        pos = T0
        for i in range(new_tokens):
            logits = self.lm_head(h)  # [B, V]
            tok = logits.argmax(dim=-1)
            logprobs[:, i] = torch.log_softmax(logits, dim=-1).gather(1, tok[:, None])[:, 0]
            out[:, i] = tok
            if i + 1 < new_tokens:
                h = self.hidden(tok[:, None], caches, pos)[:, -1]
                pos += 1
        return out, logprobs


# ---- measurements ----------------------------------------------------------------------------

def forward_flops(L, C, V, B, T):
    return 2.0 * B * T * (12 * L * C * C + C * V) + 4.0 * L * B * T * T * C


def median_ms(fn, runs):
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


def loaded_blas():
    """The libblas the process mapped (torch's float32 matmul goes there)."""
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "blas" in line.lower() and "/" in line}
        return ", ".join(sorted(os.path.realpath(p) for p in paths)) or "?"
    except OSError:
        return "?"


def sgemm_probe():
    """GFLOP/s of one torch float32 matmul ([256, 768] x [768, 2304], GPT-2's qkv shape)."""
    a, b = torch.randn(256, 768), torch.randn(768, 2304)
    ms, _ = median_ms(lambda: torch.mm(a, b), 5)
    return 2.0 * 256 * 768 * 2304 / (ms * 1e6)


def bench_config(name, cfg, runs):
    torch.manual_seed(0)
    L, C, H, V, P = cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab_size"], cfg["n_positions"]
    model = GPT(L, C, H, V, P)
    n_params = sum(p.numel() for p in model.parameters())
    res = {"n_layer": L, "n_embd": C, "n_head": H, "vocab_size": V, "n_positions": P,
           "params": n_params, "runs": runs}
    if not args.skip_train:
        B, T = cfg["train_batch"], cfg["train_steps"]
        idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.0)

        def train_step():
            loss = model.lm_loss(idx)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        ms, best = median_ms(train_step, runs)
        flops = 3.0 * forward_flops(L, C, V, B, T)
        res.update({"train_batch": B, "train_steps": T, "train_step_ms": ms, "train_step_best_ms": best,
                    "train_tokens_per_s": B * T / (ms * 1e-3), "train_gflop": flops / 1e9,
                    "train_gflops_per_s": flops / (ms * 1e6)})
        del opt
    if not args.skip_generate:
        model.zero_grad(set_to_none=True)
        Bg = cfg["gen_batch"]
        prompt = torch.randint(0, V, (Bg, PROMPT_TOKENS), generator=torch.Generator().manual_seed(2))
        ms, best = median_ms(lambda: model.generate_greedy(prompt, NEW_TOKENS), runs)
        res.update({"gen_batch": Bg, "gen_prompt": PROMPT_TOKENS, "gen_new_tokens": NEW_TOKENS,
                    "gen_ms": ms, "gen_best_ms": best,
                    "gen_tokens_per_s": Bg * NEW_TOKENS / (ms * 1e-3)})
    return res


def main():
    names = ["small", "gpt2"] if args.config == "all" else [args.config]
    blas = loaded_blas()
    probe = sgemm_probe()
    print(f"PyTorch {torch.__version__} float32 CPU  threads={torch.get_num_threads()}  "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}  blas={blas}  sgemm probe [256x768]x[768x2304]: {probe:.1f} GFLOP/s")
    print("FLOPs: forward = 2*B*T*(12*L*C^2 + C*V) + 4*L*B*T^2*C (attention products counted "
          "as full TxT, not causal halves); train step = 3 x forward")
    results = {}
    for name in names:
        cfg = CONFIGS[name]
        runs = args.runs if args.runs > 0 else cfg["runs"]
        results[name] = bench_config(name, cfg, runs)
    hdr = (f"{'config':<7} {'params':>11} {'train B x T':>11} {'step ms':>10} {'tok/s':>9} "
           f"{'GFLOP/s':>8} {'gen B':>6} {'gen ms':>10} {'gen tok/s':>10}")
    print(hdr)
    for name, r in results.items():
        tr = (f"{str(r['train_batch']) + ' x ' + str(r['train_steps']):>11} {r['train_step_ms']:>10.1f} "
              f"{r['train_tokens_per_s']:>9.1f} {r['train_gflops_per_s']:>8.1f}"
              if "train_step_ms" in r else f"{'-':>11} {'-':>10} {'-':>9} {'-':>8}")
        ge = (f"{r['gen_batch']:>6} {r['gen_ms']:>10.1f} {r['gen_tokens_per_s']:>10.1f}"
              if "gen_ms" in r else f"{'-':>6} {'-':>10} {'-':>10}")
        print(f"{name:<7} {r['params']:>11,} {tr} {ge}")
    if args.json:
        print(json.dumps({"impl": "torch", "version": torch.__version__,
                          "threads": torch.get_num_threads(), "blas": blas,
                          "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
                          "sgemm_probe_gflops_per_s": probe, "configs": results}, sort_keys=True))


if __name__ == "__main__":
    main()
