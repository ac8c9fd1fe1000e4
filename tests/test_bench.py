"""`flashattn bench` on the CPU: the CPU mode end to end, the GPU mode's runner and formatting with
CPU tensors and fake timings. No timing assertions (benchmarks are not tests)."""
from __future__ import annotations

import io
import json
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from flashattn.bench import main
from flashattn.bench import records
from flashattn.bench.gpu import make_cases, run_grid
from flashattn.bench.peers import PEERS, Case, Peer, make_inputs, run_peer
from flashattn.bench.records import Check, Result


def wall_ms(fn):
    """A stand-in for triton.testing.do_bench on the CPU."""
    fn()
    t = time.perf_counter()
    fn()
    return max((time.perf_counter() - t) * 1e3, 1e-6)


# ----------------------------------------------------------------------------------------------
# CPU mode


def test_cpu_mode_end_to_end(tmp_path, capsys):
    path = tmp_path / "cpu.json"
    rc = main(["--device", "cpu", "--seqlens", "1024", "--heads", "4", "--json", str(path),
               "--rep", "1", "--warmup", "0", "--markdown"])
    assert rc == 0
    report = json.loads(path.read_text())
    assert report["mode"] == "cpu"
    for impl in ("flashattn", "sdpa", "naive"):
        assert report["results"][impl]["ms"] > 0, report["results"][impl]
        assert report["memory"][impl]["peak_extra_mib"] > 0, report["memory"][impl]
    # naive attention materializes S and P (4 heads x 1024^2 x 4 bytes = 16 MiB each); flashattn does not
    assert report["memory"]["naive"]["peak_extra_mib"] > report["memory"]["flashattn"]["peak_extra_mib"]
    assert report["ratios"]["time_flashattn_over_sdpa"] > 0
    assert report["ratios"]["memory_flashattn_over_naive"] > 0
    assert report["check"]["max_abs_err_vs_sdpa"] < 1e-4
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1].startswith("max abs err vs naive")      # the table is printed last
    assert any(line.startswith("| flashattn (tiled) |") for line in out)


def test_cpu_mode_rejects_several_shapes():
    with pytest.raises(SystemExit, match="one shape"):
        main(["--device", "cpu", "--seqlens", "256,512", "--no-memory"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without CUDA")
def test_cuda_mode_without_cuda_says_so(capsys):
    assert main(["--device", "cuda", "--quick"]) == 2
    assert "--device cpu" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# the peer runner: failures are recorded, never raised


class _NoBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        raise RuntimeError("this peer has no backward")


def _raise(msg):
    raise RuntimeError(msg)


def _sdpa_then_no_backward(case):
    return lambda q, k, v: _NoBackward.apply(F.scaled_dot_product_attention(q, k, v, is_causal=case.causal))


BROKEN = [
    Peer("broken_make", "bhsd", lambda case: _raise("unsupported shape")),
    Peer("broken_call", "bhsd", lambda case: (lambda q, k, v: _raise("kernel launch failed"))),
    Peer("broken_context", "bhsd", PEERS["sdpa_math"].make, lambda: _raise("no such backend")),
    Peer("broken_bwd", "bhsd", _sdpa_then_no_backward),
]
CASE = Case(batch=2, nheads=2, seqlen=64, hdim=32, causal=True, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("peer", BROKEN, ids=lambda p: p.name)
def test_failing_peer_is_recorded_as_unavailable(peer):
    run = run_peer(peer, CASE, make_inputs(CASE), ("fwd", "bwd"), wall_ms)
    by_pass = {r.pass_: r for r in run.results}
    assert set(by_pass) == {"fwd", "bwd"}
    if peer.name == "broken_bwd":
        assert by_pass["fwd"].ok and by_pass["fwd"].tflops > 0
        assert "this peer has no backward" in by_pass["bwd"].error
    else:
        for r in run.results:
            assert not r.ok and r.ms is None and r.tflops is None
            assert "RuntimeError" in r.error


def test_forced_backend_that_cannot_run_says_why():
    # On the CPU there is no memory-efficient SDPA kernel: torch raises, the reason is recorded.
    run = run_peer(PEERS["sdpa_efficient"], CASE, make_inputs(CASE), ("fwd",), wall_ms)
    (r,) = run.results
    if torch.cuda.is_available() and r.ok:
        pytest.skip("this torch runs memory-efficient SDPA here")
    assert not r.ok and r.error


def test_grid_on_cpu_with_real_peers_and_a_broken_one():
    cases = make_cases([32], [64, 96], [False, True], torch.float32, "cpu", tokens=128, width=64)
    peers = [PEERS["flashattn"], PEERS["sdpa_flash"], PEERS["sdpa_math"], BROKEN[1]]
    results, checks, complete = run_grid(cases, peers, ("fwd", "bwd"), wall_ms, log=lambda s: None)
    assert complete
    assert len(results) == len(cases) * len(peers) * 2
    ours = [r for r in results if r.impl == "flashattn"]
    assert all(r.ok and r.tflops > 0 for r in ours)
    assert all(not r.ok for r in results if r.impl == "broken_call")
    assert len(checks) == len(cases)
    for c in checks:
        assert c.reference == "sdpa_flash"
        errs = c.errors["flashattn"]
        assert set(errs) == {"out", "dq", "dk", "dv"}
        assert max(errs.values()) < 1e-4, errs
        assert "broken_call" not in c.errors
    rows = records.build_rows(results, checks, [p.name for p in peers])
    table = records.format_table(rows, [p.name for p in peers])
    assert "n/a" in table and "geomean" in table.splitlines()[-1]


def test_time_budget_skips_the_rest():
    cases = make_cases([32], [64, 96], [False], torch.float32, "cpu", tokens=128, width=64)
    results, checks, complete = run_grid(cases, [PEERS["flashattn"]], ("fwd",), wall_ms, time_budget_s=-1,
                                         log=lambda s: None)
    assert not complete and checks == []
    assert len(results) == 2 and all(r.error.startswith("skipped: time budget") for r in results)


# ----------------------------------------------------------------------------------------------
# GPU-mode formatting from made-up records


IMPLS = ["flashattn", "sdpa_flash", "sdpa_cudnn", "flex"]
FAKE_TFLOPS = {"flashattn": 300.0, "sdpa_flash": 200.0, "sdpa_cudnn": 400.0, "flex": 250.0}


def fake_results():
    out = []
    for hdim in (64, 128):
        nheads = 2048 // hdim
        for causal in (False, True):
            for seqlen in (512, 1024, 2048):
                for pass_ in ("fwd", "bwd"):
                    for impl in IMPLS:
                        if impl == "flex" and hdim == 64:
                            out.append(Result(impl, hdim, seqlen, causal, pass_, 16384 // seqlen, nheads,
                                              error="BackendCompilerFailed: out of shared memory"))
                            continue
                        tf = FAKE_TFLOPS[impl] * (1 + seqlen / 4096)
                        out.append(Result(impl, hdim, seqlen, causal, pass_, 16384 // seqlen, nheads, ms=1.0,
                                          tflops=tf))
    checks = [Check(hdim, seqlen, causal, "sdpa_flash",
                    {"flashattn": {"out": 3e-3, "dq": 5e-3, "dk": 4e-3, "dv": 2e-3},
                     "sdpa_cudnn": {"out": 2e-3, "dq": 4e-3, "dk": 4e-3, "dv": 1e-3}})
              for hdim in (64, 128) for causal in (False, True) for seqlen in (512, 1024, 2048)]
    return out, checks


ENV = {"gpu": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "cudnn": "9.19.0",
       "dtype": "bfloat16", "date": "2026-11-21T10:00:00+00:00", "command": "flashattn bench",
       "flashattn_backend": "triton"}
CEILINGS = {"matmul_tflops": 797.3, "copy_tbps": 3.02}


def test_rows_ratios_and_table():
    results, checks = fake_results()
    rows = records.build_rows(results, checks, IMPLS)
    assert len(rows) == 2 * 2 * 3 * 2
    row = next(r for r in rows if (r["hdim"], r["seqlen"], r["causal"], r["pass"]) == (128, 1024, True, "bwd"))
    assert row["ratio"]["sdpa_flash"] == pytest.approx(1.5)
    assert row["ratio"]["sdpa_cudnn"] == pytest.approx(0.75)
    assert row["ratio"]["flex"] == pytest.approx(1.2)
    assert row["max_abs_err"]["flashattn"] == pytest.approx(5e-3)        # worst of dq, dk, dv on a bwd row
    row64 = next(r for r in rows if r["hdim"] == 64)
    assert row64["tflops"]["flex"] is None and row64["ratio"]["flex"] is None and "flex" in row64["errors"]
    g = records.geomean_ratios(rows, IMPLS)
    assert g["sdpa_flash"] == pytest.approx(1.5) and g["sdpa_cudnn"] == pytest.approx(0.75)

    table = records.format_table(rows, IMPLS, records.format_header(ENV, CEILINGS))
    lines = table.splitlines()
    assert "NVIDIA H100" in lines[0] and "797 TFLOP/s" in lines[1]
    assert lines[-1].split()[0] == "geomean" and "1.50" in lines[-1] and "0.75" in lines[-1]
    body = [ln for ln in lines if ln.strip().startswith(("64 ", "128 "))]
    assert len(body) == len(rows)
    assert all("n/a" in ln for ln in body if ln.strip().startswith("64 "))
    errors = records.format_errors(results)
    assert "flex: BackendCompilerFailed" in errors and "12 in all" in errors


def test_markdown_json_roundtrip_and_plot(tmp_path):
    results, checks = fake_results()
    md = records.format_markdown(records.build_rows(results, checks, IMPLS), IMPLS, ENV, CEILINGS)
    table = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(table) == 2 + 24 + 1                      # header, separator, rows, geomean
    assert "797 TFLOP/s" in md and all(ln.count("|") == table[0].count("|") for ln in table)

    report = records.report_dict(env=ENV, config={"quick": True}, ceilings=CEILINGS, results=results,
                                 checks=checks, impls=IMPLS, elapsed_s=1.0)
    path = tmp_path / "run.json"
    records.write_json(str(path), report)
    meta, results2, checks2, impls2 = records.load_reports([str(path)])
    assert impls2 == IMPLS and meta["ceilings"]["matmul_tflops"] == 797.3
    assert records.build_rows(results2, checks2, impls2) == records.build_rows(results, checks, IMPLS)
    assert json.loads(path.read_text())["summary"]["geomean_ratio_flashattn_over_peer"]["sdpa_flash"] == \
        pytest.approx(1.5)

    png = tmp_path / "plot.png"
    records.plot(report["rows"], IMPLS, str(png), title="test")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_nan_error_survives_json(tmp_path):
    results, checks = fake_results()
    checks[0].errors["flashattn"]["out"] = float("nan")       # a broken kernel must stay visible
    path = tmp_path / "nan.json"
    records.write_json(str(path), records.report_dict(env=ENV, config={}, ceilings=CEILINGS, results=results,
                                                      checks=checks, impls=IMPLS))
    _, results2, checks2, _ = records.load_reports([str(path)])
    rows = records.build_rows(results2, checks2, IMPLS)
    assert "nan" in records.format_table(rows, IMPLS)


def test_main_load_renders_table_last(tmp_path, capsys):
    results, checks = fake_results()
    half = len(results) // 2
    paths = []
    for n, part in enumerate((results[:half], results[half:])):
        p = tmp_path / f"part{n}.json"
        records.write_json(str(p), records.report_dict(env=ENV, config={}, ceilings=CEILINGS, results=part,
                                                       checks=checks, impls=IMPLS))
        paths.append(str(p))
    md = tmp_path / "BENCHMARKS.md"
    png = tmp_path / "merged.png"
    assert main(["--load", *paths, "--plot", str(png), "--markdown", str(md)]) == 0
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1].split()[0] == "geomean"
    assert png.exists() and "| hdim | seqlen |" in md.read_text()


@pytest.mark.slow
def test_flex_peer_compiles_on_cpu():
    # FlexAttention compiles its forward on the CPU too (the backward is CUDA-only: recorded, not raised).
    case = Case(batch=1, nheads=2, seqlen=128, hdim=32, causal=True, dtype=torch.float32, device="cpu")
    inputs = make_inputs(case)
    run = run_peer(PEERS["flex"], case, inputs, ("fwd", "bwd"), wall_ms)
    fwd, bwd = run.results
    assert fwd.ok, fwd.error
    ref = run_peer(PEERS["sdpa_math"], case, inputs, ("fwd",), wall_ms)
    assert (run.out - ref.out).abs().max().item() < 1e-4
    if not bwd.ok:
        assert "backward" in bwd.error


def test_gpu_mode_driver_on_cpu(tmp_path, capsys):
    # The GPU mode's orchestration (JSON after every shape, plot, markdown, table last), driven on the CPU.
    from flashattn.bench import _resolve, build_parser
    from flashattn.bench import gpu

    path, png = tmp_path / "gpu.json", tmp_path / "gpu.png"
    argv = ["--hdims", "32", "--seqlens", "64,128", "--dtype", "fp32", "--peers", "sdpa_flash,sdpa_math",
            "--tokens", "128", "--width", "64", "--json", str(path), "--plot", str(png), "--markdown"]
    args = build_parser().parse_args(argv)
    _resolve(args, "cuda")
    assert gpu.run(args, argv, device="cpu", bench=wall_ms, with_ceilings=False) == 0
    report = json.loads(path.read_text())
    assert report["complete"] and report["impls"] == ["flashattn", "sdpa_flash", "sdpa_math"]
    assert len(report["rows"]) == 2 * 2 * 2               # seqlens x causal x passes
    assert all(r["tflops"]["flashattn"] > 0 and r["ratio"]["sdpa_flash"] > 0 for r in report["rows"])
    assert all(c["errors"]["flashattn"]["out"] < 1e-4 for c in report["checks"])
    assert report["environment"]["command"].startswith("flashattn bench --hdims 32")
    assert png.read_bytes()[:4] == b"\x89PNG"
    out = capsys.readouterr().out.rstrip().splitlines()
    assert out[-1].split()[0] == "geomean"


def test_ceilings_on_cpu():
    from flashattn.bench.gpu import measure_ceilings
    c = measure_ceilings(wall_ms, "cpu", n=128, nbytes=1 << 20)
    assert "error" not in c, c
    assert c["matmul_tflops"] > 0 and c["copy_tbps"] > 0


# ----------------------------------------------------------------------------------------------
# progress bars


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_only_on_a_terminal(monkeypatch):
    from flashattn.bench import progress

    tty = _Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    assert progress.bar_enabled() and not progress.bar_enabled(quiet=True)
    assert list(progress.progress_bar(range(3), desc="bench test", unit="shape")) == [0, 1, 2]
    assert "bench test:" in tty.getvalue() and "0/3" in tty.getvalue()
    progress.log_fn(quiet=True)("hidden")
    progress.log_fn()("shown")
    assert "hidden" not in tty.getvalue() and "shown" in tty.getvalue()

    pipe = io.StringIO()                                   # not a terminal: no bar, lines still logged
    monkeypatch.setattr(sys, "stderr", pipe)
    assert list(progress.progress_bar(range(3), desc="bench test")) == [0, 1, 2]
    progress.log_fn()("a line")
    assert pipe.getvalue() == "a line\n"


# ----------------------------------------------------------------------------------------------
# sub-commands and the memory sweep


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: flashattn bench [prefill] [options]")
    for name in ("prefill", "decode", "memory"):
        assert f"\n  {name} " in out.split("sub-commands:")[1]


def test_prefill_is_the_default_mode():
    # the same parser and checks with or without the word
    for argv in (["prefill", "--device", "cpu", "--seqlens", "256,512"], ["--device", "cpu", "--seqlens", "256,512"]):
        with pytest.raises(SystemExit, match="one shape"):
            main(argv + ["--no-memory"])


def test_memory_sweep_on_cpu_end_to_end(tmp_path, capsys):
    path, png = tmp_path / "mem.json", tmp_path / "mem.png"
    assert main(["memory", "--device", "cpu", "--seqlens", "1024", "--heads", "4", "--impls", "flashattn,naive",
                 "--json", str(path), "--plot", str(png), "--quiet"]) == 0
    report = json.loads(path.read_text())
    assert report["config"]["passes"] == "fwd_bwd" and report["config"]["heads"] == 4
    (row,) = report["rows"]
    fa, naive = row["flashattn"], row["naive"]
    assert fa["passes"] == naive["passes"] == "fwd_bwd"
    # naive keeps P for the backward and builds dP and dS (16 MiB each here); flashattn keeps no score matrix
    assert row["scores_mib"] == 16.0
    assert naive["peak_extra_mib"] > 2 * row["scores_mib"] > fa["peak_extra_mib"] > 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    cap = capsys.readouterr()
    assert cap.err == ""                                   # --quiet: no bar, no per-measurement lines
    last = cap.out.rstrip().splitlines()[-1].split()
    assert last[0] == "1024" and last[-1].endswith("x")    # the table is last: seqlen ... naive/flashattn


def test_memory_sweep_skips_and_failures_json_on_stdout(monkeypatch, capsys):
    from flashattn.bench import memory_sweep

    def fake(impl, **kw):
        if impl == "sdpa" and kw["seqlen"] == 128:
            raise RuntimeError("memory measurement of sdpa at seqlen 128 failed: killed (out of memory?)")
        assert kw["backward"] is False and kw["causal"] is True
        return {"peak_extra_mib": {"flashattn": 1.0, "naive": 9.0, "sdpa": 2.0}[impl] * kw["seqlen"] / 64}

    monkeypatch.setattr(memory_sweep, "_measure_cpu", fake)
    # naive's 2 forward score matrices at seqlen 128 (2 x 8 heads x 128² x 4 bytes = 1 MiB) exceed the
    # budget of 0.75 MiB; at seqlen 64 (0.25 MiB) they do not
    assert main(["memory", "--device", "cpu", "--seqlens", "64", "128", "--fwd-only", "--causal",
                 "--naive-max-gib", str(0.75 / 1024), "--json", "--quiet"]) == 0
    cap = capsys.readouterr()
    report = json.loads(cap.out)                           # stdout holds the JSON alone
    r64, r128 = report["rows"]
    assert r64["naive"]["peak_extra_mib"] == 9.0 and "skipped" in r128["naive"]
    assert "out of memory" in r128["sdpa"]["error"] and r128["flashattn"]["peak_extra_mib"] == 2.0
    table = cap.err.splitlines()                           # the table went to stderr
    assert "seqlen 128 naive: its score matrices need" in cap.err and "seqlen 128 sdpa: RuntimeError" in cap.err
    assert table[-1].split() == ["128", "0.5", "2.0", "skipped", "failed", "-"]
    assert table[-2].split() == ["64", "0.125", "1.0", "9.0", "2.0", "9.0x"]


def test_memory_sweep_rejects_unknown_impls():
    with pytest.raises(SystemExit, match="unknown implementation"):
        main(["memory", "--device", "cpu", "--impls", "flashattn,xformers"])


def test_decode_bench_fp8_caches_on_cpu():
    """`bench decode --kv-dtype fp8` builds its caches with _fp8_cache and _paged (the timing itself needs a
    GPU): the paged float8 pages hold the same bytes as the contiguous cache, and both decode alike."""
    import torch

    from flashattn import flash_attn_with_kvcache
    from flashattn.bench import decode

    g = torch.Generator().manual_seed(0)
    b, s, hk, d = 2, 37, 2, 16
    k, v = (torch.randn(b, s, hk, d, generator=g).bfloat16() for _ in range(2))
    (k8, kd), (v8, vd) = decode._fp8_cache(k), decode._fp8_cache(v)
    assert k8.dtype == torch.float8_e4m3fn and kd.shape == (b, hk)
    assert (k8.float().abs().amax(dim=(1, 3)) == 448).all()          # amax / 448: the largest maps to 448
    kp, vp, table = decode._paged(k8, v8, 16, g)
    assert kp.dtype == torch.float8_e4m3fn and kp.shape == (b * 3, 16, hk, d)
    rows = torch.arange(s)
    pages = table.long()[:, rows // 16]
    assert torch.equal(kp[pages, rows % 16].view(torch.uint8), k8.view(torch.uint8))
    q = torch.randn(b, 1, 2 * hk, d, generator=g).bfloat16()
    kw = dict(cache_seqlens=s, causal=True, k_descale=kd, v_descale=vd)
    assert torch.equal(flash_attn_with_kvcache(q, k8, v8, **kw), flash_attn_with_kvcache(q, kp, vp, block_table=table, **kw))
    header = decode.format_table([], ["contiguous"], None, False, {}, {}, 4, 2, 16, "fp8")
    assert "fp8 (e4m3) K/V cache" in header
