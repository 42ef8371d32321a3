"""Tuning data for the block-sparse matmul kernels.

Import path: ``sparsekern.kernels.configs`` (this folder, ``kernels/``, installs as ``sparsekern.kernels``).

Configs are built by named factories, filtered against the sparsity block
(tiles must divide it) and against the device's shared memory, and looked up
by a bucketed key so that a new token count does not trigger a re-tune.

Tile names follow the kernels: ``BLOCK_M`` runs over tokens, ``BLOCK_N`` over
the weight's output rows (``bm`` side of a block) and ``BLOCK_K`` over its
input columns (``bk`` side). A tile never spans two sparsity blocks.

Kinds are ``fwd``, ``dx`` and ``wgrad`` for the matmul kernels and
``conv_fwd``, ``conv_dx`` and ``conv_wgrad`` for the implicit-GEMM conv
kernels (``kernels/bsconv.py``). A conv kernel has the same tile roles and
config keys as its matmul twin, so it shares the candidates, the shared-memory
model and the default; only the tuned records are kept apart (the kind is part
of the key).

Configs measured on a GPU are stored as JSON under ``kernels/tuned/`` (one file
per device name, written by ``bench --tune``) and take precedence over
autotuning.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
import triton

from .launch import INTERPRET, device_capability

TUNED_DIR = Path(__file__).with_name("tuned")

# Shared memory the pruning assumes when no GPU can be asked (sm_80 opt-in max).
DEFAULT_SMEM_BYTES = 166912


def m_bucket(m: int) -> int:
    """Autotune key for the token count: the next power of two, at least 64.

    Training loops see many token counts (last batch, packing); bucketing keeps
    the tuned config valid across them instead of re-benchmarking each one.
    """
    return max(64, triton.next_power_of_2(int(m)))


def count_bucket(n: int) -> int:
    """Autotune key for a block count: the next power of two (a mask update rarely crosses one)."""
    return triton.next_power_of_2(max(1, int(n)))


def _split_options(side: int) -> tuple[int, ...]:
    """Tile widths worth trying for one side of a block: the side, and its half when large."""
    return (side, side // 2) if side >= 128 else (side,)


def gemm_configs() -> list[triton.Config]:
    """Forward and input-gradient candidates: (tokens x block-slice) output tiles.

    ``BLOCK_N``/``BLOCK_K`` are placeholders (0) filled per block size by
    :func:`for_block`; the factory fixes the token tile, warps and stages.
    """
    shapes = [(64, 4, 3), (128, 4, 3), (128, 8, 3), (128, 4, 4), (256, 8, 3)]
    plain = [triton.Config({"BLOCK_M": bm, "SWAP_AB": False}, num_warps=w, num_stages=s) for bm, w, s in shapes]
    # Swapped operands put tokens on the MMA's N side; worth trying with wide token tiles.
    swapped = [(128, 4, 3), (256, 8, 3), (256, 4, 3), (256, 4, 4)]
    return plain + [triton.Config({"BLOCK_M": bm, "SWAP_AB": True}, num_warps=w, num_stages=s) for bm, w, s in swapped]


def wgrad_configs() -> list[triton.Config]:
    """Weight-gradient candidates: ``BLOCK_M`` is the reduction step over tokens."""
    # Token steps of 64 and more: a 32-token step is half a wgmma K side per operand row pair.
    shapes = [(64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (64, 8, 4)]
    single = [triton.Config({"BLOCK_M": bm, "GROUP": 1}, num_warps=w, num_stages=s) for bm, w, s in shapes]
    # Runs of blocks sharing dy make the MMA GROUP times wider (see the dW kernel).
    grouped = [(2, 64, 4, 3), (4, 64, 8, 3), (4, 64, 4, 3), (2, 128, 8, 3)]
    return single + [triton.Config({"BLOCK_M": bm, "GROUP": g}, num_warps=w, num_stages=s) for g, bm, w, s in grouped]


def base_kind(kind: str) -> str:
    """The matmul kind whose tiles a kind shares: ``conv_fwd`` -> ``fwd``, ``fwd`` -> ``fwd``."""
    base = kind.removeprefix("conv_")
    if base not in ("fwd", "dx", "wgrad"):
        raise ValueError(f"unknown kernel kind {kind!r}")
    return base


def candidates(kind: str) -> list[triton.Config]:
    """Token-tile candidates for a kind (expand them per block with :func:`for_block`)."""
    return wgrad_configs() if base_kind(kind) == "wgrad" else gemm_configs()


def for_block(base: list[triton.Config], bm: int, bk: int) -> list[triton.Config]:
    """Expand token-tile configs with every admissible (BLOCK_N, BLOCK_K) for a block."""
    out = []
    for cfg in base:
        group = cfg.kwargs.get("GROUP", 1)
        if group * bk > 256:  # the wide weight-gradient operand stays within one MMA's N
            continue
        for tn in _split_options(bm):
            for tk in _split_options(bk) if group == 1 else (bk,):
                kw = dict(cfg.kwargs, BLOCK_N=tn, BLOCK_K=tk)
                out.append(triton.Config(kw, num_warps=cfg.num_warps, num_stages=cfg.num_stages))
    return out


def smem_bytes(cfg: triton.Config, elem_bytes: int, kind: str) -> int:
    """Shared memory a config's pipelined operand tiles need."""
    k = cfg.kwargs
    kind = base_kind(kind)
    if kind == "wgrad":
        per_stage = k["BLOCK_M"] * (k["BLOCK_N"] + k.get("GROUP", 1) * k["BLOCK_K"])
    elif kind == "fwd":
        per_stage = k["BLOCK_K"] * (k["BLOCK_M"] + k["BLOCK_N"])
    else:  # input gradient: reduction runs over BLOCK_N
        per_stage = k["BLOCK_N"] * (k["BLOCK_M"] + k["BLOCK_K"])
    return cfg.num_stages * per_stage * elem_bytes


@functools.cache
def device_smem(device_index: int) -> int:
    try:
        props = triton.runtime.driver.active.utils.get_device_properties(device_index)
        return int(props["max_shared_mem"])
    except Exception:  # no driver: offline compile or interpreter
        return DEFAULT_SMEM_BYTES


def prune(configs, elem_bytes: int, kind: str, smem: int) -> list[triton.Config]:
    """Drop configs whose tiles do not fit shared memory; keep at least one."""
    fits = [c for c in configs if smem_bytes(c, elem_bytes, kind) <= smem]
    if fits:
        return fits
    return [min(configs, key=lambda c: smem_bytes(c, elem_bytes, kind))]


def default_config(kind: str, bm: int, bk: int, elem_bytes: int, cap: int = 90, variant: str = "") -> triton.Config:
    """The config used without tuning (interpreter, offline check, first guess) on sm_``cap``.

    sm_90, 16-bit operands: the forward and input gradient put tokens on the
    MMA's wide side (``SWAP_AB``, 256 tokens, 4 warps: wgmma m64n256k16, the
    dense tutorial's shape) whenever the block's output side is 64 or more;
    128-wide blocks are cut into two 64-wide output slices so the accumulator
    stays at 128 registers per thread. Blocks 32 wide or less cannot fill the
    64-row side of a wgmma, so they keep tokens on it (128 tokens x the block,
    m64n32k16 / m64n16k16): merging two block rows into one 64-row tile would
    compute the union of their columns, twice the FLOPs at random layouts.
    The conv descriptor kernels are the exception: their token tile cannot be
    a wgmma's shared-memory A operand, so 32-wide blocks put 256 tokens on N
    and run mma.sync (see the comment in the code).
    Four stages fit in shared memory (4 x 40 KB for 64-wide blocks). The
    weight gradient steps through tokens 64 at a time (the reduction side of
    its MMA) with one block per program, each through TMA. The conv kernels
    take the same tiles: their descriptor kernels (``variant="rect"``,
    ``bsconv_tma.py``) keep no per-token state, so 4 warps as for the linear
    ones; the pointer kernels sm_90 falls back to gather rows and need 8.

    sm_80 and fp32 keep the tiles that ``python -m sparsekern.check`` finds
    spill-free there. fp32 needs smaller tiles: without TF32 ``tl.dot``
    becomes FMAs that keep the whole reduction slice of both operands in
    registers, so the reduction step is 16 (``BLOCK_K`` in the forward,
    ``BLOCK_N`` in the input gradient) and the output slice at most 32 wide.
    """
    wide = elem_bytes >= 4
    kind_in, kind = kind, base_kind(kind)
    if cap >= 90 and not wide:
        if kind == "wgrad":
            kw = {"BLOCK_M": 64, "GROUP": 1, "BLOCK_N": min(bm, 128), "BLOCK_K": min(bk, 128)}
            return triton.Config(kw, num_warps=4, num_stages=4 if max(bm, bk) <= 64 else 3)
        out_side = bm if kind == "fwd" else bk
        if out_side >= 64:
            tiles = {"BLOCK_N": min(bm, 64), "BLOCK_K": min(bk, 64)}
            # The conv gathers keep per-token coordinates, pointers and masks in registers: with 4 warps
            # the 256-token tile spilled ~300 B at 255 registers (64x64 blocks, mixed); 8 warps hold it
            # in 208-215 without spilling (two warpgroups, m64n128k16 each).
            warps = 8 if kind_in.startswith("conv_") and variant != "rect" else 4
            return triton.Config({"BLOCK_M": 256, "SWAP_AB": True, **tiles}, num_warps=warps, num_stages=4)
        tiles = {"BLOCK_N": min(bm, 64), "BLOCK_K": min(bk, 64)}
        if variant == "rect":
            # The descriptor conv kernels' token tile is a box reshaped from TN x TH x TW pixels, and
            # Triton feeds a reshaped box to a wgmma's A side through registers (bsconv_tma's
            # docstring): tokens on M (128 x the block) ran 111 non-MMA instructions per iteration
            # against the dense twin's 78, and ptxas serialized the wgmma (C7515). With tokens on N
            # the block's 32 rows are too few for a wgmma, so Triton emits mma.sync (HMMA) with both
            # operands read from the TMA buffers: 80-93 non-MMA instructions per iteration against
            # the same-tile twin's 79-80, no wgmma to serialize (Triton 3.6 and 3.9; 128 tokens gave
            # 76-89 against 75). 256 tokens give each warp 32 HMMA per iteration, more tensor-unit
            # time than issue slots.
            return triton.Config({"BLOCK_M": 256, "SWAP_AB": True, **tiles}, num_warps=4, num_stages=4)
        return triton.Config({"BLOCK_M": 128, "SWAP_AB": False, **tiles}, num_warps=4, num_stages=4)
    if kind == "wgrad":
        kw = {"BLOCK_M": 32 if wide else 64, "GROUP": 1, "BLOCK_N": min(bm, 64), "BLOCK_K": min(bk, 32 if wide else 64)}
        return triton.Config(kw, num_warps=4, num_stages=3)
    reduce_side, out_side = (16, 32) if wide else (64, 64)
    if kind == "fwd":
        tiles = {"BLOCK_N": min(bm, out_side), "BLOCK_K": min(bk, reduce_side)}
    else:
        tiles = {"BLOCK_N": min(bm, reduce_side), "BLOCK_K": min(bk, out_side)}
    kw = {"BLOCK_M": 64 if wide else 128, "SWAP_AB": False, **tiles}
    # The conv kernels gather their token operand (per-row pointers and bounds masks live in
    # registers): with 16-bit operands, 128-token tiles and 4 warps, the sm_80 forward spilled
    # 24 B and the input gradient 136 B at 255 registers (64x64 blocks); 8 warps hold the same
    # tile in 178 / 199 registers without spilling.
    # The linear input gradient's mixed-block merge (two weight tiles and the element states) did the
    # same on sm_80 with 64x64 blocks: 255 registers and an 8 B spill at 4 warps, 185 and none at 8.
    # So did the linear forward's under Triton 3.6 (the GPU machine's): 32x32 blocks spilled 28 B at 4
    # warps (128 registers), and 64x64 sat at 255; at 8 warps 94 and 184, and the plain kernels drop
    # from 80/180 to 54/88 registers (fp16, 32x32/64x64; Triton 3.9 alike).
    warps = 8 if (kind_in.startswith("conv_") or kind in ("fwd", "dx")) and not wide else 4
    return triton.Config(kw, num_warps=warps, num_stages=2 if wide else 3)


# ----------------------------------------------------------- tuned records
def tuned_path(device_name: str) -> Path:
    safe = "".join(ch if ch.isalnum() else "_" for ch in device_name).strip("_")
    return TUNED_DIR / f"{safe}.json"


@functools.cache
def load_tuned(device_name: str) -> dict[str, dict]:
    """Tuned configs for a device: ``{key: {"kwargs": ..., "num_warps": .., "num_stages": ..}}``."""
    if os.environ.get("SPARSEKERN_IGNORE_TUNED") == "1":
        return {}
    path = tuned_path(device_name)
    if not path.exists():
        return {}
    return json.loads(path.read_text())


# Version 2: kernels with carried block metadata, one value store and TMA (configs of the earlier
# kernels, such as bench/results/h100's, measured other code and no longer match any key).
TUNED_FORMAT = 2


def tuned_key(kind: str, dtype_name: str, bm: int, bk: int, mb: int) -> str:
    return f"v{TUNED_FORMAT}:{kind}:{dtype_name}:{bm}x{bk}:m{mb}"


def lookup(device_name: str, key: str) -> triton.Config | None:
    rec = load_tuned(device_name).get(key)
    if rec is None:
        return None
    return triton.Config(rec["kwargs"], num_warps=rec["num_warps"], num_stages=rec["num_stages"])


def to_record(cfg: triton.Config) -> dict:
    return {"kwargs": dict(cfg.kwargs), "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


# ----------------------------------------------------------- the autotuner
_tuned_cache: dict[tuple, triton.Config] = {}


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "interpreter"


def pick_config(kind, dtype, device, bm, bk, m, run, config=None, blocks=None, variant="") -> triton.Config:
    """Explicit override, then tuned data, then (CUDA) a one-off benchmark of the candidates.

    ``run(cfg)`` launches the kernel with ``cfg`` and returns the compiled
    kernel; ``blocks`` (a block count) joins the key for kinds whose best
    config depends on it (the weight gradient's grouping and split);
    ``variant`` names a second kernel of the same kind (``"rect"``: the conv
    descriptor kernels of ``bsconv_tma.py``), tuned under its own key.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    if config is not None:
        return config
    if INTERPRET or device.type != "cuda":
        return default_config(kind, bm, bk, elem, device_capability(device), variant)
    key = tuned_key(kind, str(dtype).removeprefix("torch."), bm, bk, m_bucket(m))
    if blocks is not None:
        key += f":b{count_bucket(blocks)}"
    if variant:
        key += f":{variant}"
    name = _device_name(device)
    cache_key = (name, key)
    if cache_key in _tuned_cache:
        return _tuned_cache[cache_key]
    found = lookup(name, key)
    if found is None:
        cap = device_capability(device)
        base = [default_config(kind, bm, bk, elem, cap, variant)] + for_block(candidates(kind), bm, bk)
        cands = prune(base, elem, kind, device_smem(device.index or 0))
        if os.environ.get("SPARSEKERN_AUTOTUNE", "1") == "0":
            found = cands[0]
        else:
            timings = []
            for cand in cands:
                try:
                    # A config that spills registers is slow by construction: never pick it.
                    if getattr(run(cand), "n_spills", 0):
                        continue
                    timings.append((triton.testing.do_bench(lambda c=cand: run(c), warmup=5, rep=20), cand))
                except Exception:  # a config the compiler rejects (e.g. out of resources)
                    continue
            if not timings:
                raise RuntimeError(f"no {kind} kernel config compiled for {key} on {name}")
            found = min(timings, key=lambda tc: tc[0])[1]
    _tuned_cache[cache_key] = found
    return found


def tuned_records() -> dict[str, dict]:
    """Configs chosen in this process, as ``{device: {key: record}}`` (for ``bench --tune``)."""
    out: dict[str, dict] = {}
    for (name, key), cfg in _tuned_cache.items():
        out.setdefault(name, {})[key] = to_record(cfg)
    return out


def clear_tuned() -> None:
    """Forget the configs chosen in this process and the tuned files read (``bench`` between suites)."""
    _tuned_cache.clear()
    load_tuned.cache_clear()
