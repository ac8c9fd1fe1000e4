"""The `flashattn` command line."""
import subprocess
import sys

from flashattn import cli


def flashattn(*args):
    return subprocess.run([sys.executable, "-m", "flashattn", *args], capture_output=True, text=True, timeout=120)


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for key in ("flashattn", "torch", "triton", "numpy", "CUDA usable", "Triton usable", "backend, CPU float32"):
        assert key in out
    assert "backend, CPU float32  torch" in out


def test_info_reports_a_forced_backend(capsys, monkeypatch):
    monkeypatch.setenv("FLASHATTN_BACKEND", "reference")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "FLASHATTN_BACKEND" in out and "backend, CPU float32  reference" in out


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
