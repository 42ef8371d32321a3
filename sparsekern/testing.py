"""Dense float64 references and tolerances for checking the block-sparse kernels.

Shared by the tests and the benchmarks. References run in float64 on the
*same* (already rounded) operands the kernels see, so input rounding is never
counted as kernel error; only the kernel's own arithmetic is.

Tolerance model (:func:`tolerance`). Each output element is a reduction
``y = sum_{i<k} a_i * b_i`` whose terms have RMS ``scale`` (1 for unit-normal
operands), so ``|y|`` and every partial sum are about ``scale * sqrt(k)``.
With ``eps = torch.finfo(dtype).eps`` (unit roundoff ``u = eps / 2``):

* the final store to ``dtype`` errs by at most ``u * |y|``: ``rtol = eps``
  (2x margin), floored at ``1e-5`` for fp32 (about 80 ulp) because kernels
  and BLAS sum in different orders;
* intermediate results stored in ``dtype`` (the CPU path adds the bias and
  accumulates reduction chunks in the output dtype) each err by up to
  ``u * scale * sqrt(k)`` independently of ``|y|``; four such roundings:
  ``2 * eps * scale * sqrt(k)``;
* fp32 accumulation: recursive summation errs by ``sum_j d_j * s_j`` with
  ``|d_j| <= u32`` and ``|s_j| ~ scale * sqrt(j)``; with random rounding signs
  the standard deviation is ``u32 / sqrt(3) * scale * sqrt(sum_j j)``, about
  ``0.2 * eps32 * scale * k``, so ``eps32 * scale * k`` is a 5-sigma bound
  (tiled and BLAS sums do better).

Hence ``atol = scale * (2 * eps * sqrt(k) + eps32 * k)``: fp16 at ``k = 70``
gives ``atol ~ 0.016`` and ``rtol ~ 1e-3``, bf16 ``atol ~ 0.13`` and ``rtol ~ 8e-3``.

Whole models (:func:`assert_chain_close`): an output (or a gradient) of a
model is the end of a chain of ``depth`` reductions, each at most ``k`` long.
One reduction whose result has RMS ``r`` has terms of RMS ``r / sqrt(k)``, so
its bound is :func:`tolerance` at ``scale = r / sqrt(k)``. Each link adds its
own rounding relative to its result, and the links pass earlier errors on
with a gain of about one (normalisations and softmax are scale-free, residual
streams add), so the chain's bound is ``depth`` times one link's, with ``r``
the RMS of the expected tensor. Compare tensors whose exact value may be
zero (the gradient of a bias in front of a softmax, which is invariant to
it) together with the rest of their module, so that ``r`` is the size of the
terms that cancelled: the GPT-2 test gets ``atol ~ 3e-5 * r``, and a wrong
block errs by the size of its contribution, orders of magnitude more.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "assert_chain_close",
    "assert_close",
    "random_block_mask",
    "reference_conv2d",
    "reference_conv_grads",
    "reference_grads",
    "reference_linear",
    "tolerance",
]

_EPS32 = torch.finfo(torch.float32).eps


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float64)


def _effective_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    # where, not multiply: pruned positions may hold anything (even NaN) and must not leak.
    return torch.where(mask.to(torch.bool), _f64(weight), 0.0)


def _trainable_only(dw: torch.Tensor, mask: torch.Tensor, frozen_mask: torch.Tensor | None) -> torch.Tensor:
    """``dw`` where an element is trainable (``mask & ~frozen_mask``), 0 elsewhere."""
    trainable = mask.to(torch.bool)
    if frozen_mask is not None:
        trainable = trainable & ~frozen_mask.to(torch.bool)
    return torch.where(trainable, dw, 0.0)


def reference_linear(
    x: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Float64 ``y = x @ (W * mask).T + bias``."""
    y = _f64(x) @ _effective_weight(weight, mask).T
    return y if bias is None else y + _f64(bias)


def reference_grads(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    frozen_mask: torch.Tensor | None,
    dy: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Float64 ``(dx, dW, dbias)`` of :func:`reference_linear` for upstream ``dy``.

    ``dW`` is zero outside the trainable elements (``mask & ~frozen_mask``);
    ``dbias`` is ``None`` when ``bias`` is.
    """
    dy64 = _f64(dy)
    dx = dy64 @ _effective_weight(weight, mask)
    dw = _trainable_only(dy64.T @ _f64(x), mask, frozen_mask)
    return dx, dw, None if bias is None else dy64.sum(0)


def reference_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
) -> torch.Tensor:
    """Float64 ``F.conv2d(x, W * mask, bias, ...)``; ``padding`` may be ``'same'``/``'valid'``."""
    return torch.nn.functional.conv2d(
        _f64(x), _effective_weight(weight, mask), _f64(bias), stride=stride, padding=padding, dilation=dilation
    )


def reference_conv_grads(
    x: torch.Tensor,
    weight: torch.Tensor,
    mask: torch.Tensor,
    frozen_mask: torch.Tensor | None,
    dy: torch.Tensor,
    bias: torch.Tensor | None = None,
    stride=1,
    padding=0,
    dilation=1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Float64 ``(dx, dW, dbias)`` of :func:`reference_conv2d` for upstream ``dy``.

    ``dW`` is zero outside the trainable elements (``mask & ~frozen_mask``).
    """
    x64 = _f64(x).requires_grad_(True)
    w64 = _effective_weight(weight, mask).requires_grad_(True)
    b64 = None if bias is None else _f64(bias).requires_grad_(True)
    with torch.enable_grad():
        y = torch.nn.functional.conv2d(x64, w64, b64, stride=stride, padding=padding, dilation=dilation)
        grads = torch.autograd.grad(y, [x64, w64] + ([] if b64 is None else [b64]), _f64(dy))
    return grads[0], _trainable_only(grads[1], mask, frozen_mask), None if b64 is None else grads[2]


def random_block_mask(
    shape: Sequence[int],
    block_size: int | Sequence[int],
    density: float,
    generator: torch.Generator | None = None,
    element_density: float = 1.0,
) -> torch.Tensor:
    """A bool ``(N, K)`` mask made of whole ``block_size`` blocks.

    ``round(density * n_blocks)`` blocks (at least one when ``density > 0``)
    are chosen uniformly; edge blocks are cut at the matrix border. With
    ``element_density < 1`` each element of a chosen block is then kept with
    that probability, so a chosen block can end up mixed or (rarely) empty.
    """
    if not 0.0 <= density <= 1.0 or not 0.0 <= element_density <= 1.0:
        raise ValueError(f"densities must lie in [0, 1], got {density} and {element_density}")
    bm, bk = (block_size, block_size) if isinstance(block_size, int) else (int(b) for b in block_size)
    n, k = (int(s) for s in shape)
    rb, cb = -(-n // bm), -(-k // bk)
    count = round(density * rb * cb)
    if density > 0:
        count = max(count, 1)
    chosen = torch.zeros(rb * cb, dtype=torch.bool)
    chosen[torch.randperm(rb * cb, generator=generator)[:count]] = True
    mask = chosen.view(rb, cb).repeat_interleave(bm, 0).repeat_interleave(bk, 1)[:n, :k].contiguous()
    if element_density < 1.0:
        mask &= torch.rand(n, k, generator=generator) < element_density
    return mask


def tolerance(dtype: torch.dtype, k: int, scale: float = 1.0) -> tuple[float, float]:
    """``(atol, rtol)`` for a length-``k`` reduction computed in ``dtype`` (see the module docstring)."""
    eps = torch.finfo(dtype).eps
    k = max(int(k), 1)
    return scale * (2.0 * eps * math.sqrt(k) + _EPS32 * k), max(eps, 1e-5)


def assert_close(
    actual: torch.Tensor,
    expected_f64: torch.Tensor,
    dtype: torch.dtype,
    k: int,
    name: str,
    scale: float = 1.0,
) -> None:
    """Raise ``AssertionError`` unless ``|actual - expected| <= atol + rtol * |expected|`` everywhere.

    NaN or inf in ``actual`` fails unless ``expected`` holds the same value there.
    The message names the worst element, the largest error and how many failed.
    """
    __tracebackhide__ = True  # pytest: show the message, not this helper's body
    if tuple(actual.shape) != tuple(expected_f64.shape):
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected_f64.shape)}")
    atol, rtol = tolerance(dtype, k, scale)
    act = actual.detach().to(device=expected_f64.device, dtype=torch.float64)
    exp = expected_f64.to(torch.float64)
    err = (act - exp).abs()
    allowed = atol + rtol * exp.abs()
    same = (act == exp) | (act.isnan() & exp.isnan())
    bad = ~((err <= allowed) | same)
    n_bad = int(bad.sum())
    if n_bad == 0:
        return
    # Rank failures by how far past their allowance they are; non-finite ones first.
    ratio = torch.where(bad, torch.nan_to_num(err / allowed, nan=math.inf, posinf=math.inf), -1.0)
    worst = _index(int(ratio.argmax()), act.shape)
    finite_err = torch.where(err.isfinite(), err, 0.0)
    big = _index(int(finite_err.argmax()), act.shape)
    first = [_index(int(i), act.shape) for i in bad.flatten().nonzero()[:5, 0]]
    raise AssertionError(
        f"{name}: {n_bad} of {act.numel()} elements out of tolerance "
        f"(dtype {dtype}, k={k}, atol={atol:.3g}, rtol={rtol:.3g}).\n"
        f"  worst at {worst}: actual {act[worst].item():.6g}, expected {exp[worst].item():.6g}, "
        f"|err| {err[worst].item():.3g} > allowed {allowed[worst].item():.3g}\n"
        f"  max finite |err| {finite_err[big].item():.3g} at {big}\n"
        f"  non-finite in actual: {int(act.isnan().sum())} NaN, {int(act.isinf().sum())} inf; "
        f"in expected: {int(exp.isnan().sum())} NaN, {int(exp.isinf().sum())} inf\n"
        f"  first failing positions: {first}"
    )


def assert_chain_close(
    actual: torch.Tensor, expected_f64: torch.Tensor, dtype: torch.dtype, k: int, depth: int, name: str
) -> None:
    """:func:`assert_close` for the end of ``depth`` chained reductions of length at most ``k`` (a whole model).

    The tolerance scale is ``depth * rms(expected) / sqrt(k)`` (see the module docstring).

    Args:
        actual: the tensor computed in ``dtype``.
        expected_f64: the float64 reference.
        dtype: the computation dtype.
        k: the longest reduction in the chain (e.g. a transformer's widest matmul).
        depth: the number of reductions chained (forward; forward plus backward for gradients).
        name: printed on failure.

    Example:
        >>> assert_chain_close(model(x).logits, ref(x).logits, torch.float32, k=256, depth=13, name="logits")
    """
    __tracebackhide__ = True
    rms = float(expected_f64.detach().double().square().mean().sqrt()) if expected_f64.numel() else 0.0
    assert_close(actual, expected_f64, dtype, k, name, scale=depth * rms / math.sqrt(max(int(k), 1)))


def _index(flat: int, shape: torch.Size) -> tuple[int, ...]:
    out = []
    for s in reversed(shape):
        out.append(flat % s)
        flat //= s
    return tuple(reversed(out))
