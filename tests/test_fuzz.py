"""Differential fuzzing: hypothesis draws a problem (shapes, options, dtype, and the batch's layout: dense,
packed varlen, or a KV cache, contiguous or paged, split or not), runs it on one backend and compares out,
lse and the gradients (dq, dk, dv; forward only for KV caches, whose cache contents are checked too) with
the float64 reference under design.md's rule.

Examples per run ('ci' profile; HYPOTHESIS_PROFILE=slow multiplies the CPU counts by 10):

    backend                                    examples  dtypes                  sizes
    torch path (80%) / reference backend (20%)  400      fp32, fp64, fp16, bf16  seqlens 0..300, hdim 8..256, tiles drawn
    Triton kernels under the interpreter         80      fp16                    seqlens 0..40, hdim 8..64, tiles 16/32,
                                                                                 pointer or descriptor (TMA) loads
      + the warp-specialized loops            40 + 20    fp16                    seqlen_k 128/256, hdim 16/32, WS configs,
                                                                                 seqlen_q whole tiles / anywhere
      + every mask diagonal on every tile edge  120 calls (test_mask_edges_triton_interpreter, not random)
    Triton on the GPU, -m "gpu and not slow"    300      bf16, fp16              seqlens 0..300 (1 in 8 up to 2000),
    Triton on the GPU, -m "gpu and slow"      10000      bf16, fp16              hdim 8..256, tile configs drawn
                                                          (FLASHATTN_FUZZ_EXAMPLES=n changes the 10000,
                                                          FLASHATTN_FUZZ_GPU_EXAMPLES=n the 300)
      + the warp-specialized loops              100      bf16, fp16              seqlen_k 128..2048, hdim 64/128,
                                                          (a third of FLASHATTN_FUZZ_GPU_EXAMPLES) WS configs

Seqlens favour tile boundaries (ragged tails) and, half the time, put the causal diagonal within 2 keys of
a multiple of 16. The CPU tests are derandomized in the 'ci' profile (the same examples on every run: a CI
failure is a code change, never a new draw); the 'slow' profile and the GPU tests draw fresh examples each
run. A failure found is kept in REGRESSIONS (run by test_fuzz_regression under a readable id): paste the
`Falsifying example` dict hypothesis prints there.
"""
from __future__ import annotations

import math
import os
from contextlib import ExitStack
from unittest import mock

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

from flashattn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from flashattn.backends import torch_tiled
from helpers import check_close, make_qkv, reference_results, run_and_compare

ON_GPU = torch.cuda.is_available()
INTERPRETER = not ON_GPU and os.environ.get("TRITON_INTERPRET") == "1"
FACTOR = max(1, settings.default.max_examples // 100)   # 'ci' profile: 100 -> 1; 'slow': 1000 -> 10
SLOW_PROFILE = FACTOR > 1
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


# ------------------------------------------------------------------------------------------------
# the problems


class Space:
    """What a backend's fuzzing draws from."""

    def __init__(self, backends, dtypes, max_seqlen, headdims, max_heads_k, groups, budget, tiles, long_seqlen=0,
                 loads=("pointers",)):
        self.backends, self.dtypes, self.max_seqlen, self.headdims = backends, dtypes, max_seqlen, headdims
        self.max_heads_k, self.groups, self.budget, self.tiles, self.long_seqlen = (max_heads_k, groups, budget,
                                                                                    tiles, long_seqlen)
        self.loads = loads   # the Triton kernels' ways to read tiles to ask for (see LOADS)


# budget: the largest batch · nheads · seqlen_q · seqlen_k · headdim per example (keeps the CI time bounded:
# long sequences come with few heads and small head dims, many heads with short sequences)
TORCH_SPACE = Space(["torch"] * 4 + ["reference"], ["float32", "float64", "float16", "bfloat16"], 300,
                    [8, 12, 16, 24, 32, 40, 59, 64, 72, 96, 111, 128, 160, 192, 256], 3, [1, 2, 3, 4],
                    budget=1e8 * FACTOR, tiles=([16, 32, 64, 256], [7, 16, 33, 64, 512]))
INTERP_SPACE = Space(["triton"], ["float16"], 40, [8, 16, 24, 40, 64], 2, [1, 2, 3],
                     budget=1.5e5, tiles=([16, 32], [16, 32]), loads=("pointers", "tma"))
GPU_SPACE = Space(["triton"], ["bfloat16", "float16"], 300, [8, 16, 32, 40, 59, 64, 96, 111, 128, 192, 256], 4,
                  [1, 2, 3, 4, 8], budget=2e9, tiles=None, long_seqlen=2000)
# The warp-specialized loops run only on whole 128-key tiles (backward: whole 128-row query tiles; dK/dV: no GQA)
# without score options (backends/triton._tma_level), which the spaces above seldom draw: these draw seqlens in
# multiples of 128 (queries also anywhere below the keys), causal / right windows / none, and ask for them.
WS_INTERP_SPACE = Space(["triton"], ["float16"], 256, [16, 32], 2, [1, 1, 2], budget=2e6, tiles=([16, 32], [16, 32]),
                        loads=("ws",))
WS_GPU_SPACE = Space(["triton"], ["bfloat16", "float16"], 2048, [64, 128, 128], 4, [1, 1, 2], budget=2e10,
                     tiles=None, loads=("ws",))
# load path -> the flags asked of every kernel's config (the launcher drops what a call does not allow)
LOADS = {"pointers": {}, "tma": {"TMA": True}, "ws": {"TMA": True, "WS": True}}

BOUNDARIES = [0, 1, 2, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 299, 300]


def _seqlen(draw, hi):
    """0..hi, often right at or next to a tile boundary (ragged tails)."""
    near = [s for s in BOUNDARIES if s <= hi]
    return draw(st.one_of(st.integers(0, hi), st.sampled_from(near), st.integers(hi // 2, hi)))


def _seqlen_k(draw, seqlen_q, hi):
    """Independent of seqlen_q, or (half the time) such that the causal diagonal's offset seqlen_k − seqlen_q
    sits within 2 of a multiple of 16, where every tile size is: masks' off-by-ones live at tile edges."""
    if draw(st.booleans()):
        return _seqlen(draw, hi)
    n = seqlen_q + 16 * draw(st.integers(-2, 2)) + draw(st.integers(-2, 2))
    return min(max(n, 0), hi)


window_side = st.one_of(st.just(-1), st.integers(0, 8), st.integers(0, 200))


@st.composite
def problems(draw, space: Space):
    layout = draw(st.sampled_from(["dense"] * 5 + ["varlen"] * 3 + ["kvcache"] * 2))
    batch = draw(st.integers(1, 3 if layout == "dense" else 4))
    nheads_k = draw(st.integers(1, space.max_heads_k))
    group = draw(st.sampled_from(space.groups))
    headdim = draw(st.sampled_from(space.headdims))
    h = nheads_k * group
    # the longest sequence the budget allows for these heads (at least 16)
    longest = space.max_seqlen
    if space.long_seqlen and draw(st.integers(0, 7)) == 0:
        longest = space.long_seqlen
    longest = max(16, min(longest, int(math.sqrt(space.budget / (batch * h * headdim)))))
    p = dict(layout=layout, batch=batch, nheads_k=nheads_k, group=group, headdim=headdim,
             dtype=draw(st.sampled_from(space.dtypes)), backend=draw(st.sampled_from(space.backends)),
             causal=draw(st.booleans()), window=(draw(window_side), draw(window_side)),
             softcap=draw(st.sampled_from([0.0, 0.0, 2.0, 30.0])),
             alibi=draw(st.sampled_from(["none", "none", "heads", "batch"])),
             scale=draw(st.sampled_from([None, None, 0.05, 0.5, 1.5])),
             seed=draw(st.integers(0, 2**31 - 1)))
    if layout == "dense":
        p["lens_q"] = [_seqlen(draw, longest)] * batch
        p["lens_k"] = [_seqlen_k(draw, p["lens_q"][0], longest)] * batch
    elif layout == "varlen":
        p["lens_q"] = [_seqlen(draw, longest) for _ in range(batch)]
        p["lens_k"] = [_seqlen_k(draw, n, longest) for n in p["lens_q"]]
        p["extra_rows"] = draw(st.integers(0, 3))          # rows past cu_seqlens[-1]
        p["max_slack"] = draw(st.sampled_from([0, 0, 5]))  # max_seqlen may exceed the longest sequence
    else:   # kvcache: lens_k are the cache rows in use before appending s_new tokens; lens_q = seqlen_q
        s_new = draw(st.sampled_from([0, 1, 1, 2, 5]))
        p["s_new"] = s_new
        p["lens_q"] = [draw(st.sampled_from([1, 1, 2, 3, 8, max(1, s_new)]))] * batch
        p["lens_k"] = [_seqlen(draw, longest) for _ in range(batch)]
        p["page_size"] = draw(st.sampled_from([0, 0, 1, 3, 16, 64]))   # 0: contiguous cache
        p["leftpad"] = draw(st.booleans())
        p["cache_batch_idx"] = p["page_size"] == 0 and draw(st.booleans())
        p["num_splits"] = draw(st.sampled_from([0, 1, 3]))   # split-KV programs in the kernel (0: automatic)
    _tiles(draw, space, p)
    return p


def _tiles(draw, space: Space, p) -> None:
    """The tiles (interpreter) or tile config (GPU) of problem p, and the load path asked for."""
    if space.tiles is not None:
        p["tiles"] = (draw(st.sampled_from(space.tiles[0])), draw(st.sampled_from(space.tiles[1])))
    else:
        p["tile_config"] = draw(st.integers(-1, 7))   # GPU: -1 the default config, else a candidate (modulo)
    p["load"] = draw(st.sampled_from(space.loads))
    p["lpt"] = draw(st.booleans())   # the forward's and dQ's query blocks last first (kernels._query_tile)


@st.composite
def ws_problems(draw, space: Space, whole_q: bool):
    """Dense problems the warp-specialized loops accept (mostly): seqlen_k a multiple of 128, seqlen_q one too
    (whole_q: the backward's loops need whole query tiles) or anywhere up to seqlen_k (the forward's loop takes
    partial ones), causal, a right window or none; 1 in 8 with softcap or a left window, which must fall back
    to the other loops."""
    batch, nheads_k = draw(st.integers(1, 2)), draw(st.integers(1, space.max_heads_k))
    group, headdim = draw(st.sampled_from(space.groups)), draw(st.sampled_from(space.headdims))
    sk = 128 * draw(st.integers(1, space.max_seqlen // 128))
    sq = draw(st.sampled_from([128 * i for i in range(1, sk // 128 + 1)]) if whole_q else st.integers(1, sk))
    mask = draw(st.sampled_from(["none", "causal", "causal", "right"]))
    odd = draw(st.integers(0, 7)) == 0
    p = dict(layout="dense", batch=batch, nheads_k=nheads_k, group=group, headdim=headdim,
             dtype=draw(st.sampled_from(space.dtypes)), backend="triton", causal=mask == "causal",
             window=(draw(st.integers(0, 200)) if odd else -1, draw(st.integers(0, 200)) if mask == "right" else -1),
             softcap=draw(st.sampled_from([0.0, 30.0])) if odd else 0.0, alibi="none",
             scale=draw(st.sampled_from([None, None, 0.05, 1.5])), seed=draw(st.integers(0, 2**31 - 1)),
             lens_q=[sq] * batch, lens_k=[sk] * batch)
    _tiles(draw, space, p)
    return p


def problem_id(p) -> str:
    """A readable id: layout, batch, seqlens, heads, head dim, dtype, backend and the options in use."""
    opts = [p["layout"], f"b{p['batch']}", f"q{'-'.join(map(str, sorted(set(p['lens_q']))))}",
            f"k{'-'.join(map(str, p['lens_k'][:4]))}", f"h{p['nheads_k'] * p['group']}/{p['nheads_k']}",
            f"d{p['headdim']}", p["dtype"], p["backend"]]
    if p["causal"]:
        opts.append("causal")
    if tuple(p["window"]) != (-1, -1):
        opts.append(f"w{p['window'][0]}/{p['window'][1]}")
    if p["softcap"]:
        opts.append(f"cap{p['softcap']:g}")
    if p["alibi"] != "none":
        opts.append(f"alibi-{p['alibi']}")
    if p["scale"] is not None:
        opts.append(f"scale{p['scale']:g}")
    if p["layout"] == "kvcache":
        opts.append(f"new{p['s_new']}-page{p['page_size']}-splits{p.get('num_splits', 0)}")
    if p.get("load", "pointers") != "pointers":
        opts.append(p["load"])
    if p.get("lpt"):
        opts.append("lpt")
    return "-".join(opts)


# ------------------------------------------------------------------------------------------------
# running one problem


def _slopes(p, device):
    h, g = p["nheads_k"] * p["group"], torch.Generator().manual_seed(p["seed"] + 7)
    shape = {"none": None, "heads": (h,), "batch": (p["batch"], h)}[p["alibi"]]
    return None if shape is None else (torch.rand(*shape, generator=g) * 0.5).to(device)


def _env(stack: ExitStack, p, device):
    """The backend and tile sizes of problem p, for the duration of the stack."""
    stack.enter_context(mock.patch.dict(os.environ, {"FLASHATTN_BACKEND": p["backend"], "FLASHATTN_AUTOTUNE": "0"}))
    if "tiles" in p and p["backend"] == "torch":
        stack.enter_context(mock.patch.object(torch_tiled, "BLOCK_Q", p["tiles"][0]))
        stack.enter_context(mock.patch.object(torch_tiled, "BLOCK_K", p["tiles"][1]))
    if p["backend"] == "triton":
        from flashattn.backends import triton as tb
        flags = LOADS[p.get("load", "pointers")]
        if "tiles" in p:        # the interpreter: any tile sizes (warps and stages mean nothing there)
            bm, bn = p["tiles"]
            cfg = {name: dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=4, num_stages=1, **flags) for name in ("fwd", "dkdv", "dq")}
        elif p.get("tile_config", -1) >= 0:   # the GPU: one of the autotuning candidates for this head dim
            bd = max(16, 1 << (p["headdim"] - 1).bit_length())
            cfg = {}
            for name in ("fwd", "dkdv", "dq"):
                # the candidates of a launch that allows everything, or (ws) the warp-specialized ones
                cands = tb._KEEP[name](tb._CONFIGS[name], {"tma_ok": 2}, BLOCK_D=bd)
                if flags.get("WS"):
                    cands = [c for c in cands if c.kwargs.get("WS")] or cands
                c = cands[p["tile_config"] % len(cands)]
                cfg[name] = dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages)
        else:
            cfg = {}
        for name in ("fwd", "dq"):
            if name in cfg and p.get("lpt"):
                cfg[name]["LPT"] = True
        stack.enter_context(mock.patch.dict(tb.pinned_configs, cfg, clear=True))


def check_problem(p, device="cpu"):
    note(f"{problem_id(p)}\n{p!r}")
    dtype = DTYPES[p["dtype"]]
    with ExitStack() as stack:
        _env(stack, p, device)
        {"dense": _check_dense, "varlen": _check_varlen, "kvcache": _check_kvcache}[p["layout"]](p, dtype, device)


def _check_dense(p, dtype, device):
    b, h, hk, d = p["batch"], p["nheads_k"] * p["group"], p["nheads_k"], p["headdim"]
    q, k, v = make_qkv(b, p["lens_q"][0], p["lens_k"][0], h, hk, d, dtype, device=device, seed=p["seed"])
    run_and_compare(flash_attn_func, q, k, v, causal=p["causal"], window_size=tuple(p["window"]),
                    softmax_scale=p["scale"], softcap=p["softcap"], alibi_slopes=_slopes(p, device), seed=p["seed"],
                    name=problem_id(p))


def _cu(lens, device):
    return torch.tensor([0] + torch.tensor(lens, dtype=torch.int64).cumsum(0).tolist(), dtype=torch.int32,
                        device=device)


def _check_varlen(p, dtype, device):
    """Each sequence of the packed batch against the reference on that sequence alone; rows and keys past
    cu_seqlens[-1] must be 0 (lse -inf) with zero gradients."""
    lens_q, lens_k, extra = p["lens_q"], p["lens_k"], p["extra_rows"]
    h, hk, d, tag = p["nheads_k"] * p["group"], p["nheads_k"], p["headdim"], problem_id(p)
    g = torch.Generator().manual_seed(p["seed"])

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    q, k, v = rand(sum(lens_q) + extra, h, d), rand(sum(lens_k) + extra, hk, d), rand(sum(lens_k) + extra, hk, d)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    slopes = _slopes(p, device)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q) + p["max_slack"],
                                         max(lens_k) + p["max_slack"], softmax_scale=p["scale"], causal=p["causal"],
                                         window_size=tuple(p["window"]), softcap=p["softcap"], alibi_slopes=slopes,
                                         return_attn_probs=True)
    assert out.shape == q.shape and out.dtype == dtype and tuple(lse.shape) == (h, q.shape[0]), tag
    dout = torch.randn(out.shape, generator=g).to(device=device, dtype=dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout) if out.requires_grad else (
        torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
    if extra:
        assert (out[-extra:] == 0).all() and torch.isneginf(lse[:, -extra:]).all(), f"{tag}: rows past the end"
        assert (dq[-extra:] == 0).all() and (dk[-extra:] == 0).all() and (dv[-extra:] == 0).all(), \
            f"{tag}: gradients past the end"
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(lens_q)):
        q0, q1, k0, k1 = cq[i], cq[i + 1], ck[i], ck[i + 1]
        one = (q[None, q0:q1], k[None, k0:k1], v[None, k0:k1])
        opts = dict(causal=p["causal"], window_size=tuple(p["window"]), softmax_scale=p["scale"],
                    softcap=p["softcap"], alibi_slopes=None if slopes is None else
                    (slopes[i:i + 1] if slopes.dim() == 2 else slopes), dout=dout[None, q0:q1])
        ref, pt = reference_results(*one, **opts), reference_results(*one, **opts, compute_dtype=None)
        scale = max((ref[n].abs().max().item() for n in ("dq", "dk", "dv") if ref[n].numel()), default=None)
        name = f"{tag} seq {i}"
        check_close(f"{name} out", out[None, q0:q1], ref["out"], pt["out"])
        check_close(f"{name} lse", lse[None, :, q0:q1], ref["lse"], pt["lse"], dtype=dtype)
        check_close(f"{name} dq", dq[None, q0:q1], ref["dq"], pt["dq"], scale=scale)
        check_close(f"{name} dk", dk[None, k0:k1], ref["dk"], pt["dk"], scale=scale)
        check_close(f"{name} dv", dv[None, k0:k1], ref["dv"], pt["dv"], scale=scale)


def _check_kvcache(p, dtype, device):
    """flash_attn_with_kvcache (new tokens appended in place) against attention_ref over each sequence's
    keys collected from the cache row by row; the cache must hold exactly the expected rows afterwards."""
    b, sq, s_new, lens = p["batch"], p["lens_q"][0], p["s_new"], p["lens_k"]
    h, hk, d, tag = p["nheads_k"] * p["group"], p["nheads_k"], p["headdim"], problem_id(p)
    g = torch.Generator().manual_seed(p["seed"])

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    capacity = max(n + s_new for n in lens) + 2
    pad = [int(torch.randint(0, n + 1, (1,), generator=g)) if p["leftpad"] else 0 for n in lens]
    if p["page_size"]:
        ps = p["page_size"]
        per_seq = -(-capacity // ps)
        num_pages = b * per_seq + 2
        table = torch.randperm(num_pages, generator=g)[:b * per_seq].view(b, per_seq).to(torch.int32)
        pages = table.tolist()
        k_cache, v_cache = rand(num_pages, ps, hk, d), rand(num_pages, ps, hk, d)
        extra = dict(block_table=table.to(device))
    else:
        ps = capacity
        rows = torch.randperm(b + 1, generator=g)[:b] if p["cache_batch_idx"] else torch.arange(b)
        pages = [[r] for r in rows.tolist()]
        k_cache, v_cache = rand(b + 1, capacity, hk, d), rand(b + 1, capacity, hk, d)
        extra = dict(cache_batch_idx=rows.to(device=device, dtype=torch.int32)) if p["cache_batch_idx"] else {}
    q = rand(b, sq, h, d)
    k_new, v_new = (rand(b, s_new, hk, d), rand(b, s_new, hk, d)) if s_new else (None, None)
    slopes = _slopes(p, device)
    kc, vc = k_cache.clone(), v_cache.clone()
    out, lse = flash_attn_with_kvcache(q, kc, vc, k_new, v_new, cache_seqlens=torch.tensor(lens, dtype=torch.int32,
                                                                                            device=device),
                                       cache_leftpad=torch.tensor(pad, dtype=torch.int32, device=device)
                                       if p["leftpad"] else None, softmax_scale=p["scale"], causal=p["causal"],
                                       window_size=tuple(p["window"]), softcap=p["softcap"], alibi_slopes=slopes,
                                       num_splits=p.get("num_splits", 0), return_softmax_lse=True, **extra)
    # the expected cache, row by row
    ek, ev = k_cache.clone(), v_cache.clone()
    for i in range(b):
        for t in range(s_new):
            r = lens[i] + t
            ek[pages[i][r // ps], r % ps] = k_new[i, t]
            ev[pages[i][r // ps], r % ps] = v_new[i, t]
    assert torch.equal(kc, ek) and torch.equal(vc, ev), f"{tag}: the cache was not updated as expected"
    for i in range(b):
        rows = range(pad[i], lens[i] + s_new)
        keys = torch.stack([ek[pages[i][r // ps], r % ps] for r in rows]) if len(rows) else ek[0, :0]
        vals = torch.stack([ev[pages[i][r // ps], r % ps] for r in rows]) if len(rows) else ev[0, :0]
        one = (q[i:i + 1], keys[None], vals[None])
        opts = dict(causal=p["causal"], window_size=tuple(p["window"]), softmax_scale=p["scale"],
                    softcap=p["softcap"], alibi_slopes=None if slopes is None else
                    (slopes[i:i + 1] if slopes.dim() == 2 else slopes))
        ref, pt = reference_results(*one, **opts), reference_results(*one, **opts, compute_dtype=None)
        check_close(f"{tag} seq {i} out", out[i:i + 1], ref["out"], pt["out"])
        check_close(f"{tag} seq {i} lse", lse[i:i + 1], ref["lse"], pt["lse"], dtype=dtype)


# ------------------------------------------------------------------------------------------------
# the tests

CI_SETTINGS = dict(deadline=None, derandomize=not SLOW_PROFILE)


@settings(max_examples=400 * FACTOR, **CI_SETTINGS)
@given(problems(TORCH_SPACE))
def test_fuzz_torch_path(p):
    check_problem(p)


@pytest.mark.skipif(not INTERPRETER, reason="the interpreter tier runs on machines without a GPU")
@settings(max_examples=80 * FACTOR, **CI_SETTINGS)
@given(problems(INTERP_SPACE))
def test_fuzz_triton_interpreter(p):
    check_problem(p)


# Random draws find a boundary off-by-one of the kernels' block ranges (a mask diagonal one key past a tile
# edge) only when the diagonal happens to sit on a tile edge: about 1 example in 30. The kernels' tiles are
# 16 x 16 under the interpreter, so a sweep over every offset seqlen_k − seqlen_q of a 40-key period, for
# each kind of mask, puts every diagonal on every tile position, forward and backward.
EDGE_MASKS = {"causal": dict(causal=True), "window-4-2": dict(window_size=(4, 2)),
              "window-5-left": dict(window_size=(5, -1))}


@pytest.mark.skipif(not INTERPRETER, reason="the interpreter tier runs on machines without a GPU")
@pytest.mark.parametrize("mask", list(EDGE_MASKS))
def test_mask_edges_triton_interpreter(mask, monkeypatch):
    monkeypatch.setenv("FLASHATTN_BACKEND", "triton")
    monkeypatch.setenv("FLASHATTN_AUTOTUNE", "0")
    sq = 24   # two query tiles, the second ragged
    for sk in range(6, 46):
        q, k, v = make_qkv(1, sq, sk, 1, 1, 16, torch.float16, seed=sk)
        run_and_compare(flash_attn_func, q, k, v, name=f"{mask} q{sq} k{sk}", seed=sk, **EDGE_MASKS[mask])


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@settings(max_examples=int(os.environ.get("FLASHATTN_FUZZ_GPU_EXAMPLES", "300")), deadline=None)
@given(problems(GPU_SPACE))
def test_fuzz_triton_gpu(p):
    check_problem(p, "cuda")


@pytest.mark.skipif(not INTERPRETER, reason="the interpreter tier runs on machines without a GPU")
@settings(max_examples=40 * FACTOR, **CI_SETTINGS)
@given(ws_problems(WS_INTERP_SPACE, whole_q=True))
def test_fuzz_triton_interpreter_ws(p):
    check_problem(p)


@pytest.mark.skipif(not INTERPRETER, reason="the interpreter tier runs on machines without a GPU")
@settings(max_examples=20 * FACTOR, **CI_SETTINGS)
@given(ws_problems(WS_INTERP_SPACE, whole_q=False))
def test_fuzz_triton_interpreter_ws_ragged(p):
    check_problem(p)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@settings(max_examples=max(1, int(os.environ.get("FLASHATTN_FUZZ_GPU_EXAMPLES", "300")) // 3), deadline=None)
@given(ws_problems(WS_GPU_SPACE, whole_q=True))
def test_fuzz_triton_gpu_ws(p):
    check_problem(p, "cuda")


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@settings(max_examples=int(os.environ.get("FLASHATTN_FUZZ_EXAMPLES", "10000")), deadline=None)
@given(problems(GPU_SPACE))
def test_fuzz_triton_gpu_10k(p):
    check_problem(p, "cuda")


# ------------------------------------------------------------------------------------------------
# failures found by the fuzzer, kept (each ran wrong before its fix; see the commit that added it)

REGRESSIONS: list = []


@pytest.mark.parametrize("p", REGRESSIONS or [pytest.param(None, marks=pytest.mark.skip("none yet"))],
                         ids=[problem_id(p) for p in REGRESSIONS] or None)
def test_fuzz_regression(p):
    device = "cuda" if p["backend"] == "triton" and ON_GPU else "cpu"
    if p["backend"] == "triton" and not (ON_GPU or INTERPRETER):
        pytest.skip("needs the Triton kernels")
    if p["backend"] == "triton" and device == "cpu" and p["dtype"] == "bfloat16":
        p = dict(p, dtype="float16")   # the interpreter's bf16 dot is broken in triton 3.6
    check_problem(p, device)
