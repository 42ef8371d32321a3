"""``sparsekern-bench`` (or ``python -m sparsekern.bench``): run benchmark suites on the present device,
print tables, write results.

Examples::

    sparsekern-bench                          # linear suite, GPU if present else CPU
    sparsekern-bench --suite conv             # ResNet-50 conv layers: SparseConv2d vs nn.Conv2d and masked
    sparsekern-bench --suite layout           # layout build and set_masks cost against training steps
    sparsekern-bench --suite e2e              # training steps of small networks, dense vs masked vs sparse
    sparsekern-bench --suite fidelity         # survey methods on the stdlib's source: element vs block masks
    sparsekern-bench --suite linear,e2e       # several suites in one run (one roofline measurement)
    sparsekern-bench --quick --out /tmp/b     # tiny config (seconds), e.g. for tests
    sparsekern-bench --device cuda --tune     # GPU: autotune, store configs, then benchmark
    sparsekern-bench --suite linear,conv,e2e --device cuda --tune --run-folder   # as `make bench-gpu`

The benchmark is installed with the package, so it runs from any folder; in a
checkout ``python -m bench`` is the same command. Results go to
``<out>/<suite>_<device>_<date>.{csv,json,md}`` (``--run-folder``: into
``<out>/<device>-<date>/``). Without ``--out``, ``<out>`` is the checkout's
``bench/results/`` when the current folder is inside a sparsekern checkout, else
``./sparsekern-results`` (:func:`sparsekern.bench.common.default_out`).
Progress goes to stderr, the tables to stdout. GPU runs measure the dense
matmul rate and copy bandwidth once and add the roofline floor of every case
(``sparsekern/bench/roofline.py``; ``--roofline`` does it on the CPU too) and run the
static kernel check (``sparsekern/bench/static.py``; ``--static quick`` on the CPU).

Suites are registered in :data:`SUITES`; a registered suite whose module is
not in the checkout (yet) is listed as unavailable, and ``all`` skips it.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.util
import os
import sys
import traceback
from pathlib import Path

import torch

from sparsekern.bench import common, roofline
from sparsekern.bench.static import SCOPES as STATIC_SCOPES

#: Suite name -> module. A suite module has ``default_config(device, dtype, quick)``,
#: ``run(cfg, device, env)``, ``tables(rows)``, ``headline(rows)`` and optionally
#: ``describe(cfg)`` (the header's configuration sentence), ``footnotes(cfg, device)``
#: (lines the report ends with), ``tune(cfg, device)`` + ``write_tuned(records)``
#: (for ``--tune``), ``ROOFLINE_MODES`` (modes of its roofline table), ``RESULT_COLUMNS`` (its own
#: CSV/JSON columns instead of :data:`common.COLUMNS`) and ``write_extra(rows, paths)`` (more files
#: beside the results, e.g. a plot; returns ``{kind: path}``).
SUITES = {
    "linear": "sparsekern.bench.linear",
    "layout": "sparsekern.bench.layout",
    "conv": "sparsekern.bench.conv",
    "e2e": "sparsekern.bench.e2e",
    "fidelity": "sparsekern.bench.fidelity",
}


def available_suites() -> list[str]:
    """Registered suites whose module exists in this checkout."""
    return [name for name, mod in SUITES.items() if _importable(mod)]


def _importable(module: str) -> bool:
    if module in sys.modules:
        return True
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def parse_suites(text: str) -> list[str]:
    """``linear``, ``linear,e2e`` or ``all`` (every available suite) -> suite names; exits on unknown ones."""
    have = available_suites()
    if text == "all":
        return have
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in SUITES:
            raise SystemExit(f"unknown suite {n!r}; registered: {', '.join(SUITES)} (or all)")
        if n not in have:
            raise SystemExit(f"suite {n!r} is not available in this checkout ({SUITES[n]} is missing)")
    return names


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="sparsekern-bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--suite",
        default="linear",
        help=f"suite, comma-separated suites, or all (registered: {', '.join(SUITES)}; default: linear)",
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="default: cuda if present")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny configuration, for tests (linear: 256x256, 64 tokens; conv: 32->32 3x3 on 8x8; "
        "layout: 512x512; e2e: tiny networks)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default: bench/results/ inside a sparsekern checkout, else ./sparsekern-results)",
    )
    p.add_argument(
        "--methods",
        default=None,
        help="fidelity suite only: comma-separated methods to train (e.g. dense,rigl; default: all)",
    )
    p.add_argument("--dtype", default=None, help="float32|float16|bfloat16 (default: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default: per device)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warmup steps (default: per device)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    p.add_argument(
        "--tune",
        action="store_true",
        help="GPU only: autotune the kernels for each suite's shapes (suites that can) and merge the chosen "
        "configs into kernels/tuned/<device>.json before benchmarking",
    )
    p.add_argument(
        "--run-folder",
        action="store_true",
        help="write into <out>/<device>-<date>/ (one folder per run) instead of <out>/",
    )
    p.add_argument(
        "--roofline",
        action="store_true",
        help="measure the matmul rate and copy bandwidth and add the roofline floor (always on for CUDA)",
    )
    p.add_argument(
        "--static",
        choices=("auto", "off", *STATIC_SCOPES),
        default="auto",
        help="include the static kernel check (sparsekern.check) at this scope; auto: default on CUDA, off "
        "on the CPU (quick takes about a minute there)",
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    suites = parse_suites(args.suite)
    if not suites:
        print("no suite to run", file=sys.stderr)
        return 2
    device = common.resolve_device(args.device)
    if args.tune and device.type != "cuda":
        print("--tune needs a CUDA device: there is nothing to tune on the CPU", file=sys.stderr)
        return 2
    dtype = common.parse_dtype(args.dtype) if args.dtype else None
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = common.environment(device)
    if env["interpret"]:
        common.progress("warning: SPARSEKERN_INTERPRET/TRITON_INTERPRET is set: CPU timings are the interpreter's")
    out_dir = Path(args.out) if args.out is not None else common.default_out()
    if args.run_folder:
        out_dir = out_dir / common.run_folder_name(env)
    common.progress(f"suites: {', '.join(suites)}; results in {out_dir}")

    want_roofline = device.type == "cuda" or args.roofline
    peaks: dict[torch.dtype, dict] = {}
    written: list[tuple[str, dict[str, Path], str]] = []
    failed = []
    for name in suites:
        try:
            suite = importlib.import_module(SUITES[name])
            cfg = suite.default_config(device, dtype, quick=args.quick)
            if args.methods is not None:
                if not hasattr(suite, "select_methods"):
                    raise SystemExit(f"--methods: suite {name} has no methods to select")
                cfg = suite.select_methods(cfg, [m.strip() for m in args.methods.split(",") if m.strip()])
            if args.repeats is not None:
                cfg.repeats = args.repeats
            if args.warmup is not None:
                cfg.warmup = args.warmup
            if args.tune:
                if hasattr(suite, "tune"):
                    for line in suite.write_tuned(suite.tune(cfg, device)):
                        common.progress(f"tuned configs written: {line}")
                else:
                    common.progress(f"{name}: nothing to tune in this suite")
            if want_roofline and cfg.dtype not in peaks:
                common.progress(f"measuring the dense matmul rate and copy bandwidth ({common.dtype_name(cfg.dtype)})")
                peaks[cfg.dtype] = roofline.measure_peaks(device, cfg.dtype, **_peak_sizes(args.quick))
                common.progress(roofline.describe_peaks(peaks[cfg.dtype]))
            rows = suite.run(cfg, device, env)
            text = report(name, suite, cfg, rows, env, device, peaks.get(cfg.dtype))
        except Exception:  # one broken suite must not cost the others' results
            if len(suites) == 1:
                raise
            traceback.print_exc()
            common.progress(f"suite {name} FAILED; going on with the others")
            failed.append(name)
            continue
        print(text, flush=True)
        columns = getattr(suite, "RESULT_COLUMNS", common.COLUMNS)
        paths = common.write_results(rows, env, out_dir, common.result_stem(name, env), text, columns)
        if hasattr(suite, "write_extra"):
            paths = {**paths, **suite.write_extra(rows, paths)}
        for kind, path in paths.items():
            common.progress(f"wrote {kind}: {path}")
        written.append((name, paths, suite.headline(rows) or ""))
        if device.type == "cuda":  # the next suite starts with the memory this one cached
            gc.collect()
            torch.cuda.empty_cache()

    scope = args.static if args.static != "auto" else ("default" if device.type == "cuda" else "off")
    section, static_problems = "", 0
    if scope != "off":
        from sparsekern.bench.static import write_static

        try:
            section, spaths, static_problems = write_static(out_dir, common.result_stem("static", env), scope)
        except Exception:  # the benchmark results are written already; report the failure, keep them
            traceback.print_exc()
            common.progress("the static check FAILED to run")
            failed.append("static check")
        else:
            print(section, flush=True)
            for _, paths, _ in written:  # each suite's report carries the static check of its run
                with paths["md"].open("a") as f:
                    f.write("\n" + section + "\n")
            for kind, path in spaths.items():
                common.progress(f"wrote {kind}: {path}")
    if len(suites) > 1:
        path = out_dir / f"{common.result_stem('run', env)}.md"
        path.write_text(run_summary(env, written, failed, peaks, section, out_dir))
        common.progress(f"wrote run summary: {path}")
    if static_problems:
        common.progress(f"the static check found {static_problems} kernel(s) with problems (exit status 1)")
    return 1 if failed or static_problems else 0


def _peak_sizes(quick: bool) -> dict:
    """Small peak measurements for ``--quick`` (a test's plumbing check), the defaults otherwise."""
    return {"matmul_n": 256, "copy_bytes": 1 << 22, "repeats": 3} if quick else {}


def report(name, suite, cfg, rows, env, device, peaks) -> str:
    """The printed (and stored) markdown of one suite's run."""
    text = f"## {name}: {env['device']}\n\n"
    if hasattr(suite, "describe"):
        text += suite.describe(cfg)
    else:
        text += f"shape {cfg.shape} (tokens x out x in), {common.dtype_name(cfg.dtype)}, "
        text += f"{cfg.warmup} warmup + {cfg.repeats} timed steps"
    text += f"; torch {env['torch']}, triton {env['triton']}, "
    text += f"git {env['git_sha']}, {env['date']}, load average {env['loadavg_1min']} "
    text += f"on {os.cpu_count()} cores"
    if env["omp_wait_policy"]:
        text += f", OMP_WAIT_POLICY={env['omp_wait_policy']}"
    text += "\n\n"
    text += suite.tables(rows)
    line = suite.headline(rows)
    if line:
        text += "\n\n" + line
    if peaks is not None:
        roofline.annotate(rows, peaks)
        modes = getattr(suite, "ROOFLINE_MODES", ("forward", "backward", "step"))
        table = roofline.table(rows, modes)
        if table:
            text += "\n\n### Roofline: measured time against the floor\n\n" + roofline.describe_peaks(peaks) + ". "
            text += "Floor = computed-block FLOPs / matmul rate + bytes moved / copy bandwidth "
            text += "(`sparsekern/bench/roofline.py`); % of floor = floor / measured p50.\n\n" + table
    for note in getattr(suite, "footnotes", lambda cfg, device: [])(cfg, device):
        text += "\n\n" + note
    if device.type != "cuda":
        text += "\n\nGPU numbers are absent: "
        text += (
            "this machine has no CUDA device."
            if not torch.cuda.is_available()
            else "this run was on the CPU (--device cpu)."
        )
        if name == "linear":
            text += " Run `make bench-gpu` on a GPU machine for them."
        else:
            text += f" Run `sparsekern-bench --suite {name} --device cuda` on a GPU machine for them."
    return text


def run_summary(env, written, failed, peaks, static_section, out_dir: Path) -> str:
    """The run's index: device, peaks, each suite's headline and files, the static check."""
    text = f"# Benchmark run: {env['device']}\n\n"
    text += f"torch {env['torch']}, triton {env['triton']}, git {env['git_sha']}, {env['date']}\n\n"
    for p in peaks.values():
        text += f"- {roofline.describe_peaks(p)}\n"
    for name, paths, headline in written:
        rel = paths["md"].relative_to(out_dir) if paths["md"].is_relative_to(out_dir) else paths["md"]
        text += f"- {name}: [{rel}]({rel})" + (f": {headline}" if headline else "") + "\n"
    for name in failed:
        text += f"- {name}: FAILED (see the run's log)\n"
    if static_section:
        text += "\n" + static_section + "\n"
    return text
