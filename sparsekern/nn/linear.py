"""``SparseLinear``: a drop-in ``nn.Linear`` whose pruned and frozen blocks cost nothing.

Storage (same weight orientation as ``nn.Linear``, ``(out_features, in_features)``):

``weight_train`` (the trainable blocks), ``weight_frozen``, ``block_code``
and ``element_state``, as for every sparse layer (see ``_base.py``); the
layout is built on the weight itself.

``weight`` is a read-only dense view of the effective weight ``W * mask`` for
inspection; ``to_dense()`` returns a real ``nn.Linear``. A dense ``nn.Linear``
``state_dict`` (``weight``, ``bias``) loads into a ``SparseLinear``: the weight
is cut to the current masks.

Known limits: ``weight`` is materialised on each access (use it for
inspection, not in a training loop); masks are fixed between ``set_masks``
calls.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsekern.functional import sparse_linear
from sparsekern.layout import normalize_block_size
from sparsekern.nn._base import BlockSparseWeight

__all__ = ["SparseLinear"]


class SparseLinear(BlockSparseWeight):
    """Block-sparse ``y = x @ W.T + b`` with trainable, frozen and pruned weights.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        block_size: int or ``(bm, bk)``, each in {16, 32, 64, 128}; ``bm`` runs
            over output features, ``bk`` over input features.
        mask: ``(out_features, in_features)`` bool, True = kept. Default: all kept.
        frozen_mask: same shape, True = kept but never updated. Must lie in ``mask``.

    Example:
        >>> mask = torch.rand(256, 512) < 0.1
        >>> layer = SparseLinear(512, 256, block_size=32, mask=mask)
        >>> layer(torch.randn(8, 512)).shape
        torch.Size([8, 256])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        block_size: int | tuple[int, int] = 32,
        mask: torch.Tensor | None = None,
        frozen_mask: torch.Tensor | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = normalize_block_size(block_size)
        dense = torch.empty(out_features, in_features, **factory)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))  # nn.Linear's initialisation
        if bias:
            bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
            self.bias = nn.Parameter(torch.empty(out_features, **factory).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        self.weight_shape = (out_features, in_features)
        self._init_weight(dense, mask, frozen_mask)

    def _to_matrix(self, t: torch.Tensor, fill=0) -> torch.Tensor:
        return t

    def _from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        return m

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        mask: torch.Tensor | None = None,
        frozen_mask: torch.Tensor | None = None,
        block_size: int | tuple[int, int] = 32,
    ) -> SparseLinear:
        """Convert an ``nn.Linear``; ``mask`` defaults to the module's own mask, else ``linear.weight != 0``.

        A module pruned by ``torch.nn.utils.prune`` (``weight_orig``/``weight_mask``)
        or parametrized by ``torch.ao.pruning`` (a ``FakeSparsity`` ``.mask``) keeps its
        exact mask, so ``sparsifier.convert(model, mapping={nn.Linear: SparseLinear})`` works.

        Returns:
            A ``SparseLinear`` on the same device and dtype whose output equals
            ``F.linear(x, linear.weight * mask, linear.bias)``.

        Example:
            >>> dense = nn.Linear(128, 64)
            >>> sparse = SparseLinear.from_dense(dense, mask=dense.weight.abs() > 0.05)
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        w, mask, bias = cls._dense_parts(linear, mask)
        mod = cls(
            linear.in_features,
            linear.out_features,
            bias=bias is not None,
            block_size=block_size,
            mask=mask,
            frozen_mask=frozen_mask,
            device=w.device,
            dtype=w.dtype,
        )
        mod._copy_dense_(w, bias)
        return mod

    # ---------------------------------------------------------------- compute
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        y = sparse_linear(input, self.weight_train, self.weight_frozen, self._current_layout(), self.bias)
        return self._with_dense_grad(y, input)

    def reset_parameters(self) -> None:
        """Initialise the stored blocks and the bias as ``nn.Linear`` does (after ``to_empty()``, say)."""
        w = self.weight_train
        dense = torch.empty(self.weight_shape, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        bias = None
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            bias = torch.empty_like(self.bias).uniform_(-bound, bound)
        self._copy_dense_(dense, bias)

    # ------------------------------------------------------------- inspection
    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` holding the effective weight and the bias."""
        w = self.weight
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        lay = self._layout
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, block_density={lay.block_density:.3f}, "
            f"trainable_blocks={lay.n_train}"
        )
