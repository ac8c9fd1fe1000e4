"""`flashattn explain`: the seeds' printed numbers, the steps they leave out, and the printout."""
import io
import math

import pytest
import torch

from flashattn import explain
from flashattn.reference import attention_ref

E = math.e


@pytest.fixture(scope="module")
def ex():
    return explain.worked_example()


def close(a, b, tol=1e-3):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               atol=tol, rtol=0)


# --- (a) seed 001 §2.2: [1, 2, 3, 4] as [1, 2] and [3, 4]


def test_split_softmax_blocks_and_merge():
    r = explain.split_softmax_example()
    b1, b2 = r["blocks"]
    assert (b1["m"].item(), b2["m"].item()) == (2.0, 4.0)
    close(b1["f"], [1 / E, 1.0], 1e-12)
    close(b2["f"], [1 / E, 1.0], 1e-12)
    close(b1["l"], 1 + 1 / E, 1e-12)
    assert r["m_new"].item() == 4.0
    close(r["l"], E ** -2 * (1 + 1 / E) + (1 + 1 / E), 1e-12)   # exp(m1 - m_new)·l1 + exp(m2 - m_new)·l2


def test_split_softmax_equals_torch_softmax():
    r = explain.split_softmax_example()
    ref = torch.softmax(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64), dim=0)
    close(r["softmax"], ref, 1e-12)
    close(r["online"], ref, 1e-12)   # the library's online_softmax_step agrees with the merge formula
    assert r["max_diff"] < 1e-12


def test_split_softmax_other_split_points():
    x = [0.5, -3.0, 7.0, 2.0, 2.0]
    for split in (1, 2, 4):
        r = explain.split_softmax_example(x, split)
        close(r["softmax"], torch.softmax(torch.tensor(x, dtype=torch.float64), dim=0), 1e-12)


# --- (b) seed 000 §4.3


def test_q1_k1_matches_seed(ex):
    st = ex.steps[0]
    assert (st.q_block, st.k_block) == (1, 1)
    close(st.s, [[1, 0], [1, 2]], 0)
    close(st.m_tilde, [1, 2], 0)
    close(st.p_tilde, [[1, 1 / E], [1 / E, 1]], 1e-12)
    close(st.l_tilde, [1.368, 1.368])              # the seed's ℓ̃₁₁ ≈ 1.368, both rows
    close(st.l, [1.368, 1.368])
    close(st.o, [[0.731, 0.269], [0.269, 0.731]])  # the seed's O₁⁽¹⁾


def test_q1_k2_matches_seed(ex):
    st = ex.steps[1]
    assert (st.q_block, st.k_block) == (1, 2)
    close(st.s, [[1, 2], [0, 1]], 0)
    close(st.m_tilde, [2, 1], 0)
    close(st.m, [2, 2], 0)                          # m₁⁽²⁾ = max([1, 2], [2, 1])
    close(st.alpha, [1 / E, 1.0], 1e-12)            # α = [e⁻¹, 1]


def test_every_block_is_recorded(ex):
    assert [(s.q_block, s.k_block) for s in ex.steps] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    first = [s for s in ex.steps if s.k_block == 1]
    for st in first:                                # nothing accumulated before the first block
        assert torch.isinf(st.m_old).all() and (st.alpha == 0).all()


def test_steps_follow_the_seed_recurrences(ex):
    # ℓ = ℓ_old·α + ℓ̃·β and O = (ℓ_old/ℓ)·α·O_old + (β/ℓ)·P̃·V_j, the seed's §4.2 formulas
    v = torch.tensor(explain.V_EXAMPLE, dtype=torch.float64)
    for st in ex.steps:
        close(st.l, st.l_old * st.alpha + st.l_tilde * st.beta, 1e-12)
        vj = v[2 * (st.k_block - 1): 2 * st.k_block]
        seed_o = (st.l_old * st.alpha / st.l)[:, None] * st.o_old + (st.beta / st.l)[:, None] * (st.p_tilde @ vj)
        close(st.o, seed_o, 1e-12)


def test_final_output_equals_reference(ex):
    q, k, v = (torch.tensor(m, dtype=torch.float64)[None, :, None] for m in
               (explain.Q_EXAMPLE, explain.K_EXAMPLE, explain.V_EXAMPLE))
    ref, lse = attention_ref(q, k, v, softmax_scale=1.0)
    close(ex.out, ref[0, :, 0], 1e-6)
    close(ex.lse, lse[0, 0], 1e-6)
    assert ex.max_err < 1e-6
    close(ex.steps[-1].o, ref[0, 2:, 0], 1e-6)      # the last step's O is query block 2's final output


def test_printout_shows_the_seed_values():
    buf = io.StringIO()
    assert explain.run(file=buf) == 0
    text = buf.getvalue()
    for s in ("[1.3679, 1.3679]",                    # ℓ̃ for Q1·K1
              "[0.7311, 0.2689]", "[0.2689, 0.7311]",  # O₁⁽¹⁾
              "[2.0000, 2.0000]",                    # m after Q1's block 2
              "[0.3679, 1.0000]",                    # α there
              "Q block 2",                           # the part the seed never does
              "[0.0321, 0.0871, 0.2369, 0.6439]"):   # softmax([1, 2, 3, 4])
        assert s in text, s
    assert "max |O - naive|" in text


def test_explain_main_prints(capsys):
    assert explain.main([]) == 0
    assert "[0.7311, 0.2689]" in capsys.readouterr().out
