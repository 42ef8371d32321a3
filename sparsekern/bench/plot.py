"""Plot a linear-suite CSV: speedup over dense against density, one line per block size.

Usage::

    python -m sparsekern.bench.plot bench/results/linear_cpu_<date>.csv [OUT_DIR]
    python path/to/sparsekern/bench/plot.py <csv> [OUT_DIR]   # the same, without sparsekern or torch

Writes ``<OUT_DIR>/<csv stem>.png`` (``OUT_DIR`` defaults to the CSV's folder).
One panel per mode (forward, backward, step; weight_grad when measured).
An e2e-suite CSV plots its first network (``--select`` for the others).
Solid lines: ``sparsekern``; dash-dotted: ``sparsekern_frozen`` (half the
kept blocks frozen); dashed: ``torch_bsr`` (forward only on the CPU);
dotted with diamonds: ``stk`` (GPU, 128x128 blocks, when installed); dotted
black: the ideal ``1 / density`` (time proportional to the computed blocks);
grey: dense (1x). When the CSV holds several devices, shapes or dtypes, the
first one is plotted (``--select`` picks another: ``device|dtype|shape``).

Standalone on purpose (only the standard library and matplotlib), so that it
runs on any result file without sparsekern or torch installed.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

MODES = ("forward", "backward", "step", "weight_grad")
STYLES = {"sparsekern": "-o", "sparsekern_frozen": "-.^", "torch_bsr": "--s", "stk": ":d"}


def load(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def _float(v: str) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def speedups(rows: list[dict[str, str]], select: str | None = None):
    """``{mode: {(provider, block): [(density, speedup), ...]}}`` for one device/dtype/shape, and its label."""
    groups = []
    for r in rows:
        key = (r["device"], r["dtype"], r["shape"])
        if key not in groups:
            groups.append(key)
    if not groups:
        raise SystemExit("no rows in the CSV")
    chosen = groups[0]
    if select:
        match = [g for g in groups if "|".join(g) == select]
        if not match:
            raise SystemExit(f"--select {select!r} not in {['|'.join(g) for g in groups]}")
        chosen = match[0]
    rows = [r for r in rows if (r["device"], r["dtype"], r["shape"]) == chosen]
    # Element-mask rows (block "elem", the linear suite's unstructured cases) have no block size to
    # draw a line for: the tables report them.
    rows = [r for r in rows if r["block"] != "elem"]
    # A case's own dense row (timed in turn with its providers) when the run has one, else the run's
    # dense row, the one without a block.
    dense = [r for r in rows if r["provider"] == "dense"]
    per_case = {(r["block"], r["density"], r["mode"]): _float(r["p50"]) for r in dense if r["block"]}
    per_run = {r["mode"]: _float(r["p50"]) for r in dense if not r["block"]}
    out: dict[str, dict[tuple[str, str], list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        base = per_case.get((r["block"], r["density"], r["mode"]), per_run.get(r["mode"]))
        if r["provider"] not in STYLES or base is None:
            continue
        t = _float(r["p50"])
        if math.isnan(t) or t <= 0:
            continue
        out[r["mode"]][(r["provider"], r["block"])].append((_float(r["density"]), base / t))
    for lines in out.values():
        for pts in lines.values():
            pts.sort()
    return out, chosen


def plot(csv_path: Path, out_dir: Path, select: str | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load(csv_path)
    data, (device, dtype, shape) = speedups(rows, select)
    # e2e rows name their network; their shape is the network's, not a layer's tokens x out x in.
    model = next((r.get("model") for r in rows if r["shape"] == shape and r.get("model")), None)
    modes = [m for m in MODES if m in data]
    if not modes:
        raise SystemExit(f"{csv_path}: no sparsekern/torch_bsr rows with a dense baseline to plot")
    fig, axes = plt.subplots(1, len(modes), figsize=(4.6 * len(modes), 4.2), squeeze=False)
    densities = sorted({d for lines in data.values() for pts in lines.values() for d, _ in pts})
    ideal_x = [d for d in densities if d > 0]
    blocks = sorted({b for lines in data.values() for _, b in lines}, key=lambda b: int(b or 0))
    for ax, mode in zip(axes[0], modes, strict=True):
        ax.plot(ideal_x, [1 / d for d in ideal_x], ":", color="black", label="ideal 1/density")
        ax.axhline(1.0, color="grey", lw=0.8, label="dense")
        for (provider, block), pts in sorted(data[mode].items(), key=lambda kv: (kv[0][0], int(kv[0][1] or 0))):
            label = f"{provider} {block}x{block}"
            color = f"C{blocks.index(block) % 10}"  # one colour per block size, one style per provider
            ax.plot([d for d, _ in pts], [s for _, s in pts], STYLES[provider], color=color, label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(ideal_x, [f"{d:g}" for d in ideal_x])
        ax.set_xlabel("block density")
        ax.set_ylabel("speedup over dense (x)")
        ax.set_title(mode)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if model:
        title = f"{model} training step, sparsekern vs dense: {device}, {dtype}, {shape}"
    else:
        title = f"SparseLinear vs dense: {device}, {dtype}, {shape} (tokens x out x in)"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / (Path(csv_path).stem + ".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Plot speedup vs density from a bench CSV.")
    p.add_argument("csv", type=Path)
    p.add_argument("out_dir", type=Path, nargs="?", default=None, help="default: the CSV's folder")
    p.add_argument("--select", default=None, help="device|dtype|shape to plot when the CSV holds several")
    args = p.parse_args(argv)
    out = plot(args.csv, args.out_dir or args.csv.parent, args.select)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
