"""`flashattn demo` end to end, on sizes that take seconds.

One real run (each measurement is a fresh process, ~2 s each): seqlen 256 and 2048 with 4 heads, where
naive's S + P = 2 · 4 · 2048² · 4 B = 128 MiB and flashattn's tiles a few MiB, so the memory gap is large
and robust. The skip bookkeeping is tested with a stand-in for the measuring process.
"""
import json
import subprocess
import sys

import pytest
import torch

from flashattn import demo
from flashattn.reference import attention_ref


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    png, js = d / "demo.png", d / "demo.json"
    cmd = [sys.executable, "-m", "flashattn", "demo", "--seqlens", "256", "2048", "--heads", "4",
           "--plot", str(png), "--json", str(js), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {r["seqlen"]: r for r in json.loads(js.read_text())["rows"]}
    return proc.stdout, rows, png


def test_table_is_printed(demo_run):
    out, _, _ = demo_run
    header = next(line for line in out.splitlines() if line.lstrip().startswith("seqlen"))
    for col in ("max err flashattn", "flashattn MiB", "naive MiB", "flashattn ms", "naive ms"):
        assert col in header
    body = [line.split()[0] for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert body == ["256", "2048"]


def test_flashattn_is_exact_in_fp32(demo_run):
    _, rows, _ = demo_run
    for n in (256, 2048):
        assert rows[n]["flashattn"]["max_err"] < 1e-5
        assert rows[n]["naive"]["max_err"] < 1e-5


def test_flashattn_measured_memory_is_smaller(demo_run):
    _, rows, _ = demo_run
    fa, nv = rows[2048]["flashattn"]["peak_mib"], rows[2048]["naive"]["peak_mib"]
    assert nv > 100            # the measurement sees naive's 128 MiB of S and P
    assert fa < nv / 4


def test_skips_beyond_the_caps(monkeypatch):
    jobs = []

    def fake_measure(job):
        jobs.append((job.impl, job.seqlen, job.check))
        return {"peak_mib": 1.0, "ms": 1.0, "max_err": 0.0 if job.check else None}

    monkeypatch.setattr(demo, "measure_in_subprocess", fake_measure)
    rows = demo.run_demo([256, 4096], nheads=4, check_max_seqlen=2048, naive_max_gib=0.25, progress=False)
    assert jobs == [("flashattn", 256, True), ("naive", 256, True), ("flashattn", 4096, False)]
    assert rows[1]["naive"] == {"skipped": "would need ~0.5 GiB"}   # 2 · 4 · 4096² · 4 B
    table = demo.format_table(rows)
    assert "skipped (would need ~0.5 GiB)" in table
    assert table.splitlines()[-1].split()[1:3] == ["skipped", "skipped"]   # no check above the cap


def test_plot_is_a_png(demo_run):
    _, _, png = demo_run
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_naive_attention_matches_reference():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 33, 3, 16) for _ in range(3))
    ref, _ = attention_ref(q, k, v)
    torch.testing.assert_close(demo.naive_attention(q, k, v, 16 ** -0.5), ref.float(), atol=1e-5, rtol=0)


def test_naive_attention_causal_matches_reference_with_gradients():
    # bottom-right aligned like flashattn (seqlen_q < seqlen_k: every row sees a key)
    torch.manual_seed(1)
    q = torch.randn(2, 20, 3, 16, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 27, 3, 16, dtype=torch.float64, requires_grad=True) for _ in range(2))
    ref, _ = attention_ref(q, k, v, causal=True)
    out = demo.naive_attention(q, k, v, 16 ** -0.5, causal=True)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    dout = torch.randn_like(out)
    for g, r in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(g, r, atol=1e-12, rtol=0)


def test_options():
    p = demo.build_parser()
    assert p.parse_args([]).seqlens is None   # -> DEFAULT_SEQLENS, chosen in run()
    assert demo.DEFAULT_SEQLENS == (1024, 2048, 4096, 8192, 16384)
    a = p.parse_args(["--quick", "--device", "auto"])
    assert a.quick and demo.resolve_device(a.device) in ("cpu", "cuda")
    assert demo.naive_bytes(1, 8, 16384, 4) / 2 ** 30 == 16.0   # the default run skips naive at 16384


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_cuda_requested_without_cuda():
    assert demo.main(["--device", "cuda", "--seqlens", "64"]) == 2
