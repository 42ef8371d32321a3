"""``sparse_conv2d`` and ``SparseConv2d`` vs float64 ``F.conv2d`` references, on both CPU backends.

The ``backend`` fixture (conftest.py) runs each test on the Triton kernels under the
interpreter and on the CPU path (``kernels/bsconv_cpu.py``); on the CPU, ``conv_impl``
runs it once on the native kernels (fp32 and bf16) and once with them turned off
(``SPARSEKERN_NATIVE=0``: the torch-level plane and gather paths, what a machine without
a C++ compiler runs, and fp16 always). The CPU path picks its dense fallback from the
blocks' share of the dense conv's work, padding channels and rows included, which is
large for these small odd shapes; this module pins the crossovers at 1.3 so that the
cases run every CPU path (``test_cases_cover_every_cpu_path_and_every_block_code``
guards that).
Tolerances come from the reduction length of each pass: forward ``Cin*kh*kw``,
input gradient ``Cout*kh*kw``, weight and bias gradients ``N*Ho*Wo``.
"""

import pytest
import torch
from torch import nn

from sparsekern import convview
from sparsekern.functional import sparse_conv2d
from sparsekern.kernels import bsconv_cpu, native
from sparsekern.kernels.meta import Meta
from sparsekern.layout import BlockLayout
from sparsekern.nn import SparseConv2d
from sparsekern.testing import assert_close, reference_conv2d, reference_conv_grads

NAN = float("nan")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DT_NAME = {F32: "fp32", F16: "fp16", BF16: "bf16"}


@pytest.fixture(autouse=True, params=["native", "torch"])
def conv_impl(request, monkeypatch):
    """``native`` or ``torch``: which CPU implementation fp32/bf16 blocks run (module docstring)."""
    for name in ("DENSE_CROSSOVER", "NATIVE_CROSSOVER", "NATIVE_CROSSOVER_1X1"):
        monkeypatch.setattr(bsconv_cpu, name, dict.fromkeys((16, 32, 64, 128), 1.3))
    if "backend" in request.fixturenames and request.getfixturevalue("backend") == "triton":
        if request.param == "torch":
            pytest.skip("the Triton backend runs no CPU implementation: once is enough")
    elif request.param == "torch":
        monkeypatch.setenv("SPARSEKERN_NATIVE", "0")
    elif not native.available():
        pytest.skip(f"native kernels unavailable here: {native._error}")
    return request.param


def conv_masks(shape, bs, density, kind):
    """``(mask, frozen or None)``, weight-shaped; ``block`` keeps whole blocks of the matrix view."""
    bm, bk = (bs, bs) if isinstance(bs, int) else bs
    if kind == "unstructured":
        mask = torch.rand(shape) < density
        return mask, mask & (torch.rand(shape) < 0.3)
    rb, cb = -(-shape[0] // bm), -(-convview.matrix_shape(shape, bk)[1] // bk)
    blocks = torch.zeros(rb * cb, dtype=torch.bool)
    blocks[torch.randperm(rb * cb)[: round(density * rb * cb)]] = True
    full = blocks.view(rb, cb).repeat_interleave(bm, 0).repeat_interleave(bk, 1)
    n, k = convview.matrix_shape(shape, bk)
    mask = convview.from_matrix(full[:n, :k], shape[1], shape[2], shape[3])
    if kind == "block":
        return mask, None
    # mixed: a third of the blocks thinned, a third wholly frozen, the rest partly frozen or trainable
    pick = torch.randint(0, 3, (rb, cb)).repeat_interleave(bm, 0).repeat_interleave(bk, 1)[:n, :k]
    pick = convview.from_matrix(pick, shape[1], shape[2], shape[3])
    r = torch.rand(shape)
    mask &= (pick != 0) | (r < 0.85)
    return mask, mask & ((pick == 1) | ((pick == 2) & (r < 0.5)))


class ConvProblem:
    def __init__(self, n, cin, cout, hw, k, bs, density, kind, dtype=F32, stride=1, padding=0, dilation=1):
        self.shape = (cout, cin, *((k, k) if isinstance(k, int) else k))
        self.mask, self.frozen = conv_masks(self.shape, bs, density, kind)
        self.bs = (bs, bs) if isinstance(bs, int) else tuple(bs)
        bk = self.bs[1]
        fz = None if self.frozen is None else convview.to_matrix(self.frozen, bk, False)
        self.lay = BlockLayout.from_masks(convview.to_matrix(self.mask, bk, False), fz, self.bs)
        self.w = torch.randn(self.shape).to(dtype)
        self.wt, self.wf = self.lay.split_values(convview.to_matrix(self.w, bk))
        h, w = (hw, hw) if isinstance(hw, int) else hw
        self.x = torch.randn(n, cin, h, w).to(dtype)
        self.bias = torch.randn(cout).to(dtype)
        self.dtype = dtype
        self.conv = {"stride": stride, "padding": padding, "dilation": dilation}

    def cpu_path(self, x=None):
        """Which way ``bsconv_cpu`` runs this problem: ``dense``, ``native``, ``plane`` or ``gather``."""
        x = self.x if x is None else x
        g = convview.conv_geometry(x.shape, self.shape, bk=self.lay.block_size[1], **self.conv)
        return bsconv_cpu.path(Meta(*self.lay.meta()), g, self.dtype)

    def run(self, x=None, dy=None, bias=True):
        x = (self.x if x is None else x).clone().requires_grad_()
        wt = self.wt.clone().requires_grad_()
        b = self.bias.clone().requires_grad_() if bias else None
        y = sparse_conv2d(x, wt, self.wf, self.lay, self.shape, b, **self.conv)
        dy = torch.randn(y.shape).to(self.dtype) if dy is None else dy
        y.backward(dy)
        return y, dy, x.grad, wt.grad, None if b is None else b.grad

    def check(self, y, dy, gx, gw, gb, x=None):
        x = self.x if x is None else x
        cout, cin, kh, kw = self.shape
        yr = reference_conv2d(x, self.w, self.mask, self.bias if gb is not None else None, **self.conv)
        assert y.dtype == self.dtype
        assert_close(y, yr, self.dtype, cin * kh * kw, "y")
        dxr, dwr, dbr = reference_conv_grads(
            x, self.w, self.mask, self.frozen, dy, self.bias if gb is not None else None, **self.conv
        )
        red = y.numel() // cout
        assert_close(gx, dxr, self.dtype, cout * kh * kw, "x.grad")
        gw_dense = convview.from_matrix(self.lay.to_dense(gw, torch.zeros_like(self.wf)), cin, kh, kw)
        assert_close(gw_dense, dwr, self.dtype, red, "w_train.grad")
        # the stores' non-trainable positions get exactly zero gradient
        trainable = self.mask if self.frozen is None else self.mask & ~self.frozen
        off = self.lay.split_values(convview.to_matrix(trainable.float(), self.lay.block_size[1]))[0] == 0
        assert bool((gw[off] == 0).all()), "gradient off the trainable elements"
        if gb is not None:
            assert_close(gb, dbr, self.dtype, red, "bias.grad")


# (N, Cin, Cout, H/W, kernel, block, density, kind, stride, padding, dilation)
CASES = [
    pytest.param((2, 20, 33, 9, 3, 16, 0.5, "mixed", 1, 1, 1), id="3x3-p1-mixed"),
    pytest.param((2, 17, 40, (7, 5), 1, 16, 0.4, "block", 1, 0, 1), id="1x1-odd"),
    pytest.param((2, 18, 35, 11, 3, 16, 0.5, "mixed", (2, 1), (1, 2), 2), id="3x3-s21-p12-d2"),
    pytest.param((1, 5, 16, (8, 9), 4, 16, 0.7, "unstructured", 1, "same", 1), id="4x4-same-asym"),
    pytest.param((2, 3, 16, 15, 7, 16, 1.0, "block", 2, 3, 1), id="7x7-s2-stem-dense"),
    # the dense route where the strided output never reads the last padded row (symmetric padding
    # still serves) and where 'same' pads asymmetrically (an explicit pad first)
    pytest.param((2, 3, 16, 16, 7, 16, 1.0, "block", 2, 3, 1), id="7x7-s2-stem-dense-cropped"),
    pytest.param((1, 5, 16, (8, 9), 4, 16, 1.0, "block", 1, "same", 1), id="4x4-same-asym-dense"),
    pytest.param((2, 20, 33, 6, 3, (32, 16), 0.5, "mixed", 1, "valid", 1), id="3x3-valid-b32x16"),
    pytest.param((2, 40, 20, 7, 3, (16, 32), 0.4, "block", 2, 1, 1), id="3x3-s2-b16x32"),
    pytest.param((2, 20, 24, 9, 3, 16, 0.0, "block", 1, 1, 1), id="empty"),
    pytest.param((2, 20, 24, 9, 3, 16, 1.0, "mixed", 1, 1, 1), id="full-mixed-dense-regime"),
]


def _problem(case, dtype=F32):
    n, cin, cout, hw, k, bs, d, kind, stride, padding, dilation = case
    return ConvProblem(n, cin, cout, hw, k, bs, d, kind, dtype, stride, padding, dilation)


def test_cases_cover_every_cpu_path_and_every_block_code(conv_impl):
    paths, codes = set(), set()
    for param in CASES:
        p = _problem(param.values[0])
        codes |= set(p.lay.block_code.unique().tolist())
        if p.lay.nnz_blocks:
            paths.add(p.cpu_path())
    assert paths == ({"dense", "native"} if conv_impl == "native" else {"dense", "plane", "gather"})
    assert codes == {0, 1, 2, 3}


@pytest.mark.parametrize("case", CASES)
def test_forward_and_all_grads(backend, case):
    p = _problem(case)
    p.check(*p.run())


@pytest.mark.parametrize("dtype", [F16, BF16], ids=DT_NAME.get)
def test_half_precision(backend, dtype):
    p = ConvProblem(2, 20, 33, 9, 3, 16, 0.5, "mixed", dtype, 1, 1, 1)
    p.check(*p.run())


@pytest.mark.parametrize("fmt", ["channels_last", "sliced"])
def test_input_memory_formats(backend, fmt):
    p = ConvProblem(2, 20, 33, 9, 3, 16, 0.5, "mixed", F32, 2, 1, 1)
    if fmt == "channels_last":
        x = p.x.contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(2, 40, 9, 9)[:, ::2]  # non-contiguous channels
    y, dy, gx, gw, gb = p.run(x=x)
    p.check(y, dy, gx, gw, gb, x=x)


def test_unbatched_input_and_no_bias(backend):
    p = ConvProblem(1, 20, 33, 9, 3, 16, 0.5, "block", F32, 1, 1, 1)
    x = p.x[0].clone().requires_grad_()
    y = sparse_conv2d(x, p.wt, p.wf, p.lay, p.shape, None, padding=1)
    assert y.shape == (33, 9, 9)
    assert_close(y, reference_conv2d(p.x, p.w, p.mask, None, padding=1)[0], F32, 180, "y")


# ------------------------------------------------------------- skip proofs
def _block_rows_and_cols(p):
    code = p.lay.block_code
    return (code > 0).any(1), (code > 0).any(0)


# (size, stride, the CPU path it runs): planes for stride 1 on a large enough map, gathers otherwise.
SKIP_GEOMETRIES = [pytest.param((12, 1, "plane"), id="plane"), pytest.param((9, 2, "gather"), id="gather")]


@pytest.mark.parametrize("geometry", SKIP_GEOMETRIES)
def test_nan_in_input_channels_of_pruned_block_columns_never_reaches_y(
    xfail_cpu_dense_nan, backend, geometry, conv_impl
):
    """Input channels whose block column is empty at every tap carry NaN; y and w_train.grad stay exact."""
    size, stride, route = geometry
    p = ConvProblem(2, 48, 32, size, 3, 16, 0.0, "block", F32, stride, 1, 1)
    mask = torch.zeros(p.shape, dtype=torch.bool)
    mask[:, 16:32] = torch.rand(32, 16, 3, 3) < 0.9  # channel block 1 only
    p.mask = mask
    p.lay = BlockLayout.from_masks(convview.to_matrix(mask, 16, False), None, 16)
    p.wt, p.wf = p.lay.split_values(convview.to_matrix(p.w, 16))
    assert p.cpu_path() == ("native" if conv_impl == "native" else route)
    x = p.x.clone()
    x[:, :16] = NAN
    x[:, 32:] = NAN
    y, dy, gx, gw, gb = p.run(x=x)
    clean = torch.where(x.isnan(), 0.0, x)
    yr = reference_conv2d(clean, p.w, mask, p.bias, stride=stride, padding=1)
    assert_close(y, yr, F32, 48 * 9, "y")
    dwr = reference_conv_grads(clean, p.w, mask, None, dy, p.bias, stride=stride, padding=1)[1]
    gw_dense = convview.from_matrix(p.lay.to_dense(gw, torch.zeros_like(p.wf)), 48, 3, 3)
    assert_close(gw_dense, dwr, F32, y.numel() // 32, "w_train.grad")


@pytest.mark.parametrize("geometry", SKIP_GEOMETRIES)
def test_nan_in_dy_of_empty_block_rows_never_reaches_x_grad(backend, geometry, conv_impl):
    size, stride, route = geometry
    p = ConvProblem(2, 20, 48, size, 3, 16, 0.0, "block", F32, stride, 1, 1)
    mask = torch.zeros(p.shape, dtype=torch.bool)
    mask[16:32] = torch.rand(16, 20, 3, 3) < 0.9  # block row 1 only
    p.mask = mask
    p.lay = BlockLayout.from_masks(convview.to_matrix(mask, 16, False), None, 16)
    p.wt, p.wf = p.lay.split_values(convview.to_matrix(p.w, 16))
    assert p.cpu_path() == ("native" if conv_impl == "native" else route)
    out = (size + 2 - 3) // stride + 1
    dy = torch.randn(2, 48, out, out)
    dy[:, :16] = NAN
    dy[:, 32:] = NAN
    y, _, gx, _, _ = p.run(dy=dy, bias=False)
    clean = torch.where(dy.isnan(), 0.0, dy)
    dxr = reference_conv_grads(p.x, p.w, mask, None, clean, None, stride=stride, padding=1)[0]
    assert_close(gx, dxr, F32, 48 * 9, "x.grad")


def test_opcheck_custom_ops(backend):
    p = ConvProblem(2, 20, 33, 9, 3, 16, 0.5, "mixed", F32, 2, 1, 1)
    meta, nf = p.lay.meta(), p.lay.n_frozen
    g = list(convview.conv_geometry(p.x.shape, p.shape, 2, 1, 1, 16))
    x, wt = p.x.clone().requires_grad_(), p.wt.clone().requires_grad_()
    dy = torch.randn(2, 33, 5, 5)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    ops = torch.ops.sparsekern
    torch.library.opcheck(ops.conv2d.default, (x, wt, p.wf, p.bias, meta, g, nf), test_utils=tests)
    for want in ((True, True), (True, False), (False, True)):
        args = (dy, p.x, p.wt, p.wf, meta, g, nf, *want)
        torch.library.opcheck(ops.conv2d_backward.default, args, test_utils=tests)


# ------------------------------------------------------------------ module
def test_module_matches_masked_dense_conv_and_trains_only_trainable(backend):
    """AdamW with weight decay over several steps: pruned stay 0, frozen stay put, and every step
    equals dense nn.Conv2d training on ``W * mask`` with gradients masked to the trainable elements."""
    mask, frozen = conv_masks((32, 20, 3, 3), 16, 0.6, "mixed")
    dense = nn.Conv2d(20, 32, 3, padding=1, stride=2)
    sparse = SparseConv2d.from_dense(dense, mask=mask, frozen_mask=frozen, block_size=16)
    with torch.no_grad():
        dense.weight.mul_(mask)
    trainable = mask & ~frozen
    opt_s = torch.optim.AdamW(sparse.parameters(), lr=0.01, weight_decay=0.1)
    opt_d = torch.optim.AdamW(dense.parameters(), lr=0.01, weight_decay=0.1)
    w0 = sparse.weight.clone()
    for _ in range(4):
        x = torch.randn(2, 20, 9, 9)
        for mod, opt in ((sparse, opt_s), (dense, opt_d)):
            opt.zero_grad()
            mod(x).square().mean().backward()
            if mod is dense:
                dense.weight.grad.mul_(trainable)
                # Decoupled weight decay must not move what the sparse layer never updates.
                keep = dense.weight.detach().clone()
            opt.step()
            if mod is dense:
                with torch.no_grad():
                    dense.weight.copy_(torch.where(trainable, dense.weight, keep))
        assert_close(sparse.weight, dense.weight.detach().double(), F32, 64, "weights after step")
    w = sparse.weight
    assert bool((w[~mask] == 0).all())
    assert torch.equal(w[frozen], w0[frozen])
    assert bool((w[trainable] != w0[trainable]).all())
    assert {n for n, _ in sparse.named_parameters()} == {"weight_train", "bias"}


def test_autocast_computes_in_the_autocast_dtype_like_conv2d(backend):
    """Under ``torch.autocast`` (CPU, bf16) the module returns bf16 like ``nn.Conv2d`` and its fp32
    stores get fp32 gradients."""
    mask, frozen = conv_masks((32, 20, 3, 3), 16, 0.6, "mixed")
    dense = nn.Conv2d(20, 32, 3, padding=1)
    sparse = SparseConv2d.from_dense(dense, mask=mask, frozen_mask=frozen, block_size=16)
    x = torch.randn(2, 20, 9, 9, requires_grad=True)
    with torch.autocast("cpu", dtype=BF16):
        y = sparse(x)
        dense_dtype = dense(x).dtype
    assert y.dtype == dense_dtype == BF16
    y.float().square().mean().backward()
    assert sparse.weight_train.grad.dtype == x.grad.dtype == F32
    assert bool(sparse.weight_train.grad.abs().sum() > 0)
    xb, wb, bb = (t.detach().to(BF16) for t in (x, dense.weight, dense.bias))
    assert_close(y, reference_conv2d(xb, wb, mask, bb, padding=1), BF16, 20 * 9, "y")


def test_state_dict_round_trip_dense_load_and_to_dense(backend):
    mask, frozen = conv_masks((32, 20, 3, 3), 16, 0.5, "mixed")
    a = SparseConv2d(20, 32, 3, padding=1, block_size=16, mask=mask, frozen_mask=frozen)
    b = SparseConv2d(20, 32, 3, padding=1, block_size=16)  # other (full) layout
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.weight, a.weight) and torch.equal(b.mask, mask) and torch.equal(b.frozen_mask, frozen)
    dense = nn.Conv2d(20, 32, 3, padding=1)
    a.load_state_dict(dense.state_dict())
    assert torch.equal(a.weight, torch.where(mask, dense.weight.detach(), 0.0))
    x = torch.randn(2, 20, 8, 8)
    assert_close(a(x), reference_conv2d(x, dense.weight, mask, dense.bias, padding=1), F32, 180, "y")
    back = a.to_dense()
    assert isinstance(back, nn.Conv2d) and torch.equal(back.weight, a.weight)
    with pytest.raises(RuntimeError, match="size mismatch"):
        a.load_state_dict(nn.Conv2d(20, 32, 5, padding=1).state_dict())


def test_set_masks_keeps_values_and_adamw_state(backend):
    mask = torch.rand(32, 20, 3, 3) < 0.7
    layer = SparseConv2d(20, 32, 3, padding=1, block_size=16, mask=mask)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.01)
    layer(torch.randn(2, 20, 6, 6)).square().mean().backward()
    opt.step()
    old_w = layer.weight
    state0 = opt.state[layer.weight_train]["exp_avg"]
    old_m = layer._from_matrix(layer.layout.to_dense(state0, torch.zeros_like(layer.weight_frozen)))
    new = torch.rand(32, 20, 3, 3) < 0.5
    layer.set_masks(new, new & (torch.rand(new.shape) < 0.3), optimizer=opt)
    assert torch.equal(layer.mask, new)
    assert torch.equal(layer.weight, torch.where(new, old_w, 0.0))
    state = opt.state[layer.weight_train]["exp_avg"]
    assert state.shape == layer.weight_train.shape
    new_m = layer._from_matrix(layer.layout.to_dense(state, torch.zeros_like(layer.weight_frozen)))
    trainable = new & ~layer.frozen_mask
    assert torch.equal(new_m[trainable & mask], old_m[trainable & mask])
    assert bool((new_m[trainable & ~mask] == 0).all())
    layer(torch.randn(2, 20, 6, 6)).square().mean().backward()
    opt.step()


def test_torch_compile_fullgraph_matches_eager(backend):
    """``torch.compile(fullgraph=True)`` traces SparseConv2d (fake kernels report the real strides)."""
    from torch._inductor.utils import fresh_cache

    mask, frozen = conv_masks((32, 16, 3, 3), 16, 0.5, "mixed")
    model = nn.Sequential(
        SparseConv2d(16, 32, 3, padding=1, block_size=16, mask=mask, frozen_mask=frozen),
        nn.ReLU(),
        SparseConv2d(32, 16, 1, block_size=16),
    )
    x = torch.randn(2, 16, 6, 6)

    def run(fn):
        xr = x.clone().requires_grad_()
        model.zero_grad(set_to_none=True)
        y = fn(xr)
        y.square().sum().backward()
        return y.detach(), xr.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    y_e, gx_e, g_e = run(model)
    torch._dynamo.reset()
    try:
        with fresh_cache():
            y_c, gx_c, g_c = run(torch.compile(model, fullgraph=True))
    finally:
        torch._dynamo.reset()
    assert_close(y_c, y_e.double(), F32, 144, "compiled y")
    assert_close(gx_c, gx_e.double(), F32, 288, "compiled x.grad")
    for name in g_e:
        assert_close(g_c[name], g_e[name].double(), F32, 72, f"compiled grad {name}")


# --------------------------------------------------------------- bad input
def test_constructor_rejects_unsupported_options():
    with pytest.raises(NotImplementedError, match="groups"):
        SparseConv2d(16, 16, 3, groups=2)
    with pytest.raises(NotImplementedError, match="padding_mode"):
        SparseConv2d(16, 16, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="stride 1"):
        SparseConv2d(16, 16, 3, stride=2, padding="same")
    with pytest.raises(ValueError, match="padding must be"):
        SparseConv2d(16, 16, 3, padding="full")
    with pytest.raises(ValueError, match="block_size"):
        SparseConv2d(16, 16, 3, block_size=8)
    with pytest.raises(ValueError, match="mask has shape"):
        SparseConv2d(16, 16, 3, mask=torch.ones(16, 16, 3))
    with pytest.raises(ValueError, match="frozen elements must be kept"):
        SparseConv2d(16, 16, 3, mask=torch.zeros(16, 16, 3, 3, dtype=torch.bool), frozen_mask=torch.ones(16, 16, 3, 3))
    with pytest.raises(TypeError, match="nn.Conv2d"):
        SparseConv2d.from_dense(nn.Linear(3, 4))


def test_forward_rejects_bad_input():
    layer = SparseConv2d(16, 32, 3, block_size=16)
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(2, 15, 8, 8))
    with pytest.raises(ValueError, match="too small"):
        layer(torch.randn(2, 16, 2, 2))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        layer(torch.randn(16, 8))
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(2, 16, 8, 8, dtype=torch.float64))
    p = ConvProblem(1, 16, 32, 8, 3, 16, 0.5, "block")
    with pytest.raises(ValueError, match="matrix view"):
        sparse_conv2d(p.x, p.wt, p.wf, p.lay, (32, 16, 5, 5))


def test_failed_set_masks_leaves_module_unchanged():
    layer = SparseConv2d(16, 32, 3, block_size=16, mask=torch.rand(32, 16, 3, 3) < 0.5)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    param = layer.weight_train
    with pytest.raises(ValueError):
        layer.set_masks(torch.ones(32, 16, 5, 5, dtype=torch.bool))
    with pytest.raises(ValueError):
        layer.set_masks(torch.zeros(32, 16, 3, 3, dtype=torch.bool), torch.ones(32, 16, 3, 3, dtype=torch.bool))
    assert layer.weight_train is param
    after = layer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("wants", [(True, True), (True, False), (False, True)], ids=["both", "x-only", "w-only"])
def test_backward_computes_only_requested_grads(monkeypatch, wants):
    """The CPU backward is asked exactly for the gradients autograd needs, and returns them right."""
    calls = []
    real = bsconv_cpu.backward

    def spy(*args):
        calls.append(args[-2:])
        return real(*args)

    monkeypatch.setattr(bsconv_cpu, "backward", spy)
    import sparsekern.kernels as sk

    monkeypatch.setattr(sk, "INTERPRET", False)
    p = ConvProblem(2, 20, 33, 9, 3, 16, 0.5, "mixed", F32, 1, 1, 1)
    x = p.x.clone().requires_grad_(wants[0])
    wt = p.wt.clone().requires_grad_(wants[1])
    y = sparse_conv2d(x, wt, p.wf, p.lay, p.shape, None, padding=1)
    dy = torch.randn(y.shape)
    y.backward(dy)
    assert calls == [wants]
    dxr, dwr, _ = reference_conv_grads(p.x, p.w, p.mask, p.frozen, dy, None, padding=1)
    if wants[0]:
        assert_close(x.grad, dxr, F32, 33 * 9, "x.grad")
    if wants[1]:
        gw = convview.from_matrix(p.lay.to_dense(wt.grad, torch.zeros_like(p.wf)), 20, 3, 3)
        assert_close(gw, dwr, F32, 2 * 81, "w_train.grad")
