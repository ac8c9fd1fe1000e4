"""Train a small GPT-2-style model with flashattn, or with torch's SDPA backends, and compare them.

    python examples/train_gpt.py --config tiny --attn all --plot loss.png --json train.json   # CPU, ~75 s
    python examples/train_gpt.py --config gpt2-small --attn all                              # one GPU

The model is nanoGPT-sized: byte tokens (vocab 256), token + position embeddings (learned, or rotary
inside attention), N pre-LayerNorm blocks (causal self-attention + MLP), tied input/output embeddings.
Only the attention call differs between implementations (see `attention`):

    flashattn    flashattn.flash_attn_func(q, k, v, causal=True): Triton kernels on CUDA in bf16/fp16,
                 the tiled PyTorch path elsewhere; never stores the seqlen × seqlen matrix
    sdpa-math    torch's scaled_dot_product_attention forced to the MATH backend (the textbook
                 softmax(QKᵀ)V; it keeps the attention probabilities for the backward pass)
    sdpa-flash   torch's SDPA forced to its FLASH_ATTENTION backend (CUDA, bf16/fp16 only)

Each implementation trains from the same initial weights (same seed) on the same batches in the same
order, so in fp32 their loss curves coincide up to rounding; the script prints the largest difference.
The data is generated here: ~1 MB of text from a small deterministic grammar (`make_corpus`), with
invented names that recur within a paragraph, so attention has something to copy and the loss falls.

Reported per implementation: tokens/s (after the first warm-up steps), peak memory (CUDA:
max_memory_allocated over the run; CPU: growth of the resident set, VmHWM after a reset, see
`MemoryMeter`), final train and val loss; a table at the end with a summary row against sdpa-math.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashattn import flash_attn_func
from flashattn.demo import _rss_peak_bytes, _rss_reset_peak
from flashattn.nn import RotaryEmbedding, apply_rotary

ATTN_IMPLS = ("flashattn", "sdpa-math", "sdpa-flash")
BASELINE = "sdpa-math"
MiB = 2 ** 20


# ----------------------------------------------------------------------------------------------
# data: a deterministic toy language


_SYLLABLES = ("ka", "lo", "mi", "ren", "tha", "vo", "sel", "dun", "ira", "po", "zek", "an", "mur", "el", "fi", "tor")
_PLACES = ("market", "river", "old mill", "harbor", "forest", "library", "bakery", "hill", "bridge", "garden")
_OBJECTS = ("apple", "lamp", "book", "stone", "coin", "basket", "map", "key", "shell", "feather")
_ADJECTIVES = ("red", "small", "heavy", "bright", "old", "strange", "round", "quiet")
_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _paragraph(rng: random.Random) -> str:
    """One short story. The two names are random syllable strings, so after their first mention they
    can only be predicted by looking back at it: the part of the loss that needs attention."""
    def name() -> str:
        return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()

    a, b = name(), name()
    place, obj, adj = rng.choice(_PLACES), rng.choice(_OBJECTS), rng.choice(_ADJECTIVES)
    article = "an" if adj[0] in "aeiou" else "a"
    n = rng.randint(2, 9)
    sentences = [f"{a} walked to the {place}."]
    for _ in range(rng.randint(2, 5)):
        sentences.append(rng.choice((
            f"At the {place}, {a} found {article} {adj} {obj}.",
            f"{a} gave the {obj} to {b}.",
            f'{b} said: "Thank you, {a}."',
            f"{a} counted {_NUMBERS[n - 1]} {obj}s: " + ", ".join(str(i) for i in range(1, n + 1)) + ".",
            f"Then {b} and {a} left the {place} together.",
            f"The {obj} was {adj}, and {b} liked it.",
        )))
    return " ".join(sentences) + "\n\n"


def make_corpus(n_bytes: int, seed: int = 0) -> bytes:
    """n_bytes of ASCII text from the grammar above; the same bytes for the same (n_bytes, seed)."""
    rng, parts, size = random.Random(seed), [], 0
    while size < n_bytes:
        parts.append(_paragraph(rng))
        size += len(parts[-1])
    return "".join(parts).encode("ascii")[:n_bytes]


class Batches:
    """Random crops of a byte corpus: the first 90% for training, the last 10% for validation.

    get(split, batch, seqlen, generator) -> (x, y), both (batch, seqlen) int64 on `device`,
    y being x shifted by one token. The crops are drawn from `generator`, so a generator seeded
    the same way gives the same batches in the same order.
    """

    def __init__(self, corpus: bytes, device: torch.device) -> None:
        data = torch.frombuffer(bytearray(corpus), dtype=torch.uint8)
        n_train = int(0.9 * len(data))
        self.splits = {"train": data[:n_train], "val": data[n_train:]}
        self.device = device

    def get(self, split: str, batch: int, seqlen: int, generator: torch.Generator):
        data = self.splits[split]
        if len(data) <= seqlen + 1:
            raise ValueError(f"the {split} split has {len(data)} bytes, too few for seqlen={seqlen}; "
                             f"raise --data-mb or lower --seq")
        starts = torch.randint(len(data) - seqlen - 1, (batch,), generator=generator)
        rows = torch.stack([data[s: s + seqlen + 1] for s in starts.tolist()]).long()   # (batch, seqlen + 1)
        rows = rows.to(self.device, non_blocking=True)
        return rows[:, :-1], rows[:, 1:]


# ----------------------------------------------------------------------------------------------
# model


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str) -> torch.Tensor:
    """Causal softmax(q kᵀ / sqrt(head_dim)) v with the chosen implementation.

    q, k, v: (batch, seqlen, n_heads, head_dim), flash_attn's layout. Returns the same shape.
    """
    if impl == "flashattn":
        return flash_attn_func(q, k, v, causal=True)
    backend = {"sdpa-math": SDPBackend.MATH, "sdpa-flash": SDPBackend.FLASH_ATTENTION}[impl]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))   # SDPA's layout: (batch, n_heads, seqlen, head_dim)
    with sdpa_kernel(backend):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2)


@dataclass
class GPTConfig:
    n_layer: int = 2
    n_head: int = 4
    dim: int = 128
    seqlen: int = 256           # the longest sequence (sizes the learned position table)
    pos: str = "learned"        # "learned" (GPT-2) or "rotary" (positions rotate q and k in attention)
    vocab_size: int = 256       # bytes


class CausalSelfAttention(nn.Module):
    """x (batch, seqlen, dim) -> (batch, seqlen, dim). One fused qkv projection, causal attention by
    `attention(..., self.impl)`, an output projection. `self.impl` holds no parameters, so changing it
    never changes the weights."""

    def __init__(self, cfg: GPTConfig, impl: str) -> None:
        super().__init__()
        self.n_head, self.head_dim, self.impl = cfg.n_head, cfg.dim // cfg.n_head, impl
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.proj = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x: torch.Tensor, rotary=None) -> torch.Tensor:
        batch, seqlen, dim = x.shape
        q, k, v = self.qkv(x).view(batch, seqlen, 3, self.n_head, self.head_dim).unbind(2)   # (b, t, h, d) each
        if rotary is not None:
            cos, sin = rotary   # (seqlen, head_dim / 2) each
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = attention(q, k, v, self.impl)                                                    # (b, t, h, d)
        return self.proj(y.reshape(batch, seqlen, dim))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then + mlp(ln(x)). (batch, seqlen, dim) in and out."""

    def __init__(self, cfg: GPTConfig, impl: str) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = CausalSelfAttention(cfg, impl)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, 4 * cfg.dim), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * cfg.dim, cfg.dim))

    def forward(self, x: torch.Tensor, rotary=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rotary)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """idx (batch, seqlen) int64 -> logits (batch, seqlen, vocab_size), and the mean cross-entropy
    against targets (batch, seqlen) when given. The output layer shares the token embedding's weight."""

    def __init__(self, cfg: GPTConfig, impl: str = "flashattn") -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.wpe = nn.Embedding(cfg.seqlen, cfg.dim) if cfg.pos == "learned" else None
        self.rotary = RotaryEmbedding(cfg.dim // cfg.n_head, max_seqlen=cfg.seqlen) if cfg.pos == "rotary" else None
        self.blocks = nn.ModuleList(Block(cfg, impl) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.dim)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight   # tied embeddings
        # GPT-2's initialization; residual output projections scaled down by depth
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("attn.proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        seqlen = idx.shape[1]
        x = self.wte(idx)                                                     # (b, t, dim)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(seqlen, device=idx.device))
        rotary = self.rotary(seqlen) if self.rotary is not None else None
        for block in self.blocks:
            x = block(x, rotary)
        logits = self.lm_head(self.ln_f(x))                                   # (b, t, vocab)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


# ----------------------------------------------------------------------------------------------
# measurement helpers


class MemoryMeter:
    """Peak memory of one training run above what was in use before its model was built.

    start(): before the model exists; records the baseline. restart_peak(): forget the peak so far
    (called after the warm-up steps, so that one-time work such as Triton's autotuning is left out;
    memory the warm-up steps kept, like the optimizer state, is still in use and still counted).
    CUDA: torch.cuda.max_memory_allocated(). CPU: the resident set's high-water mark VmHWM, reset
    through /proc/self/clear_refs (the helpers of flashattn.demo). The CPU number is meaningful when
    the process has trained nothing before, which is why each implementation trains in its own process.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.base = 0

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated()
        else:
            _rss_reset_peak()
            self.base = _rss_peak_bytes()   # = the current resident set, just after the reset
        self.restart_peak()

    def restart_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            _rss_reset_peak()

    def peak_mib(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.base) / MiB
        return (_rss_peak_bytes() - self.base) / MiB


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False)")
    return torch.device(name)


def unavailable_reason(impl: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """None if `impl` can run here, else why not (printed instead of crashing)."""
    if impl != "sdpa-flash":
        return None
    if device.type != "cuda":
        return "torch's FLASH_ATTENTION backend needs a CUDA device"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"torch's FLASH_ATTENTION backend needs fp16/bf16, got {dtype} (pass --dtype bfloat16)"
    try:   # ask torch itself: it knows the GPU architecture and head-dim limits
        q = torch.randn(1, 16, 1, head_dim, device=device, dtype=dtype)
        attention(q, q, q, impl)
    except RuntimeError as e:
        return f"torch's FLASH_ATTENTION backend refused: {str(e).splitlines()[0]}"
    return None


# ----------------------------------------------------------------------------------------------
# training


CONFIGS: Dict[str, dict] = {
    # 2 CPU cores: 0.46M parameters, flashattn and sdpa-math in about 75 s together
    "tiny": dict(n_layer=2, n_head=4, dim=128, seqlen=256, pos="learned", batch=16, steps=250, lr=3e-3,
                 warmup=25, log_every=10, eval_batches=8),
    # GPT-2 small's shape on one GPU (86M parameters: the byte vocabulary replaces GPT-2's 50257 tokens)
    "gpt2-small": dict(n_layer=12, n_head=12, dim=768, seqlen=1024, pos="learned", batch=16, steps=200, lr=6e-4,
                       warmup=20, log_every=10, eval_batches=8),
    # long sequences, a smaller model: where the seqlen × seqlen matrix dominates memory
    "long": dict(n_layer=4, n_head=8, dim=512, seqlen=8192, pos="rotary", batch=2, steps=100, lr=1e-3,
                 warmup=10, log_every=5, eval_batches=4),
}


def lr_at(step: int, args) -> float:
    """Linear warm-up to args.lr, then cosine decay to args.lr / 10 at the last step."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - 1 - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embeddings only (not biases and LayerNorm gains)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train_one(impl: str, args, cfg: GPTConfig, data: Batches, device: torch.device, dtype: torch.dtype) -> dict:
    """Train a fresh model with attention `impl`; returns its measurements and loss curve.

    Same args.seed -> the same initial weights and the same batches, whatever `impl` is.
    """
    meter = MemoryMeter(device)
    meter.start()
    torch.manual_seed(args.seed)
    model = GPT(cfg, impl).to(device)   # initialized on the CPU, so the weights match across devices too
    n_params = sum(p.numel() for p in model.parameters())
    init_checksum = sum(p.detach().double().sum().item() for p in model.parameters())
    optimizer = make_optimizer(model, args.lr)
    batch_gen = torch.Generator().manual_seed(args.seed)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    steps, losses = [], []
    skip = min(args.skip_steps, args.steps - 1)   # warm-up steps left out of tokens/s
    t0 = time.perf_counter()
    for step in range(args.steps):
        if step == skip:
            sync()
            meter.restart_peak()
            t_timed = time.perf_counter()
        x, y = data.get("train", args.batch, cfg.seqlen, batch_gen)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        with autocast(device, dtype):
            _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            steps.append(step)
            losses.append(loss.item())
            if args.verbose:
                print(f"  {impl:>10}  step {step:5d}  loss {losses[-1]:.4f}", flush=True)
    sync()
    t_end = time.perf_counter()
    tokens_per_s = (args.steps - skip) * args.batch * cfg.seqlen / (t_end - t_timed)
    peak = meter.peak_mib()   # of training: read before the evaluation

    model.eval()
    val_gen, val_losses = torch.Generator().manual_seed(args.seed + 1), []
    with torch.no_grad(), autocast(device, dtype):
        for _ in range(args.eval_batches):
            val_losses.append(model(*data.get("val", args.batch, cfg.seqlen, val_gen))[1].item())
    return {"available": True, "n_params": n_params, "init_checksum": init_checksum,
            "tokens_per_s": tokens_per_s, "peak_mib": peak, "train_loss": losses[-1],
            "val_loss": sum(val_losses) / len(val_losses), "steps": steps, "losses": losses,
            "wall_s": time.perf_counter() - t0, "timed_steps": args.steps - skip}


# ----------------------------------------------------------------------------------------------
# report


def max_loss_diffs(results: Dict[str, dict]) -> Dict[str, float]:
    """impl -> max |loss(impl) - loss(sdpa-math)| over the logged steps, for each impl that ran beside it."""
    base = results.get(BASELINE, {})
    if not base.get("available"):
        return {}
    return {impl: max(abs(a - b) for a, b in zip(r["losses"], base["losses"]))
            for impl, r in results.items() if impl != BASELINE and r.get("available")}


def summary_rows(results: Dict[str, dict], seqlen: int) -> List[dict]:
    """Seeds-style summary per implementation against sdpa-math: model size, seqlen, speed-up, memory saved."""
    base = results.get(BASELINE, {})
    if not base.get("available"):
        return []
    rows = []
    for impl, r in results.items():
        if impl == BASELINE or not r.get("available"):
            continue
        saved = base["peak_mib"] - r["peak_mib"]
        rows.append({"impl": impl, "n_params": r["n_params"], "seqlen": seqlen,
                     "speedup_vs_sdpa_math": r["tokens_per_s"] / base["tokens_per_s"],
                     "memory_saved_mib": saved,
                     "memory_saved_frac": saved / base["peak_mib"] if base["peak_mib"] > 0 else float("nan")})
    return rows


def format_table(results: Dict[str, dict], summary: List[dict], diffs: Dict[str, float], mem_label: str) -> str:
    head = f"{'attention':<11} {'tokens/s':>10} {mem_label:>16} {'train loss':>10} {'val loss':>9} {'max|Δloss|':>11}"
    lines = [head, "-" * len(head)]
    for impl, r in results.items():
        if not r.get("available"):
            lines.append(f"{impl:<11} not run: {r['reason']}")
            continue
        diff = f"{diffs[impl]:.2e}" if impl in diffs else ("(baseline)" if impl == BASELINE else "-")
        lines.append(f"{impl:<11} {r['tokens_per_s']:>10,.0f} {r['peak_mib']:>16.1f} {r['train_loss']:>10.4f} "
                     f"{r['val_loss']:>9.4f} {diff:>11}")
    for s in summary:
        lines.append("-" * len(head))
        lines.append(f"summary: {s['impl']} vs {BASELINE}: model {s['n_params'] / 1e6:.2f}M params, seqlen "
                     f"{s['seqlen']}, speed-up {s['speedup_vs_sdpa_math']:.2f}x, memory saved "
                     f"{s['memory_saved_mib']:.1f} MiB ({100 * s['memory_saved_frac']:.0f}%)")
    return "\n".join(lines)


def save_plot(results: Dict[str, dict], path: str, title: str, dtype: torch.dtype) -> None:
    """Left: training loss of each implementation. Right: |loss - loss(sdpa-math)| on a log scale,
    beside the rounding unit of `dtype` times the loss (the size of one rounding of the loss itself)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ran = {impl: r for impl, r in results.items() if r.get("available")}
    base = ran.get(BASELINE) if len(ran) > 1 else None   # the right panel needs something to compare
    fig, axes = plt.subplots(1, 2 if base else 1, figsize=(11 if base else 6, 4), squeeze=False)
    styles = {"flashattn": dict(ls="-", lw=3, alpha=0.5), "sdpa-math": dict(ls="--", lw=1.5, color="k"),
              "sdpa-flash": dict(ls=":", lw=2)}
    ax = axes[0, 0]
    for impl, r in ran.items():
        ax.plot(r["steps"], r["losses"], label=impl, **styles.get(impl, {}))
    ax.set(xlabel="step", ylabel="training loss (nats / byte)", title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    if base:
        ax, floor = axes[0, 1], 1e-9
        for impl, r in ran.items():
            if impl != BASELINE:
                diff = [max(abs(a - b), floor) for a, b in zip(r["losses"], base["losses"])]
                ax.semilogy(r["steps"], diff, marker=".", label=f"{impl} vs {BASELINE}")
        rounding = torch.finfo(dtype).eps * max(base["losses"])
        ax.axhline(rounding, color="gray", ls="--", lw=1, label=f"{str(dtype).replace('torch.', '')} eps × max loss")
        ax.set(xlabel="step", ylabel=f"|loss difference| (0 drawn at {floor:g})", title="difference of the curves")
        ax.legend()
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="tiny", help="model and training sizes (tiny)")
    p.add_argument("--attn", default="all",
                   help=f"one of {', '.join(ATTN_IMPLS)}, a comma-separated list, or all (each available one; "
                        "the default)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if available")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="auto (the default): bf16 autocast on CUDA, float32 on CPU")
    for name, kind in (("steps", int), ("batch", int), ("seq", int), ("lr", float), ("warmup", int),
                       ("log-every", int), ("eval-batches", int), ("n-layer", int), ("n-head", int), ("dim", int)):
        p.add_argument(f"--{name}", type=kind, default=None, help="override the config's value")
    p.add_argument("--pos", choices=("learned", "rotary"), default=None, help="override the config's value")
    p.add_argument("--skip-steps", type=int, default=5, help="first steps left out of tokens/s and memory (5)")
    p.add_argument("--data-mb", type=float, default=1.0, help="size of the generated corpus in MiB (1)")
    p.add_argument("--seed", type=int, default=1337, help="weights and batch order (1337)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--json", metavar="PATH", help="write every measurement and loss curve here")
    p.add_argument("--plot", metavar="PATH", help="save the loss curves as a PNG here")
    p.add_argument("--in-process", action="store_true",
                   help="train every implementation in this process (default: a fresh process each, so that "
                        "one run's freed memory cannot hide the next one's peak on the CPU)")
    p.add_argument("-v", "--verbose", action="store_true", help="print the loss at every logged step")
    p.add_argument("--worker-json", help=argparse.SUPPRESS)   # internal: the worker process writes its result here
    return p


def resolve_args(argv: Optional[Sequence[str]]):
    """Parse argv and fill every unset option from the chosen config."""
    args = build_parser().parse_args(argv)
    for key, value in CONFIGS[args.config].items():
        attr = "seq" if key == "seqlen" else key
        if getattr(args, attr, None) is None:
            setattr(args, attr, value)
    impls = ATTN_IMPLS if args.attn == "all" else tuple(args.attn.split(","))
    for impl in impls:
        if impl not in ATTN_IMPLS:
            raise SystemExit(f"--attn: unknown implementation {impl!r}; choose from {', '.join(ATTN_IMPLS)} or all")
    if args.steps < 1 or args.batch < 1 or args.seq < 1:
        raise SystemExit(f"--steps, --batch and --seq must be >= 1, got {args.steps}, {args.batch}, {args.seq}")
    if args.dim % args.n_head or (args.dim // args.n_head) % 2:
        raise SystemExit(f"--dim {args.dim} must be a multiple of --n-head {args.n_head} with an even head_dim")
    args.impls = impls
    return args


def warm_up(impl: str, cfg: GPTConfig, data: Batches, device: torch.device, dtype: torch.dtype) -> None:
    """One training step of a one-layer model. First calls allocate lasting things (lazily imported
    modules (the optimizer's: ~70 MB), thread pools, compiled kernels) that are neither this
    implementation's training memory nor its speed."""
    tiny = GPT(GPTConfig(n_layer=1, n_head=cfg.n_head, dim=cfg.dim, seqlen=64, pos=cfg.pos), impl).to(device)
    optimizer = make_optimizer(tiny, 1e-4)
    with autocast(device, dtype):
        loss = tiny(*data.get("train", 2, 64, torch.Generator().manual_seed(0)))[1]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(tiny.parameters(), 1.0)
    optimizer.step()


def run_here(impl: str, args, cfg: GPTConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """Warm up and train `impl` in this process; a CUDA out-of-memory becomes a result saying so."""
    data = Batches(make_corpus(int(args.data_mb * 2 ** 20), seed=0), device)
    try:
        warm_up(impl, cfg, data, device, dtype)
        return train_one(impl, args, cfg, data, device, dtype)
    except torch.OutOfMemoryError as e:
        gc.collect()
        torch.cuda.empty_cache()
        return {"available": False, "reason": f"out of memory: {str(e).splitlines()[0]}"}


def run_in_subprocess(impl: str, argv: List[str]) -> dict:
    """Train `impl` in a fresh Python process (this script with --attn impl) and read back its result.

    A fresh process per implementation makes the runs independent: on the CPU a process that has
    trained before reuses freed heap pages, and the resident set would understate the next run's peak.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--attn", impl, "--worker-json", path]
        status = subprocess.run(cmd).returncode
        if status != 0:
            raise RuntimeError(f"training {impl} failed in its worker process (exit status {status}); "
                               f"its error is printed above. Command: {' '.join(cmd)}")
        with open(path) as f:
            return json.load(f)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = resolve_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype_name = args.dtype if args.dtype != "auto" else ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    cfg = GPTConfig(n_layer=args.n_layer, n_head=args.n_head, dim=args.dim, seqlen=args.seq, pos=args.pos)

    if args.worker_json:   # we are the worker process of run_in_subprocess
        with open(args.worker_json, "w") as f:
            json.dump(run_here(args.impls[0], args, cfg, device, dtype), f)
        return 0

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"config {args.config}: {cfg.n_layer} layers, {cfg.n_head} heads, dim {cfg.dim}, seqlen {cfg.seqlen}, "
          f"{cfg.pos} positions; batch {args.batch}, {args.steps} steps, lr {args.lr}; {dtype_name} on {where}")
    results: Dict[str, dict] = {}
    for impl in args.impls:
        reason = unavailable_reason(impl, device, dtype, cfg.dim // cfg.n_head)
        if reason:
            results[impl] = {"available": False, "reason": reason}
            print(f"{impl}: unavailable: {reason}")
            continue
        print(f"training with {impl} ...", flush=True)
        r = run_here(impl, args, cfg, device, dtype) if args.in_process else run_in_subprocess(impl, argv)
        results[impl] = r
        if r["available"]:
            print(f"  {r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_mib']:.1f} MiB, train loss "
                  f"{r['train_loss']:.4f}, val loss {r['val_loss']:.4f}, {r['wall_s']:.1f} s", flush=True)
        else:
            print(f"  {r['reason']}")

    diffs = max_loss_diffs(results)
    for impl, d in diffs.items():
        print(f"max |loss({impl}) - loss({BASELINE})| over {len(results[impl]['steps'])} logged steps: {d:.3e}")
    summary = summary_rows(results, cfg.seqlen)
    mem_label = "peak MiB (CUDA)" if device.type == "cuda" else "peak RSS+ MiB"
    print()
    print(format_table(results, summary, diffs, mem_label))

    if args.plot:
        save_plot(results, args.plot, f"{args.config}: {cfg.n_layer}x{cfg.dim}, seqlen {cfg.seqlen}, {dtype_name}",
                  dtype)
        print(f"loss curves: {args.plot}")
    if args.json:
        record = {"config": args.config, "model": asdict(cfg),
                  "train": {k: getattr(args, k) for k in ("batch", "steps", "lr", "warmup", "log_every",
                                                          "eval_batches", "skip_steps", "seed", "data_mb")},
                  "device": str(device), "device_name": where, "dtype": dtype_name, "torch": torch.__version__,
                  "processes": "one per implementation" if not args.in_process else "one for all",
                  "results": results, "max_abs_loss_diff_vs_sdpa_math": diffs, "summary": summary}
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
        print(f"measurements: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
