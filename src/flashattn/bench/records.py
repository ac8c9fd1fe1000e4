"""What a GPU benchmark run produces, and every way of showing it: table, markdown, JSON, plot.

Nothing here touches a GPU or times anything: the functions take lists of `Result` and `Check`
records, so a run can be re-rendered from its JSON (`flashattn bench --load run.json`) and the
formatting is tested with made-up numbers.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

OURS = "flashattn"
SCHEMA = "flashattn.bench/1"

# Short column labels; unknown names are shown as they are.
LABELS = {
    "flashattn": "flashattn",
    "sdpa_flash": "sdpa-flash",
    "sdpa_cudnn": "sdpa-cudnn",
    "flex": "flex",
    "sdpa_efficient": "sdpa-mem",
    "sdpa_math": "sdpa-math",
}
RATIO_LABELS = {
    "sdpa_flash": "/flash",
    "sdpa_cudnn": "/cudnn",
    "flex": "/flex",
    "sdpa_efficient": "/mem",
    "sdpa_math": "/math",
}

RowKey = Tuple[int, int, bool, str]   # (hdim, seqlen, causal, pass)


@dataclass
class Result:
    """One implementation timed on one shape and pass. `error` set (and ms None) when it could not run."""
    impl: str
    hdim: int
    seqlen: int
    causal: bool
    pass_: str                      # "fwd" or "bwd"
    batch: int
    nheads: int
    dtype: str = "bfloat16"
    ms: Optional[float] = None
    tflops: Optional[float] = None
    error: Optional[str] = None
    setup_s: Optional[float] = None  # make + first (untimed) call: compilation, autotuning

    @property
    def key(self) -> RowKey:
        return (self.hdim, self.seqlen, self.causal, self.pass_)

    @property
    def ok(self) -> bool:
        return self.error is None and self.ms is not None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        return {k: _jsonable(v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "Result":
        d = dict(d)
        d["pass_"] = d.pop("pass")
        names = {f.name for f in fields(cls)}
        return cls(**{k: _from_json(v) for k, v in d.items() if k in names})


@dataclass
class Check:
    """Correctness sanity check of one shape: max |impl - reference| of out (and dq, dk, dv)."""
    hdim: int
    seqlen: int
    causal: bool
    reference: Optional[str]
    errors: Dict[str, Dict[str, float]] = field(default_factory=dict)   # impl -> {"out"|"dq"|"dk"|"dv": err}
    note: Optional[str] = None

    @property
    def key(self) -> Tuple[int, int, bool]:
        return (self.hdim, self.seqlen, self.causal)

    def max_err(self, impl: str, pass_: str) -> Optional[float]:
        """The error shown on a table row: out for fwd rows, the worst of dq, dk, dv for bwd rows."""
        e = self.errors.get(impl, {})
        names = ("out",) if pass_ == "fwd" else ("dq", "dk", "dv")
        vals = [e[n] for n in names if n in e and e[n] is not None]
        if not vals:
            return None
        return max(vals, key=lambda x: x if x == x else math.inf)   # NaN counts as the worst

    def to_dict(self) -> dict:
        d = asdict(self)
        d["errors"] = {i: {n: _jsonable(x) for n, x in e.items()} for i, e in self.errors.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Check":
        d = dict(d)
        d["errors"] = {i: {n: _from_json(x) for n, x in e.items()} for i, e in d.get("errors", {}).items()}
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def _jsonable(x):
    # json.dumps writes NaN/Infinity, which strict JSON readers refuse: store them as strings.
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    return x


def _from_json(x):
    if isinstance(x, str) and x in ("nan", "inf", "-inf"):
        return float(x)
    return x


# ----------------------------------------------------------------------------------------------
# rows: one per (hdim, seqlen, causal, pass), the columns are implementations


def impl_order(results: Iterable[Result], preferred: Sequence[str] = ()) -> List[str]:
    """flashattn first, then `preferred` in order, then anything else in order of appearance."""
    seen: List[str] = []
    for r in results:
        if r.impl not in seen:
            seen.append(r.impl)
    order = [OURS] if OURS in seen else []
    order += [p for p in preferred if p in seen and p not in order]
    order += [i for i in seen if i not in order]
    return order


def build_rows(results: Sequence[Result], checks: Sequence[Check] = (),
               impls: Optional[Sequence[str]] = None) -> List[dict]:
    """Group results into rows; ratio[peer] = TFLOP/s of flashattn / TFLOP/s of peer (> 1: flashattn faster)."""
    impls = list(impls) if impls is not None else impl_order(results)
    by_key: Dict[RowKey, Dict[str, Result]] = {}
    meta: Dict[RowKey, Result] = {}
    for r in results:
        by_key.setdefault(r.key, {})[r.impl] = r
        meta.setdefault(r.key, r)
    check_by_key = {c.key: c for c in checks}
    rows = []
    for key in sorted(by_key, key=lambda k: (k[0], k[2], k[3] != "fwd", k[3], k[1])):
        hdim, seqlen, causal, pass_ = key
        cells = by_key[key]
        tflops = {i: (cells[i].tflops if i in cells and cells[i].ok else None) for i in impls}
        ms = {i: (cells[i].ms if i in cells and cells[i].ok else None) for i in impls}
        errors = {i: cells[i].error for i in impls if i in cells and cells[i].error}
        ours = tflops.get(OURS)
        ratio = {}
        for peer in impls:
            if peer == OURS:
                continue
            t = tflops.get(peer)
            ratio[peer] = ours / t if (ours is not None and t) else None
        check = check_by_key.get((hdim, seqlen, causal))
        max_abs_err = {}
        if check is not None:
            for i in impls:
                e = check.max_err(i, pass_)
                if e is not None:
                    max_abs_err[i] = e
        rows.append({
            "hdim": hdim, "seqlen": seqlen, "causal": causal, "pass": pass_,
            "batch": meta[key].batch, "nheads": meta[key].nheads,
            "tflops": tflops, "ms": ms, "ratio": ratio, "errors": errors,
            "reference": check.reference if check is not None else None,
            "max_abs_err": max_abs_err,
        })
    return rows


def geomean_ratios(rows: Sequence[dict], impls: Sequence[str]) -> Dict[str, Optional[float]]:
    """Geometric mean over the rows of flashattn/peer, per peer (None when no row has both)."""
    out = {}
    for peer in impls:
        if peer == OURS:
            continue
        vals = [r["ratio"].get(peer) for r in rows]
        vals = [v for v in vals if v]
        out[peer] = math.exp(sum(math.log(v) for v in vals) / len(vals)) if vals else None
    return out


def _peer_err(row: dict) -> Optional[float]:
    """The worst error of the peers against the reference: the scale flashattn's error should be read on."""
    errs = [e for i, e in row["max_abs_err"].items() if i != OURS and i != row["reference"]]
    return max(errs) if errs else None


# ----------------------------------------------------------------------------------------------
# text table (printed last: the tail of the output is what gets read)


def _f(x: Optional[float], fmt: str, missing: str = "-") -> str:
    if x is None:
        return missing
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return format(x, fmt)


def _err(x: Optional[float]) -> str:
    return "-" if x is None else ("nan" if x != x else f"{x:.1e}")


def format_header(env: dict, ceilings: dict) -> List[str]:
    """Two or three lines: device and versions, ceilings, the shape convention."""
    lines = []
    parts = [env.get("gpu") or env.get("cpu") or "?"]
    for name in ("torch", "triton", "cudnn"):
        if env.get(name):
            parts.append(f"{name} {env[name]}")
    if env.get("dtype"):
        parts.append(env["dtype"])
    if env.get("flashattn_backend"):
        parts.append(f"flashattn backend: {env['flashattn_backend']}")
    parts += [f"{k}={v}" for k, v in (env.get("env_vars") or {}).items() if k.startswith("FLASHATTN_")]
    lines.append("flashattn bench | " + " | ".join(parts))
    if env.get("flashattn_backend_warning"):
        lines.append("WARNING: " + env["flashattn_backend_warning"])
    c = []
    if ceilings.get("matmul_tflops") is not None:
        c.append(f"bf16 matmul 8192^3 {ceilings['matmul_tflops']:.0f} TFLOP/s")
    if ceilings.get("copy_tbps") is not None:
        c.append(f"device copy {ceilings['copy_tbps']:.2f} TB/s (read+write)")
    if ceilings.get("error"):
        c.append(f"ceilings failed: {ceilings['error']}")
    if c:
        lines.append("ceilings: " + " | ".join(c))
    return lines


def format_table(rows: Sequence[dict], impls: Sequence[str], header: Sequence[str] = ()) -> str:
    """Rows (hdim, seqlen, causal, pass); TFLOP/s per implementation; flashattn/peer ratios; max|Δ| checks."""
    peers = [i for i in impls if i != OURS]
    show_ratio = OURS in impls
    key_cols = ["hdim", "seqlen", "causal", "pass"]
    t_cols = [LABELS.get(i, i) for i in impls]
    r_cols = [RATIO_LABELS.get(p, "/" + p) for p in peers] if show_ratio else []
    e_cols = ["max|d| fa", "max|d| peers"]
    body = []
    for r in rows:
        cells = [str(r["hdim"]), str(r["seqlen"]), "yes" if r["causal"] else "no", r["pass"]]
        cells += [_f(r["tflops"][i], ".1f", "n/a" if i in r["errors"] else "") for i in impls]
        if show_ratio:
            cells += [_f(r["ratio"][p], ".2f", "") for p in peers]
        cells += [_err(r["max_abs_err"].get(OURS)), _err(_peer_err(r))]
        body.append(cells)
    if show_ratio and rows:
        g = geomean_ratios(rows, impls)
        foot = ["geomean", "", "", ""] + [""] * len(impls) + [_f(g[p], ".2f", "") for p in peers] + ["", ""]
    else:
        foot = None
    head = key_cols + t_cols + r_cols + e_cols
    widths = [len(h) for h in head]
    for cells in body + ([foot] if foot else []):
        widths = [max(w, len(c)) for w, c in zip(widths, cells)]
    n_key, n_t, n_r = len(key_cols), len(t_cols), len(r_cols)

    def line(cells):
        parts = [c.rjust(w) for c, w in zip(cells, widths)]
        key = " ".join(parts[:n_key])
        t = " ".join(parts[n_key:n_key + n_t])
        r = " ".join(parts[n_key + n_t:n_key + n_t + n_r])
        e = " ".join(parts[n_key + n_t + n_r:])
        return " | ".join(x for x in (key, t, r, e) if x)

    out = list(header)
    out.append("TFLOP/s (FlashAttention convention, causal halved, bwd = 2.5 x fwd); "
               "/peer = flashattn / peer (> 1: flashattn faster); max|d| = max abs error vs the reference")
    out.append(line(head))
    out.append("-" * len(out[-1]))
    out += [line(c) for c in body]
    if foot:
        out.append("-" * len(out[-1]))
        out.append(line(foot))
    return "\n".join(out)


def format_errors(results: Sequence[Result], limit: int = 300) -> str:
    """One line per (impl, reason) with the shapes it affected: who was unavailable, and why."""
    groups: Dict[Tuple[str, str], List[str]] = {}
    for r in results:
        if r.error:
            reason = r.error.splitlines()[0][:limit] if r.error else ""
            groups.setdefault((r.impl, reason), []).append(
                f"{r.hdim}/{r.seqlen}/{'c' if r.causal else 'nc'}/{r.pass_}")
    if not groups:
        return ""
    lines = ["unavailable (impl: reason [hdim/seqlen/causal/pass]):"]
    for (impl, reason), where in groups.items():
        shown = ", ".join(where[:6]) + (f", ... ({len(where)} in all)" if len(where) > 6 else "")
        lines.append(f"  {impl}: {reason} [{shown}]")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# markdown (for BENCHMARKS.md)


def format_markdown(rows: Sequence[dict], impls: Sequence[str], env: dict, ceilings: dict) -> str:
    peers = [i for i in impls if i != OURS]
    show_ratio = OURS in impls
    lines = []
    desc = ", ".join(x for x in (
        env.get("gpu"), env.get("torch") and f"torch {env['torch']}", env.get("triton") and f"triton {env['triton']}",
        env.get("cudnn") and f"cuDNN {env['cudnn']}", env.get("date", "")[:10] or None) if x)
    lines.append(f"Measured side by side in one process: {desc}.")
    ceil = []
    if ceilings.get("matmul_tflops") is not None:
        ceil.append(f"bf16 8192³ matmul **{ceilings['matmul_tflops']:.0f} TFLOP/s**")
    if ceilings.get("copy_tbps") is not None:
        ceil.append(f"device-to-device copy **{ceilings['copy_tbps']:.2f} TB/s** (bytes read + written)")
    if ceil:
        lines.append("Ceilings measured in the same run: " + "; ".join(ceil) + ".")
    if env.get("flashattn_backend"):
        lines.append(f"flashattn backend: `{env['flashattn_backend']}`.")
    if env.get("command"):
        lines.append(f"Command: `{env['command']}`")
    lines.append("")
    lines.append("TFLOP/s (forward = 4·b·h·s²·d, halved for causal; backward = 2.5 × forward); "
                 "*÷peer* = flashattn / peer, > 1 means flashattn is faster; max abs error of flashattn's "
                 "output (fwd) or gradients (bwd) against the reference.")
    lines.append("")
    head = ["hdim", "seqlen", "causal", "pass"] + [LABELS.get(i, i) for i in impls]
    if show_ratio:
        head += [f"÷{LABELS.get(p, p)}" for p in peers]
    head += ["max abs err"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        cells = [str(r["hdim"]), str(r["seqlen"]), "yes" if r["causal"] else "no", r["pass"]]
        cells += [_f(r["tflops"][i], ".0f", "n/a" if i in r["errors"] else "") for i in impls]
        if show_ratio:
            cells += [_f(r["ratio"][p], ".2f", "") for p in peers]
        cells.append(_err(r["max_abs_err"].get(OURS)) if r["max_abs_err"].get(OURS) is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    if show_ratio and rows:
        g = geomean_ratios(rows, impls)
        cells = ["geomean", "", "", ""] + [""] * len(impls) + [_f(g[p], ".2f", "") for p in peers] + [""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# JSON


def emit_markdown(md: str, dest: str) -> None:
    """Print the markdown (dest '-') or append it to the file dest."""
    if dest == "-":
        print(md)
        return
    with open(dest, "a") as f:
        f.write("\n" + md)
    print(f"appended a markdown table to {dest}")


def report_dict(*, env: dict, config: dict, ceilings: dict, results: Sequence[Result],
                checks: Sequence[Check], impls: Optional[Sequence[str]] = None, elapsed_s: Optional[float] = None,
                complete: bool = True) -> dict:
    impls = list(impls) if impls is not None else impl_order(results)
    rows = build_rows(results, checks, impls)
    return {
        "schema": SCHEMA,
        "mode": "gpu",
        "complete": complete,
        "environment": env,
        "config": config,
        "ceilings": {k: _jsonable(v) for k, v in ceilings.items()},
        "impls": impls,
        "labels": {i: LABELS.get(i, i) for i in impls},
        "results": [r.to_dict() for r in results],
        "rows": [_json_row(r) for r in rows],
        "checks": [c.to_dict() for c in checks],
        "errors": [{"impl": r.impl, "hdim": r.hdim, "seqlen": r.seqlen, "causal": r.causal, "pass": r.pass_,
                    "error": r.error} for r in results if r.error],
        "summary": {"geomean_ratio_flashattn_over_peer": {k: _jsonable(v) for k, v in
                                                           geomean_ratios(rows, impls).items()}},
        "elapsed_s": elapsed_s,
    }


def _json_row(row: dict) -> dict:
    def clean(d):
        return {k: _jsonable(v) for k, v in d.items()}
    return {**row, "tflops": clean(row["tflops"]), "ms": clean(row["ms"]), "ratio": clean(row["ratio"]),
            "max_abs_err": clean(row["max_abs_err"])}


def write_json(path: str, report: dict) -> None:
    with open(path, "w") as f:
        json.dump(report, f, indent=1, allow_nan=False)
        f.write("\n")


def load_reports(paths: Sequence[str]) -> Tuple[dict, List[Result], List[Check], List[str]]:
    """Merge GPU-mode JSON files: environment and ceilings of the first, results and checks of all."""
    env, ceilings, config, impls = {}, {}, {}, []
    results: List[Result] = []
    checks: List[Check] = []
    for n, p in enumerate(paths):
        with open(p) as f:
            d = json.load(f)
        if d.get("mode") != "gpu":
            raise ValueError(f"{p} is not a GPU-mode flashattn bench report (mode={d.get('mode')!r}); "
                             "--load merges GPU-mode JSON files only")
        if n == 0:
            env, ceilings, config = d.get("environment", {}), d.get("ceilings", {}), d.get("config", {})
        results += [Result.from_dict(r) for r in d.get("results", [])]
        checks += [Check.from_dict(c) for c in d.get("checks", [])]
        impls += [i for i in d.get("impls", []) if i not in impls]
    ceilings = {k: _from_json(v) for k, v in ceilings.items()}
    return {"environment": env, "ceilings": ceilings, "config": config}, results, checks, impls


# ----------------------------------------------------------------------------------------------
# plot


def plot(rows: Sequence[dict], impls: Sequence[str], path: str, title: str = "") -> None:
    """TFLOP/s vs seqlen: one subplot per (hdim, causal, pass), one line per implementation (PNG via Agg)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = sorted({(r["hdim"], r["causal"], r["pass"]) for r in rows},
                    key=lambda p: (p[0], p[1], p[2] != "fwd", p[2]))
    passes = sorted({p[2] for p in panels}, key=lambda s: (s != "fwd", s))
    groups = sorted({(p[0], p[1]) for p in panels})
    if not panels:
        raise ValueError("nothing to plot: no results")
    nrows, ncols = len(groups), len(passes)
    fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for gi, (hdim, causal) in enumerate(groups):
        for pi, pass_ in enumerate(passes):
            ax = axes[gi][pi]
            sel = sorted((r for r in rows if (r["hdim"], r["causal"], r["pass"]) == (hdim, causal, pass_)),
                         key=lambda r: r["seqlen"])
            for impl in impls:
                pts = [(r["seqlen"], r["tflops"][impl]) for r in sel if r["tflops"].get(impl) is not None]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, marker="o", label=LABELS.get(impl, impl),
                            linewidth=2.5 if impl == OURS else 1.2)
            ax.set_xscale("log", base=2)
            ax.set_title(f"hdim {hdim}, {'causal' if causal else 'non-causal'}, {pass_}", fontsize=10)
            ax.set_xlabel("seqlen")
            ax.set_ylabel("TFLOP/s")
            ax.set_ylim(bottom=0)
            ax.grid(True, alpha=0.3)
            if sel:
                ax.set_xticks([r["seqlen"] for r in sel])
                ax.set_xticklabels([str(r["seqlen"]) for r in sel], fontsize=8)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
