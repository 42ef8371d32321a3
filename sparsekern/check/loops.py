"""The innermost MMA loop of a compiled kernel, read from its SASS and its TTGIR.

SASS (``cuobjdump -sass``): a loop is the address range of a backward branch; the MMA loop is the
smallest one that holds an ``HGMMA``/``HMMA``. Counted there: HGMMA shapes, ``UTMALDG`` (TMA loads),
``LDGSTS`` (cp.async), the cp.async wait depths (``DEPBAR.LE SB0, N``: N copy groups may still be in
flight, 0 is a wait-all), the wgmma wait depths (``WARPGROUP.DEPBAR.LE gsb0, N``) and every other
instruction (``NOP`` excluded).

TTGIR: the MMA loop is the innermost ``scf.for`` region holding a ``tt.dot``/``ttng.warp_group_dot``.
Counted there: ``ttg.async_wait {num = N}``, one-element index copies (``async_copy_global_to_local``
of a ``tensor<1x...>``), tile copies, TMA loads and mbarrier waits. Shared buffers are the
``ttg.local_alloc`` memdescs: a ``SxRxC`` alloc of an operand tile is S pipelined buffers.
"""

from __future__ import annotations

import re
from collections import Counter

_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_MMA_OPS = ("HGMMA", "HMMA")


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of every instruction in ``cuobjdump -sass`` text."""
    return [(int(m.group(1), 16), m.group(3), m.group(4).strip()) for m in _SASS_LINE.finditer(text)]


def sass_loops(ins: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """(first, last) address of every backward branch's range."""
    out = []
    for addr, op, args in ins:
        if op.startswith(("BRA", "JMP")):
            target = re.search(r"0x([0-9a-f]+)", args)
            if target and int(target.group(1), 16) < addr:
                out.append((int(target.group(1), 16), addr))
    return out


def _waits(body, prefix: str) -> list[int]:
    found = set()
    for _, op, args in body:
        if op.startswith(prefix):
            depth = re.search(r"0x([0-9a-f]+)\s*$", args)
            if depth:
                found.add(int(depth.group(1), 16))
    return sorted(found)


def sass_mma_loop(sass: str) -> dict | None:
    """Statistics of the innermost SASS loop that holds a tensor-core instruction (None: no such loop)."""
    ins = parse_sass(sass)
    mma_addrs = [a for a, op, _ in ins if op.startswith(_MMA_OPS)]
    spans = [(hi - lo, lo, hi) for lo, hi in sass_loops(ins) if any(lo <= a <= hi for a in mma_addrs)]
    if not spans:
        return None
    _, lo, hi = min(spans)
    body = [i for i in ins if lo <= i[0] <= hi and i[1] != "NOP"]
    ops = [op for _, op, _ in body]
    shapes = Counter(m.group(1) for op in ops if (m := re.match(r"HGMMA\.(\d+x\d+x\d+)", op)))
    mma = sum(op.startswith(_MMA_OPS) for op in ops)
    return {
        "range": f"{lo:#x}-{hi:#x}",
        "instr": len(body),
        "mma": mma,
        "non_mma": len(body) - mma,
        "hgmma": dict(sorted(shapes.items())),
        "hmma": sum(op.startswith("HMMA") for op in ops),
        "utmaldg": sum(op.startswith("UTMALDG") for op in ops),
        "ldgsts": sum(op.startswith("LDGSTS") for op in ops),
        "ldg": sum(op == "LDG" or op.startswith("LDG.") for op in ops),
        # DEPBAR.LE SB0, N is the cp.async (scoreboard 0) wait; WARPGROUP.DEPBAR is the wgmma one.
        "cp_wait": _waits([b for b in body if "SB0" in b[2]], "DEPBAR"),
        "wgmma_wait": _waits(body, "WARPGROUP.DEPBAR"),
    }


# ------------------------------------------------------------------ TTGIR
_FOR = re.compile(r"\bscf\.for\b")
_DOT = re.compile(r"\b(?:tt\.dot|ttng\.warp_group_dot)\s")
_ALLOC = re.compile(r"ttg\.local_alloc\b[^\n]*?memdesc<((?:\d+x)+)([a-z]\w*)")


def ttgir_for_regions(lines: list[str]) -> list[tuple[int, int]]:
    """(first, last) line index of every ``scf.for`` region, by brace matching."""
    regions = []
    for i, line in enumerate(lines):
        if not _FOR.search(line):
            continue
        depth, opened = 0, False
        for j in range(i, len(lines)):
            depth += lines[j].count("{") - lines[j].count("}")
            opened = opened or depth > 0
            if opened and depth <= 0:
                regions.append((i, j))
                break
    return regions


def ttgir_allocs(ttgir: str) -> list[dict]:
    """Every ``ttg.local_alloc``: its shape, element type and line index."""
    out = []
    for i, line in enumerate(ttgir.splitlines()):
        m = _ALLOC.search(line)
        if m:
            out.append({"line": i, "shape": [int(d) for d in m.group(1).rstrip("x").split("x")], "elem": m.group(2)})
    return out


def ttgir_mma_loop(ttgir: str) -> dict | None:
    """Statistics of the innermost ``scf.for`` holding a dot (None: no such loop)."""
    lines = ttgir.splitlines()
    regions = ttgir_for_regions(lines)
    spans = [(hi - lo, lo, hi) for lo, hi in regions if any(_DOT.search(x) for x in lines[lo : hi + 1])]
    if not spans:
        return None
    _, lo, hi = min(spans)
    body = "\n".join(lines[lo + 1 : hi])  # the header's iter_args and the closing line are not the body
    copies = re.findall(r"ttg\.async_copy_global_to_local[^\n]*?:\s*tensor<([^,>]*)", body)
    return {
        "lines": (lo, hi),
        "async_wait": sorted({int(n) for n in re.findall(r"ttg\.async_wait\b[^\n]*\{num = (\d+)", body)}),
        "index_copies": sum(c.startswith("1x") for c in copies),
        "tile_copies": sum(not c.startswith("1x") for c in copies),
        "tma_loads": len(re.findall(r"ttng\.async_tma_copy_global_to_local|ttng\.async_tma_gather", body)),
        "wait_barrier": len(re.findall(r"ttng\.wait_barrier", body)),
        "wgmma_pendings": sorted({int(n) for n in re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", body)}),
    }


def operand_buffers(ttgir: str, operand_tiles: list[tuple[int, ...]], elem: str, loop: dict | None) -> list[int]:
    """Shared-memory buffers of each operand tile (given as (rows, cols), either orientation matching, or
    as an N-D descriptor box, matched exactly or with its unit dimensions dropped: Triton allocates a
    ``[1, 1, R, C]`` box whose load feeds only a unit-dimension reshape as ``R x C``).

    A multi-buffered alloc ``S x rows x cols`` (``S x box``) gives S; a single-tile alloc inside the loop
    gives 1 (the operand is staged but not pipelined); no alloc gives 0 (read from registers or not
    found). Allocs of equal shape go to the operands in the order they appear.
    """
    allocs = [a for a in ttgir_allocs(ttgir) if a["elem"] == elem and len(a["shape"]) >= 2]
    inside = (lambda a: loop["lines"][0] < a["line"] < loop["lines"][1]) if loop else (lambda a: False)
    used, out = set(), []
    for tile in operand_tiles:
        if len(tile) > 2:  # a box: S x box, or the box itself inside the loop
            best = 0
            squeezed = [d for d in tile if d != 1]
            for k, a in enumerate(allocs):
                if k in used:
                    continue
                if a["shape"][1:] in (list(tile), squeezed):
                    used.add(k)
                    best = a["shape"][0]
                    break
                if a["shape"] in (list(tile), squeezed) and inside(a):
                    used.add(k)
                    best = 1
                    break
            out.append(best)
            continue
        want = sorted(tile)
        best = 0
        for k, a in enumerate(allocs):
            if k in used or sorted(a["shape"][-2:]) != want:
                continue
            if len(a["shape"]) >= 3:
                used.add(k)
                best = a["shape"][0]
                break
            if inside(a):
                used.add(k)
                best = 1
                break
        out.append(best)
    return out


TTGIR_ELEM = {"bf16": "bf16", "fp16": "f16", "fp32-tf32": "f32", "fp32-ieee": "f32"}
