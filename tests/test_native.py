"""The native CPU kernels (``kernels/native``) and the CPU path's choice between its implementations.

The native kernels run fp32 on the CPU. Each pass is compared with a float64
reference on odd shapes, every block size, densities 0 to 1 and every sort of
block; outputs are pre-filled with NaN, so an element a kernel forgets to write
fails. The gathered (torch-level) path runs the same fp32 cases, because it is
what a machine without a C++ compiler gets.
"""

import itertools
import warnings

import pytest
import torch

from sparsekern.kernels import bsmm_cpu, native
from sparsekern.kernels.meta import Meta
from sparsekern.layout import BlockLayout
from sparsekern.testing import assert_close, random_block_mask, reference_grads, reference_linear

NAN = float("nan")
BLOCK_SIZES = [16, 32, 64, 128, (16, 64), (128, 32), (32, 16)]
DENSITIES = [0.0, 0.1, 0.5, 1.0]
KINDS = ["block", "unstructured", "mixed"]
SHAPES = [(37, 100, 70), (130, 33, 129), (5, 64, 48), (300, 130, 96)]  # (M, N, K): tokens, out, in


@pytest.fixture(params=["native", "gathered"])
def impl(request, monkeypatch):
    """Route fp32 CPU calls to the native kernels or to the torch-level gathered path.

    The dense crossover is lifted so that every density below 1 takes the
    chosen implementation (density 1 still runs dense, like every full layout).
    """
    monkeypatch.setattr(bsmm_cpu, "NATIVE_CROSSOVER", dict.fromkeys((16, 32, 64, 128), 0.99))
    monkeypatch.setattr(bsmm_cpu, "DENSE_CROSSOVER", dict.fromkeys((16, 32, 64, 128), 0.99))
    if request.param == "native":
        if not native.available():
            pytest.skip(f"native kernels unavailable here: {native._error}")
    else:
        monkeypatch.setenv("SPARSEKERN_NATIVE", "0")
    return request.param


def make_masks(shape, bs, density, kind):
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
    def __init__(self, m, n, k, bs, density=0.5, kind="mixed", mask=None, frozen=None):
        if mask is None:
            mask, frozen = make_masks((n, k), bs, density, kind)
        self.m, self.n, self.k = m, n, k
        self.mask, self.frozen = mask, frozen
        self.lay = BlockLayout.from_masks(mask, frozen, bs)
        self.meta = Meta(*self.lay.meta())
        self.w = torch.randn(n, k)
        self.wt, self.wf = self.lay.split_values(self.w)
        self.x, self.dy, self.bias = torch.randn(m, k), torch.randn(m, n), torch.randn(n)

    def forward(self, bias=True):
        return bsmm_cpu.forward(self.x, self.wt, self.wf, self.bias if bias else None, self.meta, self.n,
                                self.lay.n_frozen)  # fmt: skip

    def input_grad(self):
        return bsmm_cpu.input_grad(self.dy, self.wt, self.wf, self.meta, self.k, self.lay.n_frozen)

    def weight_grad(self):
        return bsmm_cpu.weight_grad(self.dy, self.x, self.meta, self.lay.block_size)

    def ref(self):
        return reference_grads(self.x, self.w, self.mask, self.frozen, self.dy, self.bias)

    def dw_blocks(self, dw_dense):
        bm, bk = self.lay.block_size
        rb, cb = self.lay.grid
        padded = torch.zeros(rb * bm, cb * bk, dtype=dw_dense.dtype)
        padded[: self.n, : self.k] = dw_dense
        t = self.lay.train_index.long()
        rows, cols = self.lay.row_indices.long()[t], self.lay.col_indices.long()[t]
        return padded.view(rb, bm, cb, bk)[rows, :, cols, :]


CASES = [
    pytest.param(shape, bs, d, kind, id=f"{shape[0]}x{shape[1]}x{shape[2]}-b{bs}-d{d}-{kind}")
    for i, (bs, d) in enumerate(itertools.product(BLOCK_SIZES, DENSITIES))
    for shape, kind in [(SHAPES[i % 4], KINDS[i % 3])]
]


@pytest.mark.parametrize("shape, bs, density, kind", CASES)
def test_all_passes_match_float64(impl, shape, bs, density, kind):
    p = Problem(*shape, bs, density, kind)
    rb, cb = p.lay.grid
    assert bsmm_cpu.path(p.meta) == ("dense" if p.lay.nnz_blocks > 0.99 * rb * cb else impl)
    dx_ref, dw_ref, _ = p.ref()
    assert_close(p.forward(), reference_linear(p.x, p.w, p.mask, p.bias), torch.float32, p.k, "y")
    assert_close(p.forward(bias=False), reference_linear(p.x, p.w, p.mask), torch.float32, p.k, "y (no bias)")
    assert_close(p.input_grad(), dx_ref, torch.float32, p.n, "dx")
    assert_close(p.weight_grad(), p.dw_blocks(dw_ref), torch.float32, p.m, "dw")


def test_cases_cover_every_block_kind():
    codes = set()
    for c in CASES:
        shape, bs, density, kind = c.values
        codes |= set(Problem(*shape, bs, density, kind).lay.block_code.unique().tolist())
    assert codes == {0, 1, 2, 3}


@pytest.mark.parametrize("m", [0, 1, 7, 600])  # 600: more than two token chunks of the weight gradient
def test_token_counts(impl, m):
    p = Problem(m, 96, 80, 32, 0.5, "mixed")
    dx_ref, dw_ref, _ = p.ref()
    assert_close(p.forward(), reference_linear(p.x, p.w, p.mask, p.bias), torch.float32, p.k, "y")
    assert_close(p.input_grad(), dx_ref, torch.float32, p.n, "dx")
    assert_close(p.weight_grad(), p.dw_blocks(dw_ref), torch.float32, max(m, 1), "dw")


@pytest.mark.parametrize("view", ["transposed", "row-strided"])
def test_noncontiguous_operands(impl, view):
    p = Problem(37, 96, 64, (32, 16), 0.5, "mixed")
    if view == "transposed":
        p.x, p.dy = p.x.t().contiguous().t(), p.dy.t().contiguous().t()
    else:
        p.x = torch.randn(p.m, p.k + 11)[:, 3 : 3 + p.k]
        p.dy = torch.randn(2 * p.m, p.n + 5)[::2, 2 : 2 + p.n]
    assert not p.x.is_contiguous() and not p.dy.is_contiguous()
    dx_ref, dw_ref, _ = p.ref()
    assert_close(p.forward(), reference_linear(p.x, p.w, p.mask, p.bias), torch.float32, p.k, "y")
    assert_close(p.input_grad(), dx_ref, torch.float32, p.n, "dx")
    assert_close(p.weight_grad(), p.dw_blocks(dw_ref), torch.float32, p.m, "dw")


# ------------------------------------------------------------ the raw kernels
def _native_or_skip():
    if not native.available():
        pytest.skip(f"native kernels unavailable here: {native._error}")


@pytest.mark.parametrize("bs", [16, 32, 64, (128, 32)])
def test_every_output_element_is_written(bs):
    """NaN-filled ``out`` buffers, including a row-strided one: no element is left unwritten."""
    _native_or_skip()
    p = Problem(53, 70, 90, bs, 0.4, "block")
    vals = bsmm_cpu.effective_blocks(p.wt, p.wf, p.meta.storage, p.meta.aux, p.meta.element_state, p.lay.n_frozen)
    y = torch.full((p.m, p.n + 3), NAN)[:, 1 : 1 + p.n]
    native.group_mm(p.x, vals.transpose(1, 2).contiguous(), p.meta.row_offsets, p.meta.col_indices, None, p.bias,
                    p.n, out=y)  # fmt: skip
    assert_close(y, reference_linear(p.x, p.w, p.mask, p.bias), torch.float32, p.k, "y")
    dx = torch.full((p.m, p.k), NAN)
    native.group_mm(p.dy, vals, p.meta.col_offsets, p.meta.row_indices_t, p.meta.block_index_t, None, p.k, out=dx)
    dx_ref, dw_ref, _ = p.ref()
    assert_close(dx, dx_ref, torch.float32, p.n, "dx")
    t = p.meta.train_index.long()
    dw = torch.full((t.numel(), *p.lay.block_size), NAN)
    native.sampled_mm(p.dy, p.x, p.meta.row_indices[t], p.meta.col_indices[t], *p.lay.block_size, out=dw)
    assert_close(dw, p.dw_blocks(dw_ref), torch.float32, p.m, "dw")


def test_out_of_the_wrong_shape_is_refused():
    _native_or_skip()
    p = Problem(8, 32, 32, 16, 0.5, "block")
    with pytest.raises(ValueError, match="out must be"):
        native.group_mm(p.x, p.wt.transpose(1, 2).contiguous(), p.meta.row_offsets, p.meta.col_indices, None,
                        None, p.n, out=torch.empty(8, 31))  # fmt: skip


# ----------------------------------------------------------------- skip proofs
def test_pruned_operands_never_reach_the_result(impl):
    """NaN where wholly pruned blocks would read x (forward), dy (input gradient) or
    non-trainable regions (weight gradient) stays out of every result."""
    n, k, bs = 64, 96, 16  # 4 x 6 blocks
    mask, frozen = make_masks((n, k), bs, 0.6, "mixed")
    mask[:, 16:32] = False  # block column 1: pruned
    mask[48:64] = False  # block row 3: pruned
    frozen &= mask
    frozen[:, 64:80] = mask[:, 64:80]  # block column 4: frozen only
    p = Problem(37, n, k, bs, mask=mask, frozen=frozen)
    assert bsmm_cpu.path(p.meta) == impl
    y_ref = reference_linear(p.x, p.w, p.mask, p.bias)
    dx_ref, dw_ref, _ = p.ref()
    x, dy = p.x.clone(), p.dy.clone()
    p.x[:, 16:32] = NAN
    assert_close(p.forward(), y_ref, torch.float32, k, "y with NaN in pruned columns of x")
    p.x = x
    p.dy[:, 48:64] = NAN
    assert_close(p.input_grad(), dx_ref, torch.float32, n, "dx with NaN in pruned rows of dy")
    p.dy = dy
    p.dy[:, 48:64] = NAN
    p.x[:, 16:32] = NAN
    p.x[:, 64:80] = NAN
    assert_close(p.weight_grad(), p.dw_blocks(dw_ref), torch.float32, p.m, "dw with NaN in non-trainable regions")


# -------------------------------------------------------------------- routing
def test_routing_by_dtype_and_switch(monkeypatch):
    _native_or_skip()
    p = Problem(8, 64, 64, 16, 0.3, "block")
    assert bsmm_cpu.path(p.meta, torch.float32) == "native"
    assert bsmm_cpu.path(p.meta, torch.bfloat16) == "gathered"
    assert not bsmm_cpu.transposed_output(p.meta, 8, torch.float32)
    assert bsmm_cpu.transposed_output(p.meta, 8, torch.float16)
    monkeypatch.setenv("SPARSEKERN_NATIVE", "0")
    assert bsmm_cpu.path(p.meta, torch.float32) == "gathered"


def test_a_failed_build_warns_once_and_falls_back(monkeypatch, tmp_path):
    """No compiler (or a broken one): one warning naming the reason, then correct results from the gathered path."""
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setenv("SPARSEKERN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(native, "_compiler", lambda: None)
    p = Problem(9, 40, 50, 16, 0.3, "mixed")
    with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable .*no C\\+\\+ compiler"):
        assert bsmm_cpu.path(p.meta) == "gathered"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = p.forward()  # no second warning
    assert_close(y, reference_linear(p.x, p.w, p.mask, p.bias), torch.float32, p.k, "y")


def test_build_from_scratch_and_release(monkeypatch, tmp_path):
    """A fresh cache builds the library (a failing compile would raise through the warning
    above); the workspace can be released and is rebuilt on the next call."""
    if native._compiler() is None:
        pytest.skip("no C++ compiler here")
    monkeypatch.setattr(native, "_lib", None)
    monkeypatch.setattr(native, "_error", None)
    monkeypatch.setenv("SPARSEKERN_CACHE_DIR", str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.available()
    assert len(list(tmp_path.glob("bsmm-*.so"))) == 1
    p = Problem(20, 64, 64, 32, 0.5, "block")
    native.release_workspace()
    assert_close(p.forward(), reference_linear(p.x, p.w, p.mask, p.bias), torch.float32, p.k, "y after release")


def test_wrappers_refuse_what_the_kernels_would_misread():
    """The kernels trust raw pointers, so the wrappers check dtypes, index types and row counts."""
    _native_or_skip()
    p = Problem(8, 32, 32, 16, 0.5, "block")
    wt = p.wt.transpose(1, 2).contiguous()
    ro, ci = p.meta.row_offsets, p.meta.col_indices
    with pytest.raises(ValueError, match="a must be a float32"):
        native.group_mm(p.x.double(), wt, ro, ci, None, None, p.n)
    with pytest.raises(ValueError, match="idx must be a contiguous int32"):
        native.group_mm(p.x, wt, ro, ci.long(), None, None, p.n)
    with pytest.raises(ValueError, match="out_cols 40 exceeds"):
        native.group_mm(p.x, wt, ro, ci, None, None, 40)
    with pytest.raises(ValueError, match="bias has 31 < 32"):
        native.group_mm(p.x, wt, ro, ci, None, p.bias[:31], p.n)
    t = p.meta.train_index.long()
    rows, cols = p.meta.row_indices[t], p.meta.col_indices[t]
    with pytest.raises(ValueError, match="dy has 8 rows but x has 7"):
        native.sampled_mm(p.dy, p.x[:7], rows, cols, 16, 16)
