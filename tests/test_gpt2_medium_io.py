"""benchmarks/gpt2_medium_io.py on the CPU: the tiny smoke mode end to end, and the numbers it prints
against flashattn.iomodel. No timing assertions (benchmarks are not tests)."""
import importlib.util
import json
import os

import pytest

from flashattn import iomodel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("gpt2_medium_io", os.path.join(ROOT, "benchmarks", "gpt2_medium_io.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_run(script, tmp_path, capsys):
    path = tmp_path / "gpt2.json"
    assert script.main(["--device", "cpu", "--rep", "1", "--warmup", "0", "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    c = report["config"]
    assert (c["batch"], c["heads"], c["seqlen"], c["hdim"], c["causal"]) == (2, 2, 128, 32, True)
    rows = {r["impl"]: r for r in report["rows"]}
    assert set(rows) == {"flashattn", "naive", "sdpa_flash", "sdpa_math"}
    for r in rows.values():
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0 and not r["errors"], r
        lo, hi = r["fwd_bwd_bytes"]
        assert 0 < lo <= hi
        assert r["fwd_bwd_tbps"][0] == pytest.approx(lo / (r["fwd_bwd_ms"] * 1e-3) / 1e12)
    assert report["reference"] == "sdpa_flash"
    for impl in ("flashattn", "naive", "sdpa_math"):
        assert max(rows[impl]["max_abs_err"].values()) < 1e-4
    # the bytes are the IO model's: naive = standard attention with its two passes over S (scale, mask)
    std = iomodel.standard_attention_traffic(2, 2, 128, 128, 32, 4, elementwise_passes=2)
    assert rows["naive"]["fwd_bwd_bytes"] == [std.fwd_bwd, std.fwd_bwd]
    assert rows["flashattn"]["fwd_bwd_bytes"][0] == iomodel.compulsory_traffic(2, 2, 128, 128, 32, 4).fwd_bwd
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1].startswith("Theta(N^2 d^2 / M)")
    assert any(line.startswith("naive ") for line in out)


def test_tiles_are_read_back_from_the_kernels(script, monkeypatch):
    from flashattn.backends import triton as tb
    monkeypatch.setenv("FLASHATTN_AUTOTUNE", "0")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    tiles, note = script.flashattn_tiles(64, "cuda")
    assert tiles == iomodel.Tiles((64, 64), (64, 64), (64, 64)) and note.count("(default)") == 3
    monkeypatch.setitem(tb.pinned_configs, "fwd", dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=2))
    tiles, note = script.flashattn_tiles(128, "cuda")
    assert tiles.fwd == (128, 32) and tiles.dq == (128, 32) and tiles.dkdv == (32, 64)
    assert "fwd 128x32 (pinned)" in note
