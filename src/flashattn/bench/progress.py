"""Progress of long sweeps on stderr: a tqdm bar when stderr is a terminal, plain log lines otherwise.

    bar = progress_bar(cases, desc="prefill", unit="shape", quiet=args.quiet)
    log = log_fn(args.quiet)
    for case in bar:
        log(f"{case}: ...")        # printed above the bar (tqdm.write), or not at all with --quiet

stdout stays for tables and JSON, so `flashattn bench ... > table.txt` captures no bar.
"""
from __future__ import annotations

import sys
from typing import Callable, Iterable, Optional, TypeVar

T = TypeVar("T")


def bar_enabled(quiet: bool = False, stream=None) -> bool:
    """A bar is drawn only on a terminal, and never with --quiet."""
    stream = sys.stderr if stream is None else stream
    return not quiet and bool(getattr(stream, "isatty", lambda: False)())


def progress_bar(iterable: Iterable[T], *, desc: str, total: Optional[int] = None, unit: str = "it",
                 quiet: bool = False):
    """`iterable` wrapped in a tqdm bar on stderr (disabled, i.e. a plain pass-through, when not a
    terminal or quiet)."""
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, total=total, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=not bar_enabled(quiet), leave=False)


def log_fn(quiet: bool = False) -> Callable[[str], None]:
    """A logger for per-step lines on stderr that does not break an active bar; silent with quiet."""
    if quiet:
        return lambda msg: None

    def log(msg: str) -> None:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)
        sys.stderr.flush()
    return log
