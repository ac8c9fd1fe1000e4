"""Which Hopper mechanism moves the forward: TMA loads, warp specialization, tile shapes (same run, one GPU).

A prototype forward (`_proto_fwd`: dense, causal or not, q/k/v/out through device-side tensor descriptors,
one key loop, optionally warp-specialized by Triton's Hopper pass) is timed next to flashattn's forward
(pointer loads, and with TMA=True pinned) and torch SDPA's cuDNN and flash backends, on the papers' grid
(b·s = 16384, h·d = 2048). Each variant's output is checked against SDPA before it is timed.

Why a prototype: triton 3.6's Hopper warp specialization (`tl.range(..., warp_specialize=True)` with
num_warps=4: one producer warpgroup issuing TMA and two consumer warpgroups of 64 rows each) compiles
only for a kernel with a single key loop and no early return, and silently does nothing when the loop
body has a run-time `if` (benchmarks/NOTES.md). Before reshaping flashattn's kernel into that form, this
measures what the form is worth.

    PYTHONPATH=src python benchmarks/exp_hopper_fwd.py [--hdims 128] [--seqlens 4096 16384]
"""
import argparse
import math

import torch
import triton
import triton.language as tl


@triton.jit
def _proto_softmax_step(s, acc, m_i, l_i, v, n, offs_m, qk_scale, BN: tl.constexpr, CAUSAL: tl.constexpr,
                        MASK_ADD: tl.constexpr):
    s = s * qk_scale
    if CAUSAL:   # on every block: a run-time `if` in the loop turns warp specialization off
        ok = (n + tl.arange(0, BN))[None, :] <= offs_m[:, None]
        if MASK_ADD:
            s = s + tl.where(ok, 0.0, -1.0e6)
        else:
            s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    p = tl.math.exp2(s - m_new[:, None])
    alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(tl.bfloat16), v, acc * alpha[:, None])
    return acc, m_new, l_i


@triton.jit
def _proto_fwd(Q, K, V, O, seqlen, nheads, stride_b, stride_m, stride_h, qk_scale,
               BM: tl.constexpr, BN: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr, WS: tl.constexpr,
               PIPE: tl.constexpr, MASK_ADD: tl.constexpr):
    start_m = tl.program_id(0) * BM
    bh = tl.program_id(1)
    base = (bh // nheads).to(tl.int64) * stride_b + (bh % nheads).to(tl.int64) * stride_h
    dq = tl.make_tensor_descriptor(Q + base, shape=[seqlen, D], strides=[stride_m, 1], block_shape=[BM, D])
    dk = tl.make_tensor_descriptor(K + base, shape=[seqlen, D], strides=[stride_m, 1], block_shape=[BN, D])
    dv = tl.make_tensor_descriptor(V + base, shape=[seqlen, D], strides=[stride_m, 1], block_shape=[BN, D])
    do = tl.make_tensor_descriptor(O + base, shape=[seqlen, D], strides=[stride_m, 1], block_shape=[BM, D])
    q = dq.load([start_m, 0])
    offs_m = start_m + tl.arange(0, BM)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    hi = tl.minimum(start_m + BM, seqlen) if CAUSAL else seqlen
    if PIPE:
        # FA3's intra-warpgroup overlap, written by hand: block n+1's q·kᵀ is issued before block n's softmax,
        # so that the tensor cores work while the softmax runs (if the compiler leaves the wgmma in flight)
        s = tl.dot(q, dk.load([0, 0]).T)
        for n in tl.range(BN, hi, BN):
            s_next = tl.dot(q, dk.load([n, 0]).T)
            acc, m_i, l_i = _proto_softmax_step(s, acc, m_i, l_i, dv.load([n - BN, 0]), n - BN, offs_m, qk_scale,
                                                BN, CAUSAL, MASK_ADD)
            s = s_next
        last = ((hi - 1) // BN) * BN
        acc, m_i, l_i = _proto_softmax_step(s, acc, m_i, l_i, dv.load([last, 0]), last, offs_m, qk_scale, BN,
                                            CAUSAL, MASK_ADD)
    else:
        for n in tl.range(0, hi, BN, warp_specialize=WS):
            acc, m_i, l_i = _proto_softmax_step(tl.dot(q, dk.load([n, 0]).T), acc, m_i, l_i, dv.load([n, 0]), n,
                                                offs_m, qk_scale, BN, CAUSAL, MASK_ADD)
    do.store([start_m, 0], (acc / l_i[:, None]).to(tl.bfloat16))


def proto(q, k, v, causal, bm, bn, warps, stages, ws, pipe=False, mask_add=False):
    b, s, h, d = q.shape
    out = torch.empty_like(q)
    _proto_fwd[(triton.cdiv(s, bm), b * h)](q, k, v, out, s, h, q.stride(0), q.stride(1), q.stride(2),
                                             1.4426950408889634 / math.sqrt(d), BM=bm, BN=bn, D=d, CAUSAL=causal,
                                             WS=ws, PIPE=pipe, MASK_ADD=mask_add, num_warps=warps, num_stages=stages)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hdims", type=int, nargs="+", default=[128])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--rep-ms", type=float, default=300.0)
    args = ap.parse_args()

    import flashattn
    from flashattn.backends import triton as T
    from flashattn.bench.gpu import do_bench_ms
    from torch.nn.attention import SDPBackend, sdpa_kernel

    T._ensure_allocator()
    bench = do_bench_ms(50.0, args.rep_ms)
    print(f"# {torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    # (name, BM, BN, warps, stages, warp-specialized, hand-pipelined, additive causal mask)
    protos = [("ws 128x128 w4 s2", 128, 128, 4, 2, True, False, False),
              ("ws+add 128x128 w4 s2", 128, 128, 4, 2, True, False, True),
              ("tma 128x64 w8 s3", 128, 64, 8, 3, False, False, False),
              ("pipe 128x64 w8 s3", 128, 64, 8, 3, False, True, False),
              ("pipe 128x128 w8 s2", 128, 128, 8, 2, False, True, False),
              ("pipe 128x64 w8 s2", 128, 64, 8, 2, False, True, False)]
    ours = [("ours 128x64 w8 s3", dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)),
            ("ours+TMA 128x64 w8 s3", dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3, TMA=True)),
            ("ours+TMA 128x64 w8 s4", dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=4, TMA=True)),
            ("ours+TMA 64x64 w4 s3", dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3, TMA=True)),
            ("ours 64x64 w4 s3", dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3))]
    rows = []
    for d in args.hdims:
        for s in args.seqlens:
            for causal in (False, True):
                b, h = 16384 // s, 2048 // d
                g = torch.Generator(device="cuda").manual_seed(0)
                q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
                qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                flops = 4 * b * h * s * s * d / (2 if causal else 1)
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    ref = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
                cands = []
                for name, backend in (("sdpa cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa flash", SDPBackend.FLASH_ATTENTION)):
                    def run(backend=backend):
                        with sdpa_kernel(backend):
                            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                    cands.append((name, run))
                for name, *cfg in protos:
                    cands.append((name, lambda cfg=cfg: proto(q, k, v, causal, *cfg)))
                for name, cfg in ours:
                    def run(cfg=cfg):
                        T.pinned_configs["fwd"] = cfg
                        try:
                            return flashattn.flash_attn_func(q, k, v, causal=causal)
                        finally:
                            T.pinned_configs.pop("fwd", None)
                    cands.append((name, run))
                for name, fn in cands:
                    try:
                        out = fn()
                        if out.shape != ref.shape:
                            out = out.transpose(1, 2)
                        err = (out.float() - ref.float()).abs().max().item()
                        ms = bench(fn) if err < 0.05 else float("nan")
                    except Exception as e:  # noqa: BLE001
                        err, ms = float("nan"), float("nan")
                        print(f"  {name}: {type(e).__name__}: {str(e)[-300:]}")
                    tf = flops / ms / 1e9 if ms == ms else float("nan")
                    rows.append((d, s, causal, name, ms, tf, err))
                    print(f"d={d} s={s} causal={int(causal)} {name:24s} {ms:8.3f} ms {tf:6.0f} TFLOP/s  err {err:.1e}",
                          flush=True)
    print("\n| hdim | seqlen | causal | variant | ms | TFLOP/s | vs cuDNN |")
    print("|---|---|---|---|---|---|---|")
    for d, s, causal, name, ms, tf, err in rows:
        base = [r for r in rows if r[:3] == (d, s, causal) and r[3] == "sdpa cudnn"][0][4]
        print(f"| {d} | {s} | {int(causal)} | {name} | {ms:.3f} | {tf:.0f} | {base / ms:.2f} |")


if __name__ == "__main__":
    main()
