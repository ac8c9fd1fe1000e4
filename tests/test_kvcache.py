"""flash_attn_with_kvcache (contiguous and paged caches, in-place append, rotary, split-KV) and the caches.

The expected result is built the plain way: each sequence's keys are collected from the cache by
Python indexing (page by page), the new tokens appended, and attention_ref runs on that sequence.
Backends: the PyTorch path (gathered keys through the varlen forward), and the Triton kernel
(`backends/triton/decode.py`: under the interpreter on the CPU with fp16, on the GPU with the `gpu` mark).
FP8 caches (k_descale, v_descale in the options) are checked here too, by tests/test_fp8_kvcache.py: the
new tokens are quantized into the expected cache, and the reference attends to the dequantized rows.
"""
import math

import pytest
import torch

from flashattn import PagedKVCache, StreamingKVCache, flash_attn_func, flash_attn_with_kvcache, fp8
from flashattn.reference import attention_ref
from flashattn.rotary import apply_rotary_emb
from helpers import check_close

CPU_BACKENDS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton-interp")]


def _use(monkeypatch, backend):
    monkeypatch.setenv("FLASHATTN_BACKEND", backend)
    return torch.float16 if backend == "triton" else torch.float32


def _rand(*shape, dtype, device="cpu", g=None):
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def _tables(n, rotary_dim):
    inv = 10000.0 ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    ang = torch.outer(torch.arange(n, dtype=torch.float64), inv)
    return ang.cos().float(), ang.sin().float()


def _per_head(descale, b, hk):
    """A descale as (b, hk) float64 (None: 1)."""
    return torch.ones(b, hk, dtype=torch.float64) if descale is None else descale.double().cpu().expand(b, hk)


def _expected(q, k_cache, v_cache, k, v, seqlens, leftpad, pages, page_size, cos, sin, interleaved, causal,
              window, compute_dtype, **opts):
    """Per sequence: keys gathered row by row, new tokens rotated and appended; attention_ref.
    FP8 caches: the new tokens are quantized with k_descale[b, head] (fp8.quantize_with) into the cache,
    and the rows gathered are dequantized (x8 · descale, exact in float64; in q's dtype for compute_dtype None).
    Returns out (b, sq, h, d), lse (b, h, sq) and the caches as they must be afterwards."""
    kc, vc = k_cache.clone(), v_cache.clone()
    b, sq = q.shape[:2]
    s_new = 0 if k is None else k.shape[1]
    local = causal or tuple(window) != (-1, -1)
    kv_fp8 = k_cache.dtype == torch.float8_e4m3fn
    kd, vd = (_per_head(opts.get(n), b, k_cache.shape[2]) for n in ("k_descale", "v_descale"))
    outs, lses = [], []
    for i in range(b):
        n, pad = int(seqlens[i]), int(leftpad[i])
        qi = q[i:i + 1]
        if k is not None:
            ki, vi = k[i:i + 1], v[i:i + 1]
            if cos is not None:
                ki = apply_rotary_emb(ki, cos, sin, interleaved, seqlen_offsets=n)
                qi = (apply_rotary_emb(qi, cos, sin, interleaved, seqlen_offsets=n) if local else
                      apply_rotary_emb(qi, cos[n:n + 1].expand(sq, -1), sin[n:n + 1].expand(sq, -1), interleaved))
            if kv_fp8:
                ki = fp8.quantize_with(ki, kd[i, :, None].float().to(ki.device))
                vi = fp8.quantize_with(vi, vd[i, :, None].float().to(vi.device))
            for t in range(s_new):
                row = n + t
                kc[pages[i][row // page_size], row % page_size] = ki[0, t]
                vc[pages[i][row // page_size], row % page_size] = vi[0, t]
        rows = range(pad, n + s_new)
        keys = torch.stack([kc[pages[i][r // page_size], r % page_size] for r in rows]) if rows else kc[0, :0]
        vals = torch.stack([vc[pages[i][r // page_size], r % page_size] for r in rows]) if rows else vc[0, :0]
        if kv_fp8:
            dt = torch.float64 if compute_dtype is not None else q.dtype
            keys = (keys.double() * kd[i, :, None].to(keys.device)).to(dt)
            vals = (vals.double() * vd[i, :, None].to(vals.device)).to(dt)
        alibi = opts.get("alibi_slopes")
        o, l = attention_ref(qi, keys[None], vals[None], causal=causal, window_size=window,
                             softcap=opts.get("softcap", 0.0), num_sink_tokens=opts.get("num_sink_tokens", 0),
                             alibi_slopes=None if alibi is None else (alibi[i] if alibi.dim() == 2 else alibi),
                             compute_dtype=compute_dtype)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs), torch.cat(lses), kc, vc


def _check(q, k_cache, v_cache, k=None, v=None, *, seqlens, leftpad=None, batch_idx=None, block_table=None,
           rotary=None, interleaved=True, causal=False, window=(-1, -1), name="", **opts):
    """Run flash_attn_with_kvcache on copies of the caches and compare out, lse and the caches."""
    b = q.shape[0]
    leftpad_t = torch.zeros(b, dtype=torch.int32) if leftpad is None else leftpad
    if block_table is not None:
        pages, page_size = block_table.tolist(), k_cache.shape[1]
    else:
        rows = list(range(b)) if batch_idx is None else batch_idx.tolist()
        pages, page_size = [[r] for r in rows], k_cache.shape[1]
    cos, sin = rotary if rotary is not None else (None, None)
    kc, vc = k_cache.clone(), v_cache.clone()
    out, lse = flash_attn_with_kvcache(q, kc, vc, k, v, cos, sin, cache_seqlens=seqlens, cache_batch_idx=batch_idx,
                                       cache_leftpad=leftpad, block_table=block_table, causal=causal,
                                       window_size=window, rotary_interleaved=interleaved, return_softmax_lse=True,
                                       **opts)
    args = (q, k_cache, v_cache, k, v, seqlens, leftpad_t, pages, page_size, cos, sin, interleaved, causal, window)
    ref_o, ref_l, ref_kc, ref_vc = _expected(*args, torch.float64, **opts)
    pt_o, pt_l, _, _ = _expected(*args, None, **opts)
    check_close(f"{name} out", out.float(), ref_o, pt_o.float())
    check_close(f"{name} lse", lse.float(), ref_l, pt_l.float())
    assert _same_bytes(kc, ref_kc) and _same_bytes(vc, ref_vc), f"{name}: the cache was not updated as expected"
    return out, lse, kc, vc


def _same_bytes(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


CASES = {
    # name: (batch, seqlen_q, seqlen_new, nheads, nheads_k, headdim, cache_len, options)
    "decode": (3, 1, 1, 4, 2, 32, 40, dict(causal=True)),
    "decode-mqa-noncausal": (2, 1, 1, 4, 1, 16, 33, dict()),
    "no-append": (2, 1, 0, 2, 2, 16, 30, dict(causal=True)),
    "chunked-prefill": (2, 5, 5, 4, 2, 16, 37, dict(causal=True)),
    "window": (2, 3, 3, 2, 1, 16, 45, dict(causal=True, window=(7, 0))),
    "sinks": (2, 2, 2, 2, 2, 16, 45, dict(causal=True, window=(6, 0), num_sink_tokens=3)),
    "softcap-alibi": (2, 2, 2, 4, 2, 16, 30, dict(causal=True, softcap=5.0, alibi=True)),
}


def _case(name, dtype, g):
    b, sq, s_new, h, hk, d, cap, opts = CASES[name]
    opts = dict(opts)
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = torch.rand(b, h, generator=g) * 0.3
    q = _rand(b, sq, h, d, dtype=dtype, g=g)
    k_cache, v_cache = _rand(b + 1, cap, hk, d, dtype=dtype, g=g), _rand(b + 1, cap, hk, d, dtype=dtype, g=g)
    kv = (_rand(b, s_new, hk, d, dtype=dtype, g=g), _rand(b, s_new, hk, d, dtype=dtype, g=g)) if s_new else (None, None)
    seqlens = torch.randint(0, cap - s_new + 1, (b,), generator=g, dtype=torch.int32)
    seqlens[0] = cap - s_new     # one sequence fills the cache to its last row
    return q, k_cache, v_cache, kv, seqlens, opts


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_contiguous_cache(name, backend, monkeypatch):
    dtype = _use(monkeypatch, backend)
    g = torch.Generator().manual_seed(hash(name) % 1000)
    q, k_cache, v_cache, (k, v), seqlens, opts = _case(name, dtype, g)
    _check(q, k_cache, v_cache, k, v, seqlens=seqlens, name=name, **opts)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batch_idx_and_leftpad(backend, monkeypatch):
    dtype = _use(monkeypatch, backend)
    g = torch.Generator().manual_seed(1)
    q = _rand(3, 2, 4, 16, dtype=dtype, g=g)
    k_cache, v_cache = _rand(5, 30, 2, 16, dtype=dtype, g=g), _rand(5, 30, 2, 16, dtype=dtype, g=g)
    k, v = _rand(3, 2, 2, 16, dtype=dtype, g=g), _rand(3, 2, 2, 16, dtype=dtype, g=g)
    _check(q, k_cache, v_cache, k, v, seqlens=torch.tensor([20, 7, 28], dtype=torch.int32),
           leftpad=torch.tensor([5, 0, 28], dtype=torch.int32), batch_idx=torch.tensor([4, 0, 2], dtype=torch.int32),
           causal=True, name="batch_idx+leftpad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_paged_cache(page_size, backend, monkeypatch):
    dtype = _use(monkeypatch, backend)
    g = torch.Generator().manual_seed(page_size)
    b, sq, h, hk, d, max_len = 3, 4, 4, 2, 16, 37
    per_seq = math.ceil(max_len / page_size)
    num_pages = b * per_seq + 3
    table = torch.randperm(num_pages, generator=g)[:b * per_seq].view(b, per_seq).to(torch.int32)
    k_cache, v_cache = (_rand(num_pages, page_size, hk, d, dtype=dtype, g=g) for _ in range(2))
    q = _rand(b, sq, h, d, dtype=dtype, g=g)
    k, v = _rand(b, sq, hk, d, dtype=dtype, g=g), _rand(b, sq, hk, d, dtype=dtype, g=g)
    seqlens = torch.tensor([max_len - sq, 0, 11], dtype=torch.int32)
    _check(q, k_cache, v_cache, k, v, seqlens=seqlens, block_table=table, causal=True, name=f"paged{page_size}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [True, False])
def test_rotary(interleaved, causal, backend, monkeypatch):
    dtype = _use(monkeypatch, backend)
    g = torch.Generator().manual_seed(7)
    q = _rand(2, 3, 2, 32, dtype=dtype, g=g)
    k_cache, v_cache = _rand(2, 24, 2, 32, dtype=dtype, g=g), _rand(2, 24, 2, 32, dtype=dtype, g=g)
    k, v = _rand(2, 3, 2, 32, dtype=dtype, g=g), _rand(2, 3, 2, 32, dtype=dtype, g=g)
    cos, sin = _tables(24, 16)          # rotary_dim 16 < headdim 32: the last channels stay as they are
    _check(q, k_cache, v_cache, k, v, seqlens=torch.tensor([9, 21], dtype=torch.int32), rotary=(cos, sin),
           interleaved=interleaved, causal=causal, name="rotary")


@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_split_kv_triton(num_splits, monkeypatch):
    """The kernel's key splits merged by flash_attn_combine equal one pass (and the reference)."""
    dtype = _use(monkeypatch, "triton")
    g = torch.Generator().manual_seed(3)
    q = _rand(2, 1, 4, 16, dtype=dtype, g=g)
    k_cache, v_cache = _rand(2, 70, 1, 16, dtype=dtype, g=g), _rand(2, 70, 1, 16, dtype=dtype, g=g)
    _check(q, k_cache, v_cache, seqlens=torch.tensor([70, 9], dtype=torch.int32), num_splits=num_splits,
           name=f"splits{num_splits}")
    _check(q, k_cache, v_cache, seqlens=torch.tensor([70, 40], dtype=torch.int32), num_splits=num_splits,
           window=(20, 0), causal=True, num_sink_tokens=2, name=f"splits{num_splits}-sinks")


def test_matches_flash_attn_func_on_full_cache():
    """With the whole cache in use and no new tokens, it is plain attention over the cache."""
    g = torch.Generator().manual_seed(5)
    q, k_cache, v_cache = _rand(2, 6, 4, 16, dtype=torch.float32, g=g), *(
        _rand(2, 20, 2, 16, dtype=torch.float32, g=g) for _ in range(2))
    out = flash_attn_with_kvcache(q, k_cache, v_cache, causal=True)
    torch.testing.assert_close(out, flash_attn_func(q, k_cache, v_cache, causal=True))


# ------------------------------------------------------------------------------------------------
# bad input: a clear error, and the cache unchanged


def _bad_call(**kw):
    g = torch.Generator().manual_seed(0)
    q = _rand(2, 1, 2, 16, dtype=torch.float32, g=g)
    k_cache, v_cache = _rand(4, 8, 2, 16, dtype=torch.float32, g=g), _rand(4, 8, 2, 16, dtype=torch.float32, g=g)
    k, v = _rand(2, 2, 2, 16, dtype=torch.float32, g=g), _rand(2, 2, 2, 16, dtype=torch.float32, g=g)
    args = dict(k=k, v=v, cache_seqlens=torch.tensor([3, 4], dtype=torch.int32))
    args.update(kw)
    before = (k_cache.clone(), v_cache.clone())
    with pytest.raises((ValueError, TypeError)) as err:
        flash_attn_with_kvcache(q, k_cache, v_cache, **args)
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1]), "a failed call wrote to the cache"
    return str(err.value)


@pytest.mark.parametrize("kw,match", [
    (dict(cache_seqlens=torch.tensor([7, 0], dtype=torch.int32)), "holds 8"),
    (dict(cache_seqlens=torch.tensor([-1, 0], dtype=torch.int32)), "cache_leftpad <= cache_seqlens"),
    (dict(cache_seqlens=torch.tensor([1.0, 2.0])), "cache_seqlens must be an int32 tensor"),
    (dict(block_table=torch.tensor([[0, 1], [2, 9]], dtype=torch.int32),
          cache_seqlens=torch.tensor([3, 7], dtype=torch.int32)), "names page 9"),
    (dict(block_table=torch.tensor([[0, 1]], dtype=torch.int32)), "block_table must be an int32 tensor of shape"),
    (dict(block_table=torch.tensor([[0, 1], [2, 3]], dtype=torch.int32),
          cache_batch_idx=torch.tensor([0, 1], dtype=torch.int32)), "cache_batch_idx is for contiguous caches"),
    (dict(cache_batch_idx=torch.tensor([1, 1], dtype=torch.int32)), "names a cache row twice"),
    (dict(cache_batch_idx=torch.tensor([0, 4], dtype=torch.int32)), "rows of the cache"),
    (dict(v=None), "both k and v"),
    (dict(k=torch.zeros(2, 2, 1, 16)), "k and v must have shape"),
    (dict(rotary_cos=torch.zeros(4, 8), rotary_sin=torch.zeros(4, 8)), "rotary tables cover positions 0..3"),
    (dict(cache_leftpad=torch.tensor([4, 0], dtype=torch.int32)), "cache_leftpad <= cache_seqlens"),
    (dict(window_size=(-2, 0)), "window_size"),
])
def test_errors_leave_cache_unchanged(kw, match):
    assert match in _bad_call(**kw)


def test_page_size_mismatch_is_an_error():
    q = torch.randn(1, 1, 2, 16)
    with pytest.raises(ValueError, match="one shape"):
        flash_attn_with_kvcache(q, torch.randn(4, 16, 2, 16), torch.randn(4, 8, 2, 16),
                                block_table=torch.zeros(1, 1, dtype=torch.int32), cache_seqlens=1)


# ------------------------------------------------------------------------------------------------
# caches


def test_paged_kv_cache_decodes_like_full_attention():
    """Sequences of different lengths, prefilled one by one, then decoded together step by step through
    a PagedKVCache with 4-token pages; each step's output equals causal attention over the history."""
    g = torch.Generator().manual_seed(11)
    h, hk, d, layers = 4, 2, 16, 2
    cache = PagedKVCache(num_pages=40, page_size=4, nheads_k=hk, headdim=d, num_layers=layers, dtype=torch.float32)
    lengths = [5, 1, 9]
    ids = [cache.add_sequence() for _ in lengths]
    hist = {(s, l): ([], []) for s in ids for l in range(layers)}
    for s, n in zip(ids, lengths):   # prefill, one sequence at a time
        table, seqlens = cache.reserve([s], n)
        for layer in range(layers):
            q, k, v = (_rand(1, n, hk if i else h, d, dtype=torch.float32, g=g) for i in range(3))
            out = flash_attn_with_kvcache(q, cache.k[layer], cache.v[layer], k, v, cache_seqlens=seqlens,
                                          block_table=table, causal=True)
            torch.testing.assert_close(out, flash_attn_func(q, k, v, causal=True))
            hist[s, layer][0].append(k[0])
            hist[s, layer][1].append(v[0])
        cache.commit([s], n)
    for step in range(6):           # batched decode
        table, seqlens = cache.reserve(ids, 1)
        for layer in range(layers):
            q = _rand(len(ids), 1, h, d, dtype=torch.float32, g=g)
            k, v = _rand(len(ids), 1, hk, d, dtype=torch.float32, g=g), _rand(len(ids), 1, hk, d, dtype=torch.float32, g=g)
            out = flash_attn_with_kvcache(q, cache.k[layer], cache.v[layer], k, v, cache_seqlens=seqlens,
                                          block_table=table, causal=True)
            for i, s in enumerate(ids):
                hist[s, layer][0].append(k[i])
                hist[s, layer][1].append(v[i])
                ks, vs = torch.cat(hist[s, layer][0]), torch.cat(hist[s, layer][1])
                torch.testing.assert_close(out[i:i + 1], flash_attn_func(q[i:i + 1], ks[None], vs[None], causal=True))
        cache.commit(ids, 1)
    assert [cache.length(s) for s in ids] == [n + 6 for n in lengths]
    used = sum(math.ceil((n + 6) / 4) for n in lengths)
    assert cache.free_pages == 40 - used
    cache.free(ids[1])
    assert cache.free_pages == 40 - used + math.ceil((lengths[1] + 6) / 4)


def test_paged_kv_cache_out_of_pages_takes_nothing():
    cache = PagedKVCache(num_pages=3, page_size=2, nheads_k=1, headdim=8, dtype=torch.float32)
    a, b = cache.add_sequence(), cache.add_sequence()
    cache.reserve([a], 3)
    cache.commit([a], 3)
    with pytest.raises(RuntimeError, match="needs 2 more pages but has 1 free"):
        cache.reserve([a, b], 2)
    assert cache.free_pages == 1
    with pytest.raises(KeyError, match="not in this cache"):
        cache.reserve([99], 1)
    with pytest.raises(ValueError, match="call reserve"):
        cache.commit([b], 1)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_streaming_cache_equals_sink_window_attention(backend, monkeypatch):
    """Generation far past the buffer (which holds sinks + window − 1 + max_new rows) gives, at every step,
    attention over the whole history with the sink + window mask, with keys at their true positions."""
    dtype = _use(monkeypatch, backend)
    g = torch.Generator().manual_seed(2)
    sink, window, max_new, h, hk, d = 2, 6, 3, 2, 1, 16
    cache = StreamingKVCache(batch=2, num_sink=sink, window=window, nheads_k=hk, headdim=d, max_new=max_new,
                             dtype=dtype)
    cos, sin = _tables(200, d)
    qs, ks, vs = [], [], []
    steps = [3, 1, 2, 3] + [1] * 12 + [3, 2]
    for n in steps:
        seqlens = cache.prepare(n)
        pos = cache.position()
        q, k, v = _rand(2, n, h, d, dtype=dtype, g=g), _rand(2, n, hk, d, dtype=dtype, g=g), _rand(2, n, hk, d, dtype=dtype, g=g)
        q = apply_rotary_emb(q, cos, sin, seqlen_offsets=pos)
        k = apply_rotary_emb(k, cos, sin, seqlen_offsets=pos)
        out = cache.attend(0, q, k, v, seqlens)
        cache.commit(n)
        qs.append(q), ks.append(k), vs.append(v)
        kh, vh = torch.cat(ks, 1), torch.cat(vs, 1)
        kw = dict(causal=True, window_size=(window - 1, 0), num_sink_tokens=sink)
        ref, _ = attention_ref(q, kh, vh, **kw)
        pt, _ = attention_ref(q, kh, vh, compute_dtype=None, **kw)
        check_close(f"step {len(qs)}", out.float(), ref, pt.float())
    assert int(cache.position()[0]) == sum(steps) > cache.capacity
    with pytest.raises(ValueError, match="max_new"):
        cache.prepare(max_new + 1)


# ------------------------------------------------------------------------------------------------
# GPU tier


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_size", [None, 1, 16, 256])
@pytest.mark.parametrize("num_splits", [0, 1, 4])
def test_gpu_kvcache(dtype, page_size, num_splits):
    g = torch.Generator().manual_seed(0)
    b, sq, h, hk, d, max_len = 3, 2, 8, 2, 128, 1000
    q = _rand(b, sq, h, d, dtype=dtype, device="cuda", g=g)
    k, v = _rand(b, sq, hk, d, dtype=dtype, device="cuda", g=g), _rand(b, sq, hk, d, dtype=dtype, device="cuda", g=g)
    seqlens = torch.tensor([max_len - sq, 1, 500], dtype=torch.int32, device="cuda")
    if page_size is None:
        k_cache, v_cache = (_rand(b, max_len, hk, d, dtype=dtype, device="cuda", g=g) for _ in range(2))
        table = None
    else:
        per_seq = math.ceil(max_len / page_size)
        k_cache, v_cache = (_rand(b * per_seq, page_size, hk, d, dtype=dtype, device="cuda", g=g) for _ in range(2))
        table = torch.randperm(b * per_seq, generator=g).view(b, per_seq).to(torch.int32).cuda()
    cos, sin = _tables(max_len, d)
    _check(q, k_cache, v_cache, k, v, seqlens=seqlens, block_table=table, rotary=(cos.cuda(), sin.cuda()),
           causal=True, num_splits=num_splits, name=f"gpu page{page_size} splits{num_splits}")
