"""The linear suite's printed tables and headline (``linear.py`` measures the rows).

Import path: ``sparsekern.bench.linear_tables``. Rows are the long-format dicts of ``linear.run``:
one per (provider, block, density, mode), keyed by those four here.
"""

from __future__ import annotations

import math

from sparsekern.bench.common import fmt_ms, fmt_x, markdown_table
from sparsekern.bench.providers import TRAIN_MODES

__all__ = ["ELEMENT_ROWS", "dense_for", "headline", "tables"]

ELEMENT_ROWS = (
    "Block `elem`: `torch.nn.utils.prune.l1_unstructured` at amount 1 - density; `masked` is torch's prune "
    "hook (`W * mask` every step), `sparsekern` that layer converted by "
    '`sparsekern.adapters.from_torch_prune(..., granularity="exact")` (identical math; the CPU runs it '
    "on the element-sparse kernels, `kernels/csr_cpu.py`)."
)


def dense_for(by: dict, r: dict | None, mode: str) -> dict | None:
    """The dense row a provider's row is measured against: the same case's interleaved dense
    steps when the run took them, else the run's one dense measurement (``block`` empty)."""
    if r is not None:
        own = by.get(("dense", r["block"], r["density"], mode))
        if own is not None:
            return own
    return by.get(("dense", "", 1.0, mode))


def tables(rows: list[dict[str, object]]) -> str:
    """Markdown: main table (forward/backward/step) and, when measured, the weight-gradient table."""
    by = {(r["provider"], r["block"], r["density"], r["mode"]): r for r in rows}

    def speedup(r, mode):
        d = dense_for(by, r, mode)
        if r is None or d is None or not r["p50"] or math.isnan(r["p50"]) or math.isnan(d["p50"]):
            return math.nan
        return d["p50"] / r["p50"]

    configs = []
    for r in rows:
        key = (r["provider"], r["block"], r["density"])
        if key not in configs:
            configs.append(key)
    head = ["block", "density", "provider", *(f"{m} ms" for m in TRAIN_MODES)]
    head += [f"{m} speedup" for m in TRAIN_MODES] + ["FLOP fraction"]
    body = []
    for prov, block, density in configs:
        got = {m: by.get((prov, block, density, m)) for m in TRAIN_MODES}
        present = [r for r in got.values() if r is not None]
        if not present:
            continue
        note = next((r["note"] for r in present if r.get("note")), "")
        frac_row = got["step"] or got["forward"]
        cells = [block or "—", f"{density:g}", prov]
        if note:
            cells += [note.split(":")[0], "—", "—", "—", "—", "—"]
        else:
            cells += [fmt_ms(got[m]["p50"]) if got[m] else "—" for m in TRAIN_MODES]
            cells += [fmt_x(speedup(got[m], m)) if got[m] else "—" for m in TRAIN_MODES]
        cells.append(f"{frac_row['flop_fraction']:.3f}")
        body.append(cells)
    text = markdown_table(head, body, align="rrl" + "r" * (len(head) - 3))
    text += "\n\nTimes are p50 ms; speedup = dense time / provider time (same mode), where dense is the "
    text += "same case's dense row (dense, masked and sparsekern steps are taken in turn per case); "
    text += "FLOP fraction = computed FLOPs / dense FLOPs for a full step (forward for forward-only providers)."
    if any(r["block"] == "elem" for r in rows):
        text += "\n\n" + ELEMENT_ROWS

    wg = [r for r in rows if r["mode"] == "weight_grad"]
    if wg:
        all_train = {(r["block"], r["density"]): r for r in wg if r["provider"] == "sparsekern"}
        head = ["block", "density", "provider", "frozen blocks", "weight_grad ms", "vs dense", "vs all-trainable"]
        head.append("dW FLOP fraction")
        body = []
        for r in wg:
            ref = all_train.get((r["block"], r["density"]))
            vs_train = ref["p50"] / r["p50"] if ref is not None and r["provider"] != "dense" else math.nan
            body.append(
                [
                    r["block"] or "—",
                    f"{r['density']:g}",
                    r["provider"],
                    f"{r['frozen_fraction']:.2f}",
                    fmt_ms(r["p50"]),
                    fmt_x(speedup(r, "weight_grad")),
                    fmt_x(vs_train),
                    f"{r['flop_fraction']:.3f}",
                ]
            )
        text += "\n\nWeight gradient only (backward with x not requiring grad), all-trainable vs half the kept "
        text += "blocks frozen:\n\n" + markdown_table(head, body, align="rrl" + "r" * (len(head) - 3))
    return text


def headline(rows: list[dict[str, object]]) -> str | None:
    """The project's headline figures, when this run measured them (stated, never judged)."""
    by = {(r["provider"], r["block"], r["density"], r["mode"]): r for r in rows}
    parts = []
    for density in (0.1, 0.5):
        sk = by.get(("sparsekern", 64, density, "step"))
        dense = dense_for(by, sk, "step")
        if dense and sk and not math.isnan(sk["p50"]):
            parts.append(f"density {density:g}: {dense['p50'] / sk['p50']:.2f}x dense")
    if not parts:
        return None
    return "Headline, sparsekern full step (fwd+bwd), 64x64 blocks: " + "; ".join(parts) + "."
