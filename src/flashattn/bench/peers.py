"""The implementations timed side by side, and the runner that never lets one of them crash a run.

A `Peer` builds, for one `Case`, a function attn(q, k, v) -> out on tensors in its own layout:
"bshd" (batch, seqlen, nheads, headdim) for flashattn, "bhsd" (batch, nheads, seqlen, headdim) for
torch's SDPA and FlexAttention. All peers get the same numbers (one random draw per case, copied
into each layout, contiguous) and the same upstream gradient.

`run_peer` times the forward on inputs that do not require grad, and the backward alone:
forward once with requires_grad inputs, then `torch.autograd.grad(out, (q, k, v), dout,
retain_graph=True)` under the timer (autograd.grad returns fresh gradients instead of
accumulating into .grad, so nothing but the backward is timed). Whatever goes wrong (unsupported
shape, no kernel for the forced backend, out of memory, compile failure) is recorded as the reason
that peer is unavailable for that shape.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch

from ..flops import attention_flops, tflops
from .records import OURS, Check, Result

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Bench = Callable[[Callable[[], object]], float]   # fn -> milliseconds


@dataclass(frozen=True)
class Case:
    batch: int
    nheads: int
    seqlen: int
    hdim: int
    causal: bool
    dtype: torch.dtype
    device: str

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).replace("torch.", "")

    def flops(self, pass_: str) -> float:
        return attention_flops(self.batch, self.nheads, self.seqlen, self.seqlen, self.hdim, self.causal, pass_)


@dataclass(frozen=True)
class Peer:
    name: str
    layout: str                                        # "bshd" or "bhsd"
    make: Callable[[Case], AttnFn]                     # once per case, outside the timer; may raise
    context: Callable[[], ContextManager] = contextlib.nullcontext   # held while building, running, timing


class DeviceLost(RuntimeError):
    """The CUDA context is unusable after an error (e.g. an illegal memory access): stop the run."""


# ----------------------------------------------------------------------------------------------
# the implementations


def _flashattn(case: Case) -> AttnFn:
    from flashattn import flash_attn_func
    causal = case.causal
    return lambda q, k, v: flash_attn_func(q, k, v, causal=causal)


def _sdpa(case: Case) -> AttnFn:
    from torch.nn.functional import scaled_dot_product_attention
    causal = case.causal
    return lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=causal)


def _sdpa_backend(name: str) -> Callable[[], ContextManager]:
    def context():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, name, None)
        if backend is None:
            raise RuntimeError(f"this torch ({torch.__version__}) has no SDPBackend.{name}")
        return sdpa_kernel(backend)
    return context


def _causal_mask_mod(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _flex(case: Case) -> AttnFn:
    import torch._dynamo
    import torch._functorch.config as functorch_config
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # A fresh compile per case: static shapes (as FlexAttention is normally used) and no risk of
    # hitting dynamo's recompile limit, past which it would silently fall back to the slow eager path.
    torch._dynamo.reset()
    # The backward is timed with retain_graph=True; AOTAutograd refuses that when it donates the
    # saved buffers to the backward, so keep them (this changes buffer reuse, not the kernels).
    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False
    compiled = torch.compile(flex_attention, dynamic=False, fullgraph=True)
    block_mask = None
    if case.causal:
        block_mask = create_block_mask(_causal_mask_mod, None, None, case.seqlen, case.seqlen, device=case.device)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


PEERS: Dict[str, Peer] = {p.name: p for p in (
    Peer(OURS, "bshd", _flashattn),
    Peer("sdpa_flash", "bhsd", _sdpa, _sdpa_backend("FLASH_ATTENTION")),
    Peer("sdpa_cudnn", "bhsd", _sdpa, _sdpa_backend("CUDNN_ATTENTION")),
    Peer("flex", "bhsd", _flex),
    Peer("sdpa_efficient", "bhsd", _sdpa, _sdpa_backend("EFFICIENT_ATTENTION")),
    Peer("sdpa_math", "bhsd", _sdpa, _sdpa_backend("MATH")),
)}
DEFAULT_PEERS = ("sdpa_flash", "sdpa_cudnn", "flex", "sdpa_efficient")   # sdpa_math: opt-in (slow, O(N²) memory)
REFERENCE_ORDER = ("sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math")


# ----------------------------------------------------------------------------------------------
# inputs


@dataclass
class Inputs:
    """q, k, v and dout of one case in both layouts; *_g are requires_grad copies for the backward."""
    by_layout: Dict[str, Tuple[torch.Tensor, ...]]   # layout -> (q, k, v, qg, kg, vg, dout)

    def get(self, layout: str):
        return self.by_layout[layout]


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    g = torch.Generator(device=case.device)
    g.manual_seed(seed * 1_000_003 + case.hdim * 100_003 + case.seqlen * 7 + int(case.causal))
    shape = (case.batch, case.seqlen, case.nheads, case.hdim)
    base = [torch.randn(shape, generator=g, device=case.device, dtype=case.dtype) for _ in range(4)]
    by_layout = {}
    for layout in ("bshd", "bhsd"):
        q, k, v, dout = (x if layout == "bshd" else x.transpose(1, 2).contiguous() for x in base)
        grads = tuple(x.detach().clone().requires_grad_(True) for x in (q, k, v))
        by_layout[layout] = (q, k, v, *grads, dout)
    return Inputs(by_layout)


def to_bshd(x: torch.Tensor, layout: str) -> torch.Tensor:
    return x if layout == "bshd" else x.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# running one peer on one case


def _chain_root(e: BaseException) -> BaseException:
    """The innermost exception, following `raise ... from` and implicit chaining as tracebacks do."""
    seen = set()
    while id(e) not in seen:
        seen.add(id(e))
        nxt = e.__cause__ if e.__cause__ is not None else (None if e.__suppress_context__ else e.__context__)
        if nxt is None:
            break
        e = nxt
    return e


def _reason(e: BaseException, caught: Sequence[warnings.WarningMessage]) -> str:
    msg = str(e).strip() or repr(e)
    first = msg.splitlines()[0]
    # Compilers wrap the real error (dynamo's "Observed exception", inductor's BackendCompilerFailed): name the root.
    root = _chain_root(e)
    root_msg = (str(root).strip() or repr(root)).splitlines()[0] if root is not e else ""
    oom = any(isinstance(x, torch.cuda.OutOfMemoryError) or "out of memory" in str(x).lower() for x in (e, root))
    reason = ("out of memory: " if oom else "") + f"{type(e).__name__}: {first}"
    if root_msg and root_msg not in first:
        reason += f" (cause: {type(root).__name__}: {root_msg[:300]})"
    # A forced SDPA backend that cannot run says why in warnings, and only "No available kernel" in the error.
    notes = []
    for w in caught:
        text = " ".join(str(w.message).split())
        if text and text not in notes:
            notes.append(text)
    if notes:
        reason += " | warnings: " + " / ".join(notes)[:600]
    return reason[:1000]


def device_check(case: Case) -> None:
    if case.device == "cuda":
        try:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        except Exception as e:
            raise DeviceLost(f"CUDA context unusable after an error: {type(e).__name__}: {e}") from e


def _sync(case: Case) -> None:
    if case.device == "cuda":
        torch.cuda.synchronize()


@dataclass
class PeerRun:
    results: List[Result]
    out: Optional[torch.Tensor] = None                          # forward output, bshd view
    grads: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None   # dq, dk, dv, bshd views


def run_peer(peer: Peer, case: Case, inputs: Inputs, passes: Sequence[str], bench: Bench,
             keep_outputs: bool = True) -> PeerRun:
    """Time `peer` on `case` for each pass in `passes`; every failure becomes a Result with `error` set."""
    def result(pass_, ms=None, error=None, setup_s=None):
        tf = tflops(case.flops(pass_), ms) if ms else None
        return Result(peer.name, case.hdim, case.seqlen, case.causal, pass_, case.batch, case.nheads,
                      case.dtype_name, ms, tf, error, setup_s)

    q, k, v, qg, kg, vg, dout = inputs.get(peer.layout)
    run = PeerRun([])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        try:
            ctx = peer.context()
            ctx.__enter__()
        except Exception as e:
            run.results += [result(p, error=_reason(e, caught)) for p in passes]
            return run
        try:
            try:
                fn = peer.make(case)
            except Exception as e:
                reason = "setup failed: " + _reason(e, caught)
                run.results += [result(p, error=reason) for p in passes]
                device_check(case)
                return run
            setup = time.perf_counter() - t0
            for pass_ in passes:
                del caught[:]
                t1 = time.perf_counter()
                try:
                    if pass_ == "fwd":
                        out = fn(q, k, v)            # first call: compilation, autotuning
                        _sync(case)
                        first = time.perf_counter() - t1
                        ms = bench(lambda: fn(q, k, v))
                        if keep_outputs:
                            run.out = to_bshd(out.detach(), peer.layout)
                        del out
                    elif pass_ == "bwd":
                        out_g = fn(qg, kg, vg)
                        g = torch.empty_like(out_g)  # same strides as the output, as a real upstream gradient
                        g.copy_(dout)
                        leaves = (qg, kg, vg)
                        grads = torch.autograd.grad(out_g, leaves, g, retain_graph=True)
                        _sync(case)
                        first = time.perf_counter() - t1
                        ms = bench(lambda: torch.autograd.grad(out_g, leaves, g, retain_graph=True))
                        if keep_outputs:
                            run.grads = tuple(to_bshd(x, peer.layout) for x in grads)
                            if run.out is None:
                                run.out = to_bshd(out_g.detach(), peer.layout)
                        del out_g, g, grads
                    else:
                        raise ValueError(f"unknown pass {pass_!r}; expected 'fwd' or 'bwd'")
                    if not (ms and ms > 0):
                        raise RuntimeError(f"timer returned {ms!r} ms")
                    run.results.append(result(pass_, ms=ms, setup_s=setup + first))
                except DeviceLost:
                    raise
                except Exception as e:
                    run.results.append(result(pass_, error=_reason(e, caught)))
                    device_check(case)
                setup = 0.0
        finally:
            ctx.__exit__(None, None, None)
    return run


# ----------------------------------------------------------------------------------------------
# correctness sanity check of one case


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def check_case(case: Case, runs: Dict[str, PeerRun], inputs: Optional[Inputs] = None) -> Check:
    """max |impl - reference| for every implementation that ran; the reference is the first SDPA
    backend that produced an output (SDPA math computed here if none did)."""
    ref_name = next((n for n in REFERENCE_ORDER if n in runs and runs[n].out is not None), None)
    note = None
    ref_out, ref_grads = None, None
    if ref_name is not None:
        ref_out, ref_grads = runs[ref_name].out, runs[ref_name].grads
    elif inputs is not None:
        try:
            q, k, v = inputs.get("bhsd")[:3]
            with _sdpa_backend("MATH")():
                ref_out = to_bshd(_sdpa(case)(q, k, v), "bhsd")
            ref_name = "sdpa_math"
        except Exception as e:
            note = "no reference: " + _reason(e, ())
            device_check(case)
    errors: Dict[str, Dict[str, float]] = {}
    if ref_out is not None:
        for name, run in runs.items():
            if name == ref_name or run.out is None:
                continue
            e = {"out": _max_abs(run.out, ref_out)}
            if run.grads is not None and ref_grads is not None:
                e.update({n: _max_abs(a, b) for n, a, b in zip(("dq", "dk", "dv"), run.grads, ref_grads)})
            errors[name] = e
    return Check(case.hdim, case.seqlen, case.causal, ref_name, errors, note)
