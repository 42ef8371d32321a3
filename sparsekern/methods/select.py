"""From scores to masks: per-layer densities, rankings, block or element granularity.

* :func:`check_fraction` is the one validator of ``density`` and ``trainable``.
* :func:`layer_densities` spreads a global density over layers (``uniform``
  or ``erk``); ``global`` instead ranks all layers' scores together.
* :func:`select` keeps the top-scoring elements (``granularity="element"``,
  exactly ``round(density * numel)`` of them) or the top-scoring blocks
  (``"block"``: scores pooled per block, ``round(density * n_blocks)`` blocks),
  optionally only inside a ``prior`` mask (IMP's nesting, freezing's "among
  the kept").

Ties are broken by position (a stable sort), so equal scores give the same
mask on every run.

Worked ERK example, two linear layers ``(100, 100)`` and ``(10, 100)`` at
global density 0.1: raw densities ``200/10^4 = 0.02`` and ``110/10^3 = 0.11``;
the scale ``e`` solves ``e * (0.02 * 10^4 + 0.11 * 10^3) = 0.1 * 11000``, so
``e = 3.548`` and the densities are 0.071 and 0.390: the small layer is denser.
"""

from __future__ import annotations

import math
import numbers

import torch

from sparsekern.methods.blocks import REDUCTIONS, SIGNED_REDUCTION, block_grid, expand_blocks, pool_blocks

__all__ = ["DISTRIBUTIONS", "GRANULARITIES", "check_fraction", "erk_densities", "layer_densities", "select"]

DISTRIBUTIONS = ("uniform", "erk", "global")
GRANULARITIES = ("block", "element")


def check_fraction(value, name: str = "density") -> float:
    """Return ``value`` as a float in ``[0, 1]``, or raise.

    Args:
        value: a real number (``0``, ``1`` and floats; not bool, not NaN).
        name: the argument's name, for the message.

    Returns:
        ``float(value)``.

    Raises:
        TypeError: ``value`` is not a real number.
        ValueError: it lies outside ``[0, 1]`` or is NaN.

    Example:
        >>> check_fraction(0.25, "density")
        0.25
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float fraction in [0, 1], got {value!r}")
    v = float(value)
    if math.isnan(v) or not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be a fraction in [0, 1], got {value!r}")
    return v


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float) -> dict[str, float]:
    """Erdős–Rényi-kernel densities: ``d_l ∝ sum(shape_l) / prod(shape_l)``, scaled to hit ``density``.

    Layers whose density would exceed 1 are made dense and the remainder is
    spread over the others, until none exceeds 1 (as RigL does). The global
    density counts only the layers in ``shapes``.

    Args:
        shapes: weight shape per layer (linear ``(out, in)``, conv ``(out, in, kh, kw)``).
        density: target fraction of kept weights over all layers.

    Returns:
        ``{name: density}``; ``sum(d_l * numel_l) == density * sum(numel_l)`` up to rounding.

    Example:
        >>> d = erk_densities({"a": (100, 100), "b": (10, 100)}, 0.1)
        >>> round(d["a"], 3), round(d["b"], 3)
        (0.071, 0.39)
    """
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: sum(s) / numel[n] for n, s in shapes.items()}
    target = density * sum(numel.values())
    dense: set[str] = set()
    while True:
        budget = target - sum(numel[n] for n in dense)
        weight = sum(raw[n] * numel[n] for n in raw if n not in dense)
        if weight <= 0:
            return {n: (1.0 if n in dense else 0.0) for n in shapes}
        scale = max(budget, 0.0) / weight
        over = [n for n in raw if n not in dense and scale * raw[n] > 1.0]
        if not over:
            return {n: (1.0 if n in dense else scale * raw[n]) for n in shapes}
        dense.add(max(over, key=lambda n: raw[n]))


def layer_densities(shapes: dict[str, tuple[int, ...]], density: float, distribution: str) -> dict[str, float] | None:
    """Per-layer densities for ``"uniform"`` and ``"erk"``; ``None`` for ``"global"`` (one ranking decides).

    Args:
        shapes: weight shape per layer.
        density: the global density.
        distribution: one of ``DISTRIBUTIONS``.

    Returns:
        ``{name: density}``, or ``None`` for ``"global"``.

    Example:
        >>> layer_densities({"a": (64, 64)}, 0.1, "uniform")
        {'a': 0.1}
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
    if distribution == "global":
        return None
    if distribution == "uniform":
        return dict.fromkeys(shapes, density)
    return erk_densities(shapes, density)


def _count(density: float, n: int) -> int:
    k = round(density * n)
    return max(0, min(n, k if density == 0 or k > 0 else 1))


def _top(flat: torch.Tensor, k: int) -> torch.Tensor:
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        keep[torch.sort(flat, descending=True, stable=True).indices[:k]] = True
    return keep


def select(
    scores: dict[str, torch.Tensor],
    density: float | dict[str, float],
    *,
    globally: bool = False,
    granularity: str = "block",
    block_size=32,
    reduce: str = "l1",
    signed: bool = False,
    prior: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Keep the top-scoring elements or blocks of each layer.

    Args:
        scores: weight-shaped scores per layer, higher = keep.
        density: per-layer ``{name: d}``, one float for every layer, or (with
            ``globally``) the density over all layers together.
        globally: one ranking over all layers instead of one per layer.
        granularity: ``"block"`` or ``"element"``.
        block_size: int or ``(bm, bk)`` for ``"block"``, the block over a score
            tensor's first two dimensions; or ``{name: block}`` per layer (a
            ``Conv1D``'s ``(in, out)`` scores take ``(bk, bm)``, see
            ``targets.Target.block``).
        reduce: block pooling of unsigned scores, ``"l1"``, ``"l2"`` or ``"max"``.
        signed: the scores carry a sign (GraSP): blocks pool them by their sum.
        prior: optional masks; only elements (blocks with a kept element) inside
            them may be kept, and at most all of them are.

    Returns:
        ``{name: bool mask}``, weight-shaped. For ``"block"`` the masks are whole
        blocks and ``prior`` is not intersected (callers do that if they need it).

    Example:
        >>> m = select({"fc": torch.randn(64, 64)}, 0.25, granularity="block", block_size=16)
        >>> int(m["fc"].sum())
        1024
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    names = list(scores)
    blocks = {n: (block_size[n] if isinstance(block_size, dict) else block_size) for n in names}
    ranked, allowed = {}, {}
    for n in names:
        s = scores[n].detach().float()
        if granularity == "block":
            s = pool_blocks(s, blocks[n], SIGNED_REDUCTION if signed else reduce)
            ok = None if prior is None else pool_blocks(prior[n].float(), blocks[n], "max") > 0
        else:
            ok = None if prior is None else prior[n].bool()
        s = torch.nan_to_num(s, nan=-math.inf).flatten()
        if ok is not None:
            ok = ok.flatten()
            s = torch.where(ok, s, -math.inf)
        ranked[n], allowed[n] = s, (s.numel() if ok is None else int(ok.sum()))
    keep: dict[str, torch.Tensor] = {}
    if globally:
        d = float(density)
        flat = torch.cat([ranked[n].cpu() for n in names]) if names else torch.zeros(0)
        k = min(_count(d, flat.numel()), sum(allowed.values()))
        top = _top(flat, k)
        start = 0
        for n in names:
            keep[n] = top[start : start + ranked[n].numel()].to(ranked[n].device)
            start += ranked[n].numel()
    else:
        for n in names:
            d = density[n] if isinstance(density, dict) else float(density)
            keep[n] = _top(ranked[n], min(_count(d, ranked[n].numel()), allowed[n]))
    out = {}
    for n in names:
        shape = tuple(scores[n].shape)
        if granularity == "block":
            out[n] = expand_blocks(keep[n].view(block_grid(shape, blocks[n])), shape, blocks[n])
        else:
            out[n] = keep[n].view(shape)
    return out
