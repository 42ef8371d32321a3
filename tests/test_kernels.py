"""Block-sparse matmul vs float64 references, for the Triton launchers and the CPU path.

The Triton launchers run on CPU tensors through Triton's interpreter (set up in
conftest.py), twice: ``triton`` on pointers (what sm_80 runs) and ``tma``
through tensor descriptors (what sm_90 runs; ``SPARSEKERN_TMA=1``), with the
activations and outputs in row-padded buffers whose padding holds NaN, so a
descriptor that reads or writes past the matrix fails the test. On a CUDA
machine conftest leaves the kernels compiled, and every
Triton test here then runs on the GPU instead (``gpu`` marks a short smoke set
for ``pytest -m gpu``); the CPU-path tests always run on CPU. Every Triton
launch writes into an ``out=`` buffer pre-filled with NaN, so an element a
kernel forgets to write fails the comparison. Tolerances come from
:func:`sparsekern.testing.tolerance` with the pass's reduction length
(forward ``K``, input gradient ``N``, weight gradient ``M``).
"""

import contextlib
import itertools
import math
import os

import pytest
import torch

import sparsekern.kernels as sk
from sparsekern.kernels import bsmm_cpu
from sparsekern.kernels.store import join_stores
from sparsekern.layout import BlockLayout
from sparsekern.testing import assert_close, random_block_mask, reference_grads, reference_linear

# The cases are built from the Triton configs, so without triton (a CPU-only install) the whole
# module skips; the CPU path is tested there by test_functional, test_nn and test_native*.
pytest.importorskip("triton")

from sparsekern.kernels import bsmm, launch  # noqa: E402
from sparsekern.kernels import configs as cfgs  # noqa: E402

NAN = float("nan")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, F16, BF16]
DT_NAME = {F32: "fp32", F16: "fp16", BF16: "bf16"}
BACKENDS = ["triton", "tma", "cpu"]
BLOCK_SIZES = [16, 32, 64, 128, (16, 64), (128, 32)]
DENSITIES = [0.0, 0.1, 0.5, 1.0]
KINDS = ["block", "unstructured", "mixed"]
SHAPES = [(37, 100, 70), (130, 33, 129), (5, 64, 48)]  # (M, N, K): tokens, out, in


def make_masks(shape, bs, density, kind):
    """``(mask, frozen_mask or None)``; ``mixed`` gives frozen, trainable and mixed blocks
    (pruned + trainable, pruned + frozen + trainable, pruned + frozen only)."""
    if kind == "unstructured":
        return torch.rand(shape) < density, None
    mask = random_block_mask(shape, bs, density)
    if kind == "block":
        return mask, None
    thin, frz, allf = (random_block_mask(shape, bs, 0.5) for _ in range(3))
    r = torch.rand(shape)
    mask &= ~(thin & (r < 0.25))
    return mask, mask & frz & (~thin | allf | (r > 0.7))


class Problem:
    """A layout, its value stores and random operands, all in ``dtype`` on ``device``."""

    def __init__(self, m, n, k, bs, dtype, density=0.5, kind="mixed", mask=None, frozen=None, device="cpu"):
        if mask is None:
            mask, frozen = make_masks((n, k), bs, density, kind)
        self.m, self.n, self.k, self.dtype, self.device = m, n, k, dtype, torch.device(device)
        self.mask, self.frozen = mask.to(device), None if frozen is None else frozen.to(device)
        self.lay = BlockLayout.from_masks(self.mask, self.frozen, bs)
        self.w = torch.randn(n, k).to(device=device, dtype=dtype)
        # One buffer, as the layers keep it (kernels/store.py): the kernels then copy nothing.
        wt, wf = self.lay.split_values(self.w)
        joined = join_stores(wt, wf)
        self.wt, self.wf = joined[: wt.shape[0]], joined[wt.shape[0] :]
        self.meta = bsmm.Meta(*self.lay.meta())
        self.x = torch.randn(m, k).to(device=device, dtype=dtype)
        self.dy = torch.randn(m, n).to(device=device, dtype=dtype)
        self.bias = torch.randn(n).to(device=device, dtype=dtype)

    def nan_full(self, *shape, pad=False):
        """NaN-filled ``shape``; with ``pad`` a view into rows padded to 16 bytes (padding stays NaN)."""
        if not pad:
            return torch.full(shape, NAN, dtype=self.dtype, device=self.device)
        rows, cols = shape
        per16 = 16 // torch.empty((), dtype=self.dtype).element_size()
        return torch.full((rows, -(-cols // per16) * per16 + per16), NAN, dtype=self.dtype, device=self.device)[
            :, :cols
        ]

    def pad_operands(self):
        """Move ``x`` and ``dy`` into NaN-padded rows that a tensor descriptor can describe."""
        for name in ("x", "dy"):
            t = getattr(self, name)
            padded = self.nan_full(*t.shape, pad=True)
            padded.copy_(t)
            assert launch.tma_ok(padded) or padded.numel() == 0
            setattr(self, name, padded)

    def ref(self):
        return reference_grads(self.x, self.w, self.mask, self.frozen, self.dy, self.bias)


# The Triton launchers run on CUDA when the kernels are compiled (SPARSEKERN_INTERPRET=0 on
# a GPU machine), else on CPU tensors through the interpreter. The CPU path always runs on CPU.
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not sk.INTERPRET else "cpu"


def _need(backend):
    """The device for a backend's operands; skips when its kernels cannot run here."""
    if backend == "cpu":
        return "cpu"
    if backend == "tma" and launch.TensorDescriptor is None:
        pytest.skip("this Triton has no tensor descriptors")
    if not sk.use_triton(torch.device(TRITON_DEVICE)):
        pytest.skip(f"Triton kernels do not run on {TRITON_DEVICE} here (INTERPRET={sk.INTERPRET})")
    return TRITON_DEVICE


# ------------------------------------------------------------ pass runners
@contextlib.contextmanager
def _route(backend, p):
    """Run the Triton launchers on descriptors (``tma``) or pointers (``triton``)."""
    old = os.environ.get("SPARSEKERN_TMA")
    if backend == "tma":
        if not launch.tma_ok(p.x) and p.x.is_contiguous():
            p.pad_operands()
        os.environ["SPARSEKERN_TMA"] = "1"
        if p.x.stride(-1) == 1 and p.dy.stride(-1) == 1 and p.m:  # else the launchers fall back to pointers
            assert launch.use_tma(p.x.device, p.x, p.dy), "the tma backend would run the pointer path"
    else:
        os.environ.pop("SPARSEKERN_TMA", None)
    try:
        yield
    finally:
        os.environ.pop("SPARSEKERN_TMA", None)
        if old is not None:
            os.environ["SPARSEKERN_TMA"] = old


def _assert_padding_untouched(out):
    """A padded output's padding (beyond its columns) still holds NaN: no write went past the matrix."""
    if out.dim() == 2 and out.stride(1) == 1 and out.stride(0) > out.shape[1] and out.shape[0]:
        pad = out.as_strided((out.shape[0], out.stride(0) - out.shape[1]), (out.stride(0), 1),
                             out.storage_offset() + out.shape[1])  # fmt: skip
        assert bool(pad.isnan().all()), "a store wrote past the output's columns"


def forward(backend, p, bias=True, out=None):
    b = p.bias if bias else None
    if backend == "cpu":
        return bsmm_cpu.forward(p.x, p.wt, p.wf, b, p.meta, p.n, p.lay.n_frozen)
    with _route(backend, p):
        out = p.nan_full(p.m, p.n, pad=backend == "tma") if out is None else out
        y = bsmm.bsmm_forward(p.x, p.wt, p.wf, b, p.meta, p.n, p.lay.n_frozen, out=out)
    assert y is out
    _assert_padding_untouched(y)
    return y


def input_grad(backend, p, out=None):
    if backend == "cpu":
        return bsmm_cpu.input_grad(p.dy, p.wt, p.wf, p.meta, p.k, p.lay.n_frozen)
    with _route(backend, p):
        out = p.nan_full(p.m, p.k, pad=backend == "tma") if out is None else out
        dx = bsmm.bsmm_input_grad(p.dy, p.wt, p.wf, p.meta, p.k, p.lay.n_frozen, out=out)
    assert dx is out
    _assert_padding_untouched(dx)
    return dx


def weight_grad(backend, p, splits=None):
    if backend == "cpu":
        return bsmm_cpu.weight_grad(p.dy, p.x, p.meta, p.lay.block_size)
    with _route(backend, p):
        out = p.nan_full(p.lay.n_train, *p.lay.block_size)
        dw = bsmm.bsmm_weight_grad(p.dy, p.x, p.meta, p.lay.block_size, out=out, splits=splits)
    assert dw is out
    return dw


# ------------------------------------------------------------------ checks
def _finite(t, what):
    bad = ~t.isfinite()
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {t.numel()} non-finite, first at {bad.nonzero()[:3].tolist()}"
    )


def check_forward(backend, p, bias=True, out=None, expected=None):
    y = forward(backend, p, bias, out)
    assert tuple(y.shape) == (p.m, p.n) and y.dtype == p.dtype
    _finite(y, f"{backend} forward")
    if expected is None:
        expected = reference_linear(p.x, p.w, p.mask, p.bias if bias else None)
    assert_close(y, expected, p.dtype, p.k, f"{backend} forward y")


def check_input_grad(backend, p, out=None, expected=None):
    dx = input_grad(backend, p, out)
    assert tuple(dx.shape) == (p.m, p.k) and dx.dtype == p.dtype
    _finite(dx, f"{backend} input grad")
    assert_close(dx, p.ref()[0] if expected is None else expected, p.dtype, p.n, f"{backend} dx")


def expected_dw_blocks(p, dw_dense):
    """Reference ``(n_train, bm, bk)`` in ``w_train`` order; zero off trainable elements and in the overhang."""
    return p.lay.gather_blocks(dw_dense)[p.lay.train_index.long()]


def check_weight_grad(backend, p, splits=None):
    dw = weight_grad(backend, p, splits)
    assert tuple(dw.shape) == (p.lay.n_train, *p.lay.block_size) and dw.dtype == p.dtype
    _finite(dw, f"{backend} weight grad")
    assert_close(dw, expected_dw_blocks(p, p.ref()[1]), p.dtype, p.m, f"{backend} dw (splits={splits})")
    return dw


# ------------------------------------------------------------------- cases
def _bs_id(bs):
    return f"{bs}" if isinstance(bs, int) else f"{bs[0]}x{bs[1]}"


def _cases():
    """Every block size x density, with dtype, mask kind and shape rotating; plus dtype x kind at 32x32."""
    cases = []
    for i, (bs, d) in enumerate(itertools.product(BLOCK_SIZES, DENSITIES)):
        cases.append((SHAPES[(i // 2) % 3], bs, d, KINDS[i % 3], DTYPES[(i // 3) % 3]))
    for dt, kind in itertools.product(DTYPES, KINDS):
        if (SHAPES[0], 32, 0.5, kind, dt) not in cases:
            cases.append((SHAPES[0], 32, 0.5, kind, dt))
    return [
        pytest.param(c, id=f"{c[0][0]}x{c[0][1]}x{c[0][2]}-b{_bs_id(c[1])}-d{c[2]}-{c[3]}-{DT_NAME[c[4]]}")
        for c in cases
    ]


CASES = _cases()


def _problem(case, device):
    (m, n, k), bs, density, kind, dtype = case
    return Problem(m, n, k, bs, dtype, density, kind, device=device)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward(backend, case, bias):
    check_forward(backend, _problem(case, _need(backend)), bias)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_input_grad(backend, case):
    check_input_grad(backend, _problem(case, _need(backend)))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_grad(backend, case):
    check_weight_grad(backend, _problem(case, _need(backend)))


def test_cases_cover_every_block_kind_and_both_cpu_regimes():
    """Guards the case list itself: mixed blocks of each sort appear, and the CPU path
    is exercised both gathered and through its dense fallback."""
    seen_codes, regimes = set(), set()
    for param in CASES:
        p = _problem(param.values[0], "cpu")
        seen_codes |= set(p.lay.block_code.unique().tolist())
        if p.lay.nnz_blocks:
            regimes.add(bsmm_cpu.use_dense(p.meta))
    assert seen_codes == {0, 1, 2, 3}
    assert regimes == {True, False}


# --------------------------------------------------- splits and strides
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_NAME.get)
@pytest.mark.parametrize("splits", [2, 3])
@pytest.mark.parametrize("backend", ["triton", "tma"])
def test_weight_grad_token_splits(backend, splits, dtype):
    dev = _need(backend)
    m = 300
    rows = math.ceil(math.ceil(m / splits) / 128) * 128  # the launcher rounds splits to 128 tokens
    assert math.ceil(m / rows) == splits, "shape too small: the launcher would merge the splits"
    p = Problem(m, 64, 48, (32, 16), dtype, 0.6, "mixed", device=dev)
    assert p.lay.n_train > 0 and int((p.lay.aux >= 0).sum()) > 0
    split = check_weight_grad(backend, p, splits=splits)
    single = weight_grad(backend, p, splits=1)
    assert_close(split, single.double(), dtype, m, "split vs unsplit dw")


@pytest.mark.parametrize("density", [0.5, 1.0])  # CPU path: gathered, dense fallback
@pytest.mark.parametrize("view", ["transposed", "sliced"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_operands(backend, view, density):
    dev = _need(backend)
    dtype = F32 if view == "transposed" else F16
    # K a multiple of bk: the CPU path uses a transposed x without copying it.
    p = Problem(37, 96, 64, (32, 16), dtype, density, "mixed", device=dev)
    if view == "transposed":
        p.x = p.x.t().contiguous().t()
        p.dy = p.dy.t().contiguous().t()
    else:
        p.x = torch.randn(p.m, 2 * p.k + 5).to(dev, dtype)[:, 3 : 3 + 2 * p.k : 2]
        p.dy = torch.randn(2 * p.m, p.n + 9).to(dev, dtype)[::2, 4 : 4 + p.n]
    assert not p.x.is_contiguous() and not p.dy.is_contiguous()
    y_out = dx_out = None
    if backend != "cpu":  # outputs as transposed views too (descriptors cannot: the pointer path runs)
        y_out = p.nan_full(p.n, p.m).t()
        dx_out = p.nan_full(p.k, p.m).t()
    check_forward(backend, p, True, y_out)
    check_input_grad(backend, p, dx_out)
    check_weight_grad(backend, p)


@pytest.mark.parametrize("m", [0, 1])
@pytest.mark.parametrize("density", [0.5, 1.0])  # CPU path: gathered, dense fallback
@pytest.mark.parametrize("backend", BACKENDS)
def test_tiny_token_counts(backend, density, m):
    """An empty batch (say, an expert that was routed no tokens) and a single token."""
    p = Problem(m, 64, 48, 16, F32, density, "mixed", device=_need(backend))
    assert p.lay.n_train > 0
    check_forward(backend, p, True)
    check_input_grad(backend, p)
    dw = check_weight_grad(backend, p)
    if m == 0:
        assert bool((dw == 0).all())


@pytest.mark.parametrize(
    "backend, bs, dtype",
    [("triton", 128, F16), ("cpu", 128, F16), ("cpu", (16, 64), BF16)],  # triton at 16x64: 12 s, no new path
    ids=["triton-b128-fp16", "cpu-b128-fp16", "cpu-b16x64-bf16"],
)
def test_long_reductions(backend, bs, dtype):
    """Rows and columns longer than one CPU reduction chunk (CHUNK_ELEMS), so partial
    sums are accumulated across chunks; the Triton kernels loop over many blocks."""
    p = Problem(20, 900, 900, bs, dtype, 0.75, "mixed", device=_need(backend))
    bm, bk = p.lay.block_size
    row_len = int(p.lay.row_offsets.diff().max())
    col_len = int(p.lay.col_offsets.diff().max())
    assert row_len * bk > bsmm_cpu.CHUNK_ELEMS and col_len * bm > bsmm_cpu.CHUNK_ELEMS
    assert not bsmm_cpu.use_dense(p.meta)
    check_forward(backend, p, True)
    check_input_grad(backend, p)
    check_weight_grad(backend, p)


def _candidates(kind, bs):
    """Every tuning candidate for a block, one per distinct kwargs (warps/stages do not
    change the interpreter's arithmetic)."""
    base = cfgs.wgrad_configs() if kind == "wgrad" else cfgs.gemm_configs()
    bm, bk = (bs, bs) if isinstance(bs, int) else bs
    unique = {}
    for cfg in cfgs.for_block(base, bm, bk):
        unique.setdefault(tuple(sorted(cfg.kwargs.items())), cfg)
    return list(unique.values())


CONFIG_CASES = [
    pytest.param(
        kind, bs, i, cfg, id=f"{kind}-b{bs[0]}x{bs[1]}-" + "-".join(f"{k}{v}" for k, v in sorted(cfg.kwargs.items()))
    )
    for kind in ("fwd", "dx", "wgrad")
    for bs in [(16, 64), (128, 32)]
    for i, cfg in enumerate(_candidates(kind, bs))
]


@pytest.mark.parametrize("kind, bs, index, cfg", CONFIG_CASES)
def test_every_tuning_candidate(kind, bs, index, cfg):
    """The default config is all the other tests use; a GPU may pick any candidate."""
    dev = _need("triton")
    if kind == "fwd":
        p = Problem(70, 100, 90, bs, F16, 0.7, "mixed", device=dev)
        y = bsmm.bsmm_forward(
            p.x, p.wt, p.wf, p.bias, p.meta, p.n, p.lay.n_frozen, out=p.nan_full(p.m, p.n), config=cfg
        )
        assert_close(y, reference_linear(p.x, p.w, p.mask, p.bias), p.dtype, p.k, f"forward {cfg}")
    elif kind == "dx":
        p = Problem(70, 100, 90, bs, BF16, 0.7, "mixed", device=dev)
        dx = bsmm.bsmm_input_grad(p.dy, p.wt, p.wf, p.meta, p.k, p.lay.n_frozen, out=p.nan_full(p.m, p.k), config=cfg)
        assert_close(dx, p.ref()[0], p.dtype, p.n, f"input grad {cfg}")
    else:
        # 300 columns: block rows hold runs of several trainable blocks (grouped dW programs);
        # 260 tokens: 2 splits (256 + 4) on every other candidate.
        p = Problem(260, 100, 300, bs, F32, 0.7, "mixed", device=dev)
        splits = 2 if index % 2 else 1
        out = p.nan_full(p.lay.n_train, *p.lay.block_size)
        dw = bsmm.bsmm_weight_grad(p.dy, p.x, p.meta, p.lay.block_size, out=out, config=cfg, splits=splits)
        assert_close(dw, expected_dw_blocks(p, p.ref()[1]), p.dtype, p.m, f"weight grad {cfg} splits={splits}")


# -------------------------------------------------------------- skip proofs
@pytest.mark.parametrize("regime", ["sparse", "dense"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_never_reads_x_of_pruned_block_columns(xfail_cpu_dense_nan, backend, regime):
    dev = _need(backend)
    xfail_cpu_dense_nan(backend, regime == "dense")
    n, k, bs = 64, 96, 16  # 4 x 6 blocks
    mask, frozen = make_masks((n, k), bs, 1.0 if regime == "dense" else 0.5, "mixed")
    dead = [4] if regime == "dense" else [1, 4]
    for c in dead:
        mask[:, c * bs : (c + 1) * bs] = False
        frozen[:, c * bs : (c + 1) * bs] = False
    p = Problem(37, n, k, bs, F32, mask=mask, frozen=frozen, device=dev)
    assert bool((p.lay.block_code[:, dead] == 0).all())
    assert bsmm_cpu.use_dense(p.meta) == (regime == "dense")
    expected = reference_linear(p.x, p.w, p.mask, p.bias)
    for c in dead:
        p.x[:, c * bs : (c + 1) * bs] = NAN
    check_forward(backend, p, True, expected=expected)


@pytest.mark.parametrize("regime", ["sparse", "dense"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_input_grad_never_reads_dy_of_pruned_block_rows(xfail_cpu_dense_nan, backend, regime):
    dev = _need(backend)
    xfail_cpu_dense_nan(backend, regime == "dense")
    n, k, bs = 96, 64, (16, 32)  # 6 x 2 blocks
    mask, frozen = make_masks((n, k), bs, 1.0 if regime == "dense" else 0.5, "mixed")
    dead = [2] if regime == "dense" else [0, 5]
    for r in dead:
        mask[r * 16 : (r + 1) * 16] = False
        frozen[r * 16 : (r + 1) * 16] = False
    p = Problem(37, n, k, bs, BF16, mask=mask, frozen=frozen, device=dev)
    assert bool((p.lay.block_code[dead] == 0).all())
    assert bsmm_cpu.use_dense(p.meta) == (regime == "dense")
    expected = p.ref()[0]
    for r in dead:
        p.dy[:, r * 16 : (r + 1) * 16] = NAN
    check_input_grad(backend, p, expected=expected)


@pytest.mark.parametrize("regime", ["sparse", "dense"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_grad_never_sees_non_trainable_regions(backend, regime):
    """NaN in dy/x columns that feed only non-trainable weights must not reach dw.

    Block row 1 and block column 3 hold no trainable element (whole frozen blocks);
    element column 70 and element row 5 are non-trainable in every block they cross,
    so the mixed blocks there must mask (not multiply) their gradient.
    """
    dev = _need(backend)
    n, k, bs = 64, 80, 16  # 4 x 5 blocks
    mask = torch.rand(n, k) < 0.9
    frozen = mask & (torch.rand(n, k) < 0.2)
    if regime == "sparse":
        for r, c in [(0, 0), (2, 2), (3, 0), (2, 4), (0, 1)]:
            mask[r * bs : (r + 1) * bs, c * bs : (c + 1) * bs] = False
    frozen[16:32] = mask[16:32]
    frozen[:, 48:64] = mask[:, 48:64]
    frozen[:, 70] = mask[:, 70]
    frozen[5] = mask[5]
    frozen &= mask
    p = Problem(40, n, k, bs, F16, mask=mask, frozen=frozen, device=dev)
    lay = p.lay
    rows, cols = lay.row_indices.long()[lay.train_index.long()], lay.col_indices.long()[lay.train_index.long()]
    assert not bool((rows == 1).any()) and not bool((cols == 3).any())
    assert bool((cols == 4).any()) and bool((rows == 0).any())
    assert bsmm_cpu.use_dense(p.meta) == (regime == "dense")
    p.dy[:, 16:32] = NAN
    p.dy[:, 5] = NAN
    p.x[:, 48:64] = NAN
    p.x[:, 70] = NAN
    check_weight_grad(backend, p)  # the float64 reference masks with where(), so it stays finite


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_NAME.get)
@pytest.mark.parametrize("backend", BACKENDS)
def test_stale_store_values_are_never_read(backend, dtype):
    """Values at positions a store does not own (optimizer drift) are never used."""
    p = Problem(37, 100, 70, 16, dtype, 0.6, "mixed", device=_need(backend))
    lay = p.lay
    aux = lay.aux.long()[lay.train_index.long()]
    has = aux >= 0
    assert bool(has.any()), "needs trainable mixed blocks"
    y_ref, (dx_ref, _, _) = reference_linear(p.x, p.w, p.mask, p.bias), p.ref()
    p.wt[has] = torch.where(lay.element_state[aux[has]] == 2, p.wt[has], NAN)
    p.wf[lay.n_frozen :] = torch.where(lay.element_state == 2, NAN, p.wf[lay.n_frozen :])
    assert bool(p.wt.isnan().any()) and bool(p.wf.isnan().any())
    check_forward(backend, p, True, expected=y_ref)
    check_input_grad(backend, p, expected=dx_ref)


@pytest.mark.parametrize("backend", ["triton", "tma"])
def test_stores_in_separate_buffers_give_the_same_result_and_say_so_once(backend, monkeypatch, recwarn):
    """Stores that are not one buffer (passed by hand, rebuilt by a sharder) are joined per call, with a warning."""
    from sparsekern.kernels import store

    p = Problem(37, 100, 70, 16, F16, 0.6, "mixed", device=_need(backend))
    assert store.adjacent(p.wt, p.wf) and p.wf.shape[0] and p.wt.shape[0]
    joined = forward(backend, p).clone()
    assert not recwarn.list, [str(w.message) for w in recwarn.list]
    monkeypatch.setattr(store, "_warned_copy", False)
    p.wt, p.wf = p.wt.clone(), p.wf.clone()
    assert not store.adjacent(p.wt, p.wf)
    with pytest.warns(UserWarning, match="not one buffer"):
        apart = forward(backend, p)
    assert torch.equal(apart, joined)
    recwarn.clear()
    forward(backend, p)
    assert not [w for w in recwarn.list if "not one buffer" in str(w.message)], "said twice"


def test_store_view_is_the_joined_buffer():
    from sparsekern.kernels import store

    buf = torch.arange(5 * 4, dtype=torch.float32).view(5, 2, 2)
    v = store.value_store(buf[:3], buf[3:])
    assert v.data_ptr() == buf.data_ptr() and torch.equal(v, buf)
    assert store.value_store(buf[:0], buf[1:]) is not None and store.value_store(buf[:3], buf[3:3]).shape[0] == 3
    assert not store.adjacent(buf[:2], buf[3:])  # a gap
    assert not store.adjacent(buf[3:], buf[:3])  # wrong order


# ---------------------------------------------------------------- bad input
@pytest.fixture
def small():
    return Problem(8, 40, 24, 16, F32, 0.5, "mixed", device=TRITON_DEVICE)


def test_forward_rejects_bad_input(small):
    _need("triton")
    p = small
    fwd = bsmm.bsmm_forward
    with pytest.raises(TypeError):
        fwd(p.x.half(), p.wt, p.wf, None, p.meta, p.n, p.lay.n_frozen)
    with pytest.raises(TypeError):
        fwd(p.x, p.wt, p.wf, p.bias.half(), p.meta, p.n, p.lay.n_frozen)
    with pytest.raises(TypeError):
        fwd(p.x.double(), p.wt.double(), p.wf.double(), None, p.meta, p.n, p.lay.n_frozen)
    with pytest.raises(ValueError):
        fwd(p.x[None], p.wt, p.wf, None, p.meta, p.n, p.lay.n_frozen)
    with pytest.raises(ValueError):
        fwd(p.x[0], p.wt, p.wf, None, p.meta, p.n, p.lay.n_frozen)
    with pytest.raises(ValueError):
        fwd(p.x, p.wt.flatten(1), p.wf, None, p.meta, p.n, p.lay.n_frozen)
    with pytest.raises(ValueError):
        fwd(p.x, p.wt, p.wf, p.bias[:-1], p.meta, p.n, p.lay.n_frozen)
    with pytest.raises(ValueError):
        fwd(p.x, p.wt, p.wf, p.bias[None], p.meta, p.n, p.lay.n_frozen)
    with pytest.raises(ValueError):
        fwd(p.x, p.wt, p.wf.transpose(1, 2), None, p.meta, p.n, p.lay.n_frozen)


def test_input_grad_rejects_bad_input(small):
    _need("triton")
    p = small
    with pytest.raises(TypeError):
        bsmm.bsmm_input_grad(p.dy.to(BF16), p.wt, p.wf, p.meta, p.k, p.lay.n_frozen)
    with pytest.raises(ValueError):
        bsmm.bsmm_input_grad(p.dy[0], p.wt, p.wf, p.meta, p.k, p.lay.n_frozen)
    with pytest.raises(ValueError):
        bsmm.bsmm_input_grad(p.dy, p.wt, p.wf[..., :8], p.meta, p.k, p.lay.n_frozen)


def test_weight_grad_rejects_bad_input(small):
    _need("triton")
    p = small
    bs = p.lay.block_size
    with pytest.raises(TypeError):
        bsmm.bsmm_weight_grad(p.dy.half(), p.x, p.meta, bs)
    with pytest.raises(TypeError):
        bsmm.bsmm_weight_grad(p.dy.double(), p.x.double(), p.meta, bs)
    with pytest.raises(ValueError):
        bsmm.bsmm_weight_grad(p.dy, p.x[None], p.meta, bs)
    with pytest.raises(ValueError):
        bsmm.bsmm_weight_grad(p.dy[:-1], p.x, p.meta, bs)


# ---------------------------------------------------------------------- GPU
GPU_CASES = [
    pytest.param(((300, 100, 70), bs, d, kind, dt), id=f"b{_bs_id(bs)}-d{d}-{kind}-{DT_NAME[dt]}")
    for bs, d, kind, dt in [
        (16, 0.5, "mixed", F32),
        (32, 0.1, "unstructured", F16),
        (64, 1.0, "block", BF16),
        ((128, 32), 0.5, "mixed", BF16),
        ((16, 64), 0.5, "mixed", F16),
        (128, 0.0, "mixed", F32),
    ]
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_compiled_kernels_on_cuda(case):
    if sk.INTERPRET:
        pytest.skip("set SPARSEKERN_INTERPRET=0 to test the compiled kernels")
    (m, n, k), bs, density, kind, dtype = case
    p = Problem(m, n, k, bs, dtype, density, kind, device="cuda")
    check_forward("triton", p, True)
    check_forward("triton", p, False)
    check_input_grad("triton", p)
    check_weight_grad("triton", p)
    check_weight_grad("triton", p, splits=2)
