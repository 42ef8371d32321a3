"""The native CPU kernels (``kernels/native``) and the CPU path's choice between its implementations.

The native kernels take fp32 and bf16 activations on the CPU. Each pass is
compared with a float64 reference on odd shapes, every block size, densities
0 to 1 and every sort of block; the raw kernels write into NaN-filled outputs,
so an element they forget fails. The gathered (torch-level) path runs the same
cases (``cpu_impl``), because it is what a machine without a C++ compiler gets.
Fixtures ``native_only``, ``cpu_impl`` and ``fresh_native_build`` live in
``conftest.py``; problems in ``native_cases.py``.
"""

import itertools
import warnings

import pytest
import torch
from native_cases import NAN, Problem, make_masks

from sparsekern.kernels import bsmm_cpu, native
from sparsekern.testing import assert_close, reference_linear

F32, BF16 = torch.float32, torch.bfloat16
BLOCK_SIZES = [16, 32, 64, 128, (16, 64), (128, 32), (32, 16)]
DENSITIES = [0.0, 0.1, 0.5, 1.0]
SHAPES = [(37, 100, 70), (130, 33, 129), (5, 64, 48), (300, 130, 96)]  # (M, N, K): tokens, out, in
BIG_SHAPE = (50, 300, 290)  # 128-wide blocks need a grid of several blocks to have some to skip


def _shape(i, bs):
    return BIG_SHAPE if 128 in ((bs, bs) if isinstance(bs, int) else bs) else SHAPES[i % len(SHAPES)]


CASES = [
    pytest.param(_shape(i, bs), bs, d, kind, id=f"{'x'.join(map(str, _shape(i, bs)))}-b{bs}-d{d}-{kind}")
    for i, (bs, d) in enumerate(itertools.product(BLOCK_SIZES, DENSITIES))
    for kind in [("block", "mixed")[i % 2]]
]


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape, bs, density, kind", CASES)
def test_all_passes_match_float64(cpu_impl, shape, bs, density, kind, dtype):
    p = Problem(*shape, bs, density, kind, dtype=dtype)
    rb, cb = p.lay.grid
    full = p.lay.nnz_blocks > 0.99 * rb * cb
    assert bsmm_cpu.path(p.meta, dtype) == ("dense" if full else cpu_impl)
    p.check_all()


def test_cases_cover_every_block_kind_and_skip_blocks():
    """Guards the case list: every block code appears, and every block size has a case that
    computes some blocks and skips others."""
    codes, partial = set(), set()
    for c in CASES:
        shape, bs, density, kind = c.values
        lay = Problem(*shape, bs, density, kind).lay
        codes |= set(lay.block_code.unique().tolist())
        if 0 < lay.nnz_blocks < lay.grid[0] * lay.grid[1]:
            partial.add(bs)
    assert codes == {0, 1, 2, 3}
    assert partial == set(BLOCK_SIZES)


@pytest.mark.parametrize("m", [0, 1, 7, 600])  # 600: more than two token chunks of the weight gradient
def test_token_counts(cpu_impl, m):
    p = Problem(m, 96, 80, 32, 0.5, "mixed")
    assert bsmm_cpu.path(p.meta) == cpu_impl
    p.check_all()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("view", ["transposed", "row-strided"])
def test_noncontiguous_operands(cpu_impl, view, dtype):
    p = Problem(37, 96, 64, (32, 16), 0.5, "mixed", dtype=dtype)
    if view == "transposed":
        p.x, p.dy = p.x.t().contiguous().t(), p.dy.t().contiguous().t()
    else:
        p.x = torch.randn(p.m, p.k + 11).to(dtype)[:, 3 : 3 + p.k]
        p.dy = torch.randn(2 * p.m, p.n + 5).to(dtype)[::2, 2 : 2 + p.n]
    assert not p.x.is_contiguous() and not p.dy.is_contiguous()
    assert bsmm_cpu.path(p.meta, dtype) == cpu_impl
    p.check_all()


# ------------------------------------------------------------ the raw kernels
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("bs", [16, 32, 64, (128, 32)])
def test_every_output_element_is_written_and_no_other(native_only, bs, dtype):
    """NaN-filled ``out`` buffers, one of them inside wider rows: every element of the output is
    written, and the columns beside it stay NaN."""
    p = Problem(53, 70, 90, bs, 0.4, "block", dtype=dtype)
    vals = bsmm_cpu.effective_blocks(p.wt, p.wf, p.meta.storage, p.meta.aux, p.meta.element_state, p.lay.n_frozen)
    wide = torch.full((p.m, p.n + 3), NAN, dtype=dtype)
    y = wide[:, 1 : 1 + p.n]
    wt = vals.transpose(1, 2).float().contiguous()
    native.group_mm(p.x, wt, p.meta.row_offsets, p.meta.col_indices, None, p.bias.float(), p.n, out=y)
    assert_close(y, reference_linear(p.x, p.w, p.mask, p.bias), dtype, p.k, "y")
    assert bool(wide[:, [0, -2, -1]].isnan().all()), "the kernel wrote outside its output"
    # The stored (bm, bk) blocks read transposed (what the forward pass hands over): the same
    # repacked operand, so the same sums in the same order.
    y_t = torch.full((p.m, p.n), NAN, dtype=dtype)
    stored = vals.float().contiguous()
    native.group_mm(
        p.x, stored, p.meta.row_offsets, p.meta.col_indices, None, p.bias.float(), p.n, out=y_t, transposed=True
    )
    assert torch.equal(y_t, y)
    dx = torch.full((p.m, p.k), NAN, dtype=dtype)
    blocks = vals.float().contiguous()
    native.group_mm(p.dy, blocks, p.meta.col_offsets, p.meta.row_indices_t, p.meta.block_index_t, None, p.k, out=dx)
    dx_ref, dw_ref, _ = p.ref()
    assert_close(dx, dx_ref, dtype, p.n, "dx")
    t = p.meta.train_index.long()
    dw = torch.full((t.numel(), *p.lay.block_size), NAN)
    native.sampled_mm(p.dy, p.x, p.meta.row_indices[t], p.meta.col_indices[t], *p.lay.block_size, out=dw)
    assert_close(dw, p.dw_blocks(dw_ref), dtype, p.m, "dw")


def test_wrappers_refuse_what_the_kernels_would_misread(native_only):
    """The kernels trust raw pointers, so the wrappers check dtypes, strides, index ranges and row counts."""
    p = Problem(8, 32, 32, 16, 0.5, "block")
    wt = p.wt.transpose(1, 2).contiguous()
    ro, ci = p.meta.row_offsets, p.meta.col_indices
    with pytest.raises(ValueError, match="a must be a float32 or bfloat16"):
        native.group_mm(p.x.double(), wt, ro, ci, None, None, p.n)
    with pytest.raises(ValueError, match="idx must be a contiguous int32"):
        native.group_mm(p.x, wt, ro, ci.long(), None, None, p.n)
    with pytest.raises(ValueError, match="out_cols 40 exceeds"):
        native.group_mm(p.x, wt, ro, ci, None, None, 40)
    with pytest.raises(ValueError, match="bias has 31 < 32"):
        native.group_mm(p.x, wt, ro, ci, None, p.bias[:31], p.n)
    with pytest.raises(ValueError, match="bias must have unit stride"):
        native.group_mm(p.x, wt, ro, ci, None, torch.randn(2 * p.n)[::2], p.n)
    with pytest.raises(ValueError, match="idx holds indices outside the 2 column blocks"):
        native.group_mm(p.x, wt, ro, torch.full_like(ci, 2), None, None, p.n)
    with pytest.raises(ValueError, match="out must be"):
        native.group_mm(p.x, wt, ro, ci, None, None, p.n, out=torch.empty(8, 31))
    assert ci.numel() > 1  # without sel, more positions than blocks would read past the repacked ones
    with pytest.raises(ValueError, match=r"len\(idx\) \d+ exceeds the \d+ blocks"):
        native.group_mm(p.x, wt[:1].contiguous(), ro, ci, None, None, p.n)
    t = p.meta.train_index.long()
    rows, cols = p.meta.row_indices[t], p.meta.col_indices[t]
    with pytest.raises(ValueError, match="dy has 8 rows but x has 7"):
        native.sampled_mm(p.dy, p.x[:7], rows, cols, 16, 16)
    with pytest.raises(ValueError, match="dy is torch.bfloat16 but x is torch.float32"):
        native.sampled_mm(p.dy.bfloat16(), p.x, rows, cols, 16, 16)
    with pytest.raises(ValueError, match="rows holds indices outside the 2 block rows"):
        native.sampled_mm(p.dy, p.x, rows + 2, cols, 16, 16)


# ----------------------------------------------------------------- skip proofs
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_pruned_operands_never_reach_the_result(cpu_impl, dtype):
    """NaN where wholly pruned blocks would read x (forward), dy (input gradient) or
    non-trainable regions (weight gradient) stays out of every result."""
    n, k, bs = 64, 96, 16  # 4 x 6 blocks
    mask, frozen = make_masks((n, k), bs, 0.6, "mixed")
    mask[:, 16:32] = False  # block column 1: pruned
    mask[48:64] = False  # block row 3: pruned
    frozen &= mask
    frozen[:, 64:80] = mask[:, 64:80]  # block column 4: frozen only
    p = Problem(37, n, k, bs, mask=mask, frozen=frozen, dtype=dtype)
    assert bsmm_cpu.path(p.meta, dtype) == cpu_impl
    y_ref = reference_linear(p.x, p.w, p.mask, p.bias)
    dx_ref, dw_ref, _ = p.ref()
    x, dy = p.x.clone(), p.dy.clone()
    p.x[:, 16:32] = NAN
    assert_close(p.forward(), y_ref, dtype, k, "y with NaN in pruned columns of x")
    p.x = x
    p.dy[:, 48:64] = NAN
    assert_close(p.input_grad(), dx_ref, dtype, n, "dx with NaN in pruned rows of dy")
    p.dy = dy
    p.dy[:, 48:64] = NAN
    p.x[:, 16:32] = NAN
    p.x[:, 64:80] = NAN
    assert_close(p.weight_grad(), p.dw_blocks(dw_ref), dtype, p.m, "dw with NaN in non-trainable regions")


# -------------------------------------------------------------------- routing
def test_routing_by_dtype_and_switch(native_only, monkeypatch):
    p = Problem(8, 64, 64, 16, 0.3, "block")
    assert bsmm_cpu.path(p.meta, F32) == bsmm_cpu.path(p.meta, BF16) == "native"
    assert bsmm_cpu.path(p.meta, torch.float16) == "gathered"
    assert not bsmm_cpu.transposed_output(p.meta, 8, F32)
    assert bsmm_cpu.transposed_output(p.meta, 8, torch.float16)
    monkeypatch.setenv("SPARSEKERN_NATIVE", "0")
    assert bsmm_cpu.path(p.meta, F32) == "gathered"
    # Output strides never depend on whether the kernels are there (compiled graphs bake them in).
    assert not bsmm_cpu.transposed_output(p.meta, 8, F32)
    assert p.forward().is_contiguous() and p.input_grad().is_contiguous()


def test_a_failed_build_warns_once_and_falls_back(fresh_native_build, monkeypatch):
    """No compiler (or a broken one): one warning naming the reason, then correct results from the gathered path."""
    monkeypatch.setattr(native, "_compiler", lambda: None)
    p = Problem(9, 40, 50, 16, 0.3, "mixed")
    with pytest.warns(RuntimeWarning, match="native CPU kernels unavailable .*no C\\+\\+ compiler"):
        assert bsmm_cpu.path(p.meta) == "gathered"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = p.forward()  # no second warning
    assert_close(y, reference_linear(p.x, p.w, p.mask, p.bias), F32, p.k, "y")
    with pytest.raises(RuntimeError, match="native kernels are unavailable .*no C\\+\\+ compiler"):
        sel = torch.zeros_like(p.meta.col_indices)  # valid operands: only the missing build is wrong
        native.group_mm(p.x, p.wt, p.meta.row_offsets, p.meta.col_indices, sel, None, p.n)


def test_build_from_scratch_and_release(fresh_native_build):
    """A fresh cache builds the library without a warning; the workspaces can be released and
    are allocated again on the next call."""
    if native._compiler() is None:
        pytest.skip("no C++ compiler here")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.available()
    assert len(list(fresh_native_build.glob("bsmm-*.so"))) == 1
    p = Problem(20, 64, 64, 32, 0.5, "block")
    assert bsmm_cpu.path(p.meta) == "native"
    p.forward()
    bsmm_cpu.release_workspace()
    p.check_all()
