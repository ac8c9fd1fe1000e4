"""deterministic=True: repeated backward passes give bitwise-identical gradients, for every variant.

Every backward here is deterministic (fixed loop orders, no atomics). The GPU tier is where this can
fail (scheduling); the CPU tier runs the same variants on the PyTorch path and under the interpreter.
"""
import pytest
import torch
from helpers import make_qkv

from flashattn import BlockMask, flash_attn_func, flash_attn_varlen_func

ON_GPU = torch.cuda.is_available()

VARIANTS = {
    "causal-gqa": dict(causal=True),
    "window": dict(window_size=(20, 5)),
    "sinks": dict(causal=True, window_size=(16, 0), num_sink_tokens=4),
    "global": dict(window_size=(8, 8), global_tokens=[0, 33]),
    "softcap-alibi": dict(causal=True, softcap=20.0, alibi_slopes="slopes"),
    "dropout": dict(causal=True, dropout_p=0.2),
    "block-mask": dict(block_mask="band"),
    "varlen": dict(causal=True, varlen=True),
}


def _run_twice(name, device, dtype, s, d):
    opts = dict(VARIANTS[name])
    q, k, v = make_qkv(2, s, s, 4, 2, d, dtype, device=device, requires_grad=True, seed=len(name))
    if opts.get("alibi_slopes") == "slopes":
        opts["alibi_slopes"] = torch.rand(4, device=device)
    if opts.get("block_mask") == "band":
        opts["block_mask"] = BlockMask.from_mask_mod(lambda b, h, qi, kv: (qi - kv).abs() < 40, None, None, s, s,
                                                     (16, 16) if device == "cpu" else (128, 64), device=device)
    varlen = opts.pop("varlen", False)

    def call():
        torch.manual_seed(0)   # the same dropout seed for both runs
        if varlen:
            cu = torch.tensor([0, s // 3, 2 * s], dtype=torch.int32, device=device)
            return flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 2 * s - s // 3,
                                          2 * s - s // 3, deterministic=True, **opts)
        return flash_attn_func(q, k, v, deterministic=True, **opts)

    out1, out2 = call(), call()
    assert torch.equal(out1, out2)
    dout = torch.randn_like(out1)
    g1 = torch.autograd.grad(out1, (q, k, v), dout)
    g2 = torch.autograd.grad(out2, (q, k, v), dout)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)
        assert a.abs().sum() > 0


@pytest.mark.parametrize("name", list(VARIANTS))
def test_torch_path(name):
    _run_twice(name, "cpu", torch.float32, 48, 16)


@pytest.mark.skipif(ON_GPU, reason="interpreter tier")
@pytest.mark.parametrize("name", ["causal-gqa", "dropout", "block-mask"])
def test_triton_interpreter(name, monkeypatch):
    monkeypatch.setenv("FLASHATTN_BACKEND", "triton")
    monkeypatch.setenv("FLASHATTN_AUTOTUNE", "0")
    _run_twice(name, "cpu", torch.float16, 48, 16)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name", list(VARIANTS))
def test_triton_gpu(name):
    _run_twice(name, "cuda", torch.bfloat16, 1024, 128)
