"""Problems for the CPU path's tests (``test_native.py``, ``test_native_edges.py``): a layout, its
value stores and random operands, with the passes run through ``kernels.bsmm_cpu``."""

import torch

from sparsekern.kernels import bsmm_cpu
from sparsekern.kernels.meta import Meta
from sparsekern.layout import BlockLayout
from sparsekern.testing import assert_close, random_block_mask, reference_grads, reference_linear

NAN = float("nan")


def make_masks(shape, bs, density, kind):
    """``(mask, frozen_mask or None)``; ``mixed`` gives trainable, frozen and partly pruned blocks."""
    if kind == "unstructured":
        return torch.rand(shape) < density, None
    mask = random_block_mask(shape, bs, density)
    if kind == "block":
        return mask, None
    thin, frz = random_block_mask(shape, bs, 0.5), random_block_mask(shape, bs, 0.5)
    r = torch.rand(shape)
    mask &= ~(thin & (r < 0.25))
    return mask, mask & frz & (~thin | (r > 0.7))


class Problem:
    """Operands in ``dtype`` (fp32 unless told); references are float64 of the same values."""

    def __init__(self, m, n, k, bs, density=0.5, kind="mixed", mask=None, frozen=None, dtype=torch.float32):
        if mask is None:
            mask, frozen = make_masks((n, k), bs, density, kind)
        self.m, self.n, self.k, self.dtype = m, n, k, dtype
        self.mask, self.frozen = mask, frozen
        self.lay = BlockLayout.from_masks(mask, frozen, bs)
        self.meta = Meta(*self.lay.meta())
        self.w = torch.randn(n, k).to(dtype)
        self.wt, self.wf = self.lay.split_values(self.w)
        self.x, self.dy, self.bias = (torch.randn(*s).to(dtype) for s in ((m, k), (m, n), (n,)))

    def forward(self, bias=True):
        b = self.bias if bias else None
        return bsmm_cpu.forward(self.x, self.wt, self.wf, b, self.meta, self.n, self.lay.n_frozen)

    def input_grad(self):
        return bsmm_cpu.input_grad(self.dy, self.wt, self.wf, self.meta, self.k, self.lay.n_frozen)

    def weight_grad(self):
        return bsmm_cpu.weight_grad(self.dy, self.x, self.meta, self.lay.block_size)

    def ref(self):
        return reference_grads(self.x, self.w, self.mask, self.frozen, self.dy, self.bias)

    def dw_blocks(self, dw_dense):
        """A dense ``(N, K)`` gradient as the trainable blocks, in ``weight_grad``'s order."""
        bm, bk = self.lay.block_size
        rb, cb = self.lay.grid
        padded = torch.zeros(rb * bm, cb * bk, dtype=dw_dense.dtype)
        padded[: self.n, : self.k] = dw_dense
        t = self.lay.train_index.long()
        rows, cols = self.lay.row_indices.long()[t], self.lay.col_indices.long()[t]
        return padded.view(rb, bm, cb, bk)[rows, :, cols, :]

    def check_all(self):
        """Every pass, with and without bias, against the float64 references."""
        dx_ref, dw_ref, _ = self.ref()
        y_ref = reference_linear(self.x, self.w, self.mask, self.bias)
        for got, name in ((self.forward(), "y"), (self.input_grad(), "dx"), (self.weight_grad(), "dw")):
            assert got.dtype == self.dtype, f"{name} is {got.dtype}, operands are {self.dtype}"
        assert_close(self.forward(), y_ref, self.dtype, self.k, "y")
        y0 = reference_linear(self.x, self.w, self.mask)
        assert_close(self.forward(bias=False), y0, self.dtype, self.k, "y (no bias)")
        assert_close(self.input_grad(), dx_ref, self.dtype, self.n, "dx")
        assert_close(self.weight_grad(), self.dw_blocks(dw_ref), self.dtype, max(self.m, 1), "dw")
