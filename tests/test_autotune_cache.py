"""flashattn's autotune cache (backends/triton/tuning.py): load/store, corrupt and stale files, concurrent
writers, the tuning lock, and the wiring into the launchers.

CPU tests drive the cache with stand-ins for the kernels (a "tuned" kernel that records that it
benchmarked and a "plain" one that records the config it was launched with), so what is checked is
exactly the decision: tune or reuse, and with which config. The `gpu` tests run the real kernels.
"""
import json
import os
import subprocess
import sys
import textwrap
import threading
import warnings

import pytest
import torch

triton = pytest.importorskip("triton")

from flashattn.backends import triton as tb  # noqa: E402
from flashattn.backends.triton import tuning  # noqa: E402
from flashattn.backends.triton.tuning import AutotuneCacheWarning  # noqa: E402

ON_GPU = torch.cuda.is_available()
KEY = {"HEAD_DIM": 64, "HAS_LEFT": False, "seq_bucket": 4096, "dtype": "torch.bfloat16", "gpu": "NVIDIA H200"}
CANDIDATES = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
              triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3)]
ALLOWED = [tuning.config_dict(c) for c in CANDIDATES]
MODULE = json   # whose source stands for "the kernels" in the fingerprint


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "autotune"
    monkeypatch.setenv("FLASHATTN_AUTOTUNE_CACHE_DIR", str(d))
    tuning.forget()
    tuning._warned.clear()
    yield d
    tuning.forget()


def test_store_then_load_round_trips(cache_dir):
    tuning.store("fwd", KEY, ALLOWED[1], MODULE)
    path = tuning.path_for("fwd", KEY)
    assert os.path.dirname(path) == str(cache_dir)
    entry = json.loads(open(path).read())
    assert entry["format"] == tuning.FORMAT and entry["kernel"] == "fwd" and entry["config"] == ALLOWED[1]
    assert tuning.load("fwd", KEY, ALLOWED, MODULE) == ALLOWED[1]
    assert tuning.load("fwd", dict(KEY, seq_bucket=8192), ALLOWED, MODULE) is None   # another key: absent
    assert [f for f in os.listdir(cache_dir) if f.endswith(".tmp")] == []            # no temporary left behind


def _entry(**changes):
    e = {"format": tuning.FORMAT, "kernel": "fwd", "key": tuning._canonical_key(KEY),
         "fingerprint": tuning.fingerprint(MODULE), "config": ALLOWED[0]}
    e.update(changes)
    return json.dumps(e).encode()


BAD_FILES = {
    "empty": (b"", "not valid JSON"),
    "truncated": (_entry()[:40], "not valid JSON"),
    "not-utf8": (b"\xff\xfe\x00garbage", "not valid JSON"),
    "a-list": (b"[1, 2, 3]", "format 'list'"),
    "old-format": (_entry(format=0), "format 0"),
    "no-format": (b'{"config": {}}', "format None"),
    "other-kernel": (_entry(kernel="dq"), "holds kernel 'dq'"),
    "other-key": (_entry(key=[["HEAD_DIM", 128]]), "holds kernel 'fwd' key"),
    "stale-triton": (_entry(fingerprint={"triton": "2.0.0", "source": "x"}), "stale"),
    "stale-kernel-source": (_entry(fingerprint=dict(tuning.fingerprint(MODULE), source="0" * 16)), "stale"),
    "config-not-a-candidate": (_entry(config={"kwargs": {"BLOCK_M": 256, "BLOCK_N": 256}, "num_warps": 4,
                                              "num_stages": 3}), "not one of the 2 candidates"),
    "config-wrong-types": (_entry(config={"kwargs": {"BLOCK_M": "64", "BLOCK_N": 64}, "num_warps": 4,
                                          "num_stages": 3}), "not one of the 2 candidates"),
    "config-missing": (_entry(config=None), "not one of the 2 candidates"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_file_is_ignored_with_a_warning(name, cache_dir):
    content, problem = BAD_FILES[name]
    path = tuning.path_for("fwd", KEY)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(content)
    with pytest.warns(AutotuneCacheWarning, match=problem):
        assert tuning.load("fwd", KEY, ALLOWED, MODULE) is None


def test_unreadable_directory_entry_is_a_warning(cache_dir):
    path = tuning.path_for("fwd", KEY)
    os.makedirs(path)   # a directory where the file should be: open() fails with IsADirectoryError
    with pytest.warns(AutotuneCacheWarning, match="cannot be read"):
        assert tuning.load("fwd", KEY, ALLOWED, MODULE) is None


def test_unwritable_directory_is_a_warning_not_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("FLASHATTN_AUTOTUNE_CACHE_DIR", str(blocker / "sub"))   # a path under a file
    with pytest.warns(AutotuneCacheWarning, match="cannot be written"):
        tuning.store("fwd", KEY, ALLOWED[0], MODULE)


# ------------------------------------------------------------------------------------------------
# run_tuned with stand-in kernels


class FakePlain:
    """A @triton.jit kernel's launch syntax, kernel[grid](*args, **kwargs); records each launch's config."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            cfg = {k: kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages") if k in kwargs}
            self.launches.append((grid, cfg))
        return launch


class FakeTuned:
    """triton.autotune's launch syntax: benchmarks (counted), then sets best_config and launches it."""

    def __init__(self, winner):
        self.winner, self.tunings, self.best_config = winner, 0, None
        self.lock = threading.Lock()

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            with self.lock:
                self.tunings += 1
            grid(dict(kwargs, **self.winner.kwargs))   # the autotuner calls the grid with the config's kwargs
            self.best_config = self.winner
        return launch


def _run(tuned, plain, key=KEY, candidates=CANDIDATES):
    grid = lambda m: (triton.cdiv(1000, m["BLOCK_M"]), 8)   # noqa: E731
    return tuning.run_tuned("fwd", tuned, plain, grid, ("q", 1, 2), {"HEAD_DIM": 64}, key, candidates, MODULE)


def test_tunes_once_then_reuses_from_memory_and_from_disk(cache_dir):
    tuned, plain = FakeTuned(CANDIDATES[1]), FakePlain()
    assert _run(tuned, plain) == ALLOWED[1]
    assert tuned.tunings == 1 and plain.launches == []          # the tuning call ran the kernel itself
    assert tuning.load("fwd", KEY, ALLOWED, MODULE) == ALLOWED[1]
    _run(tuned, plain)                                           # same process: from memory
    tuning.forget()                                              # a new process: from disk
    _run(tuned, plain)
    assert tuned.tunings == 1
    assert plain.launches == [((8, 8), {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3})] * 2


@pytest.mark.parametrize("name", ["truncated", "not-utf8", "stale-kernel-source", "config-not-a-candidate"])
def test_bad_file_is_retuned_and_rewritten(name, cache_dir):
    path = tuning.path_for("fwd", KEY)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(BAD_FILES[name][0])
    tuned, plain = FakeTuned(CANDIDATES[0]), FakePlain()
    with pytest.warns(AutotuneCacheWarning):
        assert _run(tuned, plain) == ALLOWED[0]
    assert tuned.tunings == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # the rewritten file is valid: no warning now
        assert tuning.load("fwd", KEY, ALLOWED, MODULE) == ALLOWED[0]


@pytest.mark.filterwarnings("error::flashattn.backends.triton.tuning.AutotuneCacheWarning")
def test_a_valid_file_gives_no_warning(cache_dir):
    tuning.store("fwd", KEY, ALLOWED[0], MODULE)
    tuned, plain = FakeTuned(CANDIDATES[1]), FakePlain()
    assert _run(tuned, plain) == ALLOWED[0] and tuned.tunings == 0


def test_threads_tune_once(cache_dir):
    """Eight threads hit one fresh key at once: one tuning (Triton's Autotuner is not thread-safe), all launch
    the winner."""
    tuned, plain = FakeTuned(CANDIDATES[1]), FakePlain()
    barrier = threading.Barrier(8)
    results = []

    def worker():
        barrier.wait()
        results.append(_run(tuned, plain))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert tuned.tunings == 1 and results == [ALLOWED[1]] * 8 and len(plain.launches) == 7


# ------------------------------------------------------------------------------------------------
# several processes on one cache file

_WORKER = textwrap.dedent("""
    import importlib.util, json, sys, time, warnings
    spec = importlib.util.spec_from_file_location("tuning", sys.argv[1])
    tuning = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tuning)           # the module alone: no torch import, a fast start
    role, seconds, key, offset = sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4]), int(sys.argv[5])
    configs = [{"kwargs": {"BLOCK_M": m, "BLOCK_N": 64}, "num_warps": 4, "num_stages": 3} for m in (16, 32, 64, 128)]
    warnings.simplefilter("error")            # any warning (a torn or corrupt read, a failed write) fails the worker
    seen, n, end = set(), 0, time.time() + seconds
    while time.time() < end:
        if role == "write":
            tuning.store("fwd", key, configs[(n + offset) % 4], json)
        else:
            c = tuning.load("fwd", key, configs, json)
            assert c is not None, "the file vanished"
            seen.add(c["kwargs"]["BLOCK_M"])
        n += 1
    print(json.dumps([n, sorted(seen)]))
""")

SMALL_CONFIGS = [{"kwargs": {"BLOCK_M": m, "BLOCK_N": 64}, "num_warps": 4, "num_stages": 3} for m in (16, 32, 64, 128)]


def test_concurrent_writers_and_readers_never_see_a_torn_file(cache_dir, tmp_path):
    """Three processes rewrite one entry (each cycling through four configs) while two others read it, for
    1.5 s: every read is complete and valid (os.replace), no warning anywhere, no temporary file left."""
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    tuning.store("fwd", KEY, SMALL_CONFIGS[0], json)   # readers start with a file
    env = dict(os.environ, FLASHATTN_AUTOTUNE_CACHE_DIR=str(cache_dir))
    procs = [subprocess.Popen([sys.executable, str(script), tuning.__file__, role, "1.5", json.dumps(KEY), str(i)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i, role in enumerate(["write"] * 3 + ["read"] * 2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    results = [json.loads(out) for out, _ in outs]
    assert all(n > 20 for n, _ in results), results
    # the readers saw the writers' changes: the file really was replaced under them
    assert max(len(seen) for _, seen in results[3:]) >= 2, results
    assert tuning.load("fwd", KEY, SMALL_CONFIGS, json) in SMALL_CONFIGS
    assert [f for f in os.listdir(cache_dir) if f.endswith(".tmp")] == []


# ------------------------------------------------------------------------------------------------
# the launchers' wiring: key and candidates


def test_launcher_rejects_a_cached_config_its_pruning_forbids(monkeypatch):
    """HEAD_DIM 256 forbids BLOCK_N > 64 in the forward (_keep_fwd): a cache file naming BLOCK_N = 128 for
    that key is stale (the candidates changed), so it is ignored and the kernel re-tuned."""
    monkeypatch.setattr(tb, "_autotune_enabled", lambda: True)
    tuned, plain = FakeTuned(tb._keep_fwd(tb.FWD_CONFIGS, {}, BLOCK_D=256)[0]), FakePlain()
    monkeypatch.setitem(tb._tuned, "fwd", tuned)
    monkeypatch.setitem(tb._plain, "fwd", plain)
    q = torch.empty(1, 8, 2, 256, dtype=torch.float16)
    args = (q, "...", 4096, 0, 0)   # the launchers' args start with q and end with (seq_bucket, gpu_key, tma_ok)
    meta = dict(GROUP=1, HEAD_DIM=256, BLOCK_D=256, HAS_LEFT=False, HAS_RIGHT=True, SOFTCAP=False, HAS_ALIBI=False,
                VARLEN=False, HAS_SINK=False, DROPOUT=False, HAS_GLOBAL=False, BLOCK_SPARSE=False)
    key = tb._tuning_key(args, meta)
    assert key["seq_bucket"] == 4096 and key["HEAD_DIM"] == 256 and key["dtype"] == "torch.float16"
    forbidden = tuning.config_dict(tb._cfg(128, 128, 8, 3))
    assert forbidden in [tuning.config_dict(c) for c in tb.FWD_CONFIGS]   # a candidate at smaller head dims
    tuning.store("fwd", key, forbidden, tb.K)
    with pytest.warns(AutotuneCacheWarning, match="not one of"):
        tb._launch("fwd", 1000, 2, args, meta)
    assert tuned.tunings == 1
    tuning.forget()
    tb._launch("fwd", 1000, 2, args, meta)    # now from the rewritten file
    assert tuned.tunings == 1 and plain.launches[-1][1]["BLOCK_N"] <= 64


# ------------------------------------------------------------------------------------------------
# GPU: the real kernels

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not ON_GPU, reason="needs an NVIDIA GPU")


@gpu
@needs_cuda
def test_gpu_tuning_writes_reuses_and_survives_corruption(cache_dir, monkeypatch):
    from flashattn import flash_attn_func
    monkeypatch.setenv("FLASHATTN_AUTOTUNE", "1")
    monkeypatch.delenv("FLASHATTN_BACKEND", raising=False)
    q, k, v = (torch.randn(2, 1000, 4, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def call():
        out = flash_attn_func(q, k, v, causal=True)
        return (out,) + torch.autograd.grad(out, (q, k, v), torch.ones_like(out))

    first = call()
    files = sorted(f for f in os.listdir(cache_dir) if f.endswith(".json"))
    assert [f.split("-")[0] for f in files] == ["dkdv", "dq", "fwd"], files
    for f in files:   # garble every file; a fresh process (forget) must warn, re-tune, rewrite
        with open(cache_dir / f, "r+b") as fh:
            fh.truncate(30)
    tuning.forget()
    with pytest.warns(AutotuneCacheWarning, match="not valid JSON"):
        second = call()
    for f in files:
        json.loads((cache_dir / f).read_text())
    for a, b in zip(first, second):   # the configs may differ between two tunings: compare loosely
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


_GPU_TUNER = textwrap.dedent("""
    import torch, warnings
    warnings.simplefilter("error")
    from flashattn import flash_attn_func
    q, k, v = (torch.randn(1, 3000, 4, 128, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    out = flash_attn_func(q, k, v, causal=True)
    out.sum().backward()
    torch.cuda.synchronize()
    print("ok", torch.isfinite(out).all().item())
""")


@gpu
@needs_cuda
def test_gpu_two_processes_tune_at_once(cache_dir, tmp_path):
    script = tmp_path / "tuner.py"
    script.write_text(_GPU_TUNER)
    import flashattn
    src = os.path.dirname(os.path.dirname(os.path.abspath(flashattn.__file__)))   # this checkout's flashattn
    env = dict(os.environ, FLASHATTN_AUTOTUNE_CACHE_DIR=str(cache_dir), FLASHATTN_AUTOTUNE="1",
               PYTHONPATH=os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]))
    env.pop("FLASHATTN_BACKEND", None)
    procs = [subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0 and "ok True" in out, err[-3000:]
    for f in os.listdir(cache_dir):
        assert f.endswith(".json"), f   # no temporary left
        json.loads((cache_dir / f).read_text())
