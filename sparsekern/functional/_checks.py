"""Operand checks shared by the functional ops: the value stores and bias against the layout and the input."""

from __future__ import annotations

import torch

from sparsekern.layout import BlockLayout


def check_layout(layout) -> None:
    if not isinstance(layout, BlockLayout):
        raise TypeError(f"layout must be a BlockLayout, got {type(layout).__name__}")


def check_stores(x: torch.Tensor, w_train, w_frozen, layout: BlockLayout, bias, n_out: int) -> None:
    """Dtypes and devices match ``x``; the stores have the layout's shapes; ``bias`` is ``(n_out,)``."""
    bm, bk = layout.block_size
    for name, t in (("w_train", w_train), ("w_frozen", w_frozen), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but input has dtype {x.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but input is on {x.device}")
    if layout.device != x.device:
        raise ValueError(f"layout is on {layout.device} but input is on {x.device}")
    if tuple(w_train.shape) != (layout.n_train, bm, bk):
        raise ValueError(f"w_train has shape {tuple(w_train.shape)}, layout expects {(layout.n_train, bm, bk)}")
    if tuple(w_frozen.shape) != (layout.n_frozen_slots, bm, bk):
        raise ValueError(
            f"w_frozen has shape {tuple(w_frozen.shape)}, layout expects {(layout.n_frozen_slots, bm, bk)}"
        )
    if bias is not None and tuple(bias.shape) != (n_out,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected ({n_out},)")
