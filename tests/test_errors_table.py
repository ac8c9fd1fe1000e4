"""Every row of README's error table (tests/error_cases.py): the call raises the listed exception with a
message naming the argument and the value, and README shows exactly the messages the code produces."""
import pytest

from error_cases import CASES, README, message, readme_table, render_table


@pytest.fixture(autouse=True)
def _no_forced_backend(monkeypatch):
    monkeypatch.delenv("FLASHATTN_BACKEND", raising=False)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_invalid_input_is_rejected(case):
    with pytest.raises(case.exc, match=case.match):
        case.call()


def test_readme_table_matches_the_code():
    with open(README) as f:
        table = readme_table(f.read())
    expected = render_table()
    if table != expected:
        diff = [f"README:   {a}\nexpected: {b}" for a, b in zip(table.splitlines(), expected.splitlines()) if a != b]
        pytest.fail("README's error table differs from what the code raises (regenerate it with "
                    "`PYTHONPATH=src python tests/error_cases.py --write`):\n" + "\n".join(diff[:5])
                    + (f"\n(row counts: README {len(table.splitlines())}, expected {len(expected.splitlines())})"
                       if len(table.splitlines()) != len(expected.splitlines()) else ""))


def test_the_table_covers_every_entry_point():
    functions = {c.function for c in CASES}
    for f in ("flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache", "scaled_dot_product_attention",
              "BlockMask", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func"):
        assert f in functions, f"no error case for {f}"
    assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"
    assert all(message(c) for c in CASES)
