"""flashattn's on-disk cache of autotuning results: one small JSON file per (kernel, tuning key), written
atomically, versioned, validated when read. A cache file that cannot be trusted is ignored with an
`AutotuneCacheWarning`, the kernel is tuned again and the file rewritten: never a crash, never a
configuration that is not one of the kernel's candidates.

Why not Triton's own `cache_results=True` (triton 3.6, `runtime/autotuner.py` `check_disk_cache` and
`runtime/cache.py` `FileCacheManager`): it stores `{"key": ..., "configs_timings": [[Config.__dict__,
[t50, t20, t80]], ...]}` as `<kernel>.autotune.json` in `$TRITON_CACHE_DIR/<sha256 of triton, backend,
kernel source, env vars, tuning key and candidate configs>/`. Its writes are atomic (a temporary
directory, then `os.replace`), so two processes tuning at once both benchmark and the last write wins:
safe. Its read is not guarded: `json.load(f)["configs_timings"]` and `Config(**entry)` without any
error handling, so a truncated or garbled file (a copied or synced cache directory, a full disk, bit
rot) raises JSONDecodeError / KeyError / TypeError out of every launch with that key until someone
deletes the file by hand; an empty timing list raises ValueError from `min()`; and a well-formed file
naming a configuration that is not among the candidates (edited, or written by another version of the
code under the same hash) is launched as it is, never checked against the candidates or the pruning
function. So flashattn keeps its own cache and uses Triton's autotuner only to benchmark:

- `load(kernel, key, candidates)` returns the stored config only if the file parses, has this format
  version, names this kernel and exactly this key, was written for this triton version and this kernel
  source (a stale file: `fingerprint`), and its config is one of `candidates` (the pruned list for this
  key). Anything else: a warning, and None.
- `store(kernel, key, config)` writes a temporary file in the same directory and `os.replace`s it over
  the old one: readers see the old file or the new one, never a mix; concurrent writers each replace the
  file whole (last one wins). An unwritable directory gives a warning, never an error.
- `run_tuned(...)` launches a kernel with the config cached in memory or on disk, or tunes it once (one
  thread at a time: Triton's Autotuner keeps per-call state on itself and is not thread-safe) and stores
  the winner.

The directory: FLASHATTN_AUTOTUNE_CACHE_DIR, else $XDG_CACHE_HOME/flashattn/autotune, else
~/.cache/flashattn/autotune.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import os
import tempfile
import threading
import warnings
from typing import Callable, Dict, List, Optional, Sequence

FORMAT = 1                                           # bump when the file layout changes
CONFIG_FIELDS = ("kwargs", "num_warps", "num_stages")


class AutotuneCacheWarning(UserWarning):
    """A cached autotuning result was unreadable, stale or invalid (it is ignored and rewritten), or
    could not be written."""


def cache_dir() -> str:
    explicit = os.environ.get("FLASHATTN_AUTOTUNE_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flashattn", "autotune")


@functools.lru_cache(maxsize=None)
def fingerprint(module) -> Dict[str, str]:
    """What makes a stored result stale: the triton version and the source of the kernels' module."""
    import triton
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):   # no source (a frozen or compiled module): the module name only
        source = getattr(module, "__name__", repr(module))
    return {"triton": triton.__version__, "source": hashlib.sha256(source.encode()).hexdigest()[:16]}


def config_dict(config) -> dict:
    """A triton.Config as the plain dict this cache stores: {"kwargs": {...}, "num_warps": w, "num_stages": s}."""
    return {"kwargs": dict(config.kwargs), "num_warps": int(config.num_warps), "num_stages": int(config.num_stages)}


def _canonical_key(key) -> list:
    """The key as JSON will give it back: a list of [name, value] pairs, values str, int, float or bool."""
    return json.loads(json.dumps(sorted([str(k), v] for k, v in dict(key).items())))


def path_for(kernel: str, key) -> str:
    digest = hashlib.sha256(json.dumps([kernel, _canonical_key(key)]).encode()).hexdigest()[:24]
    return os.path.join(cache_dir(), f"{kernel}-{digest}.json")


_warned = set()
_warned_lock = threading.Lock()


def _warn(path: str, problem: str) -> None:
    with _warned_lock:   # once per file and problem per process: a decode loop must not flood the log
        if (path, problem) in _warned:
            return
        _warned.add((path, problem))
    warnings.warn(f"flashattn autotune cache {path}: {problem}; ignoring it (the kernel is tuned again and the "
                  "file rewritten)", AutotuneCacheWarning, stacklevel=3)


def load(kernel: str, key, candidates: Sequence[dict], module) -> Optional[dict]:
    """The stored config for (kernel, key) if the file is present and valid, else None (with a warning
    unless the file is simply absent). candidates: config_dict()s of the configs tuning would try."""
    path = path_for(kernel, key)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        _warn(path, f"cannot be read ({e})")
        return None
    try:
        entry = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        _warn(path, f"is not valid JSON ({type(e).__name__}: {e}; {len(raw)} bytes)")
        return None
    if not isinstance(entry, dict) or entry.get("format") != FORMAT:
        got = entry.get("format") if isinstance(entry, dict) else type(entry).__name__
        _warn(path, f"has format {got!r}, expected {FORMAT}")
        return None
    if entry.get("kernel") != kernel or entry.get("key") != _canonical_key(key):
        _warn(path, f"holds kernel {entry.get('kernel')!r} key {entry.get('key')!r}, not {kernel!r} "
                    f"{_canonical_key(key)!r}")
        return None
    if entry.get("fingerprint") != fingerprint(module):
        _warn(path, f"is stale: written for {entry.get('fingerprint')!r}, now {fingerprint(module)!r}")
        return None
    config = entry.get("config")
    if config not in list(candidates):
        _warn(path, f"names config {config!r}, which is not one of the {len(candidates)} candidates for this key")
        return None
    return config


def store(kernel: str, key, config: dict, module) -> None:
    """Write (kernel, key) -> config atomically; a failure to write is a warning, not an error."""
    path = path_for(kernel, key)
    entry = {"format": FORMAT, "kernel": kernel, "key": _canonical_key(key), "fingerprint": fingerprint(module),
             "config": config}
    tmp = None
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)   # atomic on POSIX and Windows: readers see the old file or this one
        tmp = None
    except OSError as e:
        _warn(path, f"cannot be written ({e})")
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# ------------------------------------------------------------------------------------------------
# launching through the cache

_chosen: Dict[tuple, dict] = {}   # (kernel, key) -> config, this process
_tune_lock = threading.Lock()


def forget() -> None:
    """Drop the in-memory choices (tests; a long-lived process after the cache directory changed)."""
    _chosen.clear()


def run_tuned(kernel: str, tuned, plain, grid: Callable[[dict], tuple], args, meta: dict, key: dict,
              candidates: List, module) -> dict:
    """Launch `plain` (a @triton.jit kernel) on args/meta with the config chosen for `key`: from memory,
    from the disk cache, or by tuning once with `tuned` (the same kernel under triton.autotune without
    Triton's disk cache). candidates: the triton.Configs tuning would try for this key (already pruned).
    grid(config_kwargs) gives the launch grid. Returns the config used (config_dict form)."""
    mem_key = (kernel, tuple(sorted(key.items())))
    config = _chosen.get(mem_key)
    if config is None:
        with _tune_lock:
            config = _chosen.get(mem_key)
            if config is None:
                allowed = [config_dict(c) for c in candidates]
                config = load(kernel, key, allowed, module)
                if config is None:
                    # Tune: Triton benchmarks every candidate on these arguments (the kernels only write
                    # their outputs, so the repeated runs are harmless) and keeps the fastest.
                    tuned[grid](*args, **meta)
                    config = config_dict(tuned.best_config)
                    store(kernel, key, config, module)
                    _chosen[mem_key] = config
                    return config   # the tuning call has run the kernel with the winner
                _chosen[mem_key] = config
    cfg = dict(config["kwargs"], num_warps=config["num_warps"], num_stages=config["num_stages"])
    plain[grid(cfg)](*args, **meta, **cfg)
    return config


# ------------------------------------------------------------------------------------------------
# threads under the interpreter

_interpreter_lock = threading.RLock()


def serialized_under_interpreter(fn):
    """Run `fn` (a launcher) one thread at a time when TRITON_INTERPRET=1.

    Triton 3.6's interpreter patches triton.language module-wide while a kernel runs and keeps the grid
    index in one global builder (runtime/interpreter.py: `_patch_lang`, `interpreter_builder`), so two
    threads launching at once break each other (InterpreterError: "Did you forget to add @triton.jit?").
    Compiled kernels are unaffected: there the launchers run concurrently."""

    @functools.wraps(fn)
    def launcher(*args, **kwargs):
        if os.environ.get("TRITON_INTERPRET", "0") != "1":
            return fn(*args, **kwargs)
        with _interpreter_lock:
            return fn(*args, **kwargs)

    return launcher
