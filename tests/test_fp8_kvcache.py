"""FP8 KV cache: flash_attn_with_kvcache over float8_e4m3fn k_cache, v_cache with k_descale, v_descale, q (and
the new k, v, and the output) in bf16/fp16.

The reference (tests/test_kvcache.py's `_check`) is float64 attention over the *dequantized* cache rows,
x8 · descale: the exact values the kernel sees (e4m3 upcasts exactly to fp16/bf16, the descales are
applied in fp32), so quantization is no error here and design.md's rule applies as for a bf16 cache:
max|ours − ref| <= 2·max|pt − ref| + eps, pt the naive math in q's dtype on the dequantized rows rounded
to it. The new tokens are expected in the cache byte for byte as fp8.quantize_with writes them:
(k / descale).clamp(-448, 448).to(torch.float8_e4m3fn), after the rotary.
Backends: the PyTorch path (gathered rows dequantized in float32) and the Triton kernels under the
interpreter (fp16: triton 3.6's interpreter computes bf16 dots wrongly); a GPU tier.
"""
import math
import os
import re
import zlib

import pytest
import torch

from flashattn import PagedKVCache, StreamingKVCache, flash_attn_with_kvcache, fp8
from flashattn.reference import attention_ref
from helpers import check_close
from test_kvcache import CASES, _case, _check, _rand, _tables

ON_GPU = torch.cuda.is_available()
interp = pytest.mark.skipif(ON_GPU or os.environ.get("TRITON_INTERPRET") != "1",
                            reason="interpreter tier runs on machines without a GPU")
CPU_BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton-interp", marks=interp)]
E4M3 = torch.float8_e4m3fn


def _descales(granularity, b, hk, g, device="cpu"):
    """k_descale, v_descale: one element (per tensor; shape (1,) for k, () for v) or (b, hk), float32."""
    shape = {"tensor": (1,), "head": (b, hk)}[granularity]
    kd, vd = ((torch.rand(shape, generator=g) * 0.015 + 0.005).to(device) for _ in range(2))
    return kd, (vd.reshape(()) if granularity == "tensor" else vd)


def _fp8_case(name, granularity, g):
    """test_kvcache's case with an FP8 cache holding e4m3 data (its random rows / 0.01, some saturated) and
    random descales: the call reads row r of sequence b as x8 · descale[b]."""
    q, k_cache, v_cache, (k, v), seqlens, opts = _case(name, torch.float16, g)
    b, hk = q.shape[0], k_cache.shape[2]
    kd, vd = _descales(granularity, b, hk, g)
    k_cache, v_cache = fp8.quantize_with(k_cache, 0.01), fp8.quantize_with(v_cache, 0.01)
    return q, k_cache, v_cache, (k, v), seqlens, dict(opts, k_descale=kd, v_descale=vd)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("granularity", ["tensor", "head"])
@pytest.mark.parametrize("name", list(CASES))
def test_fp8_contiguous_cache(name, granularity, backend, use_backend):
    """Decoding, MQA, no append, chunked prefill, window, sinks, softcap + ALiBi, GQA (CASES)."""
    use_backend(backend)
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}-{granularity}".encode()))
    q, k_cache, v_cache, (k, v), seqlens, opts = _fp8_case(name, granularity, g)
    _check(q, k_cache, v_cache, k, v, seqlens=seqlens, name=f"fp8 {name} {granularity}", **opts)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_fp8_paged_cache(page_size, backend, use_backend):
    use_backend(backend)
    g = torch.Generator().manual_seed(page_size)
    b, sq, h, hk, d, max_len = 3, 4, 4, 2, 16, 37
    per_seq = math.ceil(max_len / page_size)
    num_pages = b * per_seq + 3
    table = torch.randperm(num_pages, generator=g)[:b * per_seq].view(b, per_seq).to(torch.int32)
    k_cache, v_cache = (fp8.quantize_with(_rand(num_pages, page_size, hk, d, dtype=torch.float32, g=g), 0.01)
                        for _ in range(2))
    q = _rand(b, sq, h, d, dtype=torch.float16, g=g)
    k, v = _rand(b, sq, hk, d, dtype=torch.float16, g=g), _rand(b, sq, hk, d, dtype=torch.float16, g=g)
    kd, vd = _descales("head", b, hk, g)
    _check(q, k_cache, v_cache, k, v, seqlens=torch.tensor([max_len - sq, 0, 11], dtype=torch.int32),
           block_table=table, causal=True, k_descale=kd, v_descale=vd, name=f"fp8 paged{page_size}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp8_rotary_batch_idx_and_leftpad(backend, use_backend):
    """The new k is rotated, then quantized; descales index the sequence b of the call, not its cache row."""
    use_backend(backend)
    g = torch.Generator().manual_seed(4)
    q = _rand(3, 2, 4, 32, dtype=torch.float16, g=g)
    k_cache, v_cache = (fp8.quantize_with(_rand(5, 30, 2, 32, dtype=torch.float32, g=g), 0.01) for _ in range(2))
    k, v = _rand(3, 2, 2, 32, dtype=torch.float16, g=g), _rand(3, 2, 2, 32, dtype=torch.float16, g=g)
    kd, vd = _descales("head", 3, 2, g)
    _check(q, k_cache, v_cache, k, v, seqlens=torch.tensor([20, 7, 28], dtype=torch.int32),
           leftpad=torch.tensor([5, 0, 28], dtype=torch.int32), batch_idx=torch.tensor([4, 0, 2], dtype=torch.int32),
           rotary=_tables(30, 16), causal=True, k_descale=kd, v_descale=vd, name="fp8 rotary+batch_idx+leftpad")


@interp
@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_fp8_split_kv_triton(num_splits, use_backend):
    """Key splits merged by the combine kernel, each split's output scaled by v_descale; GQA group of 4."""
    use_backend("triton")
    g = torch.Generator().manual_seed(3)
    q = _rand(2, 1, 4, 16, dtype=torch.float16, g=g)
    k_cache, v_cache = (fp8.quantize_with(_rand(2, 70, 1, 16, dtype=torch.float32, g=g), 0.01) for _ in range(2))
    kd, vd = _descales("head", 2, 1, g)
    _check(q, k_cache, v_cache, seqlens=torch.tensor([70, 9], dtype=torch.int32), num_splits=num_splits,
           k_descale=kd, v_descale=vd, name=f"fp8 splits{num_splits}")
    k, v = _rand(2, 1, 1, 16, dtype=torch.float16, g=g), _rand(2, 1, 1, 16, dtype=torch.float16, g=g)
    _check(q, k_cache, v_cache, k, v, seqlens=torch.tensor([69, 40], dtype=torch.int32), num_splits=num_splits,
           window=(20, 0), causal=True, num_sink_tokens=2, k_descale=kd, v_descale=vd,
           name=f"fp8 splits{num_splits}-sinks")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_append_writes_the_quantized_bytes(backend, use_backend):
    """The rows written are (k / descale).clamp(-448, 448).to(float8_e4m3fn), byte for byte: values beyond
    448 · descale saturate, ties round to even, -0 and tiny negatives keep their sign, subnormals."""
    use_backend(backend)
    g = torch.Generator().manual_seed(9)
    b, hk, d, s_new = 2, 2, 16, 3
    kd = torch.tensor([[0.01, 0.5], [2.0 ** -7, 0.03]])
    vd = torch.tensor([0.02])
    k = (torch.randn(b, s_new, hk, d, generator=g) * torch.exp(torch.randn(b, s_new, hk, d, generator=g) * 2)).half()
    k[0, 0, 0, :3] = torch.tensor([100.0, -100.0, -0.0])
    # k / descale = m exactly (descale 2^-7): ties to even (100 -> 96, 108 -> 112, 232 -> 224, 1.5·2^-9 -> 2^-8),
    # saturation (±500), a subnormal, a negative rounding to -0
    m = [100, 108, 232, 1.5 * 2 ** -9, 500, -500, 2 ** -7, -2 ** -12]
    k[1, 0, 0, :len(m)] = (torch.tensor(m, dtype=torch.float64) * 2 ** -7).half()
    v = torch.randn(b, s_new, hk, d, generator=g).half() * 5
    k_cache = torch.zeros(2, 8, hk, d, dtype=E4M3)
    v_cache = torch.zeros(2, 8, hk, d, dtype=E4M3)
    q = torch.randn(b, 1, 2 * hk, d, generator=g).half()
    seqlens = torch.tensor([2, 5], dtype=torch.int32)
    flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, k_descale=kd, v_descale=vd)
    for i, n in enumerate(seqlens.tolist()):
        want_k = (k[i] / kd[i][None, :, None]).clamp(-448, 448).to(E4M3)
        want_v = (v[i] / vd).clamp(-448, 448).to(E4M3)
        assert torch.equal(k_cache[i, n:n + s_new].view(torch.uint8), want_k.view(torch.uint8)), i
        assert torch.equal(v_cache[i, n:n + s_new].view(torch.uint8), want_v.view(torch.uint8)), i
    assert k_cache[0, 2, 0, 0].float() == 448 and k_cache[0, 2, 0, 1].float() == -448
    assert k_cache[0, 2, 0, 2].view(torch.uint8) == 0x80   # -0
    assert k_cache[1, 5, 0, :len(m)].float().tolist() == [96, 112, 224, 2 ** -8, 448, -448, 2 ** -7, -0.0]
    # nothing else was written
    untouched = torch.ones(2, 8, dtype=torch.bool)
    untouched[0, 2:5], untouched[1, 5:8] = False, False
    assert (k_cache[untouched].float() == 0).all() and (v_cache[untouched].float() == 0).all()


def test_torch_path_is_the_bf16_path_on_the_dequantized_cache(use_backend):
    """The PyTorch path with an FP8 cache equals the float32 path over the dequantized cache (same op), then
    rounded to q's dtype: it computes the definition."""
    use_backend("torch")
    g = torch.Generator().manual_seed(12)
    q = _rand(2, 3, 4, 16, dtype=torch.bfloat16, g=g)
    k_cache, v_cache = (fp8.quantize_with(_rand(2, 20, 2, 16, dtype=torch.float32, g=g), 0.01) for _ in range(2))
    kd, vd = _descales("head", 2, 2, g)
    seqlens = torch.tensor([20, 11], dtype=torch.int32)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, causal=True, k_descale=kd,
                                       v_descale=vd, return_softmax_lse=True)
    kf, vf = (c.float() * ds[:, None, :, None] for c, ds in ((k_cache, kd), (v_cache, vd)))
    out32, lse32 = flash_attn_with_kvcache(q.float(), kf, vf, cache_seqlens=seqlens, causal=True,
                                           return_softmax_lse=True)
    assert out.dtype == torch.bfloat16 and torch.equal(out, out32.to(torch.bfloat16))
    assert torch.equal(lse, lse32)


def test_descale_defaults_to_one(use_backend):
    use_backend("torch")
    g = torch.Generator().manual_seed(13)
    q = _rand(1, 1, 2, 16, dtype=torch.float16, g=g)
    k_cache, v_cache = (fp8.quantize_with(_rand(1, 10, 2, 16, dtype=torch.float32, g=g), 0.1) for _ in range(2))
    one = torch.ones(1)
    a = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=10)
    assert torch.equal(a, flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=10, k_descale=one, v_descale=one))


# ------------------------------------------------------------------------------------------------
# the caches: FP8 storage, descales passed by the caller


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_paged_kv_cache_in_fp8(backend, use_backend):
    """PagedKVCache(dtype=float8_e4m3fn) is storage like any other; the caller passes the descales (here per
    tensor, one pair per layer). Prefill and two decode steps against attention over the dequantized history."""
    use_backend(backend)
    g = torch.Generator().manual_seed(5)
    h, hk, d = 4, 2, 16
    cache = PagedKVCache(num_pages=12, page_size=3, nheads_k=hk, headdim=d, dtype=E4M3)
    assert cache.k[0].dtype == E4M3
    kd, vd = torch.tensor([0.01]), torch.tensor([0.02])
    ids = [cache.add_sequence(), cache.add_sequence()]
    hist = [([], []), ([], [])]
    for n in (4, 1, 1):
        table, seqlens = cache.reserve(ids, n)
        q = _rand(2, n, h, d, dtype=torch.float16, g=g)
        k, v = _rand(2, n, hk, d, dtype=torch.float16, g=g), _rand(2, n, hk, d, dtype=torch.float16, g=g)
        out = flash_attn_with_kvcache(q, cache.k[0], cache.v[0], k, v, cache_seqlens=seqlens, block_table=table,
                                      causal=True, k_descale=kd, v_descale=vd)
        cache.commit(ids, n)
        for i in range(2):
            hist[i][0].append(fp8.quantize_with(k[i], kd).double() * kd.double())
            hist[i][1].append(fp8.quantize_with(v[i], vd).double() * vd.double())
            ks, vs = torch.cat(hist[i][0])[None], torch.cat(hist[i][1])[None]
            ref = attention_ref(q[i:i + 1].double(), ks, vs, causal=True)[0]
            pt = attention_ref(q[i:i + 1], ks.half(), vs.half(), causal=True, compute_dtype=None)[0]
            check_close(f"step {n} seq {i}", out[i:i + 1].float(), ref, pt.float())


def test_streaming_kv_cache_in_fp8(use_backend):
    """StreamingKVCache(dtype=float8_e4m3fn): eviction moves the stored bytes; attend() passes the descales
    (per sequence and head) through; results equal sink + window attention over the dequantized history."""
    use_backend("torch")
    g = torch.Generator().manual_seed(6)
    sink, window, max_new, h, hk, d = 2, 5, 2, 2, 1, 16
    cache = StreamingKVCache(batch=2, num_sink=sink, window=window, nheads_k=hk, headdim=d, max_new=max_new,
                             dtype=E4M3)
    kd, vd = _descales("head", 2, hk, g)
    ks, vs = [], []
    for n in [2, 1, 2, 1, 1, 2, 1, 2, 1, 1]:
        seqlens = cache.prepare(n)
        q = _rand(2, n, h, d, dtype=torch.float16, g=g)
        k, v = _rand(2, n, hk, d, dtype=torch.float16, g=g), _rand(2, n, hk, d, dtype=torch.float16, g=g)
        out = cache.attend(0, q, k, v, seqlens, k_descale=kd, v_descale=vd)
        cache.commit(n)
        ks.append(fp8.quantize_with(k, kd[:, None, :, None]).double() * kd.double()[:, None, :, None])
        vs.append(fp8.quantize_with(v, vd[:, None, :, None]).double() * vd.double()[:, None, :, None])
        kh, vh = torch.cat(ks, 1), torch.cat(vs, 1)
        kw = dict(causal=True, window_size=(window - 1, 0), num_sink_tokens=sink)
        ref = attention_ref(q.double(), kh, vh, **kw)[0]
        pt = attention_ref(q, kh.half(), vh.half(), compute_dtype=None, **kw)[0]
        check_close(f"step {len(ks)}", out.float(), ref, pt.float())
    assert int(cache.position()[0]) > cache.capacity


# ------------------------------------------------------------------------------------------------
# bad input (the README table's rows: tests/error_cases.py)


def _call(q_dtype=torch.float16, cache_dtype=E4M3, v_cache_dtype=None, **kw):
    q = torch.zeros(2, 1, 4, 16, dtype=q_dtype)
    kc = torch.zeros(2, 8, 2, 16, dtype=cache_dtype)
    vc = torch.zeros(2, 8, 2, 16, dtype=v_cache_dtype or cache_dtype)
    before = (kc.clone(), vc.clone())
    with pytest.raises((ValueError, TypeError)) as err:
        flash_attn_with_kvcache(q, kc, vc, torch.ones(2, 1, 2, 16, dtype=q_dtype), torch.ones(2, 1, 2, 16, dtype=q_dtype),
                                cache_seqlens=3, **kw)
    assert torch.equal(kc.view(torch.uint8), before[0].view(torch.uint8)), "a failed call wrote to the cache"
    return str(err.value)


@pytest.mark.parametrize("kw,match", [
    (dict(k_descale=torch.ones(4)), r"k_descale must have shape \(1,\) \(per tensor\) or \(batch, nheads_k\)=\(2, 2\).*got \(4,\)"),
    (dict(v_descale=torch.ones(2, 4)), r"v_descale must have shape.*got \(2, 4\)"),
    (dict(k_descale=torch.ones(1, dtype=torch.float64)), r"k_descale must have dtype torch.float32.*\.float\(\)"),
    (dict(v_descale=0.5), r"v_descale must be a float32 tensor.*float"),
    (dict(k_descale=torch.ones(1, device="meta")), r"k_descale is on meta"),
    (dict(q_dtype=torch.float32), r"q has dtype torch.float32 but the cache is float8_e4m3fn.*bfloat16"),
    (dict(q_dtype=torch.bfloat16, v_cache_dtype=torch.bfloat16), r"k_cache is torch.float8_e4m3fn but v_cache is "
                                                                  r"torch.bfloat16: an FP8 cache has both"),
    (dict(cache_dtype=torch.float16, k_descale=torch.ones(1)), r"k_descale is given but the cache is torch.float16.*"
                                                               r"float8_e4m3fn"),
])
def test_errors_name_the_argument_and_the_fix(kw, match):
    msg = _call(**kw)
    assert re.search(match, msg), msg


def test_fp8_q_is_refused():
    q8 = torch.zeros(2, 1, 4, 16, dtype=E4M3)
    with pytest.raises(TypeError, match="q is float8_e4m3fn: flash_attn_with_kvcache takes bfloat16 or float16 q"):
        flash_attn_with_kvcache(q8, torch.zeros(2, 8, 2, 16, dtype=E4M3), torch.zeros(2, 8, 2, 16, dtype=E4M3),
                                cache_seqlens=3)


def test_dispatch_fp8_cache_needs_sm89_for_triton(monkeypatch):
    """CUDA bf16 q over an FP8 cache: the Triton kernel on sm_89+, the PyTorch path below; forcing Triton
    there names the fix."""
    import types

    import flashattn.kvcache as kvcache

    fake = types.SimpleNamespace(is_cuda=True, dtype=torch.bfloat16, device=torch.device("cuda", 0))
    monkeypatch.setattr(kvcache, "choose_backend", lambda q: "triton")
    monkeypatch.delenv("FLASHATTN_BACKEND", raising=False)
    monkeypatch.setattr(kvcache, "_fp8_capable", lambda device: True)
    assert kvcache._backend(fake, kv_fp8=True) == "triton"
    monkeypatch.setattr(kvcache, "_fp8_capable", lambda device: False)
    assert kvcache._backend(fake, kv_fp8=True) == "torch"
    assert kvcache._backend(fake, kv_fp8=False) == "triton"
    monkeypatch.setenv("FLASHATTN_BACKEND", "triton")
    with pytest.raises(ValueError, match="sm_89 or newer.*FLASHATTN_BACKEND=torch"):
        kvcache._backend(fake, kv_fp8=True)


# ------------------------------------------------------------------------------------------------
# GPU tier (pytest -m gpu)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_size", [None, 1, 16, 256])
@pytest.mark.parametrize("num_splits", [0, 1, 4])
@pytest.mark.parametrize("granularity", ["tensor", "head"])
def test_gpu_fp8_kvcache(dtype, page_size, num_splits, granularity, use_backend):
    use_backend("triton")
    g = torch.Generator().manual_seed(0)
    b, sq, h, hk, d, max_len = 3, 2, 8, 2, 128, 1000
    q = _rand(b, sq, h, d, dtype=dtype, device="cuda", g=g)
    k, v = _rand(b, sq, hk, d, dtype=dtype, device="cuda", g=g), _rand(b, sq, hk, d, dtype=dtype, device="cuda", g=g)
    seqlens = torch.tensor([max_len - sq, 1, 500], dtype=torch.int32, device="cuda")
    rows, table = (b, max_len), None
    if page_size is not None:
        per_seq = math.ceil(max_len / page_size)
        rows = (b * per_seq, page_size)
        table = torch.randperm(b * per_seq, generator=g).view(b, per_seq).to(torch.int32).cuda()
    k_cache, v_cache = (fp8.quantize_with(_rand(*rows, hk, d, dtype=torch.float32, device="cuda", g=g), 0.01)
                        for _ in range(2))
    kd, vd = _descales(granularity, b, hk, g, device="cuda")
    cos, sin = _tables(max_len, d)
    _check(q, k_cache, v_cache, k, v, seqlens=seqlens, block_table=table, rotary=(cos.cuda(), sin.cuda()),
           causal=True, num_splits=num_splits, k_descale=kd, v_descale=vd,
           name=f"gpu fp8 page{page_size} splits{num_splits} {granularity}")
