"""Generate text with a small decoder-only transformer whose attention reads a paged KV cache.

    python examples/generate.py                      # CPU, float32, a tiny model
    python examples/generate.py --device cuda --dtype bfloat16 --dim 1024 --layers 8

A Llama-shaped model (RMSNorm, rotary positions, grouped-query attention, SwiGLU) with random weights
(no download) generates greedily from a batch of prompts of different lengths:

- flashattn: each prompt is prefilled into a `PagedKVCache` (pages of --page-size tokens) with one
  `flash_attn_with_kvcache` call per layer, which also rotates q and k and writes k, v into the pages;
  then all sequences decode together, one token per step, each step appending to the pages.
- reference: the same weights in plain PyTorch, recomputing causal softmax attention over the whole
  sequence at every step, no cache.

At every step the script compares the two models' logits for the tokens flashattn generated and
prints the largest difference; the run fails if it exceeds --tol (or a generated token differs while
the reference's top two logits are further apart than that).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import List

import torch
import torch.nn.functional as F
from torch import nn

from flashattn import PagedKVCache, flash_attn_with_kvcache
from flashattn.rotary import apply_rotary_emb


class Config:
    def __init__(self, vocab=256, dim=128, layers=2, heads=4, kv_heads=2, hidden=None, rope_base=10000.0,
                 max_pos=4096):
        self.vocab, self.dim, self.layers, self.heads, self.kv_heads = vocab, dim, layers, heads, kv_heads
        self.head_dim = dim // heads
        self.hidden = hidden or 4 * dim
        self.rope_base, self.max_pos = rope_base, max_pos


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.attn_norm, self.mlp_norm = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.wq = nn.Linear(cfg.dim, cfg.heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.heads * cfg.head_dim, cfg.dim, bias=False)
        self.w1 = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden, bias=False)
        self.w2 = nn.Linear(cfg.hidden, cfg.dim, bias=False)

    def qkv(self, x):
        """x (b, s, dim) -> q (b, s, heads, hd), k, v (b, s, kv_heads, hd), before rotary."""
        c = self.cfg
        h = self.attn_norm(x)
        return (self.wq(h).unflatten(-1, (c.heads, c.head_dim)), self.wk(h).unflatten(-1, (c.kv_heads, c.head_dim)),
                self.wv(h).unflatten(-1, (c.kv_heads, c.head_dim)))

    def finish(self, x, attn):
        x = x + self.wo(attn.flatten(-2))
        h = self.mlp_norm(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Model(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.vocab, bias=False)
        inv = cfg.rope_base ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
        ang = torch.outer(torch.arange(cfg.max_pos, dtype=torch.float64), inv)
        self.register_buffer("cos", ang.cos().float(), persistent=False)
        self.register_buffer("sin", ang.sin().float(), persistent=False)

    # -- the reference: full recomputation, plain softmax attention
    def forward_reference(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (1, s) -> logits (1, s, vocab)."""
        x = self.embed(tokens)
        s = tokens.shape[1]
        causal = torch.ones(s, s, dtype=torch.bool, device=tokens.device).tril()
        for blk in self.blocks:
            q, k, v = blk.qkv(x)
            q, k = (apply_rotary_emb(t, self.cos, self.sin) for t in (q, k))
            rep = self.cfg.heads // self.cfg.kv_heads
            qh, kh, vh = q.transpose(1, 2), k.repeat_interleave(rep, 2).transpose(1, 2), v.repeat_interleave(rep, 2).transpose(1, 2)
            scores = (qh.float() @ kh.float().transpose(-1, -2)) / math.sqrt(self.cfg.head_dim)
            p = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            x = blk.finish(x, (p @ vh.float()).to(x.dtype).transpose(1, 2))
        return self.head(self.norm(x))

    # -- flashattn: one step of any number of new tokens per sequence, through the paged cache
    def forward_cached(self, tokens: torch.Tensor, cache: PagedKVCache, seq_ids: List[int]) -> torch.Tensor:
        """tokens (b, n): n new tokens for each of the b sequences -> logits (b, n, vocab); appends to the cache."""
        n = tokens.shape[1]
        block_table, cache_seqlens = cache.reserve(seq_ids, n)
        x = self.embed(tokens)
        for layer, blk in enumerate(self.blocks):
            q, k, v = blk.qkv(x)
            # rotary at the cache rows the tokens land on (= their positions); k, v written into the pages
            attn = flash_attn_with_kvcache(q, cache.k[layer], cache.v[layer], k, v, rotary_cos=self.cos,
                                           rotary_sin=self.sin, rotary_interleaved=False, cache_seqlens=cache_seqlens,
                                           block_table=block_table, causal=True)
            x = blk.finish(x, attn)
        cache.commit(seq_ids, n)
        return self.head(self.norm(x))


@torch.no_grad()
def generate(model: Model, prompts: List[List[int]], steps: int, page_size: int, device, dtype, tol: float,
             verbose: bool = True) -> dict:
    cfg = model.cfg
    pages_needed = sum(math.ceil((len(p) + steps) / page_size) for p in prompts)
    cache = PagedKVCache(pages_needed + 2, page_size, cfg.kv_heads, cfg.head_dim, num_layers=cfg.layers, dtype=dtype,
                         device=device)
    ids = [cache.add_sequence() for _ in prompts]
    seqs = [list(p) for p in prompts]
    worst, t0 = 0.0, time.perf_counter()
    last_logits = []
    for sid, p in zip(ids, prompts):   # prefill, one sequence at a time (prompt lengths differ)
        logits = model.forward_cached(torch.tensor([p], device=device), cache, [sid])
        last_logits.append(logits[0, -1])
    logits = torch.stack(last_logits)                                     # (b, vocab)
    for step in range(steps):
        for i, s in enumerate(seqs):       # check against the reference on the same tokens
            ref = model.forward_reference(torch.tensor([s], device=device))[0, -1]
            diff = float((logits[i].float() - ref.float()).abs().max())
            worst = max(worst, diff)
            top2 = ref.float().topk(2).values
            if diff > tol or (int(logits[i].argmax()) != int(ref.argmax()) and float(top2[0] - top2[1]) > tol):
                raise SystemExit(f"step {step}, sequence {i}: flashattn's logits differ from the reference by {diff:.3e} "
                                 f"(--tol {tol})")
        new = logits.argmax(-1)                                           # greedy
        for s, t in zip(seqs, new.tolist()):
            s.append(t)
        logits = model.forward_cached(new[:, None], cache, ids)[:, -1]
        if verbose:
            print(f"step {step + 1:3d}: tokens {new.tolist()}  max |logits - reference| so far {worst:.2e}")
    return dict(sequences=seqs, max_diff=worst, seconds=time.perf_counter() - t0, pages=pages_needed)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--page-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--prompt-lengths", type=int, nargs="+", default=[5, 17, 1, 9])
    ap.add_argument("--tol", type=float, default=None, help="max |logits difference| (default: 1e-3 float32, "
                                                            "0.25 bf16/fp16)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    tol = args.tol if args.tol is not None else (1e-3 if dtype == torch.float32 else 0.25)
    torch.manual_seed(args.seed)
    cfg = Config(dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads)
    model = Model(cfg).to(device=args.device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(args.seed)
    prompts = [torch.randint(0, cfg.vocab, (n,), generator=g).tolist() for n in args.prompt_lengths]
    print(f"model: {args.layers} layers, dim {args.dim}, {args.heads} heads ({args.kv_heads} kv), "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params, {args.dtype} on {args.device}; "
          f"prompts of {args.prompt_lengths} tokens; paged cache, page size {args.page_size}")
    res = generate(model, prompts, args.steps, args.page_size, args.device, dtype, tol)
    print(f"generated {args.steps} tokens for {len(prompts)} prompts in {res['seconds']:.2f} s; "
          f"max |logits(flashattn, paged cache) - logits(reference)| = {res['max_diff']:.2e} (tol {tol})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
