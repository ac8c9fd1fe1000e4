"""`flashattn explain`: the seeds' worked examples, step by step, computed by the library's own code.

(a) softmax of [1, 2, 3, 4] in two blocks [1, 2] and [3, 4], then merged (seed 001 §2.2);
(b) the n = 4, d = 2 attention example of seed 000 §4.3 (Br = Bc = 2, scale 1), every key block of
    every query block, including the steps the seed leaves out.

The numbers come from `split_softmax_example()` and `worked_example()`; `run()` only prints them.
The state update is always `online_softmax_step`; what it does not return (the block-local max m̃,
sum ℓ̃ and the factor β) is computed here for display only.
"""
from __future__ import annotations

import argparse
import sys
import unicodedata
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .backends.torch_tiled import finish, init_state, online_softmax_step
from .reference import attention_ref

# Seed 000 §4.3: n = 4 tokens, d = 2 features.
Q_EXAMPLE = [[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 2.0]]
K_EXAMPLE = [[1.0, 1.0], [0.0, 2.0], [1.0, 0.0], [2.0, 1.0]]
V_EXAMPLE = [[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [1.0, 2.0]]

_F64 = torch.float64   # exact enough that every printed digit is right


# ----------------------------------------------------------------------------------------------
# (a) one vector, two blocks


def split_softmax_example(x: Sequence[float] = (1.0, 2.0, 3.0, 4.0), split: int = 2) -> dict:
    """Softmax of x computed as two blocks x[:split] and x[split:], then merged.

    Returns a dict (all values float64 tensors):
      blocks: two dicts with x, m = max x, f = exp(x - m) and l = sum f (each block on its own);
      m_new = max(m1, m2); c1, c2 = exp(m1 - m_new), exp(m2 - m_new); l = c1·l1 + c2·l2;
      softmax = [c1·f1, c2·f2] / l, the merged result (n,);
      online: the same vector from `online_softmax_step` fed block by block (with V = I the
              accumulator is the unnormalized probability vector itself);
      torch_softmax: torch.softmax(x); max_diff: max |softmax - torch_softmax|.
    """
    x = torch.tensor(x, dtype=_F64)
    blocks = []
    for xb in (x[:split], x[split:]):
        m = xb.max()
        f = torch.exp(xb - m)
        blocks.append({"x": xb, "m": m, "f": f, "l": f.sum()})
    b1, b2 = blocks
    m_new = torch.maximum(b1["m"], b2["m"])
    c1, c2 = torch.exp(b1["m"] - m_new), torch.exp(b2["m"] - m_new)
    l = c1 * b1["l"] + c2 * b2["l"]
    softmax = torch.cat([c1 * b1["f"], c2 * b2["f"]]) / l

    n = x.numel()
    eye = torch.eye(n, dtype=_F64)
    state = init_state((1,), n, x.device, _F64)                    # one row
    for lo, hi in ((0, split), (split, n)):
        state = online_softmax_step(state, x[None, lo:hi], eye[lo:hi]).state
    online, _ = finish(state)

    ref = torch.softmax(x, dim=0)
    return {"x": x, "blocks": blocks, "m_new": m_new, "c1": c1, "c2": c2, "l": l, "softmax": softmax,
            "online": online[0], "online_l": state.l[0], "torch_softmax": ref,
            "max_diff": (softmax - ref).abs().max().item()}


# ----------------------------------------------------------------------------------------------
# (b) attention, n = 4, d = 2


@dataclass
class BlockStep:
    """What happened when query block `q_block` met key/value block `k_block` (1-based, as in the seed).

    Vectors are (Br,), matrices (Br, Bc) or (Br, d). m_old, l_old: the state before this block
    (-inf and 0 before the first one). o = acc / l, the normalized output so far.
    """
    q_block: int
    k_block: int
    s: torch.Tensor        # S = Q_i K_jᵀ · scale
    m_tilde: torch.Tensor  # m̃ = rowmax(S), this block alone
    p_tilde: torch.Tensor  # P̃ = exp(S - m̃)
    l_tilde: torch.Tensor  # ℓ̃ = rowsum(P̃)
    m_old: torch.Tensor
    m: torch.Tensor        # max(m_old, m̃)
    alpha: torch.Tensor    # exp(m_old - m): rescales what was accumulated before
    beta: torch.Tensor     # exp(m̃ - m): rescales this block's P̃
    l_old: torch.Tensor
    l: torch.Tensor        # ℓ_old·α + ℓ̃·β
    o_old: torch.Tensor
    o: torch.Tensor


@dataclass
class WorkedExample:
    """The inputs q, k, v (n, d), all steps, the final out (n, d) and lse (n,), the reference's, max |out - ref_out|."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    steps: List[BlockStep]
    out: torch.Tensor
    lse: torch.Tensor
    ref_out: torch.Tensor
    ref_lse: torch.Tensor
    max_err: float


def worked_example(q=Q_EXAMPLE, k=K_EXAMPLE, v=V_EXAMPLE, block: int = 2, scale: float = 1.0) -> WorkedExample:
    """Seed 000 §4.3 run through `online_softmax_step`: q (n, d), k and v (n_k, d), blocks of `block` rows."""
    q, k, v = (torch.as_tensor(x, dtype=_F64) for x in (q, k, v))
    d = q.shape[1]
    steps, outs, lses = [], [], []
    for i, q0 in enumerate(range(0, q.shape[0], block), start=1):
        qi = q[q0:q0 + block]
        state = init_state((qi.shape[0],), d, q.device, _F64)
        o = torch.zeros_like(qi)
        for j, k0 in enumerate(range(0, k.shape[0], block), start=1):
            s = qi @ k[k0:k0 + block].T * scale
            step = online_softmax_step(state, s, v[k0:k0 + block])
            new, alpha = step.state, step.alpha
            # block-local quantities, as the seed writes them (the library folds them into one exp)
            m_tilde = s.amax(dim=-1)
            p_tilde = torch.exp(s - m_tilde[:, None])
            o_new, _ = finish(new)
            steps.append(BlockStep(i, j, s, m_tilde, p_tilde, p_tilde.sum(dim=-1), state.m, new.m, alpha,
                                   torch.exp(m_tilde - new.m), state.l, new.l, o, o_new))
            state, o = new, o_new
        out_i, lse_i = finish(state)
        outs.append(out_i)
        lses.append(lse_i)
    out, lse = torch.cat(outs), torch.cat(lses)
    # attention_ref wants (batch, seqlen, nheads, headdim): one batch, one head
    ref_out, ref_lse = attention_ref(q[None, :, None], k[None, :, None], v[None, :, None], softmax_scale=scale)
    ref_out, ref_lse = ref_out[0, :, 0], ref_lse[0, 0]
    return WorkedExample(q, k, v, steps, out, lse, ref_out, ref_lse, (out - ref_out).abs().max().item())


# ----------------------------------------------------------------------------------------------
# printing


def fmt(x) -> str:
    """A number, vector or matrix with 4 decimals: 1.0000, [1.0000, 2.0000], [[...], [...]]."""
    if isinstance(x, torch.Tensor):
        x = x.tolist()
    if isinstance(x, list):
        return "[" + ", ".join(fmt(e) for e in x) + "]"
    return f"{x:.4f}" if x not in (float("inf"), float("-inf")) else str(x)


def _width(s: str) -> int:
    return sum(1 for ch in s if not unicodedata.combining(ch))   # m̃ is two code points, one column


def _line(file, label: str, value, note: str = "", indent: int = 6, width: int = 24) -> None:
    """`label   value   note`; a matrix is printed one row per line, rows aligned under each other."""
    if isinstance(value, torch.Tensor) and value.dim() == 2:
        rows = [fmt(r) for r in value]
    else:
        rows = [value if isinstance(value, str) else fmt(value)]
    pad = " " * max(1, width - _width(label))
    print(" " * indent + label + pad + rows[0] + (f"   {note}" if note else ""), file=file)
    for r in rows[1:]:
        print(" " * (indent + _width(label) + len(pad)) + r, file=file)


def print_split_softmax(ex: dict, file=None) -> None:
    file = file or sys.stdout   # looked up at call time, so redirections of sys.stdout apply
    print("(a) softmax of [1, 2, 3, 4] in two blocks, merged afterwards (seed 001 §2.2)", file=file)
    for i, b in enumerate(ex["blocks"], start=1):
        print(f"  block {i}: x{i} = {fmt(b['x'])}", file=file)
        _line(file, f"m{i} = max x{i}", b["m"])
        _line(file, f"f{i} = exp(x{i} - m{i})", b["f"])
        _line(file, f"l{i} = sum f{i}", b["l"])
    print("  merge:", file=file)
    _line(file, "m_new = max(m1, m2)", ex["m_new"])
    _line(file, "exp(m1 - m_new)", ex["c1"])
    _line(file, "exp(m2 - m_new)", ex["c2"], "(1 because block 2 holds the max; in general both blocks are rescaled)")
    _line(file, "l", ex["l"], "= exp(m1 - m_new)·l1 + exp(m2 - m_new)·l2")
    _line(file, "softmax", ex["softmax"], "= [exp(m1-m_new)·f1, exp(m2-m_new)·f2] / l")
    _line(file, "online_softmax_step", ex["online"], "(the library's update, block by block)")
    _line(file, "torch.softmax(x)", ex["torch_softmax"])
    _line(file, "max |merged - torch|", f"{ex['max_diff']:.1e}")


def print_worked_example(ex: WorkedExample, file=None) -> None:
    file = file or sys.stdout
    print("(b) attention, n = 4, d = 2, Br = Bc = 2, scale = 1, no 1/sqrt(d) (seed 000 §4.3)", file=file)
    for name, m in (("Q", ex.q), ("K", ex.k), ("V", ex.v)):
        _line(file, f"{name} =", m, indent=2, width=4)
    print("  Each query block i keeps m (row max), ℓ (row sum) and acc (unnormalized output); per key block j:",
          file=file)
    print("  m = max(m_old, m̃), α = exp(m_old - m), β = exp(m̃ - m), ℓ = ℓ_old·α + ℓ̃·β, acc = acc·α + P̃·β·V_j.",
          file=file)
    print("  O = acc/ℓ equals the seed's O = (ℓ_old/ℓ)·α·O_old + (β/ℓ)·P̃·V_j.", file=file)
    current = None
    for st in ex.steps:
        i, j = st.q_block, st.k_block
        br, bc = st.s.shape
        if i != current:
            current = i
            print(f"\n  Q block {i}: rows {(i - 1) * br + 1}-{(i - 1) * br + br}", file=file)
        print(f"    K/V block {j}: rows {(j - 1) * bc + 1}-{(j - 1) * bc + bc}", file=file)
        first = "(first block: nothing accumulated yet)" if j == 1 else ""
        _line(file, f"S = Q{i}·K{j}ᵀ", st.s)
        _line(file, "m̃ = rowmax(S)", st.m_tilde)
        _line(file, "P̃ = exp(S - m̃)", st.p_tilde)
        _line(file, "ℓ̃ = rowsum(P̃)", st.l_tilde)
        _line(file, "m = max(m_old, m̃)", st.m, f"m_old = {fmt(st.m_old)}")
        _line(file, "α = exp(m_old - m)", st.alpha, first)
        _line(file, "β = exp(m̃ - m)", st.beta)
        _line(file, "ℓ = ℓ_old·α + ℓ̃·β", st.l, f"ℓ_old = {fmt(st.l_old)}")
        _line(file, f"O{i} = acc / ℓ", st.o)
    print("\n  final", file=file)
    _line(file, "O", ex.out, indent=4)
    _line(file, "lse = m + log ℓ", ex.lse, indent=4)
    _line(file, "naive softmax(QKᵀ)V", ex.ref_out, "(attention_ref, float64)", indent=4)
    _line(file, "max |O - naive|", f"{ex.max_err:.1e}", indent=4)


def run(file=None) -> int:
    """Print both examples to file (default sys.stdout); 0."""
    file = file or sys.stdout
    print_split_softmax(split_softmax_example(), file=file)
    print(file=file)
    print_worked_example(worked_example(), file=file)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argparse.ArgumentParser(prog="flashattn explain", description=__doc__.splitlines()[0]).parse_args(argv)
    return run()


if __name__ == "__main__":
    sys.exit(main())
