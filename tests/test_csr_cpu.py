"""The CPU path's element-sparse route (``kernels/csr_cpu.py`` on ``kernels/native/csr.cpp``).

Every pass is compared with a float64 reference (tolerances from the dtype and the reduction
length) on odd shapes, element masks from empty to full, with frozen elements, in fp32 and bf16,
at one and two threads. The route is forced with the ``csr`` fixture (its thresholds lifted);
the shipped thresholds are checked on the masks they were measured for. The raw kernels write
into NaN-filled outputs, and NaN sits wherever a pruned element's value or operand would be read.
"""

import pytest
import torch
from native_cases import NAN, Problem

import sparsekern.kernels as sk
from sparsekern.kernels import bsmm_cpu, csr_cpu, native
from sparsekern.kernels.meta import Meta
from sparsekern.layout import BlockLayout
from sparsekern.testing import assert_close, random_block_mask, reference_grads, reference_linear

F32, BF16 = torch.float32, torch.bfloat16
# The thresholds as shipped, read before conftest's autouse fixture turns the route off for other tests.
SHIPPED = {"CSR_CROSSOVER": bsmm_cpu.CSR_CROSSOVER, "CSR_FILL": bsmm_cpu.CSR_FILL}
# (M, N, K): tokens, out, in. 65 and 130 tokens cross the kernels' 64-token tiles; K = 1100 and
# N = 1030 cross their 512-feature panels (forward and weight gradient; input gradient) and their
# 256- and 128-row work items.
SHAPES = [(37, 100, 70), (130, 33, 129), (1, 20, 1100), (65, 1030, 40)]


@pytest.fixture
def csr(native_only, monkeypatch):
    """Every layout with a kept element routed to the CSR kernels (thresholds lifted)."""
    monkeypatch.setattr(bsmm_cpu, "CSR_CROSSOVER", 1.0)
    monkeypatch.setattr(bsmm_cpu, "CSR_FILL", 1.0)


def element_masks(shape, density, frozen_share=0.3):
    """An unstructured mask and a frozen mask inside it (``frozen_share`` of the kept elements)."""
    mask = torch.rand(shape) < density
    return mask, mask & (torch.rand(shape) < frozen_share)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("density", [0.0, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("shape, bs", [(s, bs) for s, bs in zip(SHAPES, [32, (16, 64), 16, (64, 32)], strict=True)])
def test_all_passes_match_float64(csr, shape, bs, density, dtype):
    m, n, k = shape
    mask, frozen = element_masks((n, k), density)
    p = Problem(m, n, k, bs, mask=mask, frozen=frozen, dtype=dtype)
    # No kept element, no computed block: nothing for any route to do, and the block kernels keep it.
    assert bsmm_cpu.path(p.meta, dtype) == ("csr" if p.lay.nnz_blocks else "native")
    p.check_all()


@pytest.mark.parametrize("m", [0, 1, 63, 64, 65, 200])
def test_token_counts(csr, m):
    mask, frozen = element_masks((48, 80), 0.2)
    p = Problem(m, 48, 80, 16, mask=mask, frozen=frozen)
    assert bsmm_cpu.path(p.meta) == "csr"
    p.check_all()


def test_block_masks_and_every_block_kind(csr):
    """Whole trainable and frozen blocks, mixed and empty ones: the element view of any layout is exact."""
    p = Problem(37, 96, 80, 16, 0.5, "mixed")
    assert set(p.lay.block_code.unique().tolist()) == {0, 1, 2, 3}
    assert bsmm_cpu.path(p.meta) == "csr"
    p.check_all()


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_thread_counts_agree_bitwise(csr, dtype):
    """Each sum runs in one fixed order whatever the thread count: 1 and 2 threads give the same bits."""
    mask, frozen = element_masks((70, 1100), 0.1)
    p = Problem(130, 70, 1100, 32, mask=mask, frozen=frozen, dtype=dtype)
    saved = torch.get_num_threads()
    got = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got[threads] = (p.forward(), p.input_grad(), p.weight_grad())
            p.check_all()
    finally:
        torch.set_num_threads(saved)
    for a, b in zip(got[1], got[2], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_pruned_values_and_operands_never_read(csr, dtype):
    """NaN in the store wherever an element is pruned (or is not the slot's to hold), in x's columns
    that no kept element reads, in dy's rows that none reads, and in x's columns whose kept elements
    are all frozen: none of it reaches y, dx or dW."""
    n, k = 64, 96
    mask, frozen = element_masks((n, k), 0.3)
    mask[:, 10] = False  # a pruned column: x[:, 10] is never read
    mask[20] = False  # a pruned row: dy[:, 20] is never read
    frozen &= mask
    frozen[:, 40] = mask[:, 40]  # a frozen column: x[:, 40] is read by y, never by dW
    p = Problem(37, n, k, 32, mask=mask, frozen=frozen, dtype=dtype)
    y_ref = reference_linear(p.x, p.w, p.mask, p.bias)
    dx_ref, dw_ref, _ = p.ref()
    lay = p.lay
    # Poison the stores: trainable slots where the element is not trainable, fixed slots where it is
    # not frozen, and the dense weight itself where pruned (a wrong gather would pick any of these).
    es = lay.element_state
    train_aux = lay.aux[lay.train_index.long()].long()
    has = train_aux >= 0
    wt, wf = p.wt.clone(), p.wf.clone()
    wt[has] = torch.where(es[train_aux[has]] == 2, wt[has], NAN)
    fixed = wf[lay.n_frozen :]
    wf[lay.n_frozen :] = torch.where(es == 1, fixed, NAN)
    p.wt, p.wf = wt, wf
    assert_close(p.forward(), y_ref, dtype, k, "y with NaN in the stores")
    assert_close(p.input_grad(), dx_ref, dtype, n, "dx with NaN in the stores")
    x, dy = p.x.clone(), p.dy.clone()
    p.x[:, 10] = NAN
    assert_close(p.forward(), y_ref, dtype, k, "y with NaN in a pruned column of x")
    p.dy[:, 20] = NAN
    assert_close(p.input_grad(), dx_ref, dtype, n, "dx with NaN in a pruned row of dy")
    p.x[:, 40] = NAN
    assert_close(p.weight_grad(), p.dw_blocks(dw_ref), dtype, p.m, "dW with NaN in x's frozen column")
    p.x, p.dy = x, dy


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_raw_kernels_write_every_output_element_and_no_other(native_only, dtype):
    """NaN-filled outputs, one inside wider rows: every element is written and the columns beside stay
    NaN; the weight gradient's result is zero at every entry no nonzero maps to."""
    m, n, k = 70, 50, 1030
    mask = torch.rand(n, k) < 0.1
    mask[7] = False  # an empty row: its outputs are the bias alone
    w = torch.randn(n, k).to(dtype)
    ptr = torch.cat([torch.zeros(1, dtype=torch.int64), mask.sum(1).cumsum(0)]).int()
    idx = mask.nonzero()[:, 1].int()
    vals = w.float()[mask]
    x, dy, bias = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype), torch.randn(n)
    wide = torch.full((m, n + 3), NAN, dtype=dtype)
    native.csr_mm(x, ptr, idx, vals, bias, out=wide[:, 1 : 1 + n])
    assert_close(wide[:, 1 : 1 + n], reference_linear(x, w, mask, bias), dtype, k, "y")
    assert bool(wide[:, [0, -2, -1]].isnan().all()), "the kernel wrote outside its output"
    dst = torch.arange(idx.numel()) * 2 + 1  # every other entry, from 1
    dw = torch.full((2 * idx.numel() + 5,), NAN)
    native.csr_sampled(dy, x, ptr, idx, dst, dw.numel(), out=dw)
    _, dw_ref, _ = reference_grads(x, w, mask, None, dy)
    assert_close(dw[dst], dw_ref[mask], dtype, m, "dW")
    rest = torch.ones(dw.numel(), dtype=torch.bool)
    rest[dst] = False
    assert bool((dw[rest] == 0).all()), "entries no nonzero maps to must be zero"


def test_wrappers_refuse_what_the_kernels_would_misread(native_only):
    x, dy = torch.randn(8, 30), torch.randn(8, 20)
    ptr = torch.tensor([0, 2, 3] + [3] * 18, dtype=torch.int32)
    idx = torch.tensor([1, 5, 29], dtype=torch.int32)
    vals = torch.randn(3)
    dst = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="idx holds indices outside the 30 columns of a"):
        native.csr_mm(x, ptr, torch.tensor([1, 5, 30], dtype=torch.int32), vals, None)
    with pytest.raises(ValueError, match="ptr must run from 0 to len"):
        native.csr_mm(x, ptr[:-1].contiguous() + 1, idx, vals, None)
    with pytest.raises(ValueError, match="ptr must not decrease"):
        native.csr_mm(x, torch.tensor([0, 3, 1, 3], dtype=torch.int32), idx, vals, None)
    with pytest.raises(ValueError, match="vals must be contiguous, one per idx"):
        native.csr_mm(x, ptr, idx, vals[:2], None)
    with pytest.raises(ValueError, match="a must be a float32 or bfloat16"):
        native.csr_mm(x.double(), ptr, idx, vals, None)
    with pytest.raises(ValueError, match="bias has 19 < 20"):
        native.csr_mm(x, ptr, idx, vals, torch.randn(19))
    with pytest.raises(ValueError, match="ptr has 21 entries for the 19 columns of dy"):
        native.csr_sampled(dy[:, :19], x, ptr, idx, dst, 3)
    with pytest.raises(ValueError, match="dst holds indices outside the 2 entries"):
        native.csr_sampled(dy, x, ptr, idx, dst, 2)
    with pytest.raises(ValueError, match="dst must be a contiguous int64"):
        native.csr_sampled(dy, x, ptr, idx, dst.int(), 3)
    with pytest.raises(ValueError, match="dy is torch.bfloat16 but x is torch.float32"):
        native.csr_sampled(dy.bfloat16(), x, ptr, idx, dst, 3)


# -------------------------------------------------------------------- routing
@pytest.fixture
def shipped(monkeypatch):
    for name, value in SHIPPED.items():
        monkeypatch.setattr(bsmm_cpu, name, value)


def test_shipped_thresholds_route_element_masks_only(native_only, shipped):
    """As shipped: a 90%-pruned element mask takes the CSR route; a half-pruned one (the route's
    measured loss) does not. Among blocks the native kernels would run, thinly filled ones go to CSR
    and whole or well-filled ones stay."""
    shape = (256, 256)
    sparse = BlockLayout.from_masks(torch.rand(shape) < 0.1, block_size=32)
    half = BlockLayout.from_masks(torch.rand(shape) < 0.5, block_size=32)
    blocks = Problem(8, *shape, 32, 0.1, "block").lay
    assert bsmm_cpu.path(Meta(*sparse.meta())) == "csr"
    assert bsmm_cpu.path(Meta(*half.meta())) == "dense"
    assert bsmm_cpu.path(Meta(*blocks.meta())) == "native"
    for fill, route in ((0.25, "csr"), (0.6, "native")):
        lay = BlockLayout.from_masks(random_block_mask(shape, 32, 0.3, element_density=fill), block_size=32)
        assert bsmm_cpu.path(Meta(*lay.meta())) == route, f"fill {fill}"
    assert bsmm_cpu.path(Meta(*sparse.meta()), torch.float16) != "csr"  # the kernels take fp32 and bf16 only
    assert not bsmm_cpu.transposed_output(Meta(*sparse.meta()), 8, F32)  # row-major, as the native route


def test_layouts_past_int32_indices_keep_the_block_route(csr, monkeypatch):
    p = Problem(5, 40, 50, 16, mask=torch.rand(40, 50) < 0.1)
    assert bsmm_cpu.path(p.meta) == "csr"
    monkeypatch.setattr(csr_cpu, "MAX_KEPT", int(p.mask.sum()) - 1)
    q = Problem(5, 40, 50, 16, mask=p.mask)  # a new layout: its counts are not cached yet
    assert bsmm_cpu.path(q.meta) != "csr"


def test_without_native_kernels_the_same_layout_falls_back_correctly(csr, monkeypatch):
    """SPARSEKERN_NATIVE=0: another route, the same results and the same (row-major) strides."""
    mask, frozen = element_masks((70, 90), 0.1)
    p = Problem(37, 70, 90, 32, mask=mask, frozen=frozen)
    assert bsmm_cpu.path(p.meta) == "csr"
    y = p.forward()
    monkeypatch.setenv("SPARSEKERN_NATIVE", "0")
    assert bsmm_cpu.path(p.meta) != "csr"
    assert not bsmm_cpu.transposed_output(p.meta, p.m, F32)
    y0 = p.forward()
    assert y0.stride() == y.stride() and p.input_grad().is_contiguous()
    p.check_all()


def test_metadata_is_built_once_per_layout(csr, monkeypatch):
    """Forward, backward and later steps reuse one plan; a new layout, or an in-place edit of one,
    gets its own; a dead layout's entry goes with it."""
    builds = []
    real = csr_cpu.plan.__globals__["_build"]
    monkeypatch.setitem(csr_cpu.plan.__globals__, "_build", lambda *a: builds.append(1) or real(*a))
    mask, frozen = element_masks((40, 50), 0.2)
    p = Problem(9, 40, 50, 16, mask=mask, frozen=frozen)
    for _ in range(2):
        p.check_all()
    assert len(builds) == 1
    q = Problem(9, 40, 50, 16, mask=mask, frozen=frozen)
    q.forward()
    assert len(builds) == 2
    q.lay.element_state.add_(0)  # an in-place write bumps the version: the plan is rebuilt
    q.check_all()
    assert len(builds) == 3
    before = len(csr_cpu.plan.__globals__["_cache"])
    del q
    assert len(csr_cpu.plan.__globals__["_cache"]) == before - 1


def test_layout_built_under_inference_mode(csr):
    """Inference tensors have no version counter; the cache keys such layouts by identity alone."""
    mask = torch.rand(40, 50) < 0.1
    with torch.inference_mode():
        p = Problem(5, 40, 50, 16, mask=mask)
        assert bsmm_cpu.path(p.meta) == "csr"
        assert_close(p.forward(), reference_linear(p.x, p.w, p.mask, p.bias), F32, p.k, "y")


# ------------------------------------------------------------ whole layers
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_torch_prune_layer_converted_exactly_trains_on_the_csr_route(native_only, shipped, monkeypatch, dtype):
    """l1_unstructured at amount 0.9, converted with granularity="exact": the shipped route is CSR, and
    the layer's output and gradients match the masked dense layer's float64 reference."""
    from torch import nn
    from torch.nn.utils import prune

    from sparsekern.adapters import from_torch_prune

    monkeypatch.setattr(sk, "INTERPRET", False)  # conftest's Triton interpreter would take CPU tensors
    lin = nn.Linear(130, 70)
    prune.l1_unstructured(lin, "weight", amount=0.9)
    w, mask, bias = (lin.weight_orig * lin.weight_mask).detach().to(dtype), lin.weight_mask.bool(), lin.bias.detach()
    model, _ = from_torch_prune(nn.Sequential(lin), granularity="exact", block_size=32)
    layer = model[0].to(dtype)
    assert bsmm_cpu.path(Meta(*layer.layout.meta()), dtype) == "csr"
    x = torch.randn(37, 130).to(dtype).requires_grad_()
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    bias = bias.to(dtype)
    assert_close(y, reference_linear(x.detach(), w, mask, bias), dtype, 130, "y")
    dx_ref, dw_ref, db_ref = reference_grads(x.detach(), w, mask, None, dy, bias)
    assert_close(x.grad, dx_ref, dtype, 70, "dx")
    assert_close(layer.layout.scatter_blocks(layer.weight_train.grad), dw_ref, dtype, 37, "dW")
    assert_close(layer.bias.grad, db_ref, dtype, 37, "db")
