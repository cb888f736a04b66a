#!/usr/bin/env python3
"""The PyTorch yardstick of the GPT-2 engine: the same model in float32 (idiomatic torch.nn:
nn.Linear, nn.LayerNorm, nn.GELU(approximate="tanh"), tied LM head, nanoGPT-style attention
with matmul + masked softmax since torch 1.13 has no scaled_dot_product_attention),
timed on the CPU (or, with --device cuda, the GPU) like bench/cpp/bench_model.cpp times ours:

  * one training step: forward, LM loss (mean next-token cross-entropy; the LM head runs on
    the batch * (steps - 1) positions that have a next token, as our engine does), backward,
    torch.optim.AdamW step (lr 1e-4, no weight decay; zero_grad(set_to_none=True));
  * greedy generation with a KV cache (preallocated [batch, heads, prompt+new, head_size]
    per layer): a 16-token prompt, 64 new tokens, the log-prob of each chosen token
    computed as our generate() does; tokens/s = batch * 64 / (prefill + 64 steps).

Configs: small (6 layers, width 384, 6 heads, vocab 8192, context 256; train batch 8 x 128,
generation batch 8) and gpt2 (GPT-2 124M: 12/768/12, vocab 50257, context 1024; train
batch 4 x 64, generation batch 4); and GPT-2 124M at GPU batches, as bench_model's: gpt2-512
(train 8 x 512, generation batch 8) and gpt2-1024 (train 8 x 1024, generation batch 64).
--config all: small and gpt2 on the CPU, all four on CUDA. --gen-batch N overrides the
generation batch. Times are medians of --runs runs after one warm-up.

The Llama family, run by name only (not by --config all), as bench_model's: llama-100m
(12 layers, width 768, 12 query heads over 4 key/value heads, SwiGLU width 2048, vocab 32000,
context 1024, tied LM head, RMSNorm eps 1e-6, rope theta 10000; train 4 x 64, generation
batch 4) and llama-100m-512 (train 8 x 512, generation batch 8). Idiomatic torch as Hugging
Face's LlamaForCausalLM: bias-free nn.Linear q/k/v/o and gate/up/down projections,
torch.nn.RMSNorm (a small module where torch has none), rotary positions in HF's
rotate_half convention, grouped-query attention by repeating the key/value heads (on CUDA,
SDPA's enable_gqa instead where the pinned backend takes it; printed as gqa=), the KV cache
holding the rotated keys, [batch, kv_heads, prompt+new, head_size] per layer.

--device cuda (the GPU yardstick; the CPU behaviour is unchanged without it): the model and
data on the GPU, torch.cuda.synchronize() before and after each timed run. The main figures
are float32 with TF32 matmuls enabled (torch.backends.cuda.matmul.allow_tf32, the fair
comparison to our TF32 tensor-core kernel); --bf16 adds a second set under
torch.autocast(bfloat16) (float32 master weights, caches in bfloat16). Attention on CUDA is
F.scaled_dot_product_attention(is_causal=True) when torch has it (--attention matmul: the
CPU's matmul + masked softmax), pinned to the first backend that runs forward and backward
on this dtype, in torch's priority order: flash (bfloat16 only), memory-efficient, math; the
header and the JSON name it. AdamW on CUDA is torch's fused implementation when available.

FLOPs (printed): forward = 2 * tokens * (12 * L * C^2 + C * V) + 4 * L * B * T^2 * C,
i.e. the dense layers and the LM head (2 FLOPs per multiply-add), plus the two attention
products (q k^T and att v) counted as full T x T squares although causal attention needs
only half; a training step = 3 x forward. Biases, LayerNorm, GELU, softmax and AdamW are
not counted; tokens = B * T also for the LM head (which runs on B * (T - 1) rows). Llama
(bench_model's formula): 12 * C^2 per layer becomes C * (C + 2 * C * KVH / H) (q, k, v)
+ C^2 (o_proj) + 3 * C * I (SwiGLU); RMSNorm, rope and SiLU are not counted.

    /usr/bin/python3 bench/model_torch.py [--device cpu|cuda]
                                          [--config small|gpt2|gpt2-512|gpt2-1024|llama-100m|llama-100m-512|all]
                                          [--threads N] [--runs R] [--gen-batch N] [--json]
                                          [--bf16] [--attention auto|sdpa|matmul]

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
import contextlib
import json
import math
import os
import statistics
import sys
import time
import warnings

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
parser.add_argument("--config", default="all",
                    choices=["small", "gpt2", "gpt2-512", "gpt2-1024", "llama-100m", "llama-100m-512", "all"],
                    help="all: small and gpt2 on the CPU, the four GPT-2 configs on cuda; the "
                         "llama configs run by name only")
parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
parser.add_argument("--runs", type=int, default=0,
                    help="timed runs per measurement (default: 5 for small, 3 for gpt2)")
parser.add_argument("--json", action="store_true", help="also print one JSON line")
parser.add_argument("--skip-generate", action="store_true")
parser.add_argument("--skip-train", action="store_true")
parser.add_argument("--gen-batch", type=int, default=0, help="override the generation batch")
parser.add_argument("--bf16", action="store_true",
                    help="cuda: also time a bfloat16 autocast run (a second line per config)")
parser.add_argument("--attention", default="auto", choices=["auto", "sdpa", "matmul"],
                    help="auto: scaled_dot_product_attention on cuda when available, else "
                         "matmul + masked softmax (always on the CPU)")
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
DEVICE = torch.device(args.device)
CUDA = args.device == "cuda"
if CUDA:
    if not torch.cuda.is_available():
        print("model_torch.py: --device cuda, but torch.cuda.is_available() is False: skipped",
              file=sys.stderr)
        sys.exit(77)
    # float32 with TF32 tensor-core matmuls: the fair comparison to our TF32 kernel.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True

CONFIGS = {
    # n_layer, n_embd, n_head, vocab, n_positions, train (batch, steps), gen batch
    "small": dict(n_layer=6, n_embd=384, n_head=6, vocab_size=8192, n_positions=256,
                  train_batch=8, train_steps=128, gen_batch=8, runs=5),
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                 train_batch=4, train_steps=64, gen_batch=4, runs=3),
    "gpt2-512": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                     train_batch=8, train_steps=512, gen_batch=8, runs=3),
    "gpt2-1024": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024,
                      train_batch=8, train_steps=1024, gen_batch=64, runs=3),
    # The Llama family (bench_model's llama-100m / llama-100m-512): RMSNorm, rotary positions,
    # SwiGLU MLP of width intermediate_size, n_kv_head key/value heads shared by the n_head
    # query heads, no biases, LM head tied to the embedding. Run by name only (not by `all`).
    "llama-100m": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=32000, n_positions=1024,
                       train_batch=4, train_steps=64, gen_batch=4, runs=3,
                       llama=True, n_kv_head=4, intermediate_size=2048, rms_norm_eps=1e-6,
                       rope_theta=10000.0),
    "llama-100m-512": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=32000, n_positions=1024,
                           train_batch=8, train_steps=512, gen_batch=8, runs=3,
                           llama=True, n_kv_head=4, intermediate_size=2048, rms_norm_eps=1e-6,
                           rope_theta=10000.0),
}
# --config all: the GPT-2 configs (small and gpt2 on the CPU); the llama ones only by name.
ALL_CPU = ["small", "gpt2"]
ALL_CUDA = [name for name, cfg in CONFIGS.items() if not cfg.get("llama")]
PROMPT_TOKENS, NEW_TOKENS = 16, 64


# ---- the model ------------------------------------------------------------------------------

class CausalSelfAttention(nn.Module):
    use_sdpa = False  # set by main() on CUDA: F.scaled_dot_product_attention

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
        if self.use_sdpa and (T == 1 or pos == 0):
            # is_causal aligns the mask top-left: right for a prompt from position 0 and
            # not needed for one new query (it sees every cached position).
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
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


class CausalLM(nn.Module):
    """The LM loss and greedy generation shared by GPT and Llama: a subclass defines
    hidden(idx, caches, pos) (the final-norm hidden states [B, T, C]; caches: per layer a
    (k, v) pair of [B, n_kv_head, capacity, head_size]) and lm_head(h), and sets n_layer,
    n_kv_head and head_size."""

    def lm_loss(self, idx):
        h = self.hidden(idx)[:, :-1]  # positions that have a next token
        logits = self.lm_head(h)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), idx[:, 1:].reshape(-1))

    @torch.inference_mode()
    def generate_greedy(self, prompt, new_tokens, cache_dtype=torch.float32):
        B, T0 = prompt.shape
        hs, kvh = self.head_size, self.n_kv_head
        dev = prompt.device
        caches = [(torch.empty(B, kvh, T0 + new_tokens, hs, dtype=cache_dtype, device=dev),
                   torch.empty(B, kvh, T0 + new_tokens, hs, dtype=cache_dtype, device=dev))
                  for _ in range(self.n_layer)]
        out = torch.empty(B, new_tokens, dtype=torch.long, device=dev)
        logprobs = torch.empty(B, new_tokens, device=dev)
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


class GPT(CausalLM):
    def __init__(self, n_layer, n_embd, n_head, vocab_size, n_positions):
        super().__init__()
        self.n_layer, self.n_embd, self.n_head = n_layer, n_embd, n_head
        self.n_kv_head, self.head_size = n_head, n_embd // n_head  # the KV cache's shape
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
        x = self.wte(idx) + self.wpe(torch.arange(pos, pos + T, device=idx.device))
        for l, block in enumerate(self.h):
            x = block(x, None if caches is None else caches[l], pos)
        return self.ln_f(x)

    def lm_head(self, h):
        return F.linear(h, self.wte.weight)  # tied to the token embedding


# ---- the Llama family -------------------------------------------------------------------------

class SimpleRMSNorm(nn.Module):
    """torch.nn.RMSNorm's computation for a torch without it (< 2.4): x / rms(x) * weight."""

    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rms_norm(dim, eps):
    return nn.RMSNorm(dim, eps=eps) if hasattr(nn, "RMSNorm") else SimpleRMSNorm(dim, eps)


def rotate_half(x):
    """Hugging Face's rotary convention: the two halves of the head dimension are the pairs."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def repeat_kv(x, n_rep):
    """[B, KVH, T, hd] -> [B, KVH * n_rep, T, hd]: query head h reads key/value head
    h // n_rep (Hugging Face's repeat_kv; SDPA's enable_gqa maps the heads alike)."""
    if n_rep == 1:
        return x
    B, KVH, T, hd = x.shape
    return x[:, :, None].expand(B, KVH, n_rep, T, hd).reshape(B, KVH * n_rep, T, hd)


class LlamaAttention(nn.Module):
    use_sdpa = False  # set by main() on CUDA: F.scaled_dot_product_attention
    sdpa_gqa = False  # and its enable_gqa (torch >= 2.5, where the pinned backend takes it)

    def __init__(self, n_embd, n_head, n_kv_head, n_positions):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = n_head, n_kv_head, n_embd // n_head
        hd = self.head_size
        self.q_proj = nn.Linear(n_embd, n_head * hd, bias=False)
        self.k_proj = nn.Linear(n_embd, n_kv_head * hd, bias=False)
        self.v_proj = nn.Linear(n_embd, n_kv_head * hd, bias=False)
        self.o_proj = nn.Linear(n_head * hd, n_embd, bias=False)
        mask = torch.tril(torch.ones(n_positions, n_positions, dtype=torch.bool))
        self.register_buffer("causal", mask.view(1, 1, n_positions, n_positions), persistent=False)

    def forward(self, x, cos, sin, cache=None, pos=0):
        """x [B, T, C]; cos, sin [T, hd] (positions [pos, pos + T)). cache: (k, v), each
        [B, KVH, capacity, hd], written at [pos, pos + T) with the rotated keys; attention
        then runs over positions [0, pos + T)."""
        B, T, _ = x.shape
        H, KVH, hd = self.n_head, self.n_kv_head, self.head_size
        q = self.q_proj(x).view(B, T, H, hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_proj(x).view(B, T, KVH, hd).transpose(1, 2)  # [B, KVH, T, hd]
        v = self.v_proj(x).view(B, T, KVH, hd).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # bfloat16 under autocast, as HF
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            kc, vc = cache
            kc[:, :, pos:pos + T] = k
            vc[:, :, pos:pos + T] = v
            k, v = kc[:, :, :pos + T], vc[:, :, :pos + T]  # [B, KVH, pos + T, hd]
        if self.use_sdpa and (T == 1 or pos == 0):
            # is_causal as in CausalSelfAttention.
            if self.sdpa_gqa:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
            else:
                y = F.scaled_dot_product_attention(q, repeat_kv(k, H // KVH), repeat_kv(v, H // KVH),
                                                   is_causal=T > 1)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, H * hd))
        k, v = repeat_kv(k, H // KVH), repeat_kv(v, H // KVH)  # [B, H, pos + T, hd]
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))  # [B, H, T, pos + T]
        if T > 1:  # one new query sees every cached position: no mask needed
            att = att.masked_fill(~self.causal[:, :, pos:pos + T, :pos + T], float("-inf"))
        att = F.softmax(att, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(B, T, H * hd)
        return self.o_proj(y)


class LlamaMLP(nn.Module):
    def __init__(self, n_embd, intermediate_size):
        super().__init__()
        self.gate_proj = nn.Linear(n_embd, intermediate_size, bias=False)
        self.up_proj = nn.Linear(n_embd, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class LlamaBlock(nn.Module):
    def __init__(self, n_embd, n_head, n_kv_head, intermediate_size, n_positions, eps):
        super().__init__()
        self.input_layernorm = rms_norm(n_embd, eps)
        self.self_attn = LlamaAttention(n_embd, n_head, n_kv_head, n_positions)
        self.post_attention_layernorm = rms_norm(n_embd, eps)
        self.mlp = LlamaMLP(n_embd, intermediate_size)

    def forward(self, x, cos, sin, cache=None, pos=0):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, pos)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(CausalLM):
    def __init__(self, n_layer, n_embd, n_head, n_kv_head, intermediate_size, vocab_size, n_positions,
                 rms_norm_eps=1e-6, rope_theta=10000.0):
        super().__init__()
        assert n_embd % n_head == 0 and n_head % n_kv_head == 0
        self.n_layer, self.n_embd, self.n_head = n_layer, n_embd, n_head
        self.n_kv_head, self.head_size = n_kv_head, n_embd // n_head  # the KV cache's shape
        self.embed_tokens = nn.Embedding(vocab_size, n_embd)
        self.layers = nn.ModuleList([LlamaBlock(n_embd, n_head, n_kv_head, intermediate_size, n_positions,
                                                rms_norm_eps) for _ in range(n_layer)])
        self.norm = rms_norm(n_embd, rms_norm_eps)
        # Rotary tables (Hugging Face's default rope): angle p * theta^(-2i / hd) for
        # i < hd / 2, repeated over both halves of the head dimension; [n_positions, hd].
        hd = self.head_size
        inv_freq = 1.0 / (rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        angles = torch.outer(torch.arange(n_positions, dtype=torch.float32), inv_freq)
        angles = torch.cat((angles, angles), dim=-1)
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        # The engine's initialization: N(0, 0.02) for the embedding and the projections, the
        # residual projections (o_proj, down_proj) N(0, 0.02 / sqrt(2 L)); RMSNorm weights 1.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))
            elif name.endswith(".weight") and p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02)

    def hidden(self, idx, caches=None, pos=0):
        T = idx.shape[1]
        x = self.embed_tokens(idx)
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]  # [T, hd]
        for l, layer in enumerate(self.layers):
            x = layer(x, cos, sin, None if caches is None else caches[l], pos)
        return self.norm(x)

    def lm_head(self, h):
        return F.linear(h, self.embed_tokens.weight)  # tied to the token embedding


def build_model(cfg):
    if cfg.get("llama"):
        return Llama(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["n_kv_head"], cfg["intermediate_size"],
                     cfg["vocab_size"], cfg["n_positions"], cfg["rms_norm_eps"], cfg["rope_theta"])
    return GPT(cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab_size"], cfg["n_positions"])


# ---- measurements ----------------------------------------------------------------------------

def forward_flops(cfg, B, T):
    """bench_model's forward_flops: per layer the dense products (GPT-2: 12 C^2; Llama:
    q, k, v C x (H + 2 KVH) hd, o_proj C^2, SwiGLU 3 C I), the LM head, and the two attention
    products as full T x T squares."""
    L, C, V = cfg["n_layer"], cfg["n_embd"], cfg["vocab_size"]
    if cfg.get("llama"):
        I = cfg["intermediate_size"]
        per_layer = C * (C + 2.0 * C * cfg["n_kv_head"] / cfg["n_head"]) + C * C + 3.0 * C * I
    else:
        per_layer = 12.0 * C * C
    return 2.0 * B * T * (L * per_layer + C * V) + 4.0 * L * B * T * T * C


def sync():
    """Waits for the GPU's queued work (CUDA); nothing on the CPU."""
    if CUDA:
        torch.cuda.synchronize()


def median_ms(fn, runs):
    fn()  # warm-up
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
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


def tf32_probe():
    """TFLOP/s of one float32 (TF32) torch matmul on the GPU: [8192, 768] x [768, 2304]."""
    a = torch.randn(8192, 768, device=DEVICE)
    b = torch.randn(768, 2304, device=DEVICE)
    ms, _ = median_ms(lambda: torch.mm(a, b), 20)
    return 2.0 * 8192 * 768 * 2304 / (ms * 1e9)


SDPA_BACKENDS = [("flash", "FLASH_ATTENTION", "enable_flash"),
                 ("efficient", "EFFICIENT_ATTENTION", "enable_mem_efficient"),
                 ("math", "MATH", "enable_math")]


def sdpa_context(name):
    """A context manager factory that restricts scaled_dot_product_attention to one backend."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # torch >= 2.3
        backend = getattr(SDPBackend, dict((n, e) for n, e, _ in SDPA_BACKENDS)[name])
        return lambda: sdpa_kernel([backend])
    except ImportError:  # torch 2.0 - 2.2
        flags = {flag: n == name for n, _, flag in SDPA_BACKENDS}
        return lambda: torch.backends.cuda.sdp_kernel(**flags)


def pick_attention(dtype, n_head, head_size):
    """(label, context factory) of the attention the model runs with for `dtype` on CUDA:
    the first SDPA backend (torch's priority order) that runs a causal forward + backward and
    a one-query decoding step at this head size; the matmul path when SDPA is absent or off."""
    if args.attention == "matmul" or not hasattr(F, "scaled_dot_product_attention"):
        return "matmul+masked softmax", contextlib.nullcontext
    for name, _, _ in SDPA_BACKENDS:
        try:
            ctx = sdpa_context(name)
            q, k, v = (torch.randn(2, n_head, 64, head_size, device=DEVICE, dtype=dtype,
                                   requires_grad=True) for _ in range(3))
            with warnings.catch_warnings(), ctx():
                warnings.simplefilter("ignore")
                F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
                with torch.no_grad():
                    F.scaled_dot_product_attention(q[:, :, :1], k[:, :, :17], v[:, :, :17])
            sync()
            return f"sdpa:{name}", ctx
        except (RuntimeError, AttributeError, KeyError):
            continue
    return "sdpa (torch's choice)", contextlib.nullcontext


def pick_gqa(dtype, ctx_factory, n_head, n_kv_head, head_size):
    """Whether the Llama attention passes the key/value heads to SDPA as they are
    (enable_gqa=True, torch >= 2.5) rather than repeated to n_head: only where the pinned
    backend (ctx_factory) runs it, forward + backward and a decoding step; under torch's own
    choice (no backend pinned) it could fall back to the slow math kernel, so not there."""
    if ctx_factory is contextlib.nullcontext:
        return False
    try:
        q = torch.randn(2, n_head, 64, head_size, device=DEVICE, dtype=dtype, requires_grad=True)
        k, v = (torch.randn(2, n_kv_head, 64, head_size, device=DEVICE, dtype=dtype, requires_grad=True)
                for _ in range(2))
        with warnings.catch_warnings(), ctx_factory():
            warnings.simplefilter("ignore")
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
            with torch.no_grad():
                F.scaled_dot_product_attention(q[:, :, :1], k[:, :, :17], v[:, :, :17], enable_gqa=True)
        sync()
        return True
    except (RuntimeError, TypeError):  # no such argument, or the backend refuses it
        return False


def set_attention(att, ctx, dtype, names):
    """Points both attention modules at `att` (from pick_attention); for Llama configs among
    `names`, also decides enable_gqa. Returns the GQA label ("" when no Llama config)."""
    CausalSelfAttention.use_sdpa = LlamaAttention.use_sdpa = att.startswith("sdpa")
    LlamaAttention.sdpa_gqa = False
    llama = [CONFIGS[n] for n in names if CONFIGS[n].get("llama")]
    if not llama:
        return ""
    if LlamaAttention.use_sdpa:
        c = llama[0]  # the Llama configs share their head shapes
        LlamaAttention.sdpa_gqa = pick_gqa(dtype, ctx, c["n_head"], c["n_kv_head"], c["n_embd"] // c["n_head"])
    return "enable_gqa" if LlamaAttention.sdpa_gqa else "repeat_kv"


def bench_config(name, cfg, runs, bf16=False):
    torch.manual_seed(0)
    L, C, H, V, P = cfg["n_layer"], cfg["n_embd"], cfg["n_head"], cfg["vocab_size"], cfg["n_positions"]
    model = build_model(cfg).to(DEVICE)
    n_params = sum(p.numel() for p in model.parameters())
    res = {"n_layer": L, "n_embd": C, "n_head": H, "vocab_size": V, "n_positions": P,
           "params": n_params, "runs": runs}
    if cfg.get("llama"):
        res.update({"model_type": "llama", "n_kv_head": cfg["n_kv_head"],
                    "intermediate_size": cfg["intermediate_size"]})
    # bfloat16 autocast (CUDA, --bf16) around the forward passes; float32 otherwise.
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    if not args.skip_train:
        B, T = cfg["train_batch"], cfg["train_steps"]
        idx = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        adamw = dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
        opt = None
        if CUDA:
            try:
                opt = torch.optim.AdamW(model.parameters(), fused=True, **adamw)
                res["adamw"] = "fused"
            except (TypeError, RuntimeError, ValueError):
                opt = None
        if opt is None:
            opt = torch.optim.AdamW(model.parameters(), **adamw)

        def train_step():
            with amp():
                loss = model.lm_loss(idx)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        ms, best = median_ms(train_step, runs)
        flops = 3.0 * forward_flops(cfg, B, T)
        res.update({"train_batch": B, "train_steps": T, "train_step_ms": ms, "train_step_best_ms": best,
                    "train_tokens_per_s": B * T / (ms * 1e-3), "train_gflop": flops / 1e9,
                    "train_gflops_per_s": flops / (ms * 1e6)})
        del opt
    if not args.skip_generate:
        model.zero_grad(set_to_none=True)
        Bg = cfg["gen_batch"]
        prompt = torch.randint(0, V, (Bg, PROMPT_TOKENS), generator=torch.Generator().manual_seed(2)).to(DEVICE)
        cache_dtype = torch.bfloat16 if bf16 else torch.float32

        def generate():
            with amp():
                return model.generate_greedy(prompt, NEW_TOKENS, cache_dtype)

        ms, best = median_ms(generate, runs)
        res.update({"gen_batch": Bg, "gen_prompt": PROMPT_TOKENS, "gen_new_tokens": NEW_TOKENS,
                    "gen_ms": ms, "gen_best_ms": best,
                    "gen_tokens_per_s": Bg * NEW_TOKENS / (ms * 1e-3)})
    return res


def print_table(results):
    w = max([7] + [len(name) for name in results])
    hdr = (f"{'config':<{w}} {'params':>11} {'train B x T':>11} {'step ms':>10} {'tok/s':>9} "
           f"{'GFLOP/s':>8} {'gen B':>6} {'gen ms':>10} {'gen tok/s':>10}")
    print(hdr)
    for name, r in results.items():
        tr = (f"{str(r['train_batch']) + ' x ' + str(r['train_steps']):>11} {r['train_step_ms']:>10.1f} "
              f"{r['train_tokens_per_s']:>9.1f} {r['train_gflops_per_s']:>8.1f}"
              if "train_step_ms" in r else f"{'-':>11} {'-':>10} {'-':>9} {'-':>8}")
        ge = (f"{r['gen_batch']:>6} {r['gen_ms']:>10.1f} {r['gen_tokens_per_s']:>10.1f}"
              if "gen_ms" in r else f"{'-':>6} {'-':>10} {'-':>10}")
        print(f"{name:<{w}} {r['params']:>11,} {tr} {ge}")


def run_configs(names, bf16=False):
    results = {}
    for name in names:
        cfg = dict(CONFIGS[name])
        if args.gen_batch > 0:
            cfg["gen_batch"] = args.gen_batch
        runs = args.runs if args.runs > 0 else cfg["runs"]
        results[name] = bench_config(name, cfg, runs, bf16)
        if CUDA:
            torch.cuda.empty_cache()
    return results


def main_cuda(names):
    gpu = torch.cuda.get_device_name(0)
    # Every config has 12 heads of 64 (GPT-2's and the Llama ones' query heads).
    att, att_ctx = pick_attention(torch.float32, 12, 64)
    gqa = set_attention(att, att_ctx, torch.float32, names)
    probe = tf32_probe()
    print(f"PyTorch {torch.__version__} CUDA {torch.version.cuda}  device={gpu}  "
          f"tf32 matmul probe [8192x768]x[768x2304]: {probe:.1f} TFLOP/s")
    print_flops_line(names)
    print(f"-- float32 with TF32 matmuls (allow_tf32)  attention={att}" + (f"  gqa={gqa}" if gqa else ""))
    with att_ctx():
        results = run_configs(names)
    print_table(results)
    out = {"impl": "torch", "version": torch.__version__, "device": "cuda", "gpu": gpu,
           "cuda": torch.version.cuda, "precision": "float32+tf32", "attention": att,
           "tf32_probe_tflops_per_s": probe, "configs": results}
    if gqa:
        out["attention_gqa"] = gqa
    if args.bf16:
        att16, att16_ctx = pick_attention(torch.bfloat16, 12, 64)
        gqa16 = set_attention(att16, att16_ctx, torch.bfloat16, names)
        print(f"-- bfloat16 autocast (float32 weights and AdamW)  attention={att16}"
              + (f"  gqa={gqa16}" if gqa16 else ""))
        with att16_ctx():
            results16 = run_configs(names, bf16=True)
        print_table(results16)
        out.update({"attention_bf16": att16, "configs_bf16": results16})
        if gqa16:
            out["attention_gqa_bf16"] = gqa16
    if args.json:
        print(json.dumps(out, sort_keys=True))


def print_flops_line(names):
    print("FLOPs: forward = 2*B*T*(12*L*C^2 + C*V) + 4*L*B*T^2*C (attention products counted "
          "as full TxT, not causal halves); train step = 3 x forward")
    if any(CONFIGS[n].get("llama") for n in names):
        print("       Llama: 12*C^2 per layer -> C*(C + 2*C*KVH/H) + C^2 + 3*C*I (q/k/v, o_proj, SwiGLU)")


def main():
    if CUDA:
        return main_cuda(ALL_CUDA if args.config == "all" else [args.config])
    names = ALL_CPU if args.config == "all" else [args.config]
    blas = loaded_blas()
    probe = sgemm_probe()
    print(f"PyTorch {torch.__version__} float32 CPU  threads={torch.get_num_threads()}  "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}  blas={blas}  sgemm probe [256x768]x[768x2304]: {probe:.1f} GFLOP/s")
    print_flops_line(names)
    results = run_configs(names)
    print_table(results)
    if args.json:
        print(json.dumps({"impl": "torch", "version": torch.__version__,
                          "threads": torch.get_num_threads(), "blas": blas,
                          "omp_wait_policy": os.environ["OMP_WAIT_POLICY"],
                          "sgemm_probe_gflops_per_s": probe, "configs": results}, sort_keys=True))


if __name__ == "__main__":
    main()
