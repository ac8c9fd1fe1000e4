"""examples/train_gpt.py: a few training steps with flashattn and with torch's SDPA (MATH backend) on the CPU.

In float32, with the same seed and the same batches, the two implementations must give the same loss at
every logged step (they differ only by the rounding of the attention); the loss must fall; the JSON and
the plot must be written. Speed and memory numbers are only checked for presence (no timing assertions).
"""
import json
import math
import runpy
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_gpt.py"
STEPS = 20


@pytest.fixture(scope="module")
def script():
    """The script's namespace (not run as __main__, so nothing trains on import)."""
    return runpy.run_path(str(SCRIPT))


@pytest.fixture(scope="module")
def tiny_run(script, tmp_path_factory):
    """One short run of the tiny config on the CPU, every implementation: (JSON record, plot path)."""
    out = tmp_path_factory.mktemp("train_gpt")
    json_path, plot_path = out / "train.json", out / "loss.png"
    rc = script["main"](["--config", "tiny", "--attn", "all", "--device", "cpu", "--steps", str(STEPS),
                         "--seq", "64", "--batch", "8", "--log-every", "5", "--skip-steps", "2",
                         "--eval-batches", "2", "--threads", "1", "--json", str(json_path), "--plot", str(plot_path)])
    assert rc == 0
    return json.loads(json_path.read_text()), plot_path


def test_json_has_the_expected_keys(tiny_run):
    record, _ = tiny_run
    for key in ("config", "model", "train", "device", "dtype", "torch", "results",
                "max_abs_loss_diff_vs_sdpa_math", "summary"):
        assert key in record, key
    assert record["config"] == "tiny" and record["model"]["seqlen"] == 64 and record["dtype"] == "float32"
    for impl in ("flashattn", "sdpa-math"):
        r = record["results"][impl]
        assert r["available"] is True
        for key in ("tokens_per_s", "peak_mib", "train_loss", "val_loss", "steps", "losses", "n_params"):
            assert key in r, (impl, key)
        assert r["tokens_per_s"] > 0 and math.isfinite(r["peak_mib"])
    # torch's flash backend is CUDA-only: reported, not crashed on
    flash = record["results"]["sdpa-flash"]
    assert flash["available"] is False and "CUDA" in flash["reason"]
    (row,) = record["summary"]
    assert row["impl"] == "flashattn" and row["seqlen"] == 64
    assert {"n_params", "speedup_vs_sdpa_math", "memory_saved_mib"} <= set(row)


def test_losses_are_finite_and_fall(tiny_run):
    record, _ = tiny_run
    for impl in ("flashattn", "sdpa-math"):
        r = record["results"][impl]
        assert r["steps"] == [0, 5, 10, 15, STEPS - 1]
        assert all(math.isfinite(x) for x in r["losses"] + [r["val_loss"]])
        assert r["losses"][-1] < r["losses"][0] - 0.5, r["losses"]   # starts near ln(256) = 5.55


def test_flashattn_and_sdpa_math_train_identically(tiny_run):
    record, _ = tiny_run
    fa, math_ = record["results"]["flashattn"], record["results"]["sdpa-math"]
    assert fa["init_checksum"] == math_["init_checksum"]   # the same initial weights
    assert fa["steps"] == math_["steps"]
    for step, a, b in zip(fa["steps"], fa["losses"], math_["losses"]):
        assert abs(a - b) <= 1e-4, (step, a, b)
    assert record["max_abs_loss_diff_vs_sdpa_math"]["flashattn"] <= 1e-4


def test_plot_is_a_png(tiny_run):
    _, plot_path = tiny_run
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_same_weights_whatever_the_attention(script):
    cfg = script["GPTConfig"](n_layer=2, n_head=4, dim=64, seqlen=32, pos="rotary")
    states = []
    for impl in script["ATTN_IMPLS"]:
        torch.manual_seed(0)
        states.append(script["GPT"](cfg, impl).state_dict())
    for other in states[1:]:
        assert states[0].keys() == other.keys()
        assert all(torch.equal(states[0][k], other[k]) for k in other)


def test_models_agree_on_one_forward_and_backward(script):
    """Rotary positions too (the run above uses learned ones): same logits and gradients up to rounding."""
    cfg = script["GPTConfig"](n_layer=2, n_head=4, dim=64, seqlen=48, pos="rotary")
    idx = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(1))
    grads = {}
    for impl in ("flashattn", "sdpa-math"):
        torch.manual_seed(0)
        model = script["GPT"](cfg, impl)
        logits, loss = model(idx[:, :-1], idx[:, 1:])
        loss.backward()
        grads[impl] = (logits.detach(), model.wte.weight.grad.clone())
    for a, b in zip(grads["flashattn"], grads["sdpa-math"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_corpus_is_deterministic_ascii(script):
    a, b = script["make_corpus"](20_000, seed=0), script["make_corpus"](20_000, seed=0)
    assert a == b and len(a) == 20_000 and max(a) < 128
    assert script["make_corpus"](20_000, seed=1) != a


def test_sdpa_flash_is_reported_unavailable_on_cpu(script):
    reason = script["unavailable_reason"]("sdpa-flash", torch.device("cpu"), torch.float32, 32)
    assert reason is not None and "CUDA" in reason
    assert script["unavailable_reason"]("flashattn", torch.device("cpu"), torch.float32, 32) is None
