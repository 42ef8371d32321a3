"""Block pooling shared by every method: scores per element in, block masks out.

Methods score weights element by element (magnitude, SNIP's ``|g * w|``, ...).
With ``granularity="block"`` the scores are pooled over the layout's blocks
and whole blocks are kept, so the kernels skip what was pruned. Conv weights
are pooled in their matrix view (see ``sparsekern/convview.py``): a block is
``bm`` output channels by ``bk`` input channels at one filter tap.

Worked example, a ``(4, 4)`` weight with ``2 x 2`` blocks and ``reduce="l1"``::

    |s| = 1 1 | 0 0      pool -> [[4, 0],     keep 2 -> [[T, F],
          1 1 | 0 0                [2, 8]]               [F, T]]
          ----+----
          1 1 | 2 2
          0 0 | 2 2
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsekern import convview
from sparsekern.layout import normalize_block_size

__all__ = [
    "REDUCTIONS",
    "SIGNED_REDUCTION",
    "block_grid",
    "expand_blocks",
    "from_matrix",
    "keep_top_blocks",
    "pool_blocks",
    "to_matrix",
]

REDUCTIONS = ("l1", "l2", "max")
# Signed scores (GraSP's) are pooled by their plain sum: ``abs`` would turn "prune me" into "keep me".
SIGNED_REDUCTION = "sum"


def to_matrix(t: torch.Tensor, bk: int, fill=0) -> torch.Tensor:
    """The 2-D matrix view the layout is built on: a linear weight as is, a conv weight via ``convview``."""
    if t.dim() == 2:
        return t
    if t.dim() == 4:
        return convview.to_matrix(t, bk, fill)
    raise ValueError(f"expected a 2-D linear or 4-D conv weight, got shape {tuple(t.shape)}")


def from_matrix(m: torch.Tensor, weight_shape) -> torch.Tensor:
    """Inverse of :func:`to_matrix`: a matrix view back to the weight's shape (2-D as is, 4-D via ``convview``).

    Example:
        >>> from_matrix(to_matrix(torch.ones(8, 3, 1, 1), 16), (8, 3, 1, 1)).shape
        torch.Size([8, 3, 1, 1])
    """
    if len(weight_shape) == 2:
        return m
    if len(weight_shape) == 4:
        return convview.from_matrix(m, *weight_shape[1:])
    raise ValueError(f"expected a 2-D linear or 4-D conv weight shape, got {tuple(weight_shape)}")


def block_grid(weight_shape, block_size) -> tuple[int, int]:
    """``(RB, CB)``: the number of block rows and columns of a weight's matrix view."""
    bm, bk = normalize_block_size(block_size)
    n, k = weight_shape if len(weight_shape) == 2 else convview.matrix_shape(weight_shape, bk)
    return -(-n // bm), -(-k // bk)


def pool_blocks(scores: torch.Tensor, block_size, reduce: str = "l1") -> torch.Tensor:
    """Pool weight-shaped ``scores`` to one score per block, ``(RB, CB)`` float32.

    Padding (edge overhang, conv channel padding) counts as zero score.
    ``reduce="sum"`` adds signed scores as they are (for methods whose scores carry a sign).
    """
    if reduce not in (*REDUCTIONS, SIGNED_REDUCTION):
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    bm, bk = normalize_block_size(block_size)
    m = to_matrix(scores.detach().float(), bk)
    n, k = m.shape
    rb, cb = -(-n // bm), -(-k // bk)
    m = F.pad(m, (0, cb * bk - k, 0, rb * bm - n)).view(rb, bm, cb, bk)
    if reduce == SIGNED_REDUCTION:
        return m.sum((1, 3))
    if reduce == "l1":
        return m.abs().sum((1, 3))
    if reduce == "l2":
        return m.square().sum((1, 3)).sqrt()
    return m.abs().amax((1, 3))


def keep_top_blocks(block_scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """A bool mask of the ``n_keep`` highest-scoring entries (ties broken by position, deterministic)."""
    flat = block_scores.flatten()
    n_keep = max(0, min(int(n_keep), flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if n_keep:
        # A stable descending sort keeps the earliest of equal scores, unlike topk.
        order = torch.sort(flat, descending=True, stable=True).indices
        keep[order[:n_keep]] = True
    return keep.view(block_scores.shape)


def expand_blocks(block_mask: torch.Tensor, weight_shape, block_size) -> torch.Tensor:
    """A ``(RB, CB)`` block mask as a weight-shaped bool mask (2-D linear or 4-D conv)."""
    bm, bk = normalize_block_size(block_size)
    rb, cb = block_grid(weight_shape, block_size)
    if tuple(block_mask.shape) != (rb, cb):
        raise ValueError(f"block mask has shape {tuple(block_mask.shape)}, expected {(rb, cb)}")
    full = block_mask.repeat_interleave(bm, 0).repeat_interleave(bk, 1)
    if len(weight_shape) == 2:
        return full[: weight_shape[0], : weight_shape[1]].contiguous()
    c_out, c_in, kh, kw = weight_shape
    n, k = convview.matrix_shape(weight_shape, bk)
    return convview.from_matrix(full[:n, :k], c_in, kh, kw)
