"""The fidelity suite's report: the markdown table, its headline and notes, the curves and the plot.

See ``sparsekern/bench/fidelity.py`` for what the columns mean. ``write_extra``
writes ``<stem>_curves.json`` (every run's validation loss against training
seconds) and ``<stem>.png`` (dense, element RigL and block RigL at uniform
density); without matplotlib only the curves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from sparsekern.bench.common import markdown_table, progress

__all__ = ["footnotes", "headline", "tables", "write_extra"]


def _fmt(v, spec="{:.3f}") -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else spec.format(v)


def tables(rows: list[dict]) -> str:
    head = [
        "method",
        "distribution",
        "granularity",
        "block",
        "pool",
        "val bits/byte",
        "block-element gap",
        "fwd GFLOP",
        "dX GFLOP",
        "dW GFLOP",
        "FLOPs vs dense",
        "ms/step",
        "steps",
        "setup s",
        "load",
        "note",
    ]
    body = [
        [
            r["method"],
            r["distribution"],
            r["granularity"],
            r["block"] if r["method"] != "dense" else "",
            r["reduce"] if r["granularity"] == "block" else "",
            _fmt(r["val_bpb"], "{:.4f}"),
            _fmt(r["gap"], "{:+.2%}"),
            _fmt(r["fwd_gflop"]),
            _fmt(r["dx_gflop"]),
            _fmt(r["dw_gflop"]),
            _fmt(r["flop_fraction"]),
            _fmt(r["ms_per_step"], "{:.0f}"),
            r["steps"],
            _fmt(r["setup_s"], "{:.1f}"),
            r["loadavg"],
            r["note"],
        ]
        for r in rows
    ]
    return markdown_table(head, body, "llllr" + "r" * 10 + "l")


def headline(rows: list[dict]) -> str:
    gaps = [r for r in rows if r["granularity"] == "block" and not math.isnan(r["gap"]) and "remedy" not in r["note"]]
    if not gaps:
        return ""
    within = sum(r["gap"] <= 0.03 for r in gaps)
    worst = max(gaps, key=lambda r: r["gap"])
    return (
        f"{within} of {len(gaps)} block runs within 3% relative validation loss of their element twins; "
        f"largest gap {worst['gap']:+.2%} ({worst['method']}, {worst['distribution']})"
    )


def footnotes(cfg, device) -> list[str]:
    return [
        "FLOPs per training step, counted by `sparsekern.report` over every linear layer (the blocks the kernels "
        "compute; element runs compute the dense GEMMs on the masked weight); RigL rows add their dense "
        "gradients on update steps, averaged over the run. Attention's score and value matmuls are not counted. "
        "The gap is (block val loss / element val loss - 1) of the same method and distribution."
    ]


def write_extra(rows: list[dict], paths: dict[str, Path]) -> dict[str, Path]:
    """The learning curves (``<stem>_curves.json``) and the plot of dense, element and block RigL (``.png``)."""
    stem = paths["md"].with_suffix("")
    curves = [{k: r[k] for k in ("method", "distribution", "granularity", "block", "reduce", "curve")} for r in rows]
    out = {"curves": Path(f"{stem}_curves.json")}
    out["curves"].write_text(json.dumps(curves) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        progress("fidelity: no matplotlib, so no plot")
        return out
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if "remedy" in r["note"] or r["distribution"] not in ("", "uniform"):
            continue
        if r["method"] == "dense" or r["method"] == "rigl":
            t, _, loss = zip(*r["curve"], strict=True)
            label = "dense" if r["method"] == "dense" else f"RigL {r['granularity']}"
            ax.plot(t, [v / math.log(2) for v in loss], "-o", ms=3, label=label)
    ax.set_xlabel("training wall time (s)")
    ax.set_ylabel("validation bits/byte")
    ax.set_title("byte-level GPT on the stdlib source: dense vs RigL at density 0.1")
    ax.legend()
    ax.grid(alpha=0.3)
    out["png"] = stem.with_suffix(".png")
    fig.savefig(out["png"], dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
