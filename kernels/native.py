"""Builds and loads the native CPU kernels (``native/*.cpp``, one library) and wraps them for torch tensors.

Import path: ``sparsekern.kernels.native`` (this folder, ``kernels/``, installs as ``sparsekern.kernels``).

What they cover: the block-sparse linear passes (forward, input gradient,
weight gradient) on CPU tensors, fp32 or bf16 activations (fp32 sums), block
sides that are multiples of 16 (``native/bsmm.cpp``); the same passes over
element-sparse (CSR) weights, any shape (``native/csr.cpp``, see ``csr_cpu.py``). POSIX systems only (the workspace uses
``madvise``); elsewhere the build fails and the CPU path says so once.

The source depends on nothing but a C++17 compiler with OpenMP: no torch
headers, so it builds in about a second the first time a process needs it.
The library is cached under ``$SPARSEKERN_CACHE_DIR`` (default
``~/.cache/sparsekern``), keyed by the source, the flags, the compiler and the
CPU, because ``-march=native`` code only runs on the CPU it was built for.

It is loaded with ctypes, which releases the GIL during calls. Built with GCC,
its OpenMP runtime is torch's own: torch has loaded ``libgomp.so.1`` already,
and the dynamic linker resolves the library's dependency to it, so the two
share one thread pool (``CXX=clang++`` links LLVM's libomp instead: a second
pool). The thread count follows ``torch.get_num_threads()``.

``SPARSEKERN_NATIVE_CFLAGS`` appends compiler flags (whitespace-separated, part of the cache key):
``sparsekern.bench.instructions`` builds with ``-mno-avx512f`` there, because valgrind cannot decode
AVX-512 code.

``SPARSEKERN_NATIVE=0`` turns the native kernels off; so does a failed build,
which warns once and names the reason. Either way the CPU path then runs its
torch-level implementation, which is slower (see ``bsmm_cpu.py``).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).with_name("native")
# Every source file in the folder goes into the one library (a kernel family per .cpp, shared code in
# the headers); the cache key covers them all.
SOURCES = sorted(SOURCE_DIR.glob("*.cpp"))
HEADERS = sorted(SOURCE_DIR.glob("*.h"))
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def build_flags() -> list[str]:
    """``FLAGS`` and the extra flags of ``SPARSEKERN_NATIVE_CFLAGS``, in the order the compiler gets them."""
    return [*FLAGS, *shlex.split(os.environ.get("SPARSEKERN_NATIVE_CFLAGS", ""))]


_P, _I, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "sk_group_mm": [_P, _I, _I, _I, _P, _I, _INT, _P, _I, _P, _P, _I, _I, _P, _P, _I, _I, _INT, _INT],
    "sk_sampled_mm": [_P, _I, _I, _P, _I, _I, _I, _P, _P, _I, _I, _I, _P, _INT, _INT],
    "sk_conv_fwd": [_P, _P, _P, _P, _P, _I, _P, _I, _I, _P, _P, _I, _INT, _INT],
    "sk_conv_bwd": [_P, _P, _P, _P, _P, _P, _I, _I, _P, _P, _P, _P, _P, _P, _P, _I, _P, _INT, _INT],
    "sk_csr_mm": [_P, _I, _I, _I, _P, _I, _P, _P, _P, _P, _I, _INT, _INT],
    "sk_csr_sampled": [_P, _I, _I, _P, _I, _I, _I, _P, _P, _P, _P, _I, _INT, _INT],
    "sk_release": [],
    "sk_region": [ctypes.CFUNCTYPE(None)],  # an instruction-count region (sparsekern/bench/instructions.py)
    "sk_region_counts": [],
}
_VOID = ("sk_release", "sk_region")

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_error: str | None = None


def enabled() -> bool:
    """Whether the native kernels may be used at all (``SPARSEKERN_NATIVE`` is not ``0``)."""
    return os.environ.get("SPARSEKERN_NATIVE", "1") != "0"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the machine and, on Linux, the CPU's model and flags."""
    ident = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features")):
                    ident += line
                if line.strip() == "":  # the first processor's entries are enough
                    break
    except OSError:
        pass
    return ident


def _build(_retry: bool = True) -> ctypes.CDLL:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set CXX, or install g++ or clang++)")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    texts = [f.name + "\0" + f.read_text() for f in (*SOURCES, *HEADERS)]
    flags = build_flags()
    key = hashlib.sha256("\0".join([*texts, " ".join(flags), version, _cpu_id()]).encode()).hexdigest()
    cache = Path(os.environ.get("SPARSEKERN_CACHE_DIR", Path.home() / ".cache" / "sparsekern"))
    target = cache / f"bsmm-{key[:16]}.so"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # Build to a private name, then rename: concurrent processes (pytest-xdist, DDP ranks)
        # never load a half-written library.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
        os.close(fd)
        try:
            cmd = [cxx, *flags, *map(str, SOURCES), "-o", tmp]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{cxx} failed to build {SOURCE_DIR.name}/*.cpp:\n{proc.stderr.strip()[-2000:]}")
            # mkstemp made the file private (0600) and the linker keeps that, adding only execute
            # bits; other users of a shared cache directory could then not load it.
            os.chmod(tmp, 0o755)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        lib = ctypes.CDLL(str(target))
    except OSError:  # a damaged cache entry (say, a disk that filled up): build it again, once
        target.unlink(missing_ok=True)
        if _retry:
            return _build(_retry=False)
        raise
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, (None if name in _VOID else _INT)
    return lib


def lib() -> ctypes.CDLL | None:
    """The loaded library, building it on first use; ``None`` when disabled or unbuildable (warned once)."""
    global _lib, _error
    if not enabled():
        return None
    if _lib is not None or _error is not None:
        return _lib
    with _lock:
        if _lib is None and _error is None:
            try:
                _lib = _build()
            except Exception as e:  # any build or load failure means: use the torch-level path
                _error = str(e)
                warnings.warn(
                    f"sparsekern: native CPU kernels unavailable ({_error}); CPU tensors use the slower "
                    "torch-level path. Set SPARSEKERN_NATIVE=0 to silence this.",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return _lib


def available() -> bool:
    return lib() is not None


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _check(rc: int, what: str) -> None:
    if rc == 2:
        raise MemoryError(f"sparsekern native {what}: could not allocate the packing workspace")
    if rc != 0:
        raise ValueError(f"sparsekern native {what}: unsupported block size (each side must be a multiple of 16)")


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(f"sparsekern native kernels: {what}")


#: Activation dtypes the kernels read and write; weights, bias and dW are always fp32.
DTYPES = (torch.float32, torch.bfloat16)


def _operands(activations: dict, floats: dict, ints: dict) -> None:
    """The kernels trust pointers: check dtypes, devices and layouts here, where a mistake is still an error."""
    for name, t in activations.items():
        _require(t.dtype in DTYPES and t.device.type == "cpu", f"{name} must be a float32 or bfloat16 CPU tensor")
        _require(t.numel() == 0 or t.stride(-1) == 1, f"{name} must have unit stride in its last dimension")
    for name, t in floats.items():
        if t is not None:
            _require(t.dtype == torch.float32 and t.device.type == "cpu", f"{name} must be a float32 CPU tensor")
            _require(t.numel() == 0 or t.stride(-1) == 1, f"{name} must have unit stride in its last dimension")
    for name, t in ints.items():
        if t is not None:
            ok = t.dtype == torch.int32 and t.device.type == "cpu" and t.is_contiguous()
            _require(ok, f"{name} must be a contiguous int32 CPU tensor")


def _in_range(t, bound: int, name: str, what: str) -> None:
    """Index values the kernels use as offsets must lie in ``[0, bound)`` (an O(n) check, n = blocks)."""
    if t is not None and t.numel():
        _require(int(t.min()) >= 0 and int(t.max()) < bound, f"{name} holds indices outside the {bound} {what}")


def _loaded() -> ctypes.CDLL:
    got = lib()
    if got is None:
        why = "SPARSEKERN_NATIVE=0" if not enabled() else _error
        raise RuntimeError(f"sparsekern native kernels are unavailable ({why})")
    return got


def _out(out, shape, like, contiguous: bool) -> torch.Tensor:
    if out is None:
        return like.new_empty(shape)
    ok = tuple(out.shape) == tuple(shape) and out.dtype == like.dtype and out.device == like.device
    if not ok or not (out.is_contiguous() if contiguous else out.stride(-1) == 1):
        need = "contiguous" if contiguous else "with unit column stride"
        raise ValueError(f"out must be a {like.dtype} tensor of shape {tuple(shape)}, {need}")
    return out


def group_mm(a, blocks, offsets, idx, sel, bias, out_cols, out=None, transposed=False) -> torch.Tensor:
    """``out[t, g*W + w] = bias + sum_{p in group g} a[t, idx[p]*L + l] @ blocks[sel[p]][l, w]``, as ``(M, out_cols)``.

    ``a`` is ``(M, a_cols)``, fp32 or bf16, with unit column stride; the
    result has ``a``'s dtype (fp32 sums, rounded once). ``blocks`` is a
    contiguous fp32 ``(nb, L, W)``, or ``(nb, W, L)`` read as its blocks'
    transposes when ``transposed`` (the forward pass hands the stored
    ``(bm, bk)`` blocks over as they are: the kernel repacks every block
    anyway, so the transpose costs no pass of its own); ``bias`` fp32;
    ``offsets`` (``G + 1``), ``idx`` and ``sel`` (or ``None`` for the
    identity) are contiguous int32. ``out``, when given, needs unit column
    stride only.
    """
    m, a_cols = a.shape
    _, L, W = blocks.transpose(1, 2).shape if transposed else blocks.shape
    _operands({"a": a}, {"blocks": blocks, "bias": bias}, {"offsets": offsets, "idx": idx, "sel": sel})
    _require(blocks.is_contiguous(), "blocks must be contiguous")
    _in_range(idx, -(-a_cols // L), "idx", "column blocks of a")
    _in_range(sel, blocks.shape[0], "sel", "blocks")
    # Without sel, position p reads block p: the kernel repacks blocks.shape[0] of them and would read
    # stale workspace past that.
    _require(
        sel is not None or idx.numel() <= blocks.shape[0],
        f"len(idx) {idx.numel()} exceeds the {blocks.shape[0]} blocks",
    )
    _require(offsets.numel() >= 1 and int(offsets[-1]) == idx.numel(), "offsets must end at len(idx)")
    _require(
        out_cols <= (offsets.numel() - 1) * W, f"out_cols {out_cols} exceeds the groups' {offsets.numel() - 1} x {W}"
    )
    _require(
        bias is None or bias.numel() >= out_cols, f"bias has {0 if bias is None else bias.numel()} < {out_cols} entries"
    )
    out = _out(out, (m, out_cols), a, contiguous=False)
    rc = _loaded().sk_group_mm(
        _ptr(a), a.stride(0), m, a_cols, _ptr(blocks), blocks.shape[0], bool(transposed), _ptr(offsets),
        offsets.numel() - 1, _ptr(idx), _ptr(sel), L, W, _ptr(bias), _ptr(out), out.stride(0), out_cols,
        a.dtype == torch.bfloat16, torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "group_mm")
    return out


def sampled_mm(dy, x, rows, cols, bm: int, bk: int, out=None) -> torch.Tensor:
    """``dw[b] = dy[:, rows[b]*bm : +bm].T @ x[:, cols[b]*bk : +bk]``, zero past the edges, as fp32 ``(nb, bm, bk)``.

    ``dy`` and ``x`` are both fp32 or both bf16.
    """
    m, n = dy.shape
    k = x.shape[1]
    _operands({"dy": dy, "x": x}, {}, {"rows": rows, "cols": cols})
    _require(x.shape[0] == m, f"dy has {m} rows but x has {x.shape[0]}")
    _require(dy.dtype == x.dtype, f"dy is {dy.dtype} but x is {x.dtype}")
    _require(rows.numel() == cols.numel(), "rows and cols must have one entry per block")
    _in_range(rows, -(-n // bm), "rows", "block rows of dy")
    _in_range(cols, -(-k // bk), "cols", "block columns of x")
    dw = _out(out, (rows.numel(), bm, bk), x.new_empty(0, dtype=torch.float32), contiguous=True)
    rc = _loaded().sk_sampled_mm(
        _ptr(dy), dy.stride(0), n, _ptr(x), x.stride(0), k, m, _ptr(rows), _ptr(cols), rows.numel(), bm, bk,
        _ptr(dw), x.dtype == torch.bfloat16, torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "sampled_mm")
    return dw


def _int64s(values) -> torch.Tensor:
    """A contiguous int64 CPU tensor of ``values``: how strides and geometry cross into the kernels."""
    return torch.tensor(list(values), dtype=torch.int64)


def _strides4(t: torch.Tensor, name: str) -> torch.Tensor:
    _require(t.dim() == 4, f"{name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")
    return _int64s(t.stride())


def _conv_geom(geom, bm: int, bk: int) -> torch.Tensor:
    _require(len(geom) == 16, "geom must be a ConvGeom (16 ints)")
    _require(bm % 16 == 0 and bk % 16 == 0, f"block {bm}x{bk}: each side must be a multiple of 16")
    _require(geom[15] % bk == 0, f"c_pad {geom[15]} is not a multiple of bk {bk}")
    return _int64s(geom)


def conv_forward(x, geom, blocks, offsets, cols, bias, out) -> torch.Tensor:
    """The block-sparse conv forward into ``out`` ``(N, Cout, Ho, Wo)`` (unit channel stride), from ``x``.

    ``geom`` is the :class:`~sparsekern.kernels.meta.ConvGeom`; ``blocks`` the CSR-ordered blocks
    as stored, a contiguous fp32 ``(nnzb, bm, bk)`` (the kernel reads them transposed as it
    repacks them); ``offsets``/``cols`` the layout's
    ``row_offsets``/``col_indices``. ``x`` and ``out`` are fp32 or bf16 (both the same), any strides
    for ``x``; fp32 sums, rounded once.
    """
    n, bm, bk = blocks.shape
    g = _conv_geom(geom, bm, bk)
    _require(x.dtype in DTYPES and x.device.type == "cpu", "x must be a float32 or bfloat16 CPU tensor")
    _operands({}, {"blocks": blocks, "bias": bias}, {"offsets": offsets, "cols": cols})
    _require(blocks.is_contiguous(), "blocks must be contiguous")
    _require(tuple(x.shape) == tuple(geom[:4]), f"x has shape {tuple(x.shape)}, the geometry says {tuple(geom[:4])}")
    out_shape = (geom[0], geom[4], geom[5], geom[6])
    _require(
        tuple(out.shape) == out_shape and out.dtype == x.dtype and out.is_contiguous(memory_format=torch.channels_last),
        f"out must be a channels_last {x.dtype} tensor of shape {out_shape}",
    )
    _in_range(cols, geom[7] * geom[8] * geom[15] // bk, "cols", "block columns of the weight")
    _require(
        offsets.numel() == -(-geom[4] // bm) + 1 and int(offsets[-1]) == cols.numel() == n,
        "offsets must have one entry per block row plus one, ending at len(cols) == len(blocks)",
    )
    _require(bias is None or bias.numel() >= geom[4], "bias must have Cout entries")
    xs = _strides4(x, "x")
    rc = _loaded().sk_conv_fwd(
        _ptr(x), _ptr(xs), _ptr(g), _ptr(blocks), _ptr(offsets), offsets.numel() - 1, _ptr(cols), bm, bk,
        _ptr(bias), _ptr(out), geom[4], x.dtype == torch.bfloat16, torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "conv_forward")
    return out


def conv_backward(dy, x, geom, vals, col_offsets, rows_t, sel_t, dx, t_rows, t_cols, dw) -> None:
    """Both conv gradients from one packing of ``dy``: ``dx`` (when given, any strides) and ``dw``
    (when given: fp32 ``(len(t_rows), bm, bk)`` for the trainable blocks at block rows ``t_rows`` and
    matrix columns ``t_cols``), written in place.

    ``vals`` are the CSR-ordered blocks as stored, a contiguous fp32 ``(nnzb, bm, bk)``;
    ``col_offsets``/``rows_t``/``sel_t`` the layout's transposed walk.
    """
    _, bm, bk = vals.shape
    g = _conv_geom(geom, bm, bk)
    _require(dy.dtype in DTYPES and dy.device.type == "cpu", "dy must be a float32 or bfloat16 CPU tensor")
    _require(x.dtype == dy.dtype and (dx is None or dx.dtype == dy.dtype), "dy, x and dx must share one dtype")
    _operands({}, {"vals": vals, "dw": dw}, {"col_offsets": col_offsets, "rows_t": rows_t, "sel_t": sel_t,
                                            "t_rows": t_rows, "t_cols": t_cols})  # fmt: skip
    _require(vals.is_contiguous() and (dw is None or dw.is_contiguous()), "vals and dw must be contiguous")
    _require(tuple(dy.shape) == (geom[0], geom[4], geom[5], geom[6]), f"dy has shape {tuple(dy.shape)}")
    _require(tuple(x.shape) == tuple(geom[:4]), f"x has shape {tuple(x.shape)}")
    _require(dx is None or tuple(dx.shape) == tuple(geom[:4]), "dx must have x's shape")
    ncols = geom[7] * geom[8] * geom[15] // bk
    _require(
        col_offsets.numel() == ncols + 1 and int(col_offsets[-1]) == rows_t.numel() == sel_t.numel(),
        "col_offsets must have one entry per block column plus one, ending at len(rows_t) == len(sel_t)",
    )
    _in_range(rows_t, -(-geom[4] // bm), "rows_t", "block rows")
    # The kernel repacks col_offsets[-1] blocks for the input gradient and reads them through sel_t.
    _require(
        vals.shape[0] == int(col_offsets[-1]), f"vals holds {vals.shape[0]} blocks, the layout {int(col_offsets[-1])}"
    )
    _in_range(sel_t, vals.shape[0], "sel_t", "blocks")
    nt = 0 if t_rows is None else t_rows.numel()
    _require(
        dw is None or (t_cols.numel() == nt and tuple(dw.shape) == (nt, bm, bk)), "dw must be (len(t_rows), bm, bk)"
    )
    _in_range(t_rows, -(-geom[4] // bm), "t_rows", "block rows")
    _in_range(t_cols, ncols, "t_cols", "block columns")
    keep = [_strides4(dy, "dy"), _strides4(x, "x"), None if dx is None else _strides4(dx, "dx")]
    rc = _loaded().sk_conv_bwd(
        _ptr(dy), _ptr(keep[0]), _ptr(x), _ptr(keep[1]), _ptr(g), _ptr(vals), bm, bk, _ptr(col_offsets),
        _ptr(rows_t), _ptr(sel_t), _ptr(dx), _ptr(keep[2]), _ptr(t_rows if dw is not None else None),
        _ptr(t_cols if dw is not None else None), nt if dw is not None else 0, _ptr(dw),
        dy.dtype == torch.bfloat16, torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "conv_backward")


def _csr_arrays(ptr, idx, cols: int, what: str) -> None:
    """A CSR the kernels can walk: ``ptr`` starts at 0, never decreases and ends at ``len(idx)``; every
    ``idx`` in ``[0, cols)``."""
    _operands({}, {}, {"ptr": ptr, "idx": idx})
    _require(ptr.numel() >= 1 and int(ptr[0]) == 0 and int(ptr[-1]) == idx.numel(), "ptr must run from 0 to len(idx)")
    _require(bool((ptr[1:] >= ptr[:-1]).all()), "ptr must not decrease")
    _in_range(idx, cols, "idx", what)


def csr_mm(a, ptr, idx, vals, bias, out=None) -> torch.Tensor:
    """``out[t, r] = bias[r] + sum_{p in row r} vals[p] * a[t, idx[p]]``, as ``(M, R)`` with ``R = len(ptr) - 1``.

    ``a`` is ``(M, a_cols)``, fp32 or bf16, unit column stride; the result has
    its dtype (fp32 sums, rounded once). ``ptr``/``idx`` are a contiguous
    int32 CSR over the ``R`` output columns, ``vals`` its fp32 values, ``bias``
    fp32 or ``None``. ``out``, when given, needs unit column stride only.
    """
    m, a_cols = a.shape
    r = ptr.numel() - 1
    _operands({"a": a}, {"vals": vals, "bias": bias}, {})
    _csr_arrays(ptr, idx, a_cols, "columns of a")
    _require(vals.is_contiguous() and vals.numel() == idx.numel(), "vals must be contiguous, one per idx")
    _require(bias is None or bias.numel() >= r, f"bias has {0 if bias is None else bias.numel()} < {r} entries")
    out = _out(out, (m, r), a, contiguous=False)
    rc = _loaded().sk_csr_mm(
        _ptr(a), a.stride(0), m, a_cols, _ptr(ptr), r, _ptr(idx), _ptr(vals), _ptr(bias), _ptr(out), out.stride(0),
        a.dtype == torch.bfloat16, torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "csr_mm")
    return out


def csr_sampled(dy, x, ptr, idx, dst, numel: int, out=None) -> torch.Tensor:
    """``dw[dst[q]] = sum_t dy[t, row(q)] * x[t, idx[q]]`` over the nonzeros ``q`` of the CSR ``(ptr, idx)``
    on ``dy``'s ``N`` columns, every other entry zero: fp32 ``(numel,)``, fresh or the contiguous ``out``.

    ``dy`` ``(M, N)`` and ``x`` ``(M, K)`` are both fp32 or both bf16 with unit
    column stride; ``dst`` is contiguous int64 in ``[0, numel)``.
    """
    m, n = dy.shape
    k = x.shape[1]
    _operands({"dy": dy, "x": x}, {}, {})
    _require(x.shape[0] == m, f"dy has {m} rows but x has {x.shape[0]}")
    _require(dy.dtype == x.dtype, f"dy is {dy.dtype} but x is {x.dtype}")
    _require(ptr.numel() == n + 1, f"ptr has {ptr.numel()} entries for the {n} columns of dy")
    _csr_arrays(ptr, idx, k, "columns of x")
    ok = dst.dtype == torch.int64 and dst.device.type == "cpu" and dst.is_contiguous() and dst.numel() == idx.numel()
    _require(ok, "dst must be a contiguous int64 CPU tensor, one per idx")
    _in_range(dst, numel, "dst", "entries of dw")
    dw = _out(out, (numel,), x.new_empty(0, dtype=torch.float32), contiguous=True)
    rc = _loaded().sk_csr_sampled(
        _ptr(dy), dy.stride(0), n, _ptr(x), x.stride(0), k, m, _ptr(ptr), _ptr(idx), _ptr(dst), _ptr(dw), numel,
        x.dtype == torch.bfloat16, torch.get_num_threads(),
    )  # fmt: skip
    _check(rc, "csr_sampled")
    return dw


def release_workspace() -> None:
    """Free the calling thread's packing buffers (they grow to the largest operand seen, and are kept for reuse)."""
    if _lib is not None:
        _lib.sk_release()
