"""The static kernel check (``sparsekern.check``) as part of a benchmark run's output.

``write_static(out_dir, stem, scope)`` compiles the kernels for sm_80 and sm_90
(no GPU needed, see ``sparsekern/check.py``), writes the full table (registers,
spills, stack, shared memory, tensor-core instructions, occupancy estimate
from the ptxas figures) to ``<stem>.md`` and the rows to ``<stem>.json``, and
returns a short markdown section for the run's report: one line per kernel
and arch with the range of registers and occupancy, the total spills and the
number of problems, plus a link to the full table.

Scopes are the check's: ``quick`` (32 kernels, fp16/fp32-tf32, two block
sizes; the CPU option ``--static quick``), ``default`` (what a GPU run does)
and ``full``.
"""

from __future__ import annotations

import json
from pathlib import Path

from sparsekern.bench.common import markdown_table, progress

SCOPES = ("quick", "default", "full")


def run_rows(scope: str) -> list[dict]:
    """The check's rows for ``scope`` (compiles every kernel of that scope; minutes for ``default``)."""
    from sparsekern import check

    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return check.run_check(quick=scope == "quick", full=scope == "full", progress=True)


def summary(rows: list[dict]) -> str:
    """One markdown row per (kernel, arch): kernels compiled, registers, spills, occupancy range, problems."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        kernel = r["kernel"] + (" (mixed)" if r.get("has_mixed") else "")
        groups.setdefault((kernel, r["arch"]), []).append(r)
    head = ["kernel", "arch", "compiled", "regs min–max", "spill bytes", "smem max (B)", "occupancy min–max"]
    head.append("problems")
    body = []
    for (kernel, arch), rs in groups.items():
        ok = [r for r in rs if r.get("status") != "ERROR"]
        regs = [r["regs"] for r in ok]
        occ = [r["occupancy"] for r in ok]
        spills = sum(r["spill_stores"] + r["spill_loads"] for r in ok)
        smem = max((r["shared"] for r in ok), default=0)
        bad = sum(r.get("status") != "ok" for r in rs)
        body.append(
            [
                kernel,
                arch,
                len(rs),
                f"{min(regs)}–{max(regs)}" if regs else "—",
                spills,
                smem,
                f"{min(occ):.2f}–{max(occ):.2f}" if occ else "—",
                bad,
            ]
        )
    return markdown_table(head, body, align="llrrrrrr")


def write_static(
    out_dir: Path, stem: str, scope: str, rows: list[dict] | None = None
) -> tuple[str, dict[str, Path], int]:
    """Run the check (unless ``rows`` are given), write ``<stem>.md``/``.json``.

    Returns the report section, the paths written and the number of kernels with problems.
    """
    from sparsekern import check

    progress(f"static check ({scope} scope): compiling the kernels for sm_80 and sm_90")
    rows = run_rows(scope) if rows is None else rows
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"static_md": out_dir / f"{stem}.md", "static_json": out_dir / f"{stem}.json"}
    bad = check.failures(rows)
    head = f"## static check ({scope} scope): {len(rows)} kernels, {len(bad)} with problems\n\n"
    head += "Compiled ahead of time for sm_80 and sm_90 by `sparsekern.check`; occupancy is estimated from the "
    head += "ptxas registers and the shared memory (resident warps / 64).\n\n"
    paths["static_md"].write_text(head + check.format_table(rows) + "\n")
    paths["static_json"].write_text(json.dumps(rows, indent=1) + "\n")
    section = f"### Static check ({scope} scope): {len(rows)} kernels, {len(bad)} with problems\n\n"
    section += summary(rows)
    section += "\n\nFull table (registers, spills, stack, shared memory, tensor-core instructions, occupancy): "
    section += f"[{paths['static_md'].name}]({paths['static_md'].name})."
    return section, paths, len(bad)
