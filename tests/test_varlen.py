"""Packed variable-length batches (flash_attn_varlen_func and its packed forms) on every backend.

Each sequence of the packed batch must equal the reference run on that sequence alone, forward and
gradients; rows past cu_seqlens[-1] are 0 (lse -inf, gradient 0). The Triton backend runs under the
interpreter on the CPU (fp16, tiny shapes) and natively on the GPU tier.
"""
import pytest
import torch
from helpers import check_close, reference_results

import flashattn
from flashattn import flash_attn_varlen_func, flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func

ON_GPU = torch.cuda.is_available()

# (lens_q, lens_k, nheads, nheads_k, headdim, causal, window)
CASES = {
    "gqa-causal-empty-seq": ([5, 0, 17, 33], [5, 3, 40, 20], 4, 2, 16, True, (-1, -1)),
    "mqa-window-d40": ([1, 30], [1, 30], 2, 1, 40, False, (4, 2)),
    "seq-without-keys": ([20, 9], [0, 25], 2, 2, 16, False, (-1, -1)),
    "causal-q-longer-than-k": ([12, 3], [4, 7], 2, 1, 16, True, (-1, -1)),
}


def _cu(lens, device):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _check_varlen(case, dtype, device, extra_rows=3):
    lens_q, lens_k, h, hk, d, causal, window = CASES[case]
    g = torch.Generator().manual_seed(len(case))
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    q = rand(sum(lens_q) + extra_rows, h, d)
    k, v = rand(sum(lens_k), hk, d), rand(sum(lens_k), hk, d)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                         window_size=window, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (h, q.shape[0]) and lse.dtype == torch.float32
    dout = torch.randn(out.shape, generator=g).to(device=device, dtype=dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    assert (out[-extra_rows:] == 0).all() and torch.isneginf(lse[:, -extra_rows:]).all()
    assert (dq[-extra_rows:] == 0).all()
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(lens_q)):
        q0, q1, k0, k1 = cq[i], cq[i + 1], ck[i], ck[i + 1]
        if q1 == q0:
            continue
        one = (q[None, q0:q1], k[None, k0:k1], v[None, k0:k1])
        opts = dict(causal=causal, window_size=window, dout=dout[None, q0:q1])
        ref, pt = reference_results(*one, **opts), reference_results(*one, **opts, compute_dtype=None)
        tag = f"{case} seq {i}"
        check_close(f"{tag} out", out[None, q0:q1], ref["out"], pt["out"])
        check_close(f"{tag} lse", lse[None, :, q0:q1], ref["lse"], pt["lse"], dtype=dtype)
        check_close(f"{tag} dq", dq[None, q0:q1], ref["dq"], pt["dq"])
        if k1 > k0:   # each sequence's keys get gradient from its own queries only
            check_close(f"{tag} dk", dk[None, k0:k1], ref["dk"], pt["dk"])
            check_close(f"{tag} dv", dv[None, k0:k1], ref["dv"], pt["dv"])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_torch_path(case, dtype):
    _check_varlen(case, dtype, "cpu")


@pytest.mark.skipif(ON_GPU, reason="interpreter tier")
@pytest.mark.parametrize("case", list(CASES))
def test_triton_interpreter(case, monkeypatch):
    monkeypatch.setenv("FLASHATTN_BACKEND", "triton")
    monkeypatch.setenv("FLASHATTN_AUTOTUNE", "0")
    _check_varlen(case, torch.float16, "cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_gpu(case, dtype, monkeypatch):
    monkeypatch.setenv("FLASHATTN_AUTOTUNE", "0")
    _check_varlen(case, dtype, "cuda")


def test_packed_forms_match_unpacked():
    lens = [7, 0, 12]
    cu = _cu(lens, "cpu")
    qkv = torch.randn(sum(lens), 3, 2, 16, requires_grad=True)
    a = flash_attn_varlen_qkvpacked_func(qkv, cu, max(lens), causal=True)
    b = flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, max(lens), max(lens), causal=True)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = flash_attn_varlen_kvpacked_func(qkv[:, 0], qkv[:, 1:], cu, cu, max(lens), max(lens), causal=True)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    a.sum().backward()
    assert qkv.grad is not None and qkv.grad.abs().sum() > 0


def test_varlen_alibi_per_sequence():
    lens = [6, 9]
    cu = _cu(lens, "cpu")
    q, k, v = (torch.randn(sum(lens), 2, 16) for _ in range(3))
    slopes = torch.tensor([[0.5, 0.25], [1.0, 0.0]])
    out = flash_attn_varlen_func(q, k, v, cu, cu, 9, 9, causal=True, alibi_slopes=slopes)
    for i, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        ref, _ = flashattn.attention_ref(q[None, a:b], k[None, a:b], v[None, a:b], causal=True,
                                         alibi_slopes=slopes[i])
        torch.testing.assert_close(out[a:b].double(), ref[0], rtol=1e-5, atol=1e-5)


# ---- bad input

def _inputs():
    q, k, v = (torch.randn(10, 2, 16) for _ in range(3))
    return q, k, v, torch.tensor([0, 4, 10], dtype=torch.int32)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda cu: cu.to(torch.int64), TypeError, "cu_seqlens_q must have dtype torch.int32"),
    (lambda cu: cu[None], ValueError, r"cu_seqlens_q must have shape \(batch \+ 1,\)"),
    (lambda cu: torch.tensor([0, 6, 4], dtype=torch.int32), ValueError, "never decrease"),
    (lambda cu: torch.tensor([0, 4, 11], dtype=torch.int32), ValueError, "ends at 11"),
    (lambda cu: [0, 4, 10], TypeError, "cu_seqlens_q must be an int32 tensor"),
])
def test_bad_cu_seqlens(mutate, exc, match):
    q, k, v, cu = _inputs()
    with pytest.raises(exc, match=match):
        flash_attn_varlen_func(q, k, v, mutate(cu), cu, 6, 6)


def test_bad_max_seqlen_and_shapes():
    q, k, v, cu = _inputs()
    with pytest.raises(ValueError, match="max_seqlen_q=5 is smaller than the longest sequence"):
        flash_attn_varlen_func(q, k, v, cu, cu, 5, 6)
    with pytest.raises(ValueError, match="cu_seqlens_q has 3 entries and cu_seqlens_k 2"):
        flash_attn_varlen_func(q, k, v, cu, cu[:2], 6, 6)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        flash_attn_varlen_func(q[None], k, v, cu, cu, 6, 6)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape .*\(2, 2\)"):
        flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, alibi_slopes=torch.ones(3, 2))
    with pytest.raises(ValueError, match="k must have 4 dimensions"):   # with block_table, k and v are page pools
        flash_attn_varlen_func(q, k, v, cu, cu, 6, 6, block_table=torch.zeros(2, 1, dtype=torch.int32))


@pytest.mark.parametrize("page_size", [1, 4, 7])
def test_paged_kv_varlen_equals_packed(page_size):
    """block_table: k, v as page pools; the result and the gradients equal the packed call's."""
    from flashattn import flash_attn_varlen_func
    torch.manual_seed(page_size)
    lens_q, lens_k = [3, 0, 5], [9, 4, 13]
    h, hk, d = 4, 2, 16
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 13, 26], dtype=torch.int32)
    q = torch.randn(8, h, d, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(26, hk, d, dtype=torch.float64), torch.randn(26, hk, d, dtype=torch.float64)
    per_seq = max(-(-n // page_size) for n in lens_k)
    num_pages = 3 * per_seq + 2
    perm = torch.randperm(num_pages)[:3 * per_seq].view(3, per_seq).to(torch.int32)
    k_pages = torch.zeros(num_pages, page_size, hk, d, dtype=torch.float64)
    v_pages = torch.zeros_like(k_pages)
    for i, (a, n) in enumerate(zip(cu_k[:-1].tolist(), lens_k)):
        for j in range(n):
            k_pages[perm[i, j // page_size], j % page_size] = k[a + j]
            v_pages[perm[i, j // page_size], j % page_size] = v[a + j]
    k_pages.requires_grad_(), v_pages.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out = flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 5, 13, causal=True, block_table=perm)
    ref = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 13, causal=True)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    dq, dkp = torch.autograd.grad(out, (q, k_pages), g)
    dq_ref, dk_ref = torch.autograd.grad(ref, (q, k), g)
    torch.testing.assert_close(dq, dq_ref)
    torch.testing.assert_close(dkp[perm[2, 0], 0], dk_ref[13])   # the first key of sequence 2
    with pytest.raises(ValueError, match="names page"):
        flash_attn_varlen_func(q, k_pages, v_pages, cu_q, cu_k, 5, 13, block_table=perm + 100)
