"""Compiled Triton kernels on CUDA vs float64 references (launchers, autograd, SparseLinear).

Needs a CUDA device and kernels that are compiled, not interpreted: the module is
skipped when ``sparsekern.kernels.INTERPRET`` is set (``SPARSEKERN_INTERPRET=1`` or
``TRITON_INTERPRET=1`` in the environment when sparsekern was imported).

Autotuning is switched off for this module (``SPARSEKERN_AUTOTUNE=0``: each kernel uses
its first candidate config) so that the suite stays within about two minutes;
``test_autotuned_configs_are_correct`` runs the tuner for one shape. Every launcher
writes into an ``out=`` buffer pre-filled with NaN, so an element a kernel forgets to
write fails the comparison. fp32 runs with ``allow_tf32`` off (IEEE tolerance) unless a
test says otherwise.
"""

import math

import pytest
import torch

triton = pytest.importorskip("triton")  # before the kernel imports below, which need it

import sparsekern.kernels as sk  # noqa: E402
from sparsekern.kernels import bsmm  # noqa: E402
from sparsekern.kernels import configs as cfgs  # noqa: E402
from sparsekern.layout import BlockLayout  # noqa: E402
from sparsekern.nn import SparseLinear  # noqa: E402
from sparsekern.testing import assert_close, random_block_mask, reference_grads, reference_linear, tolerance  # noqa: E402

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if sk.INTERPRET:
    pytest.skip(
        "Triton kernels are interpreted in this process (SPARSEKERN_INTERPRET/TRITON_INTERPRET=1); "
        "run the GPU tests in a process without them",
        allow_module_level=True,
    )

CUDA = torch.device("cuda")
NAN = float("nan")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DT_NAME = {F32: "fp32", F16: "fp16", BF16: "bf16"}


@pytest.fixture(scope="module", autouse=True)
def _default_configs():
    """No autotuning in this module, and a private config cache (nothing leaks into ``tuned_records``)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SPARSEKERN_AUTOTUNE", "0")
        mp.setattr(cfgs, "_tuned_cache", {})
        yield


@pytest.fixture(autouse=True)
def _ieee_fp32(monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


# ------------------------------------------------------------------ problems
def make_masks(shape, bs, density, kind):
    """``(mask, frozen or None)`` built on the CPU (reproducible under the test seed), then moved to CUDA."""
    if kind == "unstructured":
        mask = torch.rand(shape) < density
        frozen = mask & (torch.rand(shape) < 0.3)
    else:
        mask = random_block_mask(shape, bs, density)
        frozen = None
        if kind == "mixed":
            thin, frz = random_block_mask(shape, bs, 0.5), random_block_mask(shape, bs, 0.5)
            r = torch.rand(shape)
            mask &= ~(thin & (r < 0.25))
            frozen = mask & frz & (~thin | (r > 0.7))
    return mask.to(CUDA), None if frozen is None else frozen.to(CUDA)


class Problem:
    def __init__(self, m, n, k, bs, dtype, density=0.5, kind="mixed", mask=None, frozen=None):
        if mask is None:
            mask, frozen = make_masks((n, k), bs, density, kind)
        self.m, self.n, self.k, self.dtype = m, n, k, dtype
        self.mask, self.frozen = mask, frozen
        self.lay = BlockLayout.from_masks(mask, frozen, bs)
        self.meta = bsmm.Meta(*self.lay.meta())
        gen = {"device": CUDA}
        self.w = torch.randn(n, k, **gen).to(dtype)
        self.wt, self.wf = self.lay.split_values(self.w)
        self.x = torch.randn(m, k, **gen).to(dtype)
        self.dy = torch.randn(m, n, **gen).to(dtype)
        self.bias = torch.randn(n, **gen).to(dtype)

    def nan(self, *shape):
        return torch.full(shape, NAN, dtype=self.dtype, device=CUDA)

    def ref(self):
        return reference_grads(self.x, self.w, self.mask, self.frozen, self.dy, self.bias)

    def dw_blocks(self, dw_dense):
        return self.lay.gather_blocks(dw_dense)[self.lay.train_index.long()]

    def forward(self, bias=True, out=None, **kw):
        out = self.nan(self.m, self.n) if out is None else out
        b = self.bias if bias else None
        y = bsmm.bsmm_forward(self.x, self.wt, self.wf, b, self.meta, self.n, self.lay.n_frozen, out=out, **kw)
        assert y is out
        return y

    def input_grad(self, out=None, **kw):
        out = self.nan(self.m, self.k) if out is None else out
        dx = bsmm.bsmm_input_grad(self.dy, self.wt, self.wf, self.meta, self.k, self.lay.n_frozen, out=out, **kw)
        assert dx is out
        return dx

    def weight_grad(self, **kw):
        out = self.nan(self.lay.n_train, *self.lay.block_size)
        dw = bsmm.bsmm_weight_grad(self.dy, self.x, self.meta, self.lay.block_size, out=out, **kw)
        assert dw is out
        return dw


def tf32_tolerance_dtype():
    """TF32 keeps fp16's 10-bit mantissa, so fp16's tolerance model (operands rounded to
    10 bits, fp32 accumulation) bounds it; the fp64 reference sees unrounded fp32 operands,
    which the model's ``2 * eps * sqrt(k)`` term covers."""
    return F16


def check_all(p, tol_dtype=None, splits=None):
    tol = tol_dtype or p.dtype
    dx_ref, dw_ref, _ = p.ref()
    assert_close(p.forward(True), reference_linear(p.x, p.w, p.mask, p.bias), tol, p.k, "y (bias)")
    assert_close(p.forward(False), reference_linear(p.x, p.w, p.mask), tol, p.k, "y (no bias)")
    assert_close(p.input_grad(), dx_ref, tol, p.n, "dx")
    dw = p.weight_grad(splits=splits)
    assert_close(dw, p.dw_blocks(dw_ref), tol, p.m, f"dw (splits={splits})")
    return dw


# --------------------------------------------------------------------- cases
CASES = [
    # (M, N, K), block size, block density, mask kind, dtype
    ((300, 256, 192), 16, 0.5, "mixed", F16),
    ((300, 256, 192), 32, 0.5, "mixed", BF16),
    ((300, 256, 192), 64, 0.5, "mixed", F32),
    ((300, 256, 192), 128, 0.5, "mixed", F16),
    ((300, 256, 192), (64, 32), 0.5, "mixed", BF16),
    ((300, 256, 192), (32, 128), 0.5, "mixed", F32),
    ((1000, 1000, 700), 64, 0.1, "mixed", BF16),
    ((1000, 1000, 700), 32, 1.0, "block", F16),
    ((1000, 1000, 700), 128, 0.0, "block", F32),
    ((1000, 1000, 700), 16, 0.5, "unstructured", F32),
    ((4096, 2048, 2048), 64, 0.5, "mixed", BF16),
]


@pytest.mark.parametrize(
    "case", [pytest.param(c, id="{}x{}x{}-b{}-d{}-{}-{}".format(*c[0], *c[1:4], DT_NAME[c[4]])) for c in CASES]
)
def test_launchers_match_reference(case):
    (m, n, k), bs, density, kind, dtype = case
    p = Problem(m, n, k, bs, dtype, density, kind)
    if density > 0:
        assert p.lay.nnz_blocks > 0
    check_all(p)


def test_cases_cover_every_block_size_and_code():
    sizes = {c[1] for c in CASES}
    assert {16, 32, 64, 128, (64, 32), (32, 128)} <= sizes
    assert {c[2] for c in CASES} == {0.0, 0.1, 0.5, 1.0}
    codes = set()
    for c in CASES[:6]:
        (m, n, k), bs, density, kind, dtype = c
        codes |= set(Problem(m, n, k, bs, dtype, density, kind).lay.block_code.unique().tolist())
    assert codes == {0, 1, 2, 3}


@pytest.mark.parametrize("bs", [32, (64, 32)])
def test_fp32_with_tf32(monkeypatch, bs):
    """``allow_tf32`` on: TF32 tolerance, and the result really differs from the IEEE one."""
    p = Problem(512, 384, 320, bs, F32, 0.5, "mixed")
    y_ieee = p.forward()
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    check_all(p, tol_dtype=tf32_tolerance_dtype())
    assert not torch.equal(p.forward(), y_ieee), "allow_tf32 had no effect on the fp32 forward"


def test_real_bf16_numerics():
    """Compiled kernels use bf16 operands (no upcast): same results as a bf16-operand GEMM."""
    p = Problem(256, 128, 256, 64, BF16, 1.0, "block")
    y = p.forward(False)
    dense = torch.where(p.mask, p.w, 0)
    assert_close(y, reference_linear(p.x, p.w, p.mask), BF16, p.k, "y")
    assert_close(y, (p.x @ dense.T).double(), BF16, p.k, "y vs cuBLAS bf16")


# ---------------------------------------------------------- weight-grad splits
@pytest.mark.parametrize("splits", [1, 2, 4])
def test_weight_grad_token_splits(splits):
    m = 1300
    p = Problem(m, 192, 160, (32, 64), BF16, 0.5, "mixed")
    dw = check_all(p, splits=splits)
    rows = math.ceil(math.ceil(m / splits) / 128) * 128
    assert math.ceil(m / rows) == splits
    single = p.weight_grad(splits=1)
    assert_close(dw, single.double(), BF16, m, "split vs unsplit")


def test_automatic_splits_with_few_trainable_blocks():
    """Few trainable blocks and many tokens: the launcher splits the token reduction itself."""
    m = 8192
    mask = torch.zeros(256, 256, dtype=torch.bool, device=CUDA)
    mask[:64, :64] = True
    mask[128:192, 64:192] = True
    p = Problem(m, 256, 256, 64, F16, mask=mask)
    assert bsmm.wgrad_splits(m, p.lay.n_train, CUDA) > 1
    dw = p.weight_grad()
    assert_close(dw, p.dw_blocks(p.ref()[1]), F16, m, "auto-split dw")


# --------------------------------------------------------- outputs and order
def test_strided_out_buffers_poisoned_with_nan():
    """``out=`` as transposed views: every element is written, at the view's strides."""
    p = Problem(333, 200, 300, (32, 64), F16, 0.5, "mixed")
    y = p.forward(out=p.nan(p.n, p.m).t())
    dx = p.input_grad(out=p.nan(p.k, p.m).t())
    dx_ref = p.ref()[0]
    assert_close(y, reference_linear(p.x, p.w, p.mask, p.bias), F16, p.k, "y into a transposed out")
    assert_close(dx, dx_ref, F16, p.n, "dx into a transposed out")


def test_non_contiguous_operands():
    p = Problem(257, 130, 90, 16, F32, 0.5, "mixed")
    p.x = torch.randn(p.k, p.m, device=CUDA).t()
    p.dy = torch.randn(2 * p.m, p.n + 5, device=CUDA)[::2, 3 : 3 + p.n]
    assert not p.x.is_contiguous() and not p.dy.is_contiguous()
    check_all(p)


def test_dense_block_row_among_empty_rows():
    """One full block row (and one full block column) among empty ones: the load-balance
    order puts it first, and empty rows/columns are still written (zeros, or bias)."""
    n, k, bs = 1024, 1024, 64
    mask = torch.zeros(n, k, dtype=torch.bool, device=CUDA)
    mask[5 * bs : 6 * bs] = True  # block row 5: all 16 blocks
    mask[:, 11 * bs : 12 * bs] = True  # block column 11: all 16 blocks
    mask[2 * bs : 3 * bs, 3 * bs : 4 * bs] = True
    p = Problem(2048, n, k, bs, BF16, mask=mask)
    assert int(p.lay.row_order[0]) == 5 and int(p.lay.col_order[0]) == 11
    check_all(p)


# ---------------------------------------------------------- autograd, module
@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=DT_NAME.get)
def test_sparse_linear_module_on_cuda(dtype):
    n, k, bs = 384, 320, (64, 32)
    mask, frozen = make_masks((n, k), bs, 0.5, "mixed")
    lin = torch.nn.Linear(k, n, device=CUDA)
    with torch.no_grad():
        lin.weight.normal_()
        lin.bias.normal_()
    lin = lin.to(dtype)
    layer = SparseLinear.from_dense(lin, mask=mask, frozen_mask=frozen, block_size=bs)
    assert layer.weight_train.is_cuda and layer.layout.device.type == "cuda"
    x = torch.randn(4, 77, k, device=CUDA).to(dtype).requires_grad_()
    y = layer(x)
    assert y.shape == (4, 77, n) and y.is_contiguous()
    dy = torch.randn_like(y)
    y.backward(dy)
    xf, dyf = x.detach().reshape(-1, k), dy.reshape(-1, n)
    m = xf.shape[0]
    assert_close(y.reshape(m, n), reference_linear(xf, lin.weight, mask, lin.bias), dtype, k, "y")
    dx, dw, db = reference_grads(xf, lin.weight, mask, frozen, dyf, lin.bias)
    assert_close(x.grad.reshape(m, k), dx, dtype, n, "x.grad")
    assert_close(
        layer.weight_train.grad, layer.layout.gather_blocks(dw)[layer.layout.train_index.long()], dtype, m, "dw"
    )
    assert_close(layer.bias.grad, db, dtype, m, "bias.grad")


def test_training_step_equals_masked_dense():
    """Bench-like step (4096 tokens, 2048 x 2048, bf16, 25% of blocks, mixed blocks): one SGD
    step of SparseLinear matches the same step on a masked dense ``nn.Linear`` whose weight
    gradient is masked to the trainable elements."""
    m, n, k, bs, dtype, lr = 4096, 2048, 2048, 64, BF16, 1e-3
    mask, frozen = make_masks((n, k), bs, 0.25, "mixed")
    trainable = mask & ~frozen
    dense = torch.nn.Linear(k, n, device=CUDA, dtype=dtype)
    with torch.no_grad():
        dense.weight.normal_().mul_(mask)
        dense.bias.normal_()
    layer = SparseLinear.from_dense(dense, mask=mask, frozen_mask=frozen, block_size=bs)
    x = torch.randn(m, k, device=CUDA, dtype=dtype)
    target = torch.randn(m, n, device=CUDA, dtype=dtype)  # d loss / d y = target
    w0, b0 = dense.weight.detach().clone(), dense.bias.detach().clone()

    def step(module, mask_grad):
        opt = torch.optim.SGD(module.parameters(), lr=lr)
        y = module(x)
        (y.float() * target.float()).sum().backward()
        if mask_grad:
            module.weight.grad.mul_(trainable)
        opt.step()
        return y.detach()

    y_sparse = step(layer, False)
    y_dense = step(dense, True)
    g_dense = dense.weight.grad.double()
    assert_close(y_sparse, y_dense.double(), dtype, k, "forward vs masked dense")
    # After the step each weight differs by the gradient difference (times lr) plus one
    # bf16 rounding of the updated value.
    atol, rtol = tolerance(dtype, m)
    w_s, w_d = layer.weight.double(), dense.weight.detach().double()
    allowed = lr * (atol + rtol * g_dense.abs()) + torch.finfo(dtype).eps * torch.maximum(w_s.abs(), w_d.abs())
    err = (w_s - w_d).abs()
    assert bool((err <= allowed).all()), f"{int((err > allowed).sum())} weights differ, max err {err.max():.3g}"
    assert bool((w_d != w0.double())[trainable].float().mean() > 0.5), "the step barely moved the dense weights"
    assert bool((layer.weight[~mask] == 0).all()) and torch.equal(layer.weight[frozen], w0[frozen])
    b_s, b_d = layer.bias.detach().double(), dense.bias.detach().double()
    assert bool(((b_s - b_d).abs() <= lr * atol + torch.finfo(dtype).eps * b_d.abs()).all())
    assert not torch.equal(layer.bias.detach(), b0)


# ---------------------------------------------------------------- autotune
def test_autotuned_configs_are_correct(monkeypatch):
    """Autotuning on, no stored configs: every pass benchmarks its candidates, and the
    chosen configs give correct results."""
    monkeypatch.setenv("SPARSEKERN_AUTOTUNE", "1")
    monkeypatch.setattr(cfgs, "_tuned_cache", {})
    monkeypatch.setattr(cfgs, "lookup", lambda name, key: None)
    benched = []
    do_bench = triton.testing.do_bench

    def counting_bench(fn, *args, **kwargs):
        benched.append(fn)
        return do_bench(fn, *args, **kwargs)

    monkeypatch.setattr(triton.testing, "do_bench", counting_bench)
    p = Problem(1024, 512, 512, 32, F16, 0.5, "mixed")
    check_all(p)
    records = cfgs.tuned_records()
    kinds = {key.split(":")[1] for recs in records.values() for key in recs}
    assert kinds == {"fwd", "dx", "wgrad"}
    assert len(benched) >= 3
