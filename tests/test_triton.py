"""The Triton kernels against the float64 reference.

Two tiers run the same kernels:
- CPU (every run, CI): Triton's interpreter (TRITON_INTERPRET=1, set below before the kernels are
  imported) on tiny shapes in float16 (the interpreter's bf16 dot is broken in triton 3.6);
- GPU (`pytest -m gpu` on a machine with an NVIDIA GPU): the foundation grid in bf16 and fp16, large
  shapes, determinism, unwritten-output detection, torch.compile and opcheck.
"""
import os
import zlib

import pytest
import torch

ON_GPU = torch.cuda.is_available()   # without one, conftest.py has switched Triton's interpreter on

triton = pytest.importorskip("triton")

from helpers import EPS, check_close, make_qkv, reference_results, run_and_compare  # noqa: E402

from flashattn import flash_attn_func, flash_attn_qkvpacked_func, flash_attn_varlen_func  # noqa: E402


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("FLASHATTN_BACKEND", "triton")
    monkeypatch.setenv("FLASHATTN_AUTOTUNE", "0")   # tests check correctness; one config per shape


# ------------------------------------------------------------------------------------------------
# CPU tier: the interpreter

interp = pytest.mark.skipif(ON_GPU or os.environ.get("TRITON_INTERPRET") != "1",
                            reason="interpreter tier runs on machines without a GPU")

# (batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, causal, window, softcap, alibi)
INTERP_CASES = {
    "s1-d16": (1, 1, 1, 2, 2, 16, False, (-1, -1), 0.0, False),
    "s17-d40-causal-mqa": (2, 17, 17, 2, 1, 40, True, (-1, -1), 0.0, False),
    "s97-d64-causal-gqa": (1, 97, 97, 4, 2, 64, True, (-1, -1), 0.0, False),
    "s130-d16": (1, 130, 130, 2, 2, 16, False, (-1, -1), 0.0, False),
    "q17-k130-causal": (1, 17, 130, 2, 1, 16, True, (-1, -1), 0.0, False),
    "q130-k17-causal-empty-rows": (1, 130, 17, 2, 2, 16, True, (-1, -1), 0.0, False),
    "q97-k40-d40": (2, 97, 40, 2, 2, 40, False, (-1, -1), 0.0, False),
    "window-7-3": (1, 60, 70, 2, 1, 32, False, (7, 3), 0.0, False),
    "causal-window-5": (1, 50, 50, 2, 2, 16, True, (5, -1), 0.0, False),
    "softcap-alibi": (2, 40, 40, 2, 2, 16, False, (-1, -1), 5.0, True),
    "causal-alibi-gqa": (1, 33, 48, 4, 2, 16, True, (-1, -1), 0.0, True),
}


@interp
@pytest.mark.parametrize("case", list(INTERP_CASES), ids=list(INTERP_CASES))
def test_interpreter_fwd_bwd(case, triton_backend):
    b, sq, sk, h, hk, d, causal, window, softcap, alibi = INTERP_CASES[case]
    q, k, v = make_qkv(b, sq, sk, h, hk, d, torch.float16, seed=zlib.crc32(case.encode()) % 1000)
    slopes = torch.rand(h) * 0.5 if alibi else None
    run_and_compare(flash_attn_func, q, k, v, causal=causal, window_size=window, softcap=softcap,
                    alibi_slopes=slopes, name=case)


# path -> (FLASHATTN_TMA, seqlen_q, seqlen_k, the call's mask, expected TMA flag, expected WS flag of the forward,
# of the backward's). WS needs whole key tiles (seqlen_k % 128 == 0), the backward whole query tiles, dK/dV no GQA.
LOAD_PATHS = {"pointers": ("0", 40, 128, dict(causal=True), False, False, False),
              "tma": ("1", 40, 128, dict(window_size=(24, 0)), True, False, False),   # a left window: no WS
              "warp-specialized-fwd": ("1", 40, 128, dict(), True, True, False),
              "warp-specialized": ("1", 128, 128, dict(), True, True, True),
              "warp-specialized-causal": ("1", 128, 256, dict(causal=True), True, True, True),
              "warp-specialized-right-window": ("1", 128, 128, dict(window_size=(-1, 17)), True, True, True)}


@interp
@pytest.mark.parametrize("path", list(LOAD_PATHS))
def test_interpreter_load_paths(path, triton_backend, monkeypatch):
    """The kernels' three ways to read tiles: pointer loads, tensor descriptors (TMA), and the
    warp-specialized loops (one loop: no left window or score options, whole tiles; see _tma_level)."""
    from flashattn.backends import triton as tb
    env, sq, sk, mask, tma, ws_fwd, ws_bwd = LOAD_PATHS[path]
    monkeypatch.setenv("FLASHATTN_TMA", env)
    q, k, v = make_qkv(1, sq, sk, 2, 2, 32, torch.float16, seed=7)   # dK/dV's WS loop: no GQA
    run_and_compare(flash_attn_func, q, k, v, name=path, **mask)
    for kernel, ws in (("fwd", ws_fwd), ("dkdv", ws_bwd), ("dq", ws_bwd)):
        used = tb.launch_config(kernel, 32)
        assert bool(used.get("TMA")) == tma and bool(used.get("WS")) == ws, (kernel, used)


@interp
def test_interpreter_query_blocks_in_reverse(triton_backend, monkeypatch):
    """LPT configs (forward, dQ): the programs take the query blocks last first. Only the order changes: a dense
    batch matches the reference, and a packed batch (whose shorter sequences meet their empty blocks first) gives
    the bits of the usual order, out and gradients."""
    from flashattn.backends import triton as tb
    lpt = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1, LPT=True)
    monkeypatch.setitem(tb.pinned_configs, "fwd", lpt)
    monkeypatch.setitem(tb.pinned_configs, "dq", lpt)
    q, k, v = make_qkv(2, 45, 60, 2, 1, 16, torch.float16, seed=5)
    run_and_compare(flash_attn_func, q, k, v, causal=True, name="lpt")
    cu = torch.tensor([0, 45, 48, 78], dtype=torch.int32)
    q, k, v = (x[0] for x in make_qkv(1, 78, 78, 2, 2, 16, torch.float16, seed=6, requires_grad=True))

    def run():
        out = flash_attn_varlen_func(q, k, v, cu, cu, 45, 45, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    reversed_ = run()
    tb.pinned_configs.clear()
    assert all(torch.equal(a, b) for a, b in zip(reversed_, run()))


@interp
def test_interpreter_strided_packed_qkv(triton_backend):
    """Slices of a packed qkv: only the last dim is contiguous; gradients land in the packed tensor."""
    qkv = torch.randn(2, 37, 3, 2, 16, dtype=torch.float16)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    run_and_compare(flash_attn_func, q, k, v, causal=True, name="packed")
    qkv.requires_grad_()
    flash_attn_qkvpacked_func(qkv, causal=True).sum().backward()
    assert qkv.grad is not None and torch.isfinite(qkv.grad).all()


@interp
def test_interpreter_backward_is_deterministic(triton_backend):
    q, k, v = make_qkv(1, 40, 40, 4, 2, 16, torch.float16, requires_grad=True, seed=3)
    out = flash_attn_func(q, k, v, causal=True)
    do = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    g2 = torch.autograd.grad(out, (q, k, v), do)
    for a, c in zip(g1, g2):
        assert torch.equal(a, c)


@interp
def test_interpreter_opcheck(triton_backend):
    q, k, v = make_qkv(1, 20, 20, 2, 1, 16, torch.float16, requires_grad=True, seed=5)
    torch.library.opcheck(torch.ops.flashattn.fwd.default, (q, k, v, 0.25, -1, 0, 0.0, None, None, None, 0, 0, 0, 0.0, None, None, None, None, None, "triton"),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


# ------------------------------------------------------------------------------------------------
# GPU tier

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")


def _poison_cuda_cache():
    """Fill freed cached memory with NaN: outputs allocated next from the cache show unwritten elements."""
    free = torch.cuda.mem_get_info()[0]
    x = torch.full((min(free // 4, 2**30) // 4,), float("nan"), device="cuda")
    del x


GPU_CASES = []
for s in (1, 17, 97, 128, 257):
    for d in (8, 40, 64, 96, 128, 256):
        GPU_CASES.append((2, s, s, 4, 2, d, True, (-1, -1)))
for sq, sk in ((1, 300), (300, 1), (113, 1025), (1025, 113)):
    for causal in (False, True):
        GPU_CASES.append((2, sq, sk, 6, 2, 64, causal, (-1, -1)))
GPU_CASES += [
    (2, 257, 257, 4, 4, 128, False, (-1, -1)),       # MHA
    (2, 257, 257, 8, 1, 128, False, (-1, -1)),       # MQA
    (2, 500, 500, 4, 2, 64, False, (64, 16)),         # window
    (2, 500, 600, 4, 2, 128, True, (100, -1)),        # causal + window
    (1, 8192, 8192, 2, 1, 128, True, (-1, -1)),       # large
    (1, 8192, 8192, 2, 2, 256, False, (-1, -1)),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "b{}-q{}-k{}-h{}/{}-d{}-{}-w{}".format(
    *c[:6], "causal" if c[6] else "full", c[7]))
def test_gpu_fwd_bwd(case, dtype, triton_backend):
    b, sq, sk, h, hk, d, causal, window = case
    q, k, v = make_qkv(b, sq, sk, h, hk, d, dtype, device="cuda", seed=sq * 7 + d)
    _poison_cuda_cache()
    run_and_compare(flash_attn_func, q, k, v, causal=causal, window_size=window)


@gpu
@needs_cuda
@pytest.mark.parametrize("softcap,alibi", [(30.0, False), (0.0, True), (10.0, True)])
def test_gpu_softcap_alibi(softcap, alibi, triton_backend):
    q, k, v = make_qkv(2, 300, 333, 4, 2, 64, torch.bfloat16, device="cuda", seed=11)
    slopes = torch.rand(2, 4, device="cuda") if alibi else None
    run_and_compare(flash_attn_func, q, k, v, causal=True, softcap=softcap, alibi_slopes=slopes)


@gpu
@needs_cuda
@pytest.mark.parametrize("path", ["pointers", "descriptors"])
@pytest.mark.parametrize("case", [(2, 256, 256, 4, 2, 128, 0.0, False), (2, 300, 384, 4, 4, 128, 10.0, True),
                                  (1, 1000, 1024, 8, 1, 128, 0.0, True), (2, 256, 512, 4, 2, 64, 0.0, False)],
                         ids=lambda c: "b{}-q{}-k{}-h{}/{}-d{}-softcap{}-alibi{}".format(*c))
def test_gpu_load_paths(case, path, triton_backend, monkeypatch):
    """Non-causal shapes with seqlen_k a multiple of 128: at head dim 128 without score options the default
    forward is the warp-specialized one (Triton's Hopper pass); with softcap or ALiBi, the descriptor loop."""
    from flashattn.backends import triton as tb
    b, sq, sk, h, hk, d, softcap, alibi = case
    monkeypatch.setenv("FLASHATTN_TMA", "1" if path == "descriptors" else "0")
    q, k, v = make_qkv(b, sq, sk, h, hk, d, torch.bfloat16, device="cuda", seed=sq + d)
    slopes = torch.rand(b, h, device="cuda") if alibi else None
    _poison_cuda_cache()
    run_and_compare(flash_attn_func, q, k, v, softcap=softcap, alibi_slopes=slopes)
    hopper = torch.cuda.get_device_capability()[0] >= 9
    used = tb.launch_config("fwd", d)
    plain = softcap == 0.0 and not alibi   # the warp-specialized loop has no score options
    assert bool(used.get("WS")) == (path == "descriptors" and hopper and d == 128 and plain), used


# (b, seqlen_q, seqlen_k, h, hk, d, mask): whole tiles, partial query tiles (forward WS only), a diagonal offset
WS_GPU_CASES = [(2, 384, 384, 4, 4, 128, dict()), (2, 384, 384, 4, 4, 128, dict(causal=True)),
                (1, 200, 512, 4, 4, 128, dict(causal=True)), (2, 256, 640, 4, 4, 128, dict(causal=True)),
                (1, 512, 512, 4, 4, 128, dict(window_size=(-1, 37))), (2, 384, 512, 4, 2, 64, dict(causal=True)),
                (1, 1024, 1024, 8, 8, 64, dict())]


@gpu
@needs_cuda
@pytest.mark.parametrize("config", ["fwd128x128-dkdv32x128", "fwd128x64-dkdv64x128"])
@pytest.mark.parametrize("case", WS_GPU_CASES, ids=lambda c: "b{}-q{}-k{}-h{}/{}-d{}-{}".format(
    *c[:6], "-".join(f"{k}{v}" for k, v in c[6].items()) or "full"))
def test_gpu_warp_specialized(case, config, triton_backend, monkeypatch):
    """Every warp-specialized loop on the GPU, also those not on by default there: the
    forward (dense, causal, right window), dK/dV (MHA, whole query tiles) and dQ (whole query tiles), at two
    tile shapes each."""
    from flashattn.backends import triton as tb
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("Triton's warp specialization targets Hopper (sm_90)")
    b, sq, sk, h, hk, d, mask = case
    bn = 128 if config.startswith("fwd128x128") else 64
    monkeypatch.setitem(tb.pinned_configs, "fwd", dict(BLOCK_M=128, BLOCK_N=bn, num_warps=4, num_stages=2, TMA=True, WS=True))
    monkeypatch.setitem(tb.pinned_configs, "dkdv", dict(BLOCK_M=128 // (bn // 32), BLOCK_N=128, num_warps=4, num_stages=2,
                                                       TMA=True, WS=True))
    monkeypatch.setitem(tb.pinned_configs, "dq", dict(BLOCK_M=128, BLOCK_N=bn, num_warps=4, num_stages=2, TMA=True, WS=True))
    q, k, v = make_qkv(b, sq, sk, h, hk, d, torch.bfloat16, device="cuda", seed=sq + sk + d)
    _poison_cuda_cache()
    run_and_compare(flash_attn_func, q, k, v, **mask)
    ran = {kernel: tb._last_default[(kernel, d, True, False)] for kernel in ("fwd", "dkdv", "dq")}
    assert ran["fwd"].get("WS"), ran
    assert bool(ran["dkdv"].get("WS")) == (sq % 128 == 0 and h == hk), ran
    assert bool(ran["dq"].get("WS")) == (sq % 128 == 0), ran


@gpu
@needs_cuda
@pytest.mark.parametrize("fwd", ["pointers", "warp-specialized"])
def test_gpu_query_blocks_in_reverse(fwd, triton_backend, monkeypatch):
    """LPT configs on the GPU (the forward's pointer-load default or its warp-specialized one, dQ's default):
    only the programs' order changes, so out and the gradients keep the usual order's bits."""
    from flashattn.backends import triton as tb
    q, k, v = make_qkv(2, 1024, 1024, 8, 8, 128, torch.bfloat16, device="cuda", seed=3, requires_grad=True)
    fcfg = tb._default("fwd", 128, 2 if fwd == "warp-specialized" else 1, True)
    qcfg = tb._default("dq", 128, 2, True)

    def run(lpt):
        monkeypatch.setitem(tb.pinned_configs, "fwd", dict(fcfg, LPT=lpt))
        monkeypatch.setitem(tb.pinned_configs, "dq", dict(qcfg, LPT=lpt))
        out = flash_attn_func(q, k, v, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), torch.ones_like(out)))

    usual = run(False)
    assert all(torch.equal(a, b) for a, b in zip(run(True), usual))
    run_and_compare(flash_attn_func, q.detach(), k.detach(), v.detach(), causal=True)   # (LPT still pinned)


@gpu
@needs_cuda
def test_gpu_deterministic_and_strided(triton_backend):
    qkv = torch.randn(2, 1000, 3, 8, 128, device="cuda", dtype=torch.bfloat16)
    q, k, v = (qkv[:, :, i].detach().requires_grad_() for i in range(3))
    run_and_compare(flash_attn_func, q, k, v, causal=True)
    out = flash_attn_func(q, k, v, causal=True)
    do = torch.randn_like(out)
    g1 = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    g2 = torch.autograd.grad(out, (q, k, v), do)
    assert all(torch.equal(a, c) for a, c in zip(g1, g2))


def _check_slices(name, ours, ref, pt, rows, dtype):
    """design.md's rule on a slice of a huge result, eps relative to the slice's own magnitude (its values
    can be tiny: dk, dv of keys a million queries share)."""
    check_close(name, ours[rows], ref[rows], pt[rows], atol=EPS[dtype] * ref[rows].abs().max().item())


@gpu
@needs_cuda
@pytest.mark.parametrize("b,s,h", [(3, 1 << 17, 64), (1, 5 << 17, 32)], ids=["batch-offsets", "row-offsets"])
def test_gpu_int64_offsets(triton_backend, b, s, h):
    """batch·seqlen·nheads·headdim > 2³¹ (3.2e9 and 2.7e9 elements per tensor, about 48 GiB in all): offsets
    must be 64-bit, for the batch (batch-offsets: batch entry 2 starts at 2³¹ elements) and for the rows of
    one sequence (row-offsets: rows past 2¹⁹ start past 2³¹). Forward and backward; checks the last batch
    entry's last rows (out, lse, dq) and last keys (dk, dv), where a 32-bit offset would have wrapped.
    Window (63, 0): rows from 63 on in the checked tail see only keys inside it, and keys from 63 on only
    rows inside it, so the reference runs on the tail alone. (Exactly 2³¹ elements would not do: the
    largest offset, 2³¹ − 1, still fits in int32.)"""
    d = 128
    assert (b - 1) * s * h * d >= 2**31 or s * h * d > 2**31
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    out, lse, _ = flash_attn_func(q, k, v, window_size=(63, 0), return_attn_probs=True)
    dout = torch.randn(out.shape, device="cuda", dtype=torch.bfloat16, generator=g)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    tail = slice(s - 256, s)
    one = (q[-1:, tail], k[-1:, tail], v[-1:, tail])
    opts = dict(window_size=(63, 0), dout=dout[-1:, tail])
    ref, pt = reference_results(*one, **opts), reference_results(*one, **opts, compute_dtype=None)
    inner = (slice(None), slice(63, None))
    for name, ours in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        _check_slices(name, ours[-1:, tail], ref[name], pt[name], inner, torch.bfloat16)
    check_close("lse", lse[-1:, :, tail][..., 63:], ref["lse"][..., 63:], pt["lse"][..., 63:], dtype=torch.bfloat16)


@gpu
@needs_cuda
def test_gpu_int64_offsets_varlen(triton_backend):
    """A packed batch of 5·2¹⁶ tokens × 64 heads × 128 (2.7e9 elements): the rows of the last sequence start
    past 2³¹ elements. Causal with window (63, 0); the last sequence's tail against the reference."""
    total, h, d = 5 << 16, 64, 128
    lens = [131_072, 1, 131_072, total - 262_145]   # the last starts at row 262145: 262145·64·128 > 2³¹
    assert (total - lens[-1]) * h * d > 2**31
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    q, k, v = (torch.randn(total, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    out = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True, window_size=(63, 0))
    dout = torch.randn(out.shape, device="cuda", dtype=torch.bfloat16, generator=g)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    tail = slice(total - 256, total)
    one = (q[None, tail], k[None, tail], v[None, tail])
    opts = dict(causal=True, window_size=(63, 0), dout=dout[None, tail])
    ref, pt = reference_results(*one, **opts), reference_results(*one, **opts, compute_dtype=None)
    inner = (slice(None), slice(63, None))
    for name, ours in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        _check_slices(name, ours[None, tail], ref[name], pt[name], inner, torch.bfloat16)


@gpu
@needs_cuda
def test_gpu_int64_offsets_paged_kvcache(triton_backend):
    """A paged KV cache of 16384 pages × 256 rows × 8 heads × 128 (2³² elements each): the sequences' pages
    are the last ones, past 2³¹ elements. Decode step (append + attend) against the reference."""
    from flashattn import flash_attn_with_kvcache
    pages, page_size, hk, d, h = 1 << 14, 256, 8, 128, 32
    k_cache = torch.empty(pages, page_size, hk, d, device="cuda", dtype=torch.bfloat16).normal_()
    v_cache = torch.empty_like(k_cache).normal_()
    assert k_cache.numel() > 2**31
    table = torch.tensor([[pages - 1, pages - 3, pages - 5], [pages - 2, pages - 4, 0]], dtype=torch.int32,
                         device="cuda")
    lens = torch.tensor([700, 300], dtype=torch.int32, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(2, 1, h, d, device="cuda", dtype=torch.bfloat16, generator=g)
    k_new, v_new = (torch.randn(2, 1, hk, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, block_table=table,
                                       causal=True, return_softmax_lse=True)
    for i, n in enumerate((701, 301)):
        rows = torch.arange(n, device="cuda")
        page = table[i].long()[rows // page_size]
        keys, vals = k_cache[page, rows % page_size][None], v_cache[page, rows % page_size][None]
        ref = reference_results(q[i:i + 1], keys, vals, causal=True)
        pt = reference_results(q[i:i + 1], keys, vals, causal=True, compute_dtype=None)
        check_close(f"seq {i} out", out[i:i + 1], ref["out"], pt["out"])
        check_close(f"seq {i} lse", lse[i:i + 1], ref["lse"], pt["lse"], dtype=torch.bfloat16)
    torch.testing.assert_close(k_cache[pages - 5, 700 - 512], k_new[0, 0], rtol=0, atol=0)   # appended in place


@gpu
@pytest.mark.slow
@needs_cuda
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_gpu_seqlen_1m(triton_backend, causal):
    """One sequence of 2²⁰ tokens on one GPU, forward and backward (GQA 4/1, head dim 128, bf16). Checked:
    out, lse, dq of the last 16 queries (they see every key) and dk, dv of the last 16 keys (causal: seen by
    those queries only), against the reference on those queries and all keys; and, causal, the first 256
    rows (they see only the first 256 keys)."""
    s, h, hk, d = 1 << 20, 4, 1, 128
    g = torch.Generator(device="cuda").manual_seed(3)
    q = torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    k, v = (torch.randn(1, s, hk, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
            for _ in range(2))
    out, lse, _ = flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    dout = torch.randn(out.shape, device="cuda", dtype=torch.bfloat16, generator=g)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert all(torch.isfinite(x).all() for x in (out, lse, dq, dk, dv))
    last = slice(s - 16, s)
    opts = dict(causal=causal, dout=dout[:, last])
    ref = reference_results(q[:, last], k, v, compute_dtype=torch.float32, **opts)   # fp32: 16 × 2²⁰ scores
    pt = reference_results(q[:, last], k, v, compute_dtype=None, **opts)
    every = (slice(None),)
    for name, ours in (("out", out[:, last]), ("dq", dq[:, last])):
        _check_slices(name, ours, ref[name], pt[name], every, torch.bfloat16)
    check_close("lse", lse[..., last], ref["lse"], pt["lse"], dtype=torch.bfloat16)
    if causal:
        for name, ours in (("dk", dk[:, last]), ("dv", dv[:, last])):
            _check_slices(name, ours, ref[name][:, last], pt[name][:, last], every, torch.bfloat16)
        first = slice(0, 256)
        one = (q[:, first], k[:, first], v[:, first])
        ref0 = reference_results(*one, causal=True, dout=dout[:, first])
        pt0 = reference_results(*one, causal=True, dout=dout[:, first], compute_dtype=None)
        for name, ours in (("out", out[:, first]), ("dq", dq[:, first])):
            _check_slices(name, ours, ref0[name], pt0[name], every, torch.bfloat16)


@gpu
@needs_cuda
def test_gpu_compile_and_opcheck(triton_backend):
    q, k, v = make_qkv(2, 128, 128, 4, 2, 64, torch.bfloat16, device="cuda", requires_grad=True, seed=1)

    def f(q, k, v):
        return flash_attn_func(q, k, v, causal=True).float().square().sum()

    compiled = torch.compile(f, fullgraph=True)
    a, b = compiled(q, k, v), f(q, k, v)
    assert torch.allclose(a, b, rtol=1e-3)
    ga = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    gb = torch.autograd.grad(f(q, k, v), (q, k, v))
    assert all(torch.allclose(x.float(), y.float(), atol=1e-2, rtol=1e-2) for x, y in zip(ga, gb))
    torch.library.opcheck(torch.ops.flashattn.fwd.default, (q, k, v, 0.125, -1, 0, 0.0, None, None, None, 0, 0, 0, 0.0, None, None, None, None, None, "triton"))
