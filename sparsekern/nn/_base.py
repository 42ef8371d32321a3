"""What every block-sparse layer shares: the two value stores, the layout, mask updates and checkpoints.

A layer's weight has a user-facing shape (``(out, in)`` for linear,
``(Cout, Cin, kh, kw)`` for conv) and a *matrix view* on which the
:class:`~sparsekern.layout.BlockLayout` is built. Subclasses say how to go
between the two (:meth:`_to_matrix` / :meth:`_from_matrix`); everything else
lives here:

* ``weight_train`` (Parameter): the trainable blocks only, so gradients and
  optimizer state exist for nothing else.
* ``weight_frozen`` (buffer): frozen blocks and the fixed values of mixed blocks.

Both are views of one buffer, ``[weight_train | weight_frozen]``, which is the
single value store the kernels address (``kernels/store.py``): no copy per
call, one TMA descriptor for every block. Every place that replaces the stores
(construction, ``set_masks``, loading a checkpoint of another layout, and
``.to()``/``.half()``, which convert parameters and buffers one by one) lays
them out in one buffer again.
* ``block_code`` / ``element_state`` (buffers): the layout's compact form; the
  full layout is rebuilt from them on load.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from sparsekern.kernels.store import adjacent, join_stores
from sparsekern.layout import BlockLayout
from sparsekern.nn._ingest import dense_weight_and_mask


def _bool_mask(mask: torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected the weight's shape {shape}")
    if mask.is_complex():
        raise TypeError(f"{name} must be bool or real, got {mask.dtype}")
    return mask if mask.dtype == torch.bool else mask != 0


_warned_no_empty_block = False


def _warn_if_nothing_skipped(layout: BlockLayout, what: str) -> None:
    """Say once per process when a layout skips no work: every block computed and mixed (an element mask)."""
    global _warned_no_empty_block
    rb, cb = layout.grid
    if _warned_no_empty_block or rb * cb < 4 or layout.n_mixed < rb * cb:
        return
    _warned_no_empty_block = True
    warnings.warn(
        f"{what}: every block of its {layout.shape} weight holds kept and pruned elements, so no block is empty "
        "and no work is skipped; such layouts run slower than a dense layer. Prune in blocks (e.g. "
        "sparsekern.sparsify(..., granularity='block')) to gain speed. (Said once per process.)",
        stacklevel=4,
    )


class BlockSparseWeight(nn.Module):
    """Base class of the sparse layers; not used directly.

    Subclasses set ``weight_shape`` and ``block_size`` and call
    :meth:`_init_weight` from their constructor.
    """

    weight_shape: tuple[int, ...]
    block_size: tuple[int, int]

    # -------------------------------------------------- matrix view (subclass)
    def _to_matrix(self, t: torch.Tensor, fill=0) -> torch.Tensor:
        raise NotImplementedError

    def _from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --------------------------------------------------------------- building
    def _build_layout(self, mask, frozen_mask, device) -> BlockLayout:
        mask = _bool_mask(mask, "mask", self.weight_shape).to(device)
        if frozen_mask is not None:
            frozen_mask = self._to_matrix(_bool_mask(frozen_mask, "frozen_mask", self.weight_shape).to(device), False)
        return BlockLayout.from_masks(self._to_matrix(mask, False), frozen_mask, self.block_size)

    def _init_weight(self, dense: torch.Tensor, mask, frozen_mask) -> None:
        if mask is None:
            mask = torch.ones(self.weight_shape, dtype=torch.bool, device=dense.device)
        layout = self._build_layout(mask, frozen_mask, dense.device)
        w_train, w_frozen = layout.split_values(self._to_matrix(dense))
        self.weight_train, frozen = self._joined_stores(w_train, w_frozen, True)
        self.register_buffer("weight_frozen", frozen)
        self._install_layout(layout)

    @staticmethod
    def _joined_stores(w_train: torch.Tensor, w_frozen: torch.Tensor, requires_grad: bool):
        """``(Parameter, buffer)``: views of one fresh ``[w_train | w_frozen]`` buffer."""
        buf = join_stores(w_train, w_frozen)
        n = w_train.shape[0]
        return nn.Parameter(buf[:n], requires_grad=requires_grad), buf[n:]

    def _install_layout(self, layout: BlockLayout) -> None:
        _warn_if_nothing_skipped(layout, type(self).__name__)
        self._layout = layout
        self.register_buffer("block_code", layout.block_code)
        self.register_buffer("element_state", layout.element_state)

    @staticmethod
    def _dense_parts(module: nn.Module, mask: torch.Tensor | None):
        """``(weight, mask, bias)`` of a dense module for ``from_dense``.

        The module's own torch prune / torch.ao mask wins over ``weight != 0``
        when no ``mask`` is given (``nn/_ingest.py``); values come back detached.
        """
        w, foreign = dense_weight_and_mask(module)
        if mask is None:
            mask = foreign if foreign is not None else w != 0
        bias = None if module.bias is None else dense_weight_and_mask(module, "bias")[0]
        return w, mask, bias

    def _copy_dense_(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Load a dense weight (cut to the masks) and bias in place."""
        with torch.no_grad():
            w_train, w_frozen = self._layout.split_values(self._to_matrix(weight.detach()))
            self.weight_train.copy_(w_train)
            self.weight_frozen.copy_(w_frozen)
            if bias is not None:
                self.bias.copy_(bias)

    # ------------------------------------------------------------- inspection
    @property
    def layout(self) -> BlockLayout:
        """The :class:`~sparsekern.layout.BlockLayout` of the weight's matrix view."""
        return self._layout

    @property
    def weight(self) -> torch.Tensor:
        """The effective dense weight ``W * mask`` (a fresh tensor, no autograd)."""
        with torch.no_grad():
            return self._from_matrix(self._layout.to_dense(self.weight_train, self.weight_frozen))

    @property
    def mask(self) -> torch.Tensor:
        """Bool, weight-shaped: True where the weight is kept."""
        return self._from_matrix(self._layout.dense_masks()[0])

    @property
    def frozen_mask(self) -> torch.Tensor:
        """Bool, weight-shaped: True where the weight is kept but never updated."""
        return self._from_matrix(self._layout.dense_masks()[1])

    # ----------------------------------------------------------- mask updates
    def set_masks(
        self,
        mask: torch.Tensor,
        frozen_mask: torch.Tensor | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ):
        """Rebuild the layout in place for new (weight-shaped) masks.

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
            dense = self._layout.to_dense(self.weight_train, self.weight_frozen)
            new = self._build_layout(mask, frozen_mask, dense.device)
            w_train, w_frozen = new.split_values(dense)
            new_state = {}
            if optimizer is not None:
                for key, val in optimizer.state.get(param, {}).items():
                    if isinstance(val, torch.Tensor) and val.shape == param.shape:
                        old_dense = self._layout.to_dense(val, torch.zeros_like(self.weight_frozen, dtype=val.dtype))
                        new_state[key] = new.split_values(old_dense)[0]
        # Everything above can fail; nothing below can, so the module never ends half-changed.
        fresh, w_frozen = self._joined_stores(w_train, w_frozen, param.requires_grad)
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
        # Conversions build the parameter and the buffer separately: join them again. ``.data`` keeps
        # the Parameter object, so optimizers and hooks holding it stay valid.
        wt, wf = self.weight_train, self.weight_frozen
        if wt.shape[0] and wf.shape[0] and not adjacent(wt, wf):
            buf = join_stores(wt, wf)
            wt.data = buf[: wt.shape[0]]
            self.weight_frozen = buf[wt.shape[0] :]
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
            # A dense checkpoint (nn.Linear / nn.Conv2d): cut it to this layer's masks.
            dense = state_dict.pop(dense_key)
            if tuple(dense.shape) != self.weight_shape:
                errors.append(f"size mismatch for {dense_key}: got {tuple(dense.shape)}, expected {self.weight_shape}")
                return
            dense = self._to_matrix(dense.to(self.weight_train.device, self.weight_train.dtype))
            w_train, w_frozen = layout.split_values(dense)
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
            old = self.weight_train
            empty = old.new_empty(wt.shape[0] + wf.shape[0], *wt.shape[1:])
            self.weight_train, self.weight_frozen = self._joined_stores(
                empty[: wt.shape[0]], empty[wt.shape[0] :], old.requires_grad
            )
            self._install_layout(layout)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
