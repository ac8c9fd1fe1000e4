"""The `flashattn` command line."""
import subprocess
import sys

from flashattn import cli


def flashattn(*args):
    return subprocess.run([sys.executable, "-m", "flashattn", *args], capture_output=True, text=True, timeout=120)


def _info_rows(out):
    """`flashattn info` lines as {key: value} (keys are padded to one width, then two spaces)."""
    rows = {}
    for line in out.splitlines():
        key, sep, value = line.partition("  ")
        if sep:
            rows[key.strip()] = value.strip()
    return rows


def test_info(capsys):
    assert cli.main(["info"]) == 0
    rows = _info_rows(capsys.readouterr().out)
    for key in ("flashattn", "torch", "triton", "numpy", "CUDA usable", "Triton usable", "autotune cache"):
        assert key in rows, rows
    assert rows["call: dense, CPU (any dtype)"].startswith("torch -> PyTorch tiled path")
    assert rows["call: kvcache decode, CPU"].startswith("torch -> gather the cache")
    assert rows["call: varlen (cu_seqlens), CPU"].endswith("one sequence at a time")
    # CUDA rows are answered by choose_backend even without a GPU
    cuda_row = rows["call: dense fp16/bf16, CUDA"]
    assert cuda_row.startswith("triton -> Triton kernels: _attn_fwd") or cuda_row.startswith("torch ->")
    assert rows["call: dense fp32/fp64, CUDA"].startswith("torch ->")
    assert rows["call: kvcache decode, CUDA fp16/bf16"].split(" ")[0] == cuda_row.split(" ")[0]


def test_info_reports_a_forced_backend(capsys, monkeypatch):
    monkeypatch.setenv("FLASHATTN_BACKEND", "reference")
    assert cli.main(["info"]) == 0
    rows = _info_rows(capsys.readouterr().out)
    assert rows["FLASHATTN_BACKEND"] == "reference"
    assert rows["call: dense, CPU (any dtype)"].startswith("reference -> reference: float64")
    assert rows["call: kvcache decode, CUDA fp16/bf16"].startswith("reference -> gather the cache")


def test_info_forced_triton_on_cpu_is_an_error_row(capsys, monkeypatch):
    monkeypatch.setenv("FLASHATTN_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert cli.main(["info"]) == 0
    rows = _info_rows(capsys.readouterr().out)
    assert rows["call: dense, CPU (any dtype)"].startswith("error: FLASHATTN_BACKEND=triton needs CUDA")
    assert "fp16/bf16 only" in rows["call: dense fp32/fp64, CUDA"]


def test_info_autotune_cache_follows_triton(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "tc"))
    assert cli.main(["info"]) == 0
    assert _info_rows(capsys.readouterr().out)["autotune cache"].startswith(f"{tmp_path / 'tc'} (not created yet")
    (tmp_path / "tc" / "abc").mkdir(parents=True)
    assert cli.main(["info"]) == 0
    assert "(1 entries" in _info_rows(capsys.readouterr().out)["autotune cache"]


def test_triton_cache_dir_without_the_env_var(monkeypatch, tmp_path):
    from flashattn.bench.environment import triton_cache_dir
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_HOME", str(tmp_path))
    assert triton_cache_dir() == str(tmp_path / ".triton" / "cache")


def test_explain_via_python_m():
    proc = flashattn("explain")
    assert proc.returncode == 0, proc.stderr
    assert "[0.7311, 0.2689]" in proc.stdout and "max |O - naive|" in proc.stdout


def test_unknown_subcommand_is_a_usage_error():
    proc = flashattn("frobnicate")
    assert proc.returncode != 0
    assert "usage: flashattn" in proc.stderr and "invalid choice" in proc.stderr


def test_no_subcommand_is_a_usage_error(capsys):
    assert cli.main([]) == 2
    assert "usage: flashattn" in capsys.readouterr().err


def test_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("demo", "explain", "bench", "info"):
        assert name in out


def test_bench_forwards_its_arguments(monkeypatch):
    seen = []

    class FakeBench:
        @staticmethod
        def main(argv):
            seen.append(argv)
            return 7

    monkeypatch.setitem(sys.modules, "flashattn.bench", FakeBench)
    monkeypatch.setattr("flashattn.bench", FakeBench, raising=False)
    assert cli.main(["bench", "--seqlens", "1024", "--quick"]) == 7
    assert seen == [["--seqlens", "1024", "--quick"]]
