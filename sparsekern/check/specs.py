"""What the check compiles: arches, precisions, the kernels' launch-like signatures, and the static job list."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field

INTERPRET_VARS = ("TRITON_INTERPRET", "SPARSEKERN_INTERPRET")


@dataclass(frozen=True)
class Arch:
    cap: int
    gpu_name: str  # ptxas --gpu-name; Triton compiles sm_90 as the arch-specific sm_90a
    smem_per_sm: int  # shared memory an SM can hold in total
    smem_per_block: int  # opt-in maximum for one block (what configs.prune is given)
    tc_ops: tuple[str, ...]  # SASS opcodes that count as tensor-core instructions


ARCHS = {
    80: Arch(80, "sm_80", 164 * 1024, 163 * 1024, ("HMMA",)),
    90: Arch(90, "sm_90a", 228 * 1024, 227 * 1024, ("HGMMA", "HMMA")),
}
REGS_PER_SM = 65536
SM_PARTITIONS = 4  # a warp's registers come from one of the four sub-partitions
REG_ALLOC_UNIT = 256  # registers are allocated per warp in chunks of 256
MAX_THREADS_PER_SM = 2048
MAX_BLOCKS_PER_SM = 32
MAX_WARPS_PER_SM = MAX_THREADS_PER_SM // 32
SMEM_RESERVED_PER_BLOCK = 1024  # the driver keeps 1 KiB per block for itself


@dataclass(frozen=True)
class Precision:
    name: str
    ptr_type: str  # Triton signature element type of the data operands
    elem_bytes: int
    dot_precision: str
    needs_tensor_cores: bool


PRECISIONS = {
    p.name: p
    for p in (
        # ieee fp32 is computed with FMAs by design, so tensor cores are not required.
        Precision("fp32-ieee", "fp32", 4, "ieee", False),
        Precision("fp32-tf32", "fp32", 4, "tf32", True),
        Precision("fp16", "fp16", 2, "ieee", True),
        Precision("bf16", "bf16", 2, "ieee", True),
    )
}


@dataclass(frozen=True)
class Desc:
    """A kernel argument that is a host TensorDescriptor when the kernel runs with ``USE_TMA=True``.

    ``block`` names the tile constexprs of its block shape (``"WIDE"`` is ``GROUP * BLOCK_K``);
    ``when`` restricts it to configs with these constexpr values (wgrad's ``x`` only when ``GROUP == 1``).
    """

    arg: str
    block: tuple[str, ...]
    when: tuple[tuple[str, object], ...] = ()


@dataclass(frozen=True)
class KernelSpec:
    """How to build a launch-like signature for one kernel."""

    kind: str  # name used by kernels/configs.py
    fn_name: str
    data_ptrs: frozenset[str]  # pointers to operands in the compute dtype
    unit_strides: frozenset[str]  # inner strides of contiguous operands (== 1)
    unaligned_ints: frozenset[str] = frozenset()  # ints with no divisibility to assume
    extra_constexprs: dict = field(default_factory=dict)
    module: str = "bsmm"  # the module of sparsekern.kernels that defines the kernel
    # The dense twin's operands A, B and output C, as the kernel's argument names (see twins.py).
    operands: tuple[str, str, str] = ("", "", "")
    descriptors: tuple[Desc, ...] = ()  # only used when the kernel has a USE_TMA argument and it is True
    rect: bool = False  # a descriptor conv kernel of kernels/bsconv_tma.py: always descriptors, TN/TH/TW tiles


# ---- The kernels as they are in the tree today (two weight stores, pointers only).
# Conv geometry ints: image sizes, taps and conv strides/paddings/dilations are small and odd in practice.
_CONV_GEOMETRY = frozenset(
    {"M", "H", "W", "H_out", "W_out", "KW", "CPB", "conv_stride_h", "conv_stride_w", "pad_h", "pad_w", "dil_h", "dil_w"}
)
# The redesigned conv kernels take precomputed per-block tap offsets instead of KW/CPB/dilations
# (forward) and per-line output-pixel offsets (input gradient).
_CONV_TMA_FWD_INTS = frozenset(
    {"M", "H", "W", "H_out", "W_out", "conv_stride_h", "conv_stride_w", "pad_h", "pad_w", "fixed_base"}
)
_CONV_TMA_DX_INTS = frozenset(
    {
        "M",
        "HQ",
        "WQ",
        "H",
        "W",
        "H_out",
        "W_out",
        "CPB",
        "conv_stride_h",
        "conv_stride_w",
        "pad_h",
        "pad_w",
        "fixed_base",
    }
)
SPECS = {
    "fwd": KernelSpec(
        "fwd",
        "_bsmm_fwd_kernel",
        frozenset({"x_ptr", "wt_ptr", "wf_ptr", "bias_ptr", "y_ptr"}),
        frozenset({"stride_xk", "stride_yn"}),
        frozenset({"n_frozen"}),
        {"HAS_BIAS": True},
        operands=("x_ptr", "wt_ptr", "y_ptr"),
    ),
    "dx": KernelSpec(
        "dx",
        "_bsmm_dx_kernel",
        frozenset({"dy_ptr", "wt_ptr", "wf_ptr", "dx_ptr"}),
        frozenset({"stride_dyn", "stride_dxk"}),
        frozenset({"n_frozen"}),
        operands=("dy_ptr", "wt_ptr", "dx_ptr"),
    ),
    "wgrad": KernelSpec(
        "wgrad",
        "_bsmm_dw_kernel",
        frozenset({"dy_ptr", "x_ptr", "dw_ptr"}),
        frozenset({"stride_dyn", "stride_xk"}),
        operands=("dy_ptr", "x_ptr", "dw_ptr"),
    ),
    "conv_fwd": KernelSpec(
        "conv_fwd",
        "_bsconv_fwd_kernel",
        frozenset({"x_ptr", "wt_ptr", "wf_ptr", "bias_ptr", "y_ptr"}),
        frozenset({"stride_xc", "stride_yc"}),  # channels_last activations
        _CONV_GEOMETRY | {"n_frozen"},
        {"HAS_BIAS": True},
        module="bsconv",
        operands=("x_ptr", "wt_ptr", "y_ptr"),
    ),
    "conv_dx": KernelSpec(
        "conv_dx",
        "_bsconv_dx_kernel",
        frozenset({"dy_ptr", "wt_ptr", "wf_ptr", "dx_ptr"}),
        frozenset({"stride_dyc", "stride_dxc"}),
        _CONV_GEOMETRY | {"HQ", "WQ", "KH", "n_frozen"},
        module="bsconv",
        operands=("dy_ptr", "wt_ptr", "dx_ptr"),
    ),
    "conv_wgrad": KernelSpec(
        "conv_wgrad",
        "_bsconv_dw_kernel",
        frozenset({"dy_ptr", "x_ptr", "dw_ptr"}),
        frozenset({"stride_dyc", "stride_xc"}),
        _CONV_GEOMETRY,
        module="bsconv",
        operands=("dy_ptr", "x_ptr", "dw_ptr"),
    ),
}

# ---- The redesigned kernels (issue 10): one value store (kernels/store.py), USE_TMA with host descriptors.
# Used instead of SPECS[kind] when the kernel function has a USE_TMA argument. The linear ones follow the
# contract; the conv ones are a guess (the contract gives no conv signatures): one store ``w_ptr``,
# activations gathered with pointers, the weight through a descriptor. A wrong name fails loudly.
_X_TILE, _W_TILE = ("BLOCK_M", "BLOCK_K"), ("BLOCK_N", "BLOCK_K")
_Y_TILE = ("BLOCK_M", "BLOCK_N")
TMA_SPECS = {
    "fwd": KernelSpec(
        "fwd",
        "_bsmm_fwd_kernel",
        frozenset({"x_ptr", "w_ptr", "bias_ptr", "y_ptr"}),
        frozenset({"stride_xk", "stride_yn"}),
        frozenset({"fixed_base"}),
        {"HAS_BIAS": True},
        operands=("x_ptr", "w_ptr", "y_ptr"),
        descriptors=(Desc("x_ptr", _X_TILE), Desc("w_ptr", _W_TILE), Desc("y_ptr", _Y_TILE)),
    ),
    "dx": KernelSpec(
        "dx",
        "_bsmm_dx_kernel",
        frozenset({"dy_ptr", "w_ptr", "dx_ptr"}),
        frozenset({"stride_dyn", "stride_dxk"}),
        frozenset({"fixed_base"}),
        operands=("dy_ptr", "w_ptr", "dx_ptr"),
        descriptors=(Desc("dy_ptr", _Y_TILE), Desc("w_ptr", _W_TILE), Desc("dx_ptr", _X_TILE)),
    ),
    "wgrad": KernelSpec(
        "wgrad",
        "_bsmm_dw_kernel",
        frozenset({"dy_ptr", "x_ptr", "dw_ptr"}),
        frozenset({"stride_dyn", "stride_xk"}),
        operands=("dy_ptr", "x_ptr", "dw_ptr"),
        descriptors=(Desc("dy_ptr", _Y_TILE), Desc("x_ptr", _X_TILE, (("GROUP", 1),))),
    ),
    "conv_fwd": KernelSpec(
        "conv_fwd",
        "_bsconv_fwd_kernel",
        frozenset({"x_ptr", "w_ptr", "bias_ptr", "y_ptr"}),
        frozenset({"stride_xc", "stride_yc"}),
        _CONV_TMA_FWD_INTS,
        {"HAS_BIAS": True},
        module="bsconv",
        operands=("x_ptr", "w_ptr", "y_ptr"),
        descriptors=(Desc("w_ptr", _W_TILE),),
    ),
    "conv_dx": KernelSpec(
        "conv_dx",
        "_bsconv_dx_kernel",
        frozenset({"dy_ptr", "w_ptr", "dx_ptr"}),
        frozenset({"stride_dyc", "stride_dxc"}),
        _CONV_TMA_DX_INTS,
        module="bsconv",
        operands=("dy_ptr", "w_ptr", "dx_ptr"),
        descriptors=(Desc("w_ptr", _W_TILE),),
    ),
    "conv_wgrad": SPECS["conv_wgrad"],
}


# ---- The descriptor conv kernels (kernels/bsconv_tma.py): what sm_90 runs for aligned channels_last
# activations. Every operand but the input gradient's output is a descriptor; x is the 5-D stride-phase view.
# x is the plain NHWC box of a stride-1 conv (PHASED=False, what the gate compiles; strided convs read
# the 5-D stride-phase view, reported as "-strided" rows).
_RECT_X, _RECT_Y = ("TN", "TH", "TW", "BLOCK_K"), ("TN", "TH", "TW", "BLOCK_N")
_RECT_X_PHASED = ("TN", "TH", "ONE", "TW", "BLOCK_K")
# The weight gradient's one-pixel tiles of TN images: descriptors ordered [H, W, N, C] (BATCH_INNER).
_INNER_X, _INNER_Y = ("TH", "TW", "TN", "BLOCK_K"), ("TH", "TW", "TN", "BLOCK_N")
_INNER_X_PHASED = ("TH", "ONE", "TW", "TN", "BLOCK_K")
# Ints with no divisibility to assume: grid and image sizes, channel counts, conv strides/pads/dilations.
_RECT_CONV = frozenset({"GH", "GW", "conv_stride_h", "conv_stride_w", "pad_h", "pad_w"})
_RECT_FWD_INTS = _RECT_CONV - {"conv_stride_h", "conv_stride_w", "pad_h", "pad_w"} | {"M", "C_out", "fixed_base"}
_RECT_DX_INTS = _RECT_CONV | {"M", "N", "C_in", "H", "W", "CPB", "fixed_base"}
_RECT_DW_INTS = _RECT_CONV | {"n_rects", "C_in", "KW", "CPB", "rects_per_split", "dil_h", "dil_w"}
RECT_SPECS = {
    "conv_fwd": KernelSpec(
        "conv_fwd",
        "_bsconv_fwd_tma_kernel",
        frozenset({"bias_ptr"}),
        frozenset(),
        _RECT_FWD_INTS,
        {"HAS_BIAS": True, "PHASED": False},
        module="bsconv_tma",
        operands=("x_desc", "w_desc", "y_desc"),
        descriptors=(Desc("x_desc", _RECT_X), Desc("w_desc", _W_TILE), Desc("y_desc", _RECT_Y)),
        rect=True,
    ),
    "conv_dx": KernelSpec(
        "conv_dx",
        "_bsconv_dx_tma_kernel",
        frozenset({"dx_ptr"}),
        frozenset({"stride_dxc"}),
        _RECT_DX_INTS,
        module="bsconv_tma",
        operands=("dy_desc", "w_desc", "dx_ptr"),
        descriptors=(Desc("dy_desc", _RECT_Y), Desc("w_desc", _W_TILE)),
        rect=True,
    ),
    "conv_wgrad": KernelSpec(
        "conv_wgrad",
        "_bsconv_dw_tma_kernel",
        frozenset({"dw_ptr"}),
        frozenset(),
        _RECT_DW_INTS,
        # RECT_BATCH images of RECT_IMAGE take one-pixel tiles (wgrad_tiling), which step along the row.
        {"PHASED": False, "WRAP_W": True, "BATCH_INNER": True},
        module="bsconv_tma",
        operands=("dy_desc", "x_desc", "dw_ptr"),
        descriptors=(Desc("dy_desc", _INNER_Y), Desc("x_desc", _INNER_X)),
        rect=True,
    ),
}
# The weight gradient over rectangles, what small batches take (reported as "-rect" rows).
_WGRAD_RECTANGLES = dataclasses.replace(
    RECT_SPECS["conv_wgrad"],
    extra_constexprs={"PHASED": False, "WRAP_W": False, "BATCH_INNER": False},  # RECT_IMAGE's rows: GW == 1
    descriptors=(Desc("dy_desc", _RECT_Y), Desc("x_desc", _RECT_X)),
)
# The rectangle the check compiles the descriptor kernels with: that of 14x14 images (the conv
# layer, 3x3 256->256 @14, batch 256), e.g. 16x16 pixels for 256 tokens. The loop code does not depend
# on it, but the weight gradient's choice of tiles does (wgrad_tiling): for this batch, one pixel of
# BLOCK_M images.
RECT_IMAGE = (14, 14)
RECT_BATCH = 256


def kernel_fn(kind: str, rect: bool = False):
    """The kernel function of a kind (imports the kernels: call it in a compiling process only)."""
    import importlib

    spec = RECT_SPECS[kind] if rect else SPECS[kind]
    return getattr(importlib.import_module(f"sparsekern.kernels.{spec.module}"), spec.fn_name)


def job_kernel(job: dict):
    """``(kernel function, KernelSpec)`` of a job: the descriptor conv kernel when ``job["rect"]``."""
    rect = bool(job.get("rect"))
    fn = kernel_fn(job["kind"], rect)
    spec = RECT_SPECS[job["kind"]] if rect else spec_for(job["kind"], fn)
    inner = job_batch_inner(job)
    if rect and job["kind"] == "conv_wgrad" and not inner:
        spec = _WGRAD_RECTANGLES
    if rect and job.get("phased"):  # a strided conv: x through the 5-D stride-phase view
        box = _INNER_X_PHASED if inner else _RECT_X_PHASED
        descs = tuple(Desc(d.arg, box) if d.arg == "x_desc" else d for d in spec.descriptors)
        spec = dataclasses.replace(spec, extra_constexprs={**spec.extra_constexprs, "PHASED": True}, descriptors=descs)
    return fn, spec


def job_batch_inner(job: dict) -> bool:
    """Whether a job is the descriptor weight gradient on one-pixel tiles: what RECT_BATCH images of
    RECT_IMAGE take with its ``BLOCK_M`` (``bsconv_tma.wgrad_tiling``), unless it is a ``-rect`` row."""
    if not job.get("rect") or job["kind"] != "conv_wgrad" or job.get("rectangles"):
        return False
    from sparsekern.kernels.bsconv_tma import wgrad_tiling

    return wgrad_tiling(job["kwargs"]["BLOCK_M"], RECT_BATCH, *RECT_IMAGE)[2]


def job_tiles(job: dict) -> dict:
    """The job's config kwargs plus, for a descriptor conv kernel, its rectangle ``TN``/``TH``/``TW``."""
    kw = dict(job["kwargs"])
    if job.get("rect"):
        from sparsekern.kernels.bsconv_tables import pixel_tile

        tile = (kw["BLOCK_M"], 1, 1) if job_batch_inner(job) else pixel_tile(kw["BLOCK_M"], 1, *RECT_IMAGE)
        kw.update(zip(("TN", "TH", "TW"), tile, strict=True), ONE=1)
    return kw


def job_fn_name(job: dict) -> str:
    return (RECT_SPECS if job.get("rect") else SPECS)[job["kind"]].fn_name


def spec_for(kind: str, fn) -> KernelSpec:
    """``TMA_SPECS[kind]`` for a kernel that takes ``USE_TMA`` (the redesign), else ``SPECS[kind]``."""
    return TMA_SPECS[kind] if "USE_TMA" in fn.arg_names else SPECS[kind]


def active_descriptors(spec: KernelSpec, kwargs: dict, use_tma: bool) -> dict[str, tuple[str, str]]:
    """``{argument: block constexpr names}`` of the descriptors a launch with these constexprs passes."""
    if not use_tma:
        return {}
    return {d.arg: d.block for d in spec.descriptors if all(kwargs.get(k) == v for k, v in d.when)}


def default_config(kind: str, bm: int, bk: int, elem_bytes: int, cap: int, variant: str | None = None):
    """``configs.default_config`` for an arch (the redesign takes ``cap``; the old one has no arch argument).

    ``variant`` defaults to what the launcher runs on aligned channels_last activations: the descriptor
    conv kernels (``"rect"``) on sm_90, the pointer kernels elsewhere.
    """
    from sparsekern.kernels import configs as cfgs

    params = inspect.signature(cfgs.default_config).parameters
    if variant is None:
        variant = "rect" if cap >= 90 and kind.startswith("conv_") else ""
    if "variant" in params:
        return cfgs.default_config(kind, bm, bk, elem_bytes, cap=cap, variant=variant)
    if "cap" in params:
        return cfgs.default_config(kind, bm, bk, elem_bytes, cap=cap)
    return cfgs.default_config(kind, bm, bk, elem_bytes)


# (kind, HAS_MIXED) pairs: the forward kernel both ways, the gradients with the heavier mixed path.
# The conv kernels (kernels/bsconv.py) only with the mixed path: their forward differs from the matmul's
# in the gather, which HAS_MIXED does not touch.
VARIANTS = (
    ("fwd", False),
    ("fwd", True),
    ("dx", True),
    ("wgrad", True),
    ("conv_fwd", True),
    ("conv_dx", True),
    ("conv_wgrad", True),
)
BLOCKS = ((16, 16), (32, 32), (64, 64), (128, 128), (64, 32), (32, 128))
CONV_BLOCKS = ((16, 16), (32, 32), (64, 64), (128, 128), (128, 32))
QUICK_BLOCKS = ((64, 64), (32, 32))
QUICK_CONV_BLOCKS = ((64, 64),)
QUICK_PRECISIONS = ("fp16", "fp32-tf32")
# Outside --full, only these get the largest config too: bf16 has fp16's tiles and element size (its
# registers, spills and shared memory have matched fp16's everywhere), and fp32-ieee's FMA dot is
# several times slower to compile; both still get every default config.
LARGEST_PRECISIONS = ("fp16", "fp32-tf32")

TILE_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K")
SCOPES = ("quick", "default", "full")


def _config_key(cfg) -> tuple:
    return tuple(sorted(cfg.kwargs.items())), cfg.num_warps, cfg.num_stages


def _code_path(cfg) -> tuple:
    """Config constexprs other than the tile sizes (``SWAP_AB``, ``GROUP``): they select different kernel code."""
    return tuple(sorted((k, v) for k, v in cfg.kwargs.items() if k not in TILE_KEYS))


def _pick_configs(
    kind: str, bm: int, bk: int, elem_bytes: int, arch: Arch, scope: str, variant: str | None = None
) -> list[tuple[str, object]]:
    """The default config and the largest pruned candidate (by shared memory, then tile size).

    ``full`` takes the largest candidate of every code path instead of the largest overall.
    """
    from sparsekern.kernels import configs as cfgs

    default = default_config(kind, bm, bk, elem_bytes, arch.cap, variant)
    picked = {_config_key(default): ["default", default]}
    if scope == "quick":
        return [tuple(v) for v in picked.values()]
    cands = cfgs.prune(cfgs.for_block(cfgs.candidates(kind), bm, bk), elem_bytes, kind, arch.smem_per_block)

    def size(c):
        k = c.kwargs
        return cfgs.smem_bytes(c, elem_bytes, kind), k["BLOCK_M"] * k["BLOCK_N"] * k["BLOCK_K"], c.num_warps

    paths = {}
    for c in cands:
        paths.setdefault(_code_path(c) if scope == "full" else (), []).append(c)
    for group in paths.values():
        largest = max(group, key=size)
        entry = picked.setdefault(_config_key(largest), ["largest", largest])
        if entry[0] == "default":
            entry[0] = "default=largest"
    return [tuple(v) for v in picked.values()]


def make_job(kind: str, mixed: bool, cap: int, dtype: str, bm: int, bk: int, label: str, cfg, rect=None) -> dict:
    """One kernel compile, as a picklable dict. ``use_tma``: the launcher's choice for aligned operands."""
    return {
        "kind": kind,
        "has_mixed": mixed,
        "cap": cap,
        "dtype": dtype,
        "bm": bm,
        "bk": bk,
        "config": label,
        "kwargs": dict(cfg.kwargs),
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
        "use_tma": cap >= 90,
        # sm_90 runs the descriptor conv kernels for aligned channels_last activations (one block per
        # weight-gradient program: grouped configs run the pointer kernel).
        "rect": (cap >= 90 and kind.startswith("conv_") if rect is None else rect) and cfg.kwargs.get("GROUP", 1) == 1,
    }


def _variants(only: str | None) -> list[tuple[str, bool]]:
    variants = [v for v in VARIANTS if only is None or only in SPECS[v[0]].fn_name]
    if not variants:
        raise ValueError(f"no kernel name contains {only!r}; kernels: {[s.fn_name for s in SPECS.values()]}")
    return variants


def build_jobs(scope: str = "default", only: str | None = None) -> list[dict]:
    """Every (kernel variant, arch, precision, block, config) of the static check, as picklable dicts.

    ``only`` keeps the kernels whose function name contains it (``bsconv``: the conv kernels).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    precisions = QUICK_PRECISIONS if scope == "quick" else tuple(PRECISIONS)
    variants = _variants(only)
    jobs = []
    for cap in (90, 80):
        for prec in precisions:
            for kind, mixed in variants:
                if kind.startswith("conv_"):
                    blocks = QUICK_CONV_BLOCKS if scope == "quick" else CONV_BLOCKS
                else:
                    blocks = QUICK_BLOCKS if scope == "quick" else BLOCKS
                cfg_scope = scope if scope == "full" or prec in LARGEST_PRECISIONS else "quick"
                for bm, bk in blocks:
                    elem = PRECISIONS[prec].elem_bytes
                    # sm_90 conv: the descriptor kernels and the pointer kernels they fall back to.
                    paths = [(None, None), ("", False)] if cap >= 90 and kind.startswith("conv_") else [(None, None)]
                    for variant, rect in paths:
                        for label, cfg in _pick_configs(kind, bm, bk, elem, ARCHS[cap], cfg_scope, variant):
                            jobs.append(make_job(kind, mixed, cap, prec, bm, bk, label, cfg, rect))
    return jobs
