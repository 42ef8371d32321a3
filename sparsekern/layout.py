"""Three-state block layouts: which weight blocks are computed, which are trained.

Why one file of this size: ``BlockLayout`` is one data structure, and its builders, index
tensors, ``validate()`` and the block-value mapping must agree on one encoding. Its FLOP count
(``flops``/``summary``, 30 lines) stays here because ``sparsekern.flops`` sits above ``nn``
(it walks models) and this layer may not import it (ARCHITECTURE.md).

A weight ``W`` of shape ``(N, K)`` (``out_features, in_features``) is cut into
blocks of ``bm x bk`` elements, ``RB = ceil(N / bm)`` block rows and
``CB = ceil(K / bk)`` block columns. Edge blocks may hang over the matrix; the
overhang is padding that is never read as data and always holds zero.

Every element is *trainable*, *frozen* (kept, never updated) or *pruned* (zero).
Each block gets a code:

====  ========  ===========================================================
code  name      meaning
====  ========  ===========================================================
0     empty     every element pruned: skipped by all three GEMMs
1     frozen    every element kept and frozen: forward and dX, no dW
2     trainable every element kept and trainable: all three GEMMs
3     mixed     anything else with at least one kept element
====  ========  ===========================================================

Only mixed blocks carry an element state (``int8``: 0 pruned, 1 frozen,
2 trainable). ``(block_code, element_state)`` is the compact source of truth;
everything else is derived from it with vectorised torch ops on its device.

Values live in two stores so that optimizers only see trainable data:

* ``w_train`` ``(n_train, bm, bk)``: the trainable blocks, CSR order. In a
  mixed block, positions that are not trainable hold zero and are never read.
* ``w_frozen`` ``(n_frozen + n_mixed, bm, bk)``: first the frozen blocks (code
  1), then one *fixed* slot per mixed block holding its frozen values (zero
  where pruned or trainable).

Both stores are halves of one buffer, ``[w_train | w_frozen]`` (``kernels/store.py``):
``storage[p]`` is the slot of block ``p`` in it, so every kernel addresses a block
as ``base + slot * bm * bk``. When ``aux >= 0`` (a trainable mixed block) it takes
``where(element_state[aux] == 2, stored, store[fixed_base + aux])`` with
``fixed_base = n_train + n_frozen``. A mixed block with no trainable element is
stored directly in its fixed slot.

Worked example, ``N = K = 4``, ``bm = bk = 2``, ``P`` pruned, ``F`` frozen,
``T`` trainable::

    T T | P P        codes  [[2, 0],      CSR: row_offsets [0, 1, 3]
    T T | P P               [1, 3]]            col_indices [0, 0, 1]
    ----+----                                  storage     [0, 2, 1]
    F F | T F        block (1, 1) is mixed:    aux         [-1, -1, 0]
    F F | P T        element_state [[2, 1],    store = [w_train: (0,0), (1,1) |
                                    [0, 2]]             w_frozen: frozen (1,0), fixed slot of (1,1)]

Transposed traversal (for dX): ``col_offsets [0, 2, 3]``,
``row_indices_t [0, 1, 1]``, ``block_index_t [0, 1, 2]`` (CSR positions, so no
value is copied), ``storage_t [0, 2, 1]`` and ``aux_t [-1, -1, 0]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from sparsekern.kernels.meta import Meta
from sparsekern.kernels.store import effective_blocks

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["BlockLayout", "SUPPORTED_BLOCK_SIZES", "as_bool_mask", "normalize_block_size"]

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)

EMPTY, FROZEN, TRAINABLE, MIXED = 0, 1, 2, 3
E_PRUNED, E_FROZEN, E_TRAINABLE = 0, 1, 2


def normalize_block_size(block_size: int | Sequence[int]) -> tuple[int, int]:
    """Return ``(bm, bk)`` from an int or a pair, or raise ``ValueError``."""
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        pair = (block_size, block_size)
    else:
        try:
            pair = tuple(int(b) for b in block_size)
        except TypeError:
            raise TypeError(f"block_size must be an int or a pair of ints, got {block_size!r}") from None
    if len(pair) != 2 or any(b not in SUPPORTED_BLOCK_SIZES for b in pair):
        raise ValueError(f"unsupported block_size {block_size!r}: each side must be one of {SUPPORTED_BLOCK_SIZES}")
    return pair


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def as_bool_mask(
    mask: torch.Tensor, name: str = "mask", shape: Sequence[int] | None = None, dims: int | None = None
) -> torch.Tensor:
    """The one mask validator: ``mask`` as a bool tensor, or a clear error.

    Bool masks pass as they are. Integer and float masks must hold exactly 0
    and 1: a NaN, a soft score (``torch.rand``) or any other value is an error,
    because reading it as ``!= 0`` would silently keep nearly everything.

    Args:
        mask: the mask to check.
        name: how errors name it (``"mask"``, ``"frozen_mask"``).
        shape: the shape it must have, if any.
        dims: the number of dimensions it must have, if any.

    Returns:
        A bool tensor (``mask`` itself when it is already bool).

    Example:
        >>> as_bool_mask(torch.tensor([[0.0, 1.0]])).tolist()
        [[False, True]]
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if dims is not None and mask.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(mask.shape)}")
    if shape is not None and tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)}")
    if mask.is_complex():
        raise TypeError(f"{name} must be bool or real, got {mask.dtype}")
    if mask.is_meta:
        raise ValueError(f"{name} is on the meta device; a mask needs real values (build it on the CPU)")
    if mask.dtype == torch.bool:
        return mask
    binary = (mask == 0) | (mask == 1)
    if not bool(binary.all()):
        bad = mask[~binary]
        n_nan = int(bad.isnan().sum()) if bad.is_floating_point() else 0
        raise ValueError(
            f"{name} ({mask.dtype}) must hold only 0 and 1 (or be bool): {bad.numel()} element(s) are neither"
            + (f", {n_nan} of them NaN" if n_nan else f", e.g. {bad.flatten()[0].item()!r}")
            + "; threshold a soft mask yourself (e.g. scores > t)"
        )
    return mask != 0


def _block_view(t: torch.Tensor, bm: int, bk: int, pad: int = 0) -> torch.Tensor:
    """View a 2-D tensor as ``(RB, bm, CB, bk)``, filling the overhang with ``pad``."""
    n, k = t.shape
    pad_n, pad_k = _cdiv(n, bm) * bm - n, _cdiv(k, bk) * bk - k
    if pad_n or pad_k:
        t = F.pad(t, (0, pad_k, 0, pad_n), value=pad)
    return t.view(t.shape[0] // bm, bm, t.shape[1] // bk, bk)


def _offsets(counts: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=out[1:])
    return out


@dataclass(frozen=True, eq=False)
class BlockLayout:
    """Block-sparse structure of one weight; build with :meth:`from_masks`.

    All index tensors are ``int32`` on the mask's device. ``nnzb`` is the number
    of computed blocks.

    Attributes:
        shape: ``(N, K)`` of the weight.
        block_size: ``(bm, bk)``.
        block_code: ``(RB, CB)`` int8 codes (see the module docstring).
        element_state: ``(n_mixed, bm, bk)`` int8, mixed blocks in CSR order.
        row_offsets: ``(RB + 1,)`` CSR pointers of computed blocks.
        col_indices / row_indices: ``(nnzb,)`` block column / row of each block.
        storage: ``(nnzb,)`` the slot of each block's values in the joined store
            ``[w_train | w_frozen]`` (see module doc).
        aux: ``(nnzb,)`` mixed-slot index of trainable mixed blocks, else -1.
        row_order: ``(RB,)`` block rows, longest first (load balance).
        col_offsets: ``(CB + 1,)`` pointers of the transposed traversal.
        row_indices_t / block_index_t: ``(nnzb,)`` block row and CSR position
            of each block in column-major order.
        storage_t / aux_t: ``storage`` and ``aux`` in column-major order, so the
            transposed walk reads a block's slot with one indirection, not two.
        col_slot / row_slot_t: ``(nnzb, 2)`` pairs ``(col_indices, storage)`` in
            CSR order and ``(row_indices_t, storage_t)`` in column-major order:
            what the kernels' main loops prefetch, one 8-byte load per block.
        col_order: ``(CB,)`` block columns, longest first.
        train_index: ``(n_train,)`` CSR position of each trainable block, in
            ``w_train`` order.
        train_rank / train_left: ``(n_train,)`` position of a trainable block
            among the trainable blocks of its block row, and how many of them
            remain from it on (itself included). The weight-gradient kernel
            uses them to give one program a run of blocks that share ``dy``.
        n_frozen: number of code-1 blocks; fixed slots start there.
    """

    shape: tuple[int, int]
    block_size: tuple[int, int]
    block_code: torch.Tensor
    element_state: torch.Tensor
    row_offsets: torch.Tensor
    col_indices: torch.Tensor
    row_indices: torch.Tensor
    storage: torch.Tensor
    aux: torch.Tensor
    row_order: torch.Tensor
    col_offsets: torch.Tensor
    row_indices_t: torch.Tensor
    block_index_t: torch.Tensor
    storage_t: torch.Tensor
    aux_t: torch.Tensor
    col_slot: torch.Tensor
    row_slot_t: torch.Tensor
    col_order: torch.Tensor
    train_index: torch.Tensor
    train_rank: torch.Tensor
    train_left: torch.Tensor
    n_frozen: int

    # ------------------------------------------------------------------ build
    @classmethod
    def from_masks(
        cls,
        mask: torch.Tensor,
        frozen_mask: torch.Tensor | None = None,
        block_size: int | Sequence[int] = 32,
    ) -> BlockLayout:
        """Build a layout from element masks.

        Args:
            mask: ``(N, K)`` bool, True where the weight is kept (not pruned).
            frozen_mask: optional ``(N, K)`` bool, True where a kept weight is
                frozen. Must lie inside ``mask``.
            block_size: int or ``(bm, bk)``, each in {16, 32, 64, 128}.

        Returns:
            A :class:`BlockLayout` on ``mask.device``.

        Example:
            >>> m = torch.rand(100, 70) < 0.5
            >>> lay = BlockLayout.from_masks(m, block_size=(32, 16))
            >>> lay.grid
            (4, 5)
        """
        bm, bk = normalize_block_size(block_size)
        kept = as_bool_mask(mask, "mask", dims=2)
        n, k = kept.shape
        # One int8 state per element, 2*kept - frozen: 0 pruned, 1 frozen, 2 trainable,
        # and -1 exactly where frozen_mask marks a pruned element. Bool storage is 0/1
        # bytes, so the int8 views are free; the per-block min and max then classify
        # every block in two reductions (the 16384^2 build is dominated by them).
        state = kept.view(torch.int8) * 2
        if frozen_mask is not None:
            frozen = as_bool_mask(frozen_mask, "frozen_mask", kept.shape)
            if frozen.device != kept.device:
                raise ValueError(f"frozen_mask is on {frozen.device}, mask is on {kept.device}")
            state -= frozen.view(torch.int8)
        # The overhang of edge blocks must not look pruned to the min or trainable to the max.
        lo = _block_view(state, bm, bk, pad=E_TRAINABLE).amin(dim=3).amin(dim=1)
        hi = _block_view(state, bm, bk, pad=E_PRUNED).amax(dim=3).amax(dim=1)
        if bool((lo < 0).any()):
            outside = int((state < 0).sum())
            raise ValueError(f"frozen_mask marks {outside} element(s) that mask prunes; frozen elements must be kept")
        code = torch.full_like(lo, MIXED)
        code[lo == E_TRAINABLE] = TRAINABLE
        code[(lo == E_FROZEN) & (hi == E_FROZEN)] = FROZEN
        code[hi == E_PRUNED] = EMPTY
        mixed = (code == MIXED).nonzero()
        estate = _block_view(state, bm, bk, pad=E_PRUNED)[mixed[:, 0], :, mixed[:, 1], :]
        return cls.from_block_code(code, estate, (n, k), (bm, bk))

    @classmethod
    def from_block_code(
        cls,
        block_code: torch.Tensor,
        element_state: torch.Tensor,
        shape: Sequence[int],
        block_size: int | Sequence[int],
    ) -> BlockLayout:
        """Rebuild a layout from its compact form (``block_code``, ``element_state``).

        This is what ``state_dict`` stores. All derived indices are recomputed
        with vectorised ops; ``validate()`` is run on the result.
        """
        bm, bk = normalize_block_size(block_size)
        n, k = (int(s) for s in shape)
        rb, cb = _cdiv(n, bm), _cdiv(k, bk)
        if tuple(block_code.shape) != (rb, cb):
            raise ValueError(f"block_code has shape {tuple(block_code.shape)}, expected {(rb, cb)}")
        dev = block_code.device
        computed = block_code > 0
        nz = computed.nonzero()
        row_idx, col_idx = nz[:, 0], nz[:, 1]
        codes = block_code[computed]
        is_mixed = codes == MIXED
        n_mixed = int(is_mixed.sum())
        if tuple(element_state.shape) != (n_mixed, bm, bk):
            raise ValueError(f"element_state has shape {tuple(element_state.shape)}, expected {(n_mixed, bm, bk)}")
        pidx = torch.cumsum(is_mixed, 0) - 1
        mixed_trainable = (element_state == E_TRAINABLE).flatten(1).any(1)
        trainable = (codes == TRAINABLE) | (is_mixed & mixed_trainable[pidx.clamp(min=0)] if n_mixed else codes < 0)
        is_frozen = codes == FROZEN
        n_frozen = int(is_frozen.sum())
        frozen_pos = torch.cumsum(is_frozen, 0) - 1
        n_train = int(trainable.sum())
        # One slot per computed block in the joined store [w_train | w_frozen] (kernels/store.py).
        storage = torch.where(
            trainable,
            torch.cumsum(trainable, 0) - 1,
            n_train + torch.where(is_frozen, frozen_pos, n_frozen + pidx),
        )
        aux = torch.where(trainable & is_mixed, pidx, -1)

        row_counts = computed.sum(1)
        col_counts = computed.sum(0)
        # Column-major order of the same blocks: the transposed traversal points
        # back into CSR positions instead of moving any values.
        order = torch.argsort(col_idx * rb + row_idx, stable=True)
        train_index = trainable.nonzero().squeeze(1)
        t_rows = row_idx[train_index]
        t_counts = torch.bincount(t_rows, minlength=rb)
        train_rank = torch.arange(train_index.numel(), device=dev) - _offsets(t_counts)[t_rows]
        i32 = torch.int32
        layout = cls(
            shape=(n, k),
            block_size=(bm, bk),
            # Copies: a layout is a snapshot, never an alias of the buffers it was read from (a module
            # compares its buffers with it to notice in-place writes).
            block_code=block_code.to(torch.int8, copy=True),
            element_state=element_state.to(torch.int8, copy=True),
            row_offsets=_offsets(row_counts).to(i32),
            col_indices=col_idx.to(i32),
            row_indices=row_idx.to(i32),
            storage=storage.to(i32),
            aux=aux.to(i32),
            row_order=torch.argsort(row_counts, descending=True, stable=True).to(i32),
            col_offsets=_offsets(col_counts).to(i32),
            row_indices_t=row_idx[order].to(i32),
            block_index_t=order.to(i32),
            storage_t=storage[order].to(i32),
            aux_t=aux[order].to(i32),
            col_slot=torch.stack([col_idx, storage], 1).to(i32),
            row_slot_t=torch.stack([row_idx[order], storage[order]], 1).to(i32),
            col_order=torch.argsort(col_counts, descending=True, stable=True).to(i32),
            train_index=train_index.to(i32),
            train_rank=train_rank.to(i32),
            train_left=(t_counts[t_rows] - train_rank).to(i32),
            n_frozen=n_frozen,
        )
        assert layout.row_offsets.device == dev
        layout.validate()
        return layout

    # ----------------------------------------------------------- properties
    @property
    def grid(self) -> tuple[int, int]:
        """``(RB, CB)``: block rows and block columns."""
        return tuple(self.block_code.shape)

    @property
    def device(self) -> torch.device:
        return self.block_code.device

    @property
    def nnz_blocks(self) -> int:
        return self.col_indices.numel()

    @property
    def n_train(self) -> int:
        return self.train_index.numel()

    @property
    def n_mixed(self) -> int:
        return self.element_state.shape[0]

    @property
    def n_frozen_slots(self) -> int:
        """Blocks in ``w_frozen``: frozen blocks plus one fixed slot per mixed block."""
        return self.n_frozen + self.n_mixed

    def meta(self) -> list[torch.Tensor]:
        """Index tensors in the order the kernel launchers take them (see ``kernels.meta.Meta``)."""
        return [getattr(self, name) for name in Meta._fields]

    def to(self, device: torch.device | str) -> BlockLayout:
        """Return the layout with every tensor on ``device``."""
        fields = {f: (v.to(device) if isinstance(v, torch.Tensor) else v) for f, v in self.__dict__.items()}
        return type(self)(**fields)

    # ------------------------------------------------------------- checking
    def validate(self) -> None:
        """Check internal consistency; raise ``ValueError`` naming what is wrong."""
        rb, cb = self.grid
        nnzb = self.nnz_blocks
        expect = {
            "row_offsets": (rb + 1,),
            "col_offsets": (cb + 1,),
            "row_order": (rb,),
            "col_order": (cb,),
            "row_indices": (nnzb,),
            "storage": (nnzb,),
            "aux": (nnzb,),
            "row_indices_t": (nnzb,),
            "block_index_t": (nnzb,),
            "storage_t": (nnzb,),
            "aux_t": (nnzb,),
            "col_slot": (nnzb, 2),
            "row_slot_t": (nnzb, 2),
            "train_rank": (self.n_train,),
            "train_left": (self.n_train,),
        }
        for name, shp in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shp:
                raise ValueError(f"layout.{name} has shape {got}, expected {shp}")
        int32 = (
            "row_offsets",
            "col_indices",
            "storage",
            "aux",
            "train_index",
            "block_index_t",
            "storage_t",
            "col_slot",
        )
        for name in int32:
            t = getattr(self, name)
            if t.dtype != torch.int32 or t.device != self.device:
                raise ValueError(f"layout.{name} must be int32 on {self.device}, got {t.dtype} on {t.device}")
        if int(self.row_offsets[-1]) != nnzb or int(self.col_offsets[-1]) != nnzb:
            raise ValueError(
                f"layout offsets end at {int(self.row_offsets[-1])}/{int(self.col_offsets[-1])}, expected {nnzb}"
            )

    # ---------------------------------------------------------- reporting
    def _valid_area(self) -> torch.Tensor:
        """Elements of each computed block that lie inside the matrix, ``(nnzb,)`` int64."""
        (n, k), (bm, bk) = self.shape, self.block_size
        rows = torch.clamp(n - self.row_indices.long() * bm, max=bm)
        cols = torch.clamp(k - self.col_indices.long() * bk, max=bk)
        return rows * cols

    def element_counts(self) -> dict[str, int]:
        """Numbers of kept, trainable and frozen elements (exact)."""
        area = self._valid_area()
        codes = self.block_code[self.block_code > 0]
        es = self.element_state
        kept = int(area[codes != MIXED].sum()) + int((es > 0).sum())
        trainable = int(area[codes == TRAINABLE].sum()) + int((es == E_TRAINABLE).sum())
        return {"kept": kept, "trainable": trainable, "frozen": kept - trainable}

    @property
    def element_density(self) -> float:
        """Kept elements over all elements."""
        return self.element_counts()["kept"] / max(1, self.shape[0] * self.shape[1])

    @property
    def block_density(self) -> float:
        """Computed blocks over all blocks."""
        rb, cb = self.grid
        return self.nnz_blocks / max(1, rb * cb)

    @property
    def trainable_block_fraction(self) -> float:
        """Trainable blocks over all blocks (the share of dW the kernels compute)."""
        rb, cb = self.grid
        return self.n_train / max(1, rb * cb)

    def flops(self, tokens: int) -> dict[str, dict[str, int]]:
        """Multiply-add FLOPs (2 per MAC) of one layer pass over ``tokens`` rows.

        Returns ``{"forward"|"input_grad"|"weight_grad": {"dense", "element", "block"}}``:
        ``dense`` is ``W`` dense; ``element`` counts kept (trainable for dW)
        elements, the figure papers report; ``block`` counts the in-matrix
        elements of the blocks the kernels compute.
        """
        n, k = self.shape
        area = self._valid_area()
        counts = self.element_counts()
        dense = 2 * tokens * n * k
        blk_all = 2 * tokens * int(area.sum())
        blk_train = 2 * tokens * int(area[self.train_index.long()].sum())
        return {
            "forward": {"dense": dense, "element": 2 * tokens * counts["kept"], "block": blk_all},
            "input_grad": {"dense": dense, "element": 2 * tokens * counts["kept"], "block": blk_all},
            "weight_grad": {"dense": dense, "element": 2 * tokens * counts["trainable"], "block": blk_train},
        }

    def summary(self) -> dict[str, float]:
        """Densities and per-pass block FLOP fractions against dense."""
        f = self.flops(1)
        return {
            "element_density": self.element_density,
            "block_density": self.block_density,
            "trainable_block_fraction": self.trainable_block_fraction,
            **{f"{p}_flop_fraction": v["block"] / max(1, v["dense"]) for p, v in f.items()},
        }

    def __repr__(self) -> str:
        return (
            f"BlockLayout(shape={self.shape}, block_size={self.block_size}, "
            f"blocks={self.nnz_blocks}/{self.grid[0] * self.grid[1]}, trainable={self.n_train}, "
            f"mixed={self.n_mixed}, device={self.device})"
        )

    # ------------------------------------------------ dense <-> block values
    def dense_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the element ``(mask, frozen_mask)`` as dense ``(N, K)`` bool tensors."""
        state = self._scatter_codes()
        return state > 0, state == E_FROZEN

    def _scatter_codes(self) -> torch.Tensor:
        (n, k), (bm, bk) = self.shape, self.block_size
        rb, cb = self.grid
        # Uniform blocks map code -> element state directly (1 -> frozen, 2 -> trainable).
        uniform = torch.where(self.block_code == MIXED, 0, self.block_code).to(torch.int8)
        full = uniform[:, None, :, None].expand(rb, bm, cb, bk).contiguous()
        mixed = (self.block_code == MIXED).nonzero()
        full[mixed[:, 0], :, mixed[:, 1], :] = self.element_state
        return full.view(rb * bm, cb * bk)[:n, :k]

    def gather_blocks(self, dense: torch.Tensor) -> torch.Tensor:
        """Blocks of a dense ``(N, K)`` tensor at the computed positions, ``(nnzb, bm, bk)``."""
        bm, bk = self.block_size
        view = _block_view(dense, bm, bk)
        return view[self.row_indices.long(), :, self.col_indices.long(), :]

    def scatter_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`gather_blocks`: a dense ``(N, K)`` tensor, zero off the blocks."""
        (n, k), (bm, bk) = self.shape, self.block_size
        rb, cb = self.grid
        out = blocks.new_zeros(rb, bm, cb, bk)
        out[self.row_indices.long(), :, self.col_indices.long(), :] = blocks
        return out.view(rb * bm, cb * bk)[:n, :k]

    def split_values(self, dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Split a dense weight into ``(w_train, w_frozen)`` stores for this layout.

        Pruned elements are dropped, so the stores hold exactly the effective
        weight ``dense * mask``.
        """
        if tuple(dense.shape) != self.shape:
            raise ValueError(f"weight has shape {tuple(dense.shape)}, layout expects {self.shape}")
        blocks = self.gather_blocks(dense)
        mixed_pos = (self.block_code[self.block_code > 0] == MIXED).nonzero().squeeze(1)
        es = self.element_state
        w_train = blocks[self.train_index.long()].clone()
        train_aux = self.aux[self.train_index.long()].long()
        has = train_aux >= 0
        if has.any():
            w_train[has] = torch.where(es[train_aux[has]] == E_TRAINABLE, w_train[has], 0)
        frozen_pos = (self.block_code[self.block_code > 0] == FROZEN).nonzero().squeeze(1)
        fixed = torch.where(es == E_FROZEN, blocks[mixed_pos], 0)
        w_frozen = torch.cat([blocks[frozen_pos], fixed])
        return w_train, w_frozen

    def merge_values(self, w_train: torch.Tensor, w_frozen: torch.Tensor) -> torch.Tensor:
        """Effective blocks ``(nnzb, bm, bk)`` from the two stores."""
        vals = effective_blocks(w_train, w_frozen, self.storage, self.aux, self.element_state, self.n_frozen)
        return vals.clone() if vals is w_train else vals

    def to_dense(self, w_train: torch.Tensor, w_frozen: torch.Tensor) -> torch.Tensor:
        """The effective dense weight ``(N, K)`` (``W * mask``)."""
        return self.scatter_blocks(self.merge_values(w_train, w_frozen))
