"""examples/generate.py: paged-cache generation matches the plain PyTorch model, and the check can fail."""
import importlib.util
import os

import pytest
import torch

_PATH = os.path.join(os.path.dirname(__file__), "..", "examples", "generate.py")


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("generate_example", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _model(gen):
    torch.manual_seed(0)
    return gen.Model(gen.Config(dim=64, layers=2, heads=4, kv_heads=2)).eval()


def test_generation_matches_reference(gen):
    res = gen.generate(_model(gen), [[1, 2, 3], [7], [5] * 11], steps=5, page_size=3, device="cpu",
                       dtype=torch.float32, tol=1e-4, verbose=False)
    assert res["max_diff"] < 1e-4
    assert [len(s) for s in res["sequences"]] == [8, 6, 16]


def test_a_wrong_attention_is_caught(gen, monkeypatch):
    """The comparison has teeth: rotating with the other channel pairing must fail it."""
    orig = gen.flash_attn_with_kvcache
    monkeypatch.setattr(gen, "flash_attn_with_kvcache", lambda *a, **kw: orig(*a, **{**kw, "rotary_interleaved": True}))
    with pytest.raises(SystemExit, match="differ from the reference"):
        gen.generate(_model(gen), [[1, 2, 3, 4], [9, 9]], steps=3, page_size=2, device="cpu", dtype=torch.float32,
                     tol=1e-4, verbose=False)


def test_main_runs(gen, capsys):
    assert gen.main(["--steps", "2", "--prompt-lengths", "3", "6"]) == 0
    assert "max |logits(flashattn, paged cache) - logits(reference)|" in capsys.readouterr().out
