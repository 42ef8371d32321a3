"""The native CPU conv kernels (``kernels/native/bsconv.cpp``) called directly, beyond ``test_conv.py``.

``test_conv.py`` runs every conv case through ``sparse_conv2d`` on the native kernels and on the
torch-level paths (``conv_impl``). Here the raw entry points (``native.conv_forward``,
``native.conv_backward``) write into NaN-filled outputs, so an element they forget fails, on
geometries chosen to stress the implicit im2col: strides that do not divide, dilation, asymmetric
padding, 1x1 and 7x7 kernels, input memory formats, block sides 16 to 64 and uneven channel counts;
plus bf16, one against two threads (identical bits), and the strides the op promises to
``torch.compile`` with and without the native build.
"""

import pytest
import torch

from sparsekern import convview
from sparsekern.kernels import bsconv_cpu, bsmm_cpu, native
from sparsekern.kernels.meta import Meta
from sparsekern.kernels.store import effective_blocks
from sparsekern.layout import BlockLayout
from sparsekern.testing import assert_close, reference_conv2d, reference_conv_grads

NAN = float("nan")
F32, BF16 = torch.float32, torch.bfloat16


@pytest.fixture(autouse=True)
def _native(native_only):
    """Skip where the native kernels cannot be built (``native_only`` in conftest.py)."""


class Case:
    """A random conv problem in the matrix view: a layout of ``density`` (blocks kept, some elements
    thinned and frozen inside kept blocks), the effective weight, and the geometry."""

    def __init__(self, n, cin, cout, hw, k, bs, density, stride=1, padding=0, dilation=1, dtype=F32):
        kh, kw = (k, k) if isinstance(k, int) else k
        self.shape = (cout, cin, kh, kw)
        self.bm, self.bk = (bs, bs) if isinstance(bs, int) else bs
        rows, cols = convview.matrix_shape(self.shape, self.bk)
        rb, cb = -(-rows // self.bm), -(-cols // self.bk)
        keep = torch.rand(rb, cb) < density
        full = keep.repeat_interleave(self.bm, 0).repeat_interleave(self.bk, 1)[:rows, :cols]
        valid = convview.to_matrix(torch.ones(self.shape, dtype=torch.bool), self.bk, False)
        mask = full & valid & (torch.rand(rows, cols) < 0.9)
        self.w = torch.randn(self.shape)
        self.set_masks(
            convview.from_matrix(mask, cin, kh, kw),
            convview.from_matrix(mask, cin, kh, kw) & (torch.rand(self.shape) < 0.3),
        )
        h, w = (hw, hw) if isinstance(hw, int) else hw
        self.x = torch.randn(n, cin, h, w).to(dtype)
        self.conv = {"stride": stride, "padding": padding, "dilation": dilation}
        self.g = convview.conv_geometry(self.x.shape, self.shape, bk=self.bk, **self.conv)
        self.dy = torch.randn(n, cout, self.g.h_out, self.g.w_out).to(dtype)
        self.dtype = dtype

    def set_masks(self, mask4, frozen4):
        """The layout of weight-shaped ``mask4``/``frozen4``, its index bundle and effective blocks."""
        self.mask4, self.frozen4 = mask4, frozen4
        to_m = lambda t: convview.to_matrix(t, self.bk, False)  # noqa: E731
        self.lay = BlockLayout.from_masks(to_m(mask4), to_m(frozen4), (self.bm, self.bk))
        self.meta = m = Meta(*self.lay.meta())
        w_train, w_frozen = self.lay.split_values(convview.to_matrix(self.w, self.bk))
        self.vals = effective_blocks(w_train, w_frozen, m.storage, m.aux, m.element_state, self.lay.n_frozen)

    def forward(self, x=None, bias=None):
        x = self.x if x is None else x
        g = self.g
        y = torch.full((g.n, g.c_out, g.h_out, g.w_out), NAN, dtype=x.dtype).contiguous(
            memory_format=torch.channels_last
        )
        wt = self.vals.float().contiguous()  # as stored: the kernel reads them transposed
        return native.conv_forward(x, list(g), wt, self.meta.row_offsets, self.meta.col_indices, bias, y)

    def backward(self, dx_format=torch.channels_last, dy=None, x=None):
        g, m = self.g, self.meta
        tidx = m.train_index.long()
        dx = torch.full((g.n, g.c_in, g.h, g.w), NAN, dtype=self.dtype).contiguous(memory_format=dx_format)
        dw = torch.full((tidx.numel(), self.bm, self.bk), NAN)
        native.conv_backward(
            self.dy if dy is None else dy, self.x if x is None else x, list(g), self.vals.float().contiguous(),
            m.col_offsets, m.row_indices_t, m.block_index_t, dx,
            m.row_indices[tidx].contiguous(), m.col_indices[tidx].contiguous(), dw,
        )  # fmt: skip
        return dx, dw

    def dense_dw(self, dw):
        """The trainable blocks' gradient as a dense weight-shaped tensor, non-trainable elements zeroed
        as ``bsconv_cpu.backward`` does."""
        dw = bsmm_cpu.mask_mixed_grad_(dw.clone(), self.meta)
        dense = self.lay.to_dense(dw, torch.zeros(self.lay.n_frozen, self.bm, self.bk))
        return convview.from_matrix(dense, self.shape[1], self.shape[2], self.shape[3])


GEOMETRIES = [
    pytest.param((2, 20, 33, 9, 3, 16, 0.5, 1, 1, 1), id="3x3-p1"),
    pytest.param((3, 48, 40, (7, 10), 3, 16, 0.6, (2, 3), (0, 2), 1), id="3x3-s23-p02"),
    pytest.param((2, 33, 64, 11, 3, 32, 0.5, 1, 2, 2), id="3x3-d2-p2-b32"),
    pytest.param((2, 70, 36, 8, 1, (16, 32), 0.7, 2, 0, 1), id="1x1-s2-b16x32"),
    pytest.param((1, 3, 64, 23, 7, (32, 16), 0.8, 2, 3, 1), id="7x7-s2-stem"),
    pytest.param((2, 64, 128, 6, (1, 3), 64, 0.6, 1, (0, 1), 1), id="1x3-b64"),
    pytest.param((2, 16, 16, 5, 3, 16, 0.0, 1, 1, 1), id="empty"),
    pytest.param((2, 32, 32, 5, 3, 16, 1.0, 1, 1, 1), id="full"),
]


def _case(params, dtype=F32):
    n, cin, cout, hw, k, bs, d, stride, padding, dilation = params
    return Case(n, cin, cout, hw, k, bs, d, stride, padding, dilation, dtype)


@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
@pytest.mark.parametrize("params", GEOMETRIES)
def test_raw_kernels_match_float64(params, fmt):
    c = _case(params)
    x = c.x if fmt == "nchw" else c.x.contiguous(memory_format=torch.channels_last)
    cout, cin, kh, kw = c.shape
    bias = torch.randn(cout)
    y = c.forward(x, bias)
    assert_close(y, reference_conv2d(c.x, c.w, c.mask4, bias, **c.conv), F32, cin * kh * kw, "y")
    dx, dw = c.backward(torch.channels_last if fmt == "channels_last" else torch.contiguous_format, x=x)
    dxr, dwr, _ = reference_conv_grads(c.x, c.w, c.mask4, c.frozen4, c.dy, None, **c.conv)
    assert_close(dx, dxr, F32, cout * kh * kw, "dx")
    assert_close(c.dense_dw(dw), dwr, F32, c.dy.numel() // cout, "dw")


def test_bf16_matches_float64():
    c = _case((2, 40, 48, 9, 3, 16, 0.5, 2, 1, 1), BF16)
    cout, cin, kh, kw = c.shape
    y = c.forward()
    assert y.dtype == BF16
    assert_close(y, reference_conv2d(c.x, c.w, c.mask4, None, **c.conv), BF16, cin * kh * kw, "y")
    dx, dw = c.backward()
    dxr, dwr, _ = reference_conv_grads(c.x, c.w, c.mask4, c.frozen4, c.dy, None, **c.conv)
    assert_close(dx, dxr, BF16, cout * kh * kw, "dx")
    assert_close(c.dense_dw(dw), dwr, BF16, c.dy.numel() // cout, "dw")


def test_nan_in_pruned_operands_never_reaches_the_results():
    """NaN in the input channels no computed block reads, and in dy of empty block rows."""
    c = _case((2, 48, 48, 8, 3, 16, 0.0, 1, 1, 1))
    mask = torch.zeros(c.shape, dtype=torch.bool)
    mask[16:32, 16:32] = torch.rand(16, 16, 3, 3) < 0.9  # block row 1, channel block 1 only
    c.set_masks(mask, torch.zeros_like(mask))
    x, dy = c.x.clone(), c.dy.clone()
    x[:, :16], x[:, 32:] = NAN, NAN
    dy[:, :16], dy[:, 32:] = NAN, NAN
    clean_x, clean_dy = torch.nan_to_num(x, nan=0.0), torch.nan_to_num(dy, nan=0.0)
    y = c.forward(x)
    assert_close(y, reference_conv2d(clean_x, c.w, mask, None, padding=1), F32, 48 * 9, "y")
    dx, dw = c.backward(dy=dy, x=x)
    dxr, dwr, _ = reference_conv_grads(clean_x, c.w, mask, None, clean_dy, None, padding=1)
    assert_close(dx, dxr, F32, 48 * 9, "dx")
    assert_close(c.dense_dw(dw), dwr, F32, dy.numel() // 48, "dw")


def test_one_and_two_threads_give_identical_bits():
    c = _case((2, 40, 48, 9, 3, 16, 0.6, 1, 1, 1))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (c.forward(), *c.backward())
        torch.set_num_threads(2)
        two = (c.forward(), *c.backward())
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_bad_operands_are_errors_that_name_them():
    c = _case((2, 20, 33, 9, 3, 16, 0.5, 1, 1, 1))
    g, m = c.g, c.meta
    wt = c.vals.float().contiguous()
    nchw_y = torch.empty(g.n, g.c_out, g.h_out, g.w_out)
    with pytest.raises(ValueError, match="channels_last"):
        native.conv_forward(c.x, list(g), wt, m.row_offsets, m.col_indices, None, nchw_y)
    y = nchw_y.contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="x has shape"):
        native.conv_forward(c.x[:1], list(g), wt, m.row_offsets, m.col_indices, None, y)
    with pytest.raises(ValueError, match="cols holds indices"):
        native.conv_forward(c.x, list(g), wt, m.row_offsets, m.col_indices + 1000, None, y)
    # sel_t indexes the blocks the kernel repacks, exactly the layout's: a longer vals would be misread.
    longer = torch.cat([torch.zeros_like(wt), wt]).contiguous()
    with pytest.raises(ValueError, match="vals holds .* blocks, the layout"):
        native.conv_backward(
            c.dy, c.x, list(g), longer, m.col_offsets, m.row_indices_t, (m.block_index_t + wt.shape[0]).contiguous(),
            torch.empty_like(c.x), None, None, None,
        )  # fmt: skip
    with pytest.raises(ValueError, match="share one dtype"):
        native.conv_backward(
            c.dy.bfloat16(), c.x, list(g), c.vals.float().contiguous(), m.col_offsets, m.row_indices_t,
            m.block_index_t, None, None, None, None,
        )  # fmt: skip


@pytest.mark.parametrize("fmt", ["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [F32, BF16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("stride", [1, 2])
def test_promised_strides_hold_with_and_without_the_native_build(monkeypatch, dtype, stride, fmt):
    """``output_view`` (what ``torch.compile`` is told) matches what ``forward``/``backward`` return,
    on the native kernels and on the torch-level paths a machine without a compiler runs; on the
    block paths ``dx`` has ``x``'s memory format (autograd would otherwise copy it into ``x``'s)."""
    for name in ("DENSE_CROSSOVER", "NATIVE_CROSSOVER", "NATIVE_CROSSOVER_1X1"):
        monkeypatch.setattr(bsconv_cpu, name, dict.fromkeys((16, 32, 64, 128), 1.3))
    torch.manual_seed(1)  # a partial layout (a full one runs dense whatever the crossover)
    c = _case((2, 20, 33, 9, 3, 16, 0.5, stride, 1, 1), dtype)
    assert 0 < c.lay.nnz_blocks < c.lay.grid[0] * c.lay.grid[1]
    if fmt == "channels_last":
        c.x = c.x.contiguous(memory_format=torch.channels_last)
    w_train, w_frozen = c.lay.split_values(convview.to_matrix(c.w, 16))
    w_train, w_frozen = w_train.to(dtype), w_frozen.to(dtype)
    dx_ref = reference_conv_grads(c.x, c.w, c.mask4, c.frozen4, c.dy, None, **c.conv)[0]
    seen = []
    for enabled in ("1", "0"):
        monkeypatch.setenv("SPARSEKERN_NATIVE", enabled)
        y = bsconv_cpu.forward(c.x, w_train, w_frozen, None, c.meta, c.g, c.lay.n_frozen)
        dx, _ = bsconv_cpu.backward(c.dy, c.x, w_train, w_frozen, c.meta, c.g, c.lay.n_frozen, True, True)
        assert y.stride() == bsconv_cpu.output_view(c.x, c.g, c.meta, "forward").stride()
        assert dx.stride() == bsconv_cpu.output_view(c.x, c.g, c.meta, "input_grad").stride()
        if dtype != torch.float16:
            assert dx.stride() == c.x.stride()
            assert_close(dx, dx_ref, dtype, 33 * 9, "dx")
        seen.append(bsconv_cpu.path(c.meta, c.g, dtype))
    if dtype == torch.float16:
        assert seen[0] == seen[1] != "native"  # fp16 never takes the native kernels
    else:
        assert seen[0] == "native" and seen[1] in ("plane", "gather")


def test_one_by_one_convs_have_their_own_crossover(monkeypatch):
    """A 1x1 conv leaves the native kernels for dense at a lower density than a 3x3 one (oneDNN runs
    1x1 convs as plain GEMMs near peak): the same block density routes differently by kernel size."""
    monkeypatch.setattr(bsconv_cpu, "NATIVE_CROSSOVER", dict.fromkeys((16, 32, 64, 128), 0.8))
    monkeypatch.setattr(bsconv_cpu, "NATIVE_CROSSOVER_1X1", dict.fromkeys((16, 32, 64, 128), 0.6))
    routes = {}
    for k in (1, 3):
        torch.manual_seed(0)
        c = _case((2, 128, 128, 4, k, 16, 0.7, 1, k // 2, 1))
        assert 0.6 < c.lay.nnz_blocks / (c.lay.grid[0] * c.lay.grid[1]) < 0.8
        routes[k] = bsconv_cpu.path(c.meta, c.g, F32)
    assert routes == {1: "dense", 3: "native"}
