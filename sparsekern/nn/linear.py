"""``SparseLinear``: a drop-in ``nn.Linear`` whose pruned and frozen blocks cost nothing.

Storage (same weight orientation as ``nn.Linear``, ``(out_features, in_features)``):

* ``weight_train`` (Parameter): the trainable blocks only, so gradients and
  optimizer state exist for nothing else.
* ``weight_frozen`` (buffer): frozen blocks and the fixed values of mixed blocks.
* ``block_code`` / ``element_state`` (buffers): the layout's compact form; the
  full :class:`~sparsekern.layout.BlockLayout` is rebuilt from them on load.

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
from sparsekern.layout import BlockLayout, normalize_block_size

__all__ = ["SparseLinear"]


class SparseLinear(nn.Module):
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
        if mask is None:
            mask = torch.ones(out_features, in_features, dtype=torch.bool, device=dense.device)
        layout = self._build_layout(mask, frozen_mask, dense.device)
        w_train, w_frozen = layout.split_values(dense)
        self.weight_train = nn.Parameter(w_train)
        self.register_buffer("weight_frozen", w_frozen)
        self._install_layout(layout)

    # --------------------------------------------------------------- building
    def _build_layout(self, mask, frozen_mask, device) -> BlockLayout:
        shape = (self.out_features, self.in_features)
        for name, m in (("mask", mask), ("frozen_mask", frozen_mask)):
            if m is not None and tuple(m.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(m.shape)}, expected (out_features, in_features)={shape}")
        mask = mask.to(device)
        frozen_mask = None if frozen_mask is None else frozen_mask.to(device)
        return BlockLayout.from_masks(mask, frozen_mask, self.block_size)

    def _install_layout(self, layout: BlockLayout) -> None:
        self._layout = layout
        self.register_buffer("block_code", layout.block_code)
        self.register_buffer("element_state", layout.element_state)

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        mask: torch.Tensor | None = None,
        frozen_mask: torch.Tensor | None = None,
        block_size: int | tuple[int, int] = 32,
    ) -> SparseLinear:
        """Convert an ``nn.Linear``; ``mask`` defaults to ``linear.weight != 0``.

        Returns:
            A ``SparseLinear`` on the same device and dtype whose output equals
            ``F.linear(x, linear.weight * mask, linear.bias)``.

        Example:
            >>> dense = nn.Linear(128, 64)
            >>> sparse = SparseLinear.from_dense(dense, mask=dense.weight.abs() > 0.05)
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_dense expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        mod = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            block_size=block_size,
            mask=w != 0 if mask is None else mask,
            frozen_mask=frozen_mask,
            device=w.device,
            dtype=w.dtype,
        )
        with torch.no_grad():
            w_train, w_frozen = mod._layout.split_values(w)
            mod.weight_train.copy_(w_train)
            mod.weight_frozen.copy_(w_frozen)
            if linear.bias is not None:
                mod.bias.copy_(linear.bias)
        return mod

    # ---------------------------------------------------------------- compute
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return sparse_linear(input, self.weight_train, self.weight_frozen, self._layout, self.bias)

    # ------------------------------------------------------------- inspection
    @property
    def layout(self) -> BlockLayout:
        return self._layout

    @property
    def weight(self) -> torch.Tensor:
        """The effective dense weight ``W * mask`` (a fresh tensor, no autograd)."""
        with torch.no_grad():
            return self._layout.to_dense(self.weight_train, self.weight_frozen)

    @property
    def mask(self) -> torch.Tensor:
        return self._layout.dense_masks()[0]

    @property
    def frozen_mask(self) -> torch.Tensor:
        return self._layout.dense_masks()[1]

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

    # ----------------------------------------------------------- mask updates
    def set_masks(
        self,
        mask: torch.Tensor,
        frozen_mask: torch.Tensor | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> SparseLinear:
        """Rebuild the layout in place for new masks.

        Kept values are preserved; newly kept weights start at zero.
        ``weight_train`` changes shape, so it becomes a *new* Parameter (resizing
        a Parameter in place breaks autograd graphs that are still alive).
        Pass the ``optimizer`` that holds the layer: the new Parameter takes
        the old one's place in its ``param_groups`` and its state is remapped,
        so state of elements that stay trainable is kept, grown elements start
        from zero state and dropped elements lose theirs. Any other holder of
        the old Parameter (a second optimizer, an EMA copy) must be refreshed
        by the caller.

        Nothing is changed if the masks are invalid.

        Returns:
            ``self``.

        Example:
            >>> opt = torch.optim.AdamW(layer.parameters())
            >>> layer.set_masks(new_mask, optimizer=opt)
        """
        param = self.weight_train
        with torch.no_grad():
            dense = self.weight
            new = self._build_layout(mask, frozen_mask, dense.device)
            w_train, w_frozen = new.split_values(dense)
            new_state = {}
            if optimizer is not None:
                for key, val in optimizer.state.get(param, {}).items():
                    if isinstance(val, torch.Tensor) and val.shape == param.shape:
                        old_dense = self._layout.to_dense(val, torch.zeros_like(self.weight_frozen, dtype=val.dtype))
                        new_state[key] = new.split_values(old_dense)[0]
        # Everything above can fail; nothing below can, so the module never ends half-changed.
        fresh = nn.Parameter(w_train, requires_grad=param.requires_grad)
        self.weight_train = fresh
        self.weight_frozen = w_frozen
        self._install_layout(new)
        if optimizer is not None:
            for group in optimizer.param_groups:
                group["params"] = [fresh if p is param else p for p in group["params"]]
            old_state = optimizer.state.pop(param, None)
            if old_state is not None:
                optimizer.state[fresh] = {**old_state, **new_state}
        return self

    # ------------------------------------------------------------ state, devices
    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._layout = self._layout.to(self.block_code.device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        dense_key = prefix + "weight"
        code_key, es_key = prefix + "block_code", prefix + "element_state"
        layout = self._layout
        if (
            code_key in state_dict
            and es_key in state_dict
            and not (
                torch.equal(state_dict[code_key].cpu(), self.block_code.cpu())
                and torch.equal(state_dict[es_key].cpu(), self.element_state.cpu())
            )
        ):
            layout = BlockLayout.from_block_code(
                state_dict[code_key].to(self.block_code.device),
                state_dict[es_key].to(self.block_code.device),
                layout.shape,
                self.block_size,
            )
        if dense_key in state_dict:
            # A dense nn.Linear checkpoint: cut it to this layer's masks.
            dense = state_dict.pop(dense_key)
            if tuple(dense.shape) != layout.shape:
                errors.append(f"size mismatch for {dense_key}: got {tuple(dense.shape)}, expected {layout.shape}")
                return
            w_train, w_frozen = layout.split_values(dense.to(self.weight_train.device, self.weight_train.dtype))
            state_dict[prefix + "weight_train"] = w_train
            state_dict[prefix + "weight_frozen"] = w_frozen
            state_dict[code_key] = layout.block_code
            state_dict[es_key] = layout.element_state
        if layout is not self._layout:
            wt, wf = state_dict.get(prefix + "weight_train"), state_dict.get(prefix + "weight_frozen")
            bm, bk = self.block_size
            if (
                wt is None
                or wf is None
                or tuple(wt.shape) != (layout.n_train, bm, bk)
                or (tuple(wf.shape) != (layout.n_frozen_slots, bm, bk))
            ):
                errors.append(f"{prefix}weight_train/weight_frozen do not match the layout in {code_key}")
                return
            # The masks differ, so the stores change shape: new tensors in this module's dtype/device
            # (the checkpoint's values are copied in by the default loader below, cast as nn.Linear would).
            old, fz = self.weight_train, self.weight_frozen
            self.weight_train = nn.Parameter(
                torch.empty(wt.shape, dtype=old.dtype, device=old.device), requires_grad=old.requires_grad
            )
            self.weight_frozen = torch.empty(wf.shape, dtype=fz.dtype, device=fz.device)
            self._install_layout(layout)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
