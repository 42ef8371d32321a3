"""Shared benchmark machinery: timing, environment record, result files, tables, progress.

Timing: ``warmup`` untimed calls, then ``repeats`` timed ones; each timed call
is bracketed by a device synchronisation (``torch.cuda.synchronize`` on CUDA;
on the CPU work is synchronous and ``time.perf_counter`` alone is exact).
Results are the 20th, 50th and 80th percentiles in milliseconds: the median is
the figure to quote, p20..p80 shows the noise.

Results are written in long format, one row per (config, provider, mode), to a
CSV and a JSON file (the JSON also holds the environment record) plus the
markdown table that was printed. Column meanings are in :data:`COLUMNS`.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

import sparsekern

#: Where results go when run outside a checkout (``--out`` overrides): the current folder, so an
#: installed ``sparsekern-bench`` never writes into site-packages.
OUTSIDE_CHECKOUT_OUT = Path("sparsekern-results")


def is_checkout(root: Path) -> bool:
    """``root`` is a sparsekern source checkout: it holds the benchmark code and the tracked results."""
    return (root / "sparsekern" / "bench" / "cli.py").is_file() and (root / "bench" / "results").is_dir()


#: The checkout this code runs from (an editable install or the repo itself), or None when it was
#: installed from a wheel or sdist; its git commit goes into every result row.
SOURCE_ROOT: Path | None = Path(__file__).resolve().parents[2]
if not is_checkout(SOURCE_ROOT):
    SOURCE_ROOT = None


def default_out(cwd: Path | None = None) -> Path:
    """``bench/results`` of the checkout that holds ``cwd`` (or a parent of it), else ``./sparsekern-results``.

    Example: run from ``~/sparsekern`` or ``~/sparsekern/tests`` -> ``~/sparsekern/bench/results``
    (where tracked results live); run from ``/tmp`` -> ``/tmp/sparsekern-results``.
    """
    cwd = Path.cwd() if cwd is None else Path(cwd)
    for folder in (cwd, *cwd.parents):
        if is_checkout(folder):
            return folder / "bench" / "results"
    return cwd / OUTSIDE_CHECKOUT_OUT


#: Long-format result columns. Times (``p20``/``p50``/``p80``) are milliseconds;
#: ``shape`` is ``tokens x out_features x in_features`` (conv: input and kernel);
#: ``layer`` names a conv case; ``flop_fraction`` is the share of dense FLOPs
#: the provider computes in that mode; ``frozen_fraction`` is the share of kept
#: blocks that are frozen; ``model`` names the network of an end-to-end case
#: (e2e suite); ``flops``/``bytes`` are the work of the computed blocks in that
#: mode and ``floor_ms``/``pct_of_floor`` the roofline floor and the share of it
#: the measured p50 reaches (``sparsekern/bench/roofline.py``; filled on GPU runs, or with
#: ``--roofline``); ``note`` says why a provider has no numbers (``unavailable: ...``).
COLUMNS = [
    "device",
    "torch",
    "triton",
    "git_sha",
    "dtype",
    "block",
    "density",
    "shape",
    "layer",
    "provider",
    "mode",
    "p20",
    "p50",
    "p80",
    "flop_fraction",
    "tokens",
    "frozen_fraction",
    "model",
    "flops",
    "bytes",
    "floor_ms",
    "pct_of_floor",
    "warmup",
    "repeats",
    "date",
    "note",
]

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}


# ------------------------------------------------------------------ device
def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else the CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return dev


def parse_dtype(name: str) -> torch.dtype:
    key = _DTYPE_ALIASES.get(name, name)
    if key not in DTYPES:
        raise SystemExit(f"unknown dtype {name!r}; choose from {sorted(DTYPES) + sorted(_DTYPE_ALIASES)}")
    return DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu: {model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def slug(text: str) -> str:
    out = "".join(ch.lower() if ch.isalnum() else "-" for ch in text)
    while "--" in out:
        out = out.replace("--", "-")
    return out.strip("-")[:40]


# ------------------------------------------------------------------ timing
def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    """p20/p50/p80 with linear interpolation between order statistics."""
    xs = sorted(samples_ms)
    if not xs:
        return {"p20": math.nan, "p50": math.nan, "p80": math.nan}

    def q(f: float) -> float:
        pos = f * (len(xs) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    return {"p20": q(0.2), "p50": q(0.5), "p80": q(0.8)}


def time_fn(
    fn: Callable[..., object],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    setup: Callable[[], tuple] | None = None,
) -> dict[str, float]:
    """Time ``fn(*setup())``; ``setup`` (untimed) runs before every call. Returns ms percentiles."""
    samples = []
    for i in range(warmup + repeats):
        args = setup() if setup is not None else ()
        sync(device)
        t0 = time.perf_counter()
        fn(*args)
        sync(device)
        if i >= warmup:
            samples.append((time.perf_counter() - t0) * 1e3)
    return percentiles(samples)


class Laps:
    """A stopwatch for the phases of one step: ``start()``, then ``lap(name)`` after each phase.

    Each lap synchronises the device first, so it measures the phase's work,
    not its launch. ``pause()``/``start()`` exclude untimed setup in between.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.times: dict[str, float] = {}
        self._t = None

    def start(self) -> None:
        sync(self.device)
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        sync(self.device)
        now = time.perf_counter()
        self.times[name] = self.times.get(name, 0.0) + (now - self._t) * 1e3
        self._t = now


def time_phases(
    step: Callable[[Laps], object],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    total: str | None = "step",
) -> dict[str, dict[str, float]]:
    """Time the phases of ``step(laps)`` over repeated steps.

    Returns ``{phase: percentiles}``; with ``total`` set, also the percentiles
    of each step's summed phases under that name (the percentiles of the sums,
    not the sum of the percentiles).
    """
    per_phase: dict[str, list[float]] = {}
    totals = []
    for i in range(warmup + repeats):
        laps = Laps(device)
        step(laps)
        if i < warmup:
            continue
        for name, ms in laps.times.items():
            per_phase.setdefault(name, []).append(ms)
        totals.append(sum(laps.times.values()))
    out = {name: percentiles(v) for name, v in per_phase.items()}
    if total is not None:
        out[total] = percentiles(totals)
    return out


# ------------------------------------------------------------- environment
def git_sha() -> str:
    """Short commit of the checkout the code runs from, ``-dirty`` when tracked files differ; ``unknown``
    without git or when installed from a wheel (``environment()['sparsekern']`` has the version then)."""
    if SOURCE_ROOT is None:  # never ask git in site-packages: a venv inside another repo would give its commit
        return "unknown"
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=SOURCE_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=SOURCE_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


#: Distributions that install the ``triton`` module: PyPI's, and the one torch nightlies depend on.
TRITON_DISTRIBUTIONS = ("triton", "pytorch-triton", "pytorch-triton-rocm")


def triton_version() -> str:
    """The installed triton's version, ``absent`` without one; read without importing it (CPU runs never do)."""
    if "triton" in sys.modules:
        return sys.modules["triton"].__version__
    for dist in TRITON_DISTRIBUTIONS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "absent"


def environment(device: torch.device) -> dict[str, object]:
    """What a result row needs to be comparable: device, versions, commit, date."""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "sparsekern": sparsekern.__version__,
        "torch": torch.__version__,
        "triton": triton_version(),
        "git_sha": git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        # Under CPU contention the OpenMP runtime's active spin-waiting can slow code made of many small
        # BLAS calls (the CPU path) by an order of magnitude; OMP_WAIT_POLICY=PASSIVE avoids it.
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        # Other work on the machine skews CPU timings: the 1-minute load average at the start says how much.
        "loadavg_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "interpret": os.environ.get("SPARSEKERN_INTERPRET") == "1" or os.environ.get("TRITON_INTERPRET") == "1",
    }


#: The fields of :func:`environment` that every result row repeats (the rest go to the JSON header only).
ROW_ENVIRONMENT = ("device", "torch", "triton", "git_sha", "date")


def row_base(env: dict[str, object], **columns: object) -> dict[str, object]:
    """The columns every row of one suite run shares: ``ROW_ENVIRONMENT`` from ``env``, then ``columns``.

    Example:
        >>> list(row_base(environment(torch.device("cpu")), dtype="fp32"))
        ['device', 'torch', 'triton', 'git_sha', 'date', 'dtype']
    """
    return {**{k: env[k] for k in ROW_ENVIRONMENT}, **columns}


# ----------------------------------------------------------------- output
def fmt_ms(v: float | None) -> str:
    """A time in ms for the suites' tables: three significant figures or so, ``—`` when not measured."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.3f}" if v < 1 else f"{v:.1f}" if v >= 100 else f"{v:.2f}"


def fmt_x(v: float | None) -> str:
    """A speedup (``1.23x``), ``—`` when not measured."""
    return "—" if v is None or math.isnan(v) else f"{v:.2f}x"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]], align: str | None = None) -> str:
    """A GitHub markdown table; ``align`` is one letter per column (``l``/``r``), default right but the first."""
    rows = [[str(c) for c in r] for r in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def fmt(cells):
        padded = (c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(
        "-" * (w + 1) + ":" if a == "r" else "-" * (w + 2) for w, a in zip(widths, align, strict=True)
    )
    rule += "|"
    return "\n".join([fmt(headers), rule, *(fmt(r) for r in rows)])


def result_stem(suite: str, env: dict[str, object]) -> str:
    """``<suite>_<device>_<UTC date-time>``, e.g. ``linear_nvidia-h100-80gb-hbm3_20250101-120000``."""
    date = str(env["date"]).replace("-", "").replace(":", "").replace("T", "-").rstrip("Z")
    dev = "cpu" if env["device_type"] == "cpu" else slug(str(env["device"]))
    return f"{suite}_{dev}_{date}"


def run_folder_name(env: dict[str, object]) -> str:
    """``<device>-<UTC date-time>``, e.g. ``nvidia-h100-80gb-hbm3-20250101-120000`` (``--run-folder``)."""
    date = str(env["date"]).replace("-", "").replace(":", "").replace("T", "-").rstrip("Z")
    dev = "cpu" if env["device_type"] == "cpu" else slug(str(env["device"]))
    return f"{dev}-{date}"


def write_results(
    rows: list[dict[str, object]],
    env: dict[str, object],
    out_dir: Path,
    stem: str,
    markdown: str,
    columns: Sequence[str] = COLUMNS,
) -> dict[str, Path]:
    """Write ``<stem>.csv`` (long format), ``<stem>.json`` (environment + rows) and ``<stem>.md``.

    ``columns`` are the CSV's and JSON's (default :data:`COLUMNS`; a suite may define its own).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("csv", "json", "md")}
    with paths["csv"].open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k, "")) for k in columns})
    clean = [{k: _json_value(row.get(k)) for k in columns} for row in rows]
    paths["json"].write_text(json.dumps({"environment": env, "columns": list(columns), "rows": clean}, indent=1) + "\n")
    paths["md"].write_text(markdown.rstrip() + "\n")
    return paths


def _csv_value(v: object) -> object:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def _json_value(v: object) -> object:
    if isinstance(v, float) and math.isnan(v):
        return None
    return v


# --------------------------------------------------------------- progress
_T0 = time.perf_counter()


def progress(msg: str) -> None:
    """One line to stderr, prefixed with seconds since the run began."""
    print(f"[{time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def time_phases_interleaved(
    steps: dict[str, Callable[[Laps], object]],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    total: str | None = "step",
) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`time_phases` for several providers at once, their steps taken in turn (A B C A B C ...).

    Each provider's samples then come from the same stretch of time, so drift
    of the machine (clock boost, other tenants) hits all of them alike and
    their ratios are measured side by side. Returns ``{provider: {phase: percentiles}}``.
    """
    per: dict[str, dict[str, list[float]]] = {name: {} for name in steps}
    totals: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + repeats):
        for name, step in steps.items():
            laps = Laps(device)
            step(laps)
            if i < warmup:
                continue
            for phase, ms in laps.times.items():
                per[name].setdefault(phase, []).append(ms)
            totals[name].append(sum(laps.times.values()))
    out = {}
    for name in steps:
        out[name] = {phase: percentiles(v) for phase, v in per[name].items()}
        if total is not None:
            out[name][total] = percentiles(totals[name])
    return out


@contextlib.contextmanager
def autotune_session():
    """Autotune on first use and ignore stored configs inside; yields a function returning the tuned records.

    Suites' ``tune()`` run one training step per shape inside, which makes the
    kernels benchmark their candidates; stored configs are used again afterwards.
    """
    from sparsekern.kernels import configs as kcfg

    os.environ["SPARSEKERN_IGNORE_TUNED"] = "1"
    os.environ["SPARSEKERN_AUTOTUNE"] = "1"
    kcfg.clear_tuned()
    try:
        yield kcfg.tuned_records
    finally:
        os.environ.pop("SPARSEKERN_IGNORE_TUNED", None)
        kcfg.load_tuned.cache_clear()
