"""What every Triton launcher shares: operand checks, precision, the TMA decision and descriptors.

Import path: ``sparsekern.kernels.launch`` (this folder, ``kernels/``, installs as ``sparsekern.kernels``).

Used by ``bsmm.py`` (linear) and ``bsconv.py`` (conv); nothing here launches.

TMA: on sm_90 and newer the kernels read their dense operands and the value
store through tensor descriptors (``triton.tools.tensor_descriptor``, built on
the host per launch), with the descriptor's bounds replacing edge masks. A
descriptor needs a 16-byte aligned base, a unit inner stride and 16-byte
aligned row strides; an operand that has none of this (a transposed view, an
odd row length in 16-bit types) runs the pointer path instead, which is what
sm_80 always runs. ``SPARSEKERN_TMA=0``/``1`` forces the choice (``1`` is how
the interpreter tests the descriptor path on the CPU; the interpreter
otherwise uses pointers).
"""

from __future__ import annotations

import functools
import os

import torch

from .store import store_matrix

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

try:  # Triton >= 3.3; older releases run the pointer path only
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

__all__ = [
    "INTERPRET",
    "SUPPORTED_DTYPES",
    "check",
    "check_bias",
    "check_dtype",
    "check_values",
    "descriptor",
    "device_capability",
    "dot_precision",
    "kernel_constexprs",
    "launch_kw",
    "tma_ok",
    "upcast",
    "use_tma",
    "weight_operand",
]


def check(name: str, t: torch.Tensor, ndim: int, dtype: torch.dtype, device: torch.device) -> None:
    """``t`` is an ``ndim``-D tensor of ``dtype`` on ``device``, or a TypeError/ValueError names what is not."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def check_bias(bias: torch.Tensor | None, n_out: int, dtype: torch.dtype, device: torch.device) -> None:
    """``bias`` is ``None`` or a 1-D tensor of ``n_out`` elements (one per output feature or channel)."""
    if bias is not None:
        check("bias", bias, 1, dtype, device)
        if bias.shape[0] != n_out:
            raise ValueError(f"bias has {bias.shape[0]} elements, expected {n_out}")


def check_dtype(dtype: torch.dtype) -> None:
    """A TypeError unless the kernels support ``dtype`` (``SUPPORTED_DTYPES``)."""
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"unsupported dtype {dtype}; supported: {SUPPORTED_DTYPES}")


def check_values(w_train: torch.Tensor, w_frozen: torch.Tensor, dtype, device) -> tuple[int, int]:
    """Check the two value stores; return the block size ``(bm, bk)``."""
    check_dtype(dtype)
    check("w_train", w_train, 3, dtype, device)
    check("w_frozen", w_frozen, 3, dtype, device)
    bm, bk = w_train.shape[1:]
    if tuple(w_frozen.shape[1:]) != (bm, bk):
        raise ValueError(f"w_frozen blocks {tuple(w_frozen.shape[1:])} differ from w_train blocks {(bm, bk)}")
    if not (w_train.is_contiguous() and w_frozen.is_contiguous()):
        raise ValueError("w_train and w_frozen must be contiguous block stores")
    return bm, bk


def dot_precision(dtype: torch.dtype, device: torch.device) -> str:
    """``"tf32"`` only for fp32 on CUDA with ``torch.backends.cuda.matmul.allow_tf32`` set: no silent TF32."""
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def upcast(dtype: torch.dtype) -> bool:
    """The interpreter's bf16 ``tl.dot`` is wrong, so bf16 tiles are upcast to fp32 there (never compiled)."""
    return INTERPRET and dtype == torch.bfloat16


def launch_kw(cfg) -> dict:
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def kernel_constexprs(bm: int, bk: int, meta, dtype: torch.dtype, device: torch.device, cfg) -> dict:
    """The meta-parameters every block-sparse kernel takes, decided one way for all six of them.

    ``BM``/``BK`` (the sparsity block), ``HAS_MIXED`` (the layout ``meta`` has mixed blocks, so
    weight tiles merge with their fixed slot), ``DOT_PRECISION`` and ``UPCAST`` (from ``dtype`` on
    ``device``: no silent TF32, the interpreter's bf16 fix), then the config's tiles, warps and stages
    (:func:`launch_kw`). A launcher adds what only its kernel takes (``HAS_BIAS``, ``USE_TMA``).

    Example:
        >>> kernel_constexprs(32, 32, meta, torch.float16, torch.device("cuda"), cfg)["DOT_PRECISION"]
        'ieee'
    """
    return dict(
        BM=bm,
        BK=bk,
        HAS_MIXED=meta.element_state.shape[0] > 0,
        DOT_PRECISION=dot_precision(dtype, device),
        UPCAST=upcast(dtype),
        **launch_kw(cfg),
    )


@functools.cache
def _capability(device: torch.device) -> int:
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def device_capability(device: torch.device) -> int:
    """``90`` for sm_90 and so on; the interpreter counts as sm_90 when it runs the TMA path, else sm_80."""
    if device.type == "cuda":
        return _capability(device)
    return 90 if os.environ.get("SPARSEKERN_TMA") == "1" else 80


def tma_ok(t: torch.Tensor) -> bool:
    """Whether a 2-D operand can sit behind a tensor descriptor (alignment and unit inner stride)."""
    if t.dim() != 2 or t.stride(1) != 1 or t.data_ptr() % 16 or t.numel() == 0:
        return False
    return (t.stride(0) * t.element_size()) % 16 == 0


def use_tma(device: torch.device, *operands: torch.Tensor) -> bool:
    """Whether this launch reads and writes its 2-D operands through tensor descriptors."""
    forced = os.environ.get("SPARSEKERN_TMA")
    if TensorDescriptor is None or forced == "0":
        return False
    if device.type == "cuda":
        arch_ok = _capability(device) >= 90
    else:  # the interpreter: only when asked, so the default CPU runs test the pointer path
        arch_ok = INTERPRET and forced == "1"
    return arch_ok and all(tma_ok(t) for t in operands)


def descriptor(t: torch.Tensor, block_shape: list[int]):
    """A host tensor descriptor over a 2-D operand, zero-filled out of bounds."""
    return TensorDescriptor(t, list(t.shape), [t.stride(0), 1], block_shape)


def weight_operand(store: torch.Tensor, tma: bool, block_n: int, block_k: int):
    """What a kernel's ``w_ptr`` gets: a ``[block_n, block_k]`` descriptor over the store's matrix, or the store."""
    return descriptor(store_matrix(store), [block_n, block_k]) if tma else store
