"""Block-sparse conv2d kernels (``kernels/bsconv.py``) vs float64 references.

The launchers run on CPU tensors through Triton's interpreter (conftest.py); on a
CUDA machine without the interpreter they run compiled on the GPU, and ``gpu``
marks a short smoke set for ``pytest -m gpu``. Every launch writes into an
``out=`` buffer pre-filled with NaN, so an element a kernel forgets to write
fails the comparison. Tolerances come from :func:`sparsekern.testing.tolerance`
with each pass's reduction length: forward ``Cin*kh*kw``, input gradient
``Cout*kh*kw``, weight gradient ``N*Ho*Wo``. Shapes are tiny on purpose: the
interpreter runs every program in numpy.
"""

import itertools

import pytest
import torch

import sparsekern.kernels as sk
from sparsekern import convview
from sparsekern.kernels.meta import Meta
from sparsekern.layout import BlockLayout
from sparsekern.testing import assert_close, random_block_mask, reference_conv2d, reference_conv_grads

pytest.importorskip("triton")  # every test here runs the Triton conv kernels

from sparsekern.kernels import bsconv  # noqa: E402
from sparsekern.kernels import configs as cfgs  # noqa: E402

# The float64 reference pads an even 'same' kernel by copying the input; torch warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")

NAN = float("nan")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DTYPES = [F32, F16, BF16]
DT_NAME = {F32: "fp32", F16: "fp16", BF16: "bf16"}
KINDS = ["block", "unstructured", "mixed"]
CL, NCHW = torch.channels_last, torch.contiguous_format
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and not sk.INTERPRET else "cpu"


def _need():
    if not sk.use_triton(torch.device(TRITON_DEVICE)):
        pytest.skip(f"Triton kernels do not run on {TRITON_DEVICE} here (INTERPRET={sk.INTERPRET})")
    return TRITON_DEVICE


def make_conv_masks(weight_shape, bs, density, kind):
    """``(mask, frozen_mask or None)`` of a ``(Cout, Cin, kh, kw)`` weight.

    ``block`` masks are whole blocks of the matrix view; ``mixed`` adds partly
    pruned and partly frozen blocks (as in test_kernels.make_masks).
    """
    c_out, c_in, kh, kw = weight_shape
    if kind == "unstructured":
        return torch.rand(weight_shape) < density, None
    bm, bk = (bs, bs) if isinstance(bs, int) else bs
    shape = convview.matrix_shape(weight_shape, bk)

    def back(m):
        return convview.from_matrix(m, c_in, kh, kw)

    mask = back(random_block_mask(shape, bs, density))
    if kind == "block":
        return mask, None
    thin, frz, allf = (back(random_block_mask(shape, bs, 0.5)) for _ in range(3))
    r = torch.rand(weight_shape)
    mask &= ~(thin & (r < 0.25))
    return mask, mask & frz & (~thin | allf | (r > 0.7))


class ConvProblem:
    """A conv layout, its value stores, geometry and random operands, in ``dtype`` on ``device``."""

    def __init__(self, n, c_in, hw, c_out, k, stride=1, padding=0, dilation=1, bs=16, dtype=F32,
                 density=0.5, kind="mixed", fmt=CL, mask=None, frozen=None, device="cpu"):  # fmt: skip
        self.dtype, self.device = dtype, torch.device(device)
        self.conv = dict(stride=stride, padding=padding, dilation=dilation)
        w_shape = (c_out, c_in, *k)
        if mask is None:
            mask, frozen = make_conv_masks(w_shape, bs, density, kind)
        self.mask, self.frozen = mask.to(device), None if frozen is None else frozen.to(device)
        self.bm, self.bk = (bs, bs) if isinstance(bs, int) else bs
        bk = self.bk
        frozen_m = None if frozen is None else convview.to_matrix(self.frozen, bk, False)
        self.lay = BlockLayout.from_masks(convview.to_matrix(self.mask, bk, False), frozen_m, (self.bm, bk))
        self.w = torch.randn(w_shape).to(device=device, dtype=dtype)
        self.wt, self.wf = self.lay.split_values(convview.to_matrix(self.w, bk))
        self.meta = Meta(*self.lay.meta())
        self.x = torch.randn(n, c_in, *hw).to(device=device, dtype=dtype).to(memory_format=fmt)
        self.geom = convview.conv_geometry(self.x.shape, w_shape, stride, padding, dilation, bk)
        g = self.geom
        self.y_shape = (n, c_out, g.h_out, g.w_out)
        self.dy = torch.randn(self.y_shape).to(device=device, dtype=dtype).to(memory_format=fmt)
        self.bias = torch.randn(c_out).to(device=device, dtype=dtype)
        self.fmt = fmt

    def nan_full(self, shape, fmt=None):
        t = torch.full(shape, NAN, dtype=self.dtype, device=self.device)
        return t.to(memory_format=fmt or self.fmt) if len(shape) == 4 else t

    @property
    def k_fwd(self):
        return self.geom.c_in * self.geom.kh * self.geom.kw

    @property
    def k_dx(self):
        return self.geom.c_out * self.geom.kh * self.geom.kw

    @property
    def k_dw(self):
        return self.geom.n * self.geom.h_out * self.geom.w_out

    def ref_y(self, bias=True):
        return reference_conv2d(self.x, self.w, self.mask, self.bias if bias else None, **self.conv)

    def ref_grads(self):
        return reference_conv_grads(self.x, self.w, self.mask, self.frozen, self.dy, None, **self.conv)

    def dw_blocks(self, dw_dense):
        """Reference ``(n_train, bm, bk)`` in ``w_train`` order from a dense ``(Cout, Cin, kh, kw)`` gradient."""
        return self.lay.gather_blocks(convview.to_matrix(dw_dense, self.bk))[self.lay.train_index.long()]

    # launches, each into a NaN-poisoned out=
    def forward(self, bias=True, out=None, config=None):
        out = self.nan_full(self.y_shape) if out is None else out
        y = bsconv.bsconv_forward(self.x, self.wt, self.wf, self.bias if bias else None, self.meta, self.geom,
                                  self.lay.n_frozen, out=out, config=config)  # fmt: skip
        assert y is out
        return y

    def input_grad(self, out=None, config=None):
        out = self.nan_full(tuple(self.x.shape)) if out is None else out
        dx = bsconv.bsconv_input_grad(self.dy, self.wt, self.wf, self.meta, self.geom, self.lay.n_frozen,
                                      out=out, config=config)  # fmt: skip
        assert dx is out
        return dx

    def weight_grad(self, splits=None, config=None):
        out = self.nan_full((self.lay.n_train, self.bm, self.bk))
        dw = bsconv.bsconv_weight_grad(self.dy, self.x, self.meta, self.geom, (self.bm, self.bk),
                                       config=config, splits=splits, out=out)  # fmt: skip
        assert dw is out
        return dw


def check_forward(p, bias=True, out=None, expected=None, config=None):
    y = p.forward(bias, out, config)
    assert tuple(y.shape) == p.y_shape and y.dtype == p.dtype
    assert_close(y, p.ref_y(bias) if expected is None else expected, p.dtype, p.k_fwd, "conv forward y")


def check_input_grad(p, out=None, expected=None, config=None):
    dx = p.input_grad(out, config)
    assert tuple(dx.shape) == tuple(p.x.shape) and dx.dtype == p.dtype
    assert_close(dx, p.ref_grads()[0] if expected is None else expected, p.dtype, p.k_dx, "conv dx")


def check_weight_grad(p, splits=None, expected=None, config=None):
    dw = p.weight_grad(splits, config)
    assert tuple(dw.shape) == (p.lay.n_train, p.bm, p.bk) and dw.dtype == p.dtype
    exp = p.dw_blocks(p.ref_grads()[1]) if expected is None else expected
    assert_close(dw, exp, p.dtype, p.k_dw, f"conv dw (splits={splits})")
    return dw


# ------------------------------------------------------------------- cases
# (id, N, Cin, (H, W), Cout, (kh, kw), stride, padding, dilation): odd sizes almost everywhere.
GEOMS = [
    ("3x3-s1-p1", 2, 5, (7, 6), 20, (3, 3), 1, 1, 1),
    ("3x3-s2-p0", 2, 19, (9, 8), 18, (3, 3), 2, 0, 1),
    ("3x2-s2x1-p1x2", 1, 7, (8, 7), 17, (3, 2), (2, 1), (1, 2), 1),
    ("2x4-same", 1, 5, (6, 7), 9, (2, 4), 1, "same", 1),  # even kernel: asymmetric padding
    ("3x3-valid-d2", 2, 16, (9, 9), 12, (3, 3), 1, "valid", 2),  # Cin a block multiple: whole frozen blocks
    ("1x1", 2, 33, (5, 4), 40, (1, 1), 1, 0, 1),
    ("7x7-s2-p3", 1, 3, (13, 12), 16, (7, 7), 2, 3, 1),
]
BLOCK_SIZES = [16, 32, (16, 32), (32, 16)]
DENSITIES = [0.5, 1.0, 0.0]


def _bs_id(bs):
    return f"{bs}" if isinstance(bs, int) else f"{bs[0]}x{bs[1]}"


def _cases():
    """Every geometry x block size, with density, mask kind, dtype and memory formats rotating.

    ``fmt`` is the inputs' memory format, ``out_fmt`` that of the NaN-poisoned outputs.
    """
    cases = []
    for i, (geom, bs) in enumerate(itertools.product(GEOMS, BLOCK_SIZES)):
        density, kind, dtype = DENSITIES[i % 3], KINDS[(i // 3) % 3], DTYPES[(i // 2) % 3]
        fmt, out_fmt = (CL, NCHW)[(i // 4) % 2], (CL, NCHW)[i % 2]
        cases.append((geom, bs, density, kind, dtype, fmt, out_fmt))
    name = {CL: "cl", NCHW: "nchw"}
    return [
        pytest.param(c, id=f"{c[0][0]}-b{_bs_id(c[1])}-d{c[2]}-{c[3]}-{DT_NAME[c[4]]}-{name[c[5]]}-out_{name[c[6]]}")
        for c in cases
    ]


CASES = _cases()


def _problem(case, device):
    (_, n, c_in, hw, c_out, k, stride, padding, dilation), bs, density, kind, dtype, fmt, _ = case
    return ConvProblem(n, c_in, hw, c_out, k, stride, padding, dilation, bs, dtype, density, kind, fmt, device=device)


@pytest.mark.parametrize("case", CASES)
def test_forward(case):
    p = _problem(case, _need())
    check_forward(p, bias=case[1] in (16, (16, 32)), out=p.nan_full(p.y_shape, fmt=case[6]))


@pytest.mark.parametrize("case", CASES)
def test_input_grad(case):
    p = _problem(case, _need())
    check_input_grad(p, out=p.nan_full(tuple(p.x.shape), fmt=case[6]))


@pytest.mark.parametrize("case", CASES)
def test_weight_grad(case):
    check_weight_grad(_problem(case, _need()))


def test_cases_cover_block_kinds_dtypes_and_formats():
    """Guards the case list: every block code, dtype, density, format and geometry appears."""
    codes, seen = set(), set()
    for param in CASES:
        case = param.values[0]
        p = _problem(case, "cpu")
        codes |= set(p.lay.block_code.unique().tolist())
        seen |= {("dtype", case[4]), ("density", case[2]), ("fmt", case[5]), ("out_fmt", case[6]), ("kind", case[3])}
    assert codes == {0, 1, 2, 3}
    formats = [CL, NCHW]
    wanted = [("dtype", DTYPES), ("density", DENSITIES), ("fmt", formats), ("out_fmt", formats), ("kind", KINDS)]
    for what, values in wanted:
        for v in values:
            assert (what, v) in seen, f"no case with {what}={v}"


def test_default_outputs_are_channels_last():
    p = ConvProblem(1, 5, (5, 6), 9, (3, 3), padding=1, fmt=NCHW, device=_need())
    y = bsconv.bsconv_forward(p.x, p.wt, p.wf, p.bias, p.meta, p.geom, p.lay.n_frozen)
    dx = bsconv.bsconv_input_grad(p.dy, p.wt, p.wf, p.meta, p.geom, p.lay.n_frozen)
    assert y.is_contiguous(memory_format=CL) and dx.is_contiguous(memory_format=CL)
    assert_close(y, p.ref_y(), p.dtype, p.k_fwd, "y (default out)")
    assert_close(dx, p.ref_grads()[0], p.dtype, p.k_dx, "dx (default out)")


# --------------------------------------------------- splits, views, sizes
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_NAME.get)
def test_weight_grad_token_splits(dtype):
    # 2 x 12 x 12 = 288 tokens: splits of 256 (rounded to 128 tokens) and 32.
    p = ConvProblem(2, 20, (12, 12), 24, (3, 3), padding=1, bs=(16, 32), dtype=dtype, device=_need())
    assert p.k_dw == 288 and p.lay.n_train > 0 and int((p.lay.aux >= 0).sum()) > 0
    split = check_weight_grad(p, splits=2)
    assert_close(split, p.weight_grad(splits=1).double(), dtype, p.k_dw, "split vs unsplit dw")


def test_strided_views_are_never_read_outside_the_tensor():
    """Activations as views into larger NaN-filled buffers (spatial halo, extra channels, every other
    image): loads outside the image and channels >= Cin must be masked, not read."""
    dev = _need()
    p = ConvProblem(2, 7, (6, 5), 18, (3, 3), stride=2, padding=(2, 1), bs=16, dtype=F16, device=dev)
    g = p.geom

    def embed(t, fmt):
        n, c, h, w = t.shape
        big = torch.full((2 * n, c + 3, h + 4, w + 5), NAN, dtype=t.dtype, device=dev).to(memory_format=fmt)
        view = big[::2, 1 : 1 + c, 2 : 2 + h, 3 : 3 + w]
        view.copy_(t)
        return view

    y_ref, (dx_ref, dw_ref, _) = p.ref_y(), p.ref_grads()
    p.x, p.dy = embed(p.x, CL), embed(p.dy, NCHW)
    assert not p.x.is_contiguous(memory_format=CL) and not p.dy.is_contiguous()
    y_out = embed(p.nan_full(p.y_shape), CL)
    dx_out = embed(p.nan_full((g.n, g.c_in, g.h, g.w)), NCHW)
    check_forward(p, out=y_out, expected=y_ref)
    check_input_grad(p, out=dx_out, expected=dx_ref)
    check_weight_grad(p, expected=p.dw_blocks(dw_ref))


@pytest.mark.parametrize(
    "k, stride, padding, dilation",
    [((1, 1), 2, 0, 1), ((2, 2), 3, 1, 2), ((3, 1), (3, 2), (2, 0), (2, 1))],
    ids=["1x1-s2", "2x2-s3-p1-d2", "3x1-s3x2-p2x0-d2x1"],
)
def test_input_grad_stride_phases(k, stride, padding, dilation):
    """dx programs own one stride phase and skip the taps that miss it; pixels no tap reaches
    (1x1 stride 2) are still written, as zeros. H, W are not multiples of the strides."""
    p = ConvProblem(2, 9, (10, 7), 20, k, stride, padding, dilation, bs=16, dtype=F32, density=0.8, device=_need())
    check_input_grad(p)
    check_forward(p)
    check_weight_grad(p)


def test_channel_order_worked_example():
    """The docstring example of ``bsconv.channel_order``: two taps, two channel blocks."""
    meta = Meta(*[torch.zeros(0, dtype=torch.int32)] * len(Meta._fields))._replace(
        col_offsets=torch.tensor([0, 1, 4, 4, 5], dtype=torch.int32)
    )
    geom = convview.conv_geometry((1, 32, 4, 4), (8, 32, 1, 2), bk=16)
    assert bsconv.channel_order(meta, geom, 16).tolist() == [1, 0]


def test_empty_batch():
    p = ConvProblem(0, 5, (5, 5), 9, (3, 3), padding=1, device=_need())
    assert p.forward().numel() == 0 and p.input_grad().numel() == 0
    assert bool((p.weight_grad() == 0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_NAME.get)
def test_stale_store_values_are_never_read(dtype):
    """Values at positions a store does not own (optimizer drift) are never used."""
    p = ConvProblem(1, 20, (5, 5), 24, (3, 3), padding=1, bs=16, dtype=dtype, density=0.6, device=_need())
    lay = p.lay
    aux = lay.aux.long()[lay.train_index.long()]
    has = aux >= 0
    assert bool(has.any()), "needs trainable mixed blocks"
    y_ref, dx_ref = p.ref_y(), p.ref_grads()[0]
    p.wt[has] = torch.where(lay.element_state[aux[has]] == 2, p.wt[has], NAN)
    p.wf[lay.n_frozen :] = torch.where(lay.element_state == 2, NAN, p.wf[lay.n_frozen :])
    assert bool(p.wt.isnan().any()) and bool(p.wf.isnan().any())
    check_forward(p, expected=y_ref)
    check_input_grad(p, expected=dx_ref)


# -------------------------------------------------------------- skip proofs
@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["cl", "nchw"])
def test_pruned_input_channels_are_never_read(fmt):
    """NaN in x at input channels whose block columns are pruned at every tap reaches neither y nor dw."""
    dev = _need()
    c_in, bs = 40, (16, 16)  # channel blocks 0..2 (c_pad 48), block 1 = channels 16..31
    w_shape = (24, c_in, 3, 3)
    mask, frozen = make_conv_masks(w_shape, bs, 0.7, "mixed")
    mask[:, 16:32] = False
    frozen[:, 16:32] = False
    p = ConvProblem(2, c_in, (5, 6), 24, (3, 3), padding=1, bs=bs, fmt=fmt, mask=mask, frozen=frozen, device=dev)
    cpb = p.geom.c_pad // p.bk
    cols = torch.arange(p.lay.grid[1]).view(9, cpb)[:, 1]
    assert bool((p.lay.block_code[:, cols] == 0).all()) and p.lay.n_train > 0
    y_ref, dw_ref = p.ref_y(), p.ref_grads()[1]
    p.x[:, 16:32] = NAN
    check_forward(p, expected=y_ref)
    check_weight_grad(p, expected=p.dw_blocks(dw_ref))


@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["cl", "nchw"])
def test_pruned_output_channels_never_reach_dx(fmt):
    """NaN in dy at output channels whose block row is empty never reaches dx (nor dw)."""
    dev = _need()
    bs = (16, 32)
    w_shape = (48, 9, 3, 2)
    mask, frozen = make_conv_masks(w_shape, bs, 0.7, "mixed")
    mask[16:32] = False
    frozen[16:32] = False
    p = ConvProblem(2, 9, (6, 5), 48, (3, 2), stride=(1, 2), padding=1, bs=bs, dtype=BF16, fmt=fmt,
                    mask=mask, frozen=frozen, device=dev)  # fmt: skip
    assert bool((p.lay.block_code[1] == 0).all())
    dx_ref, dw_ref, _ = p.ref_grads()
    p.dy[:, 16:32] = NAN
    check_input_grad(p, expected=dx_ref)
    check_weight_grad(p, expected=p.dw_blocks(dw_ref))


# ----------------------------------------------------- tuning candidates
def _candidates(kind, bs):
    """Every tuning candidate for a block, one per distinct kwargs (warps/stages do not
    change the interpreter's arithmetic)."""
    unique = {}
    for cfg in cfgs.for_block(cfgs.candidates(kind), *bs):
        unique.setdefault(tuple(sorted(cfg.kwargs.items())), cfg)
    return list(unique.values())


CONFIG_BS = (32, 16)
CONFIG_CASES = [
    pytest.param(kind, i, cfg, id=f"{kind}-" + "-".join(f"{k}{v}" for k, v in sorted(cfg.kwargs.items())))
    for kind in ("conv_fwd", "conv_dx", "conv_wgrad")
    for i, cfg in enumerate(_candidates(kind, CONFIG_BS))
]


@pytest.mark.parametrize("kind, index, cfg", CONFIG_CASES)
def test_every_tuning_candidate(kind, index, cfg):
    """The default config is what the other tests use; a GPU may pick any candidate (SWAP_AB, GROUP)."""
    dev = _need()
    # Cin 20 at bk 16: 2 channel blocks per tap, so block rows hold runs of trainable blocks at
    # different taps (grouped dW programs gather several taps at once). 3 x 6 x 9 = 162 tokens:
    # every other candidate reduces them in 2 splits (128 + 34).
    p = ConvProblem(3, 20, (12, 9), 40, (3, 3), stride=(2, 1), padding=1, bs=CONFIG_BS, dtype=F16,
                    density=0.7, device=dev)  # fmt: skip
    assert p.k_dw == 162
    if kind == "conv_fwd":
        check_forward(p, config=cfg)
    elif kind == "conv_dx":
        check_input_grad(p, config=cfg)
    else:
        check_weight_grad(p, splits=1 + index % 2, config=cfg)


# ---------------------------------------------------------------- bad input
@pytest.fixture
def small():
    return ConvProblem(1, 5, (5, 5), 20, (3, 3), padding=1, device=_need())


def test_forward_rejects_bad_input(small):
    p = small
    args = (p.wt, p.wf, p.bias, p.meta, p.geom, p.lay.n_frozen)
    fwd = bsconv.bsconv_forward
    with pytest.raises(TypeError):
        fwd(p.x.half(), *args)
    with pytest.raises(TypeError):
        fwd(p.x.double(), p.wt.double(), p.wf.double(), None, p.meta, p.geom, p.lay.n_frozen)
    with pytest.raises(TypeError):
        fwd(p.x, p.wt, p.wf, p.bias.half(), p.meta, p.geom, p.lay.n_frozen)
    with pytest.raises(ValueError):
        fwd(p.x[0], *args)
    with pytest.raises(ValueError):
        fwd(p.x[:, :4], *args)
    with pytest.raises(ValueError):
        fwd(p.x, p.wt, p.wf, p.bias[:-1], p.meta, p.geom, p.lay.n_frozen)
    with pytest.raises(ValueError):
        fwd(p.x, *args, out=p.nan_full((1, 20, 4, 5)))
    with pytest.raises(ValueError):  # geometry of another block size
        fwd(p.x, p.wt, p.wf, p.bias, p.meta, p.geom._replace(c_pad=32), p.lay.n_frozen)
    with pytest.raises(ValueError):  # geometry of another kernel size
        fwd(p.x, p.wt, p.wf, p.bias, p.meta, p.geom._replace(kh=1, kw=1), p.lay.n_frozen)
    with pytest.raises(TypeError):
        fwd(p.x, p.wt, p.wf, p.bias, p.meta, tuple(p.geom), p.lay.n_frozen)
    with pytest.raises(ValueError):
        fwd(p.x, p.wt, p.wf, p.bias, p.meta, p.geom, p.lay.n_frozen + 1)


def test_input_grad_rejects_bad_input(small):
    p = small
    with pytest.raises(TypeError):
        bsconv.bsconv_input_grad(p.dy.to(BF16), p.wt, p.wf, p.meta, p.geom, p.lay.n_frozen)
    with pytest.raises(ValueError):
        bsconv.bsconv_input_grad(p.dy[:, :, 1:], p.wt, p.wf, p.meta, p.geom, p.lay.n_frozen)
    with pytest.raises(ValueError):
        bsconv.bsconv_input_grad(p.dy, p.wt, p.wf[..., :8], p.meta, p.geom, p.lay.n_frozen)


def test_weight_grad_rejects_bad_input(small):
    p = small
    bs = (p.bm, p.bk)
    with pytest.raises(TypeError):
        bsconv.bsconv_weight_grad(p.dy.half(), p.x, p.meta, p.geom, bs)
    with pytest.raises(TypeError):
        bsconv.bsconv_weight_grad(p.dy.double(), p.x.double(), p.meta, p.geom, bs)
    with pytest.raises(ValueError):
        bsconv.bsconv_weight_grad(p.dy, p.x[:, :, :-1], p.meta, p.geom, bs)
    with pytest.raises(ValueError):
        bsconv.bsconv_weight_grad(p.dy, p.x, p.meta, p.geom, (32, 16))


# ---------------------------------------------------------------------- GPU
GPU_CASES = [
    pytest.param(c, id=c[0])
    for c in [
        ("b16-s1-fp32-cl", 4, 37, (17, 15), 70, (3, 3), 1, 1, 1, 16, F32, 0.5, "mixed", CL),
        ("b32-s2-fp16-nchw", 4, 64, (20, 19), 96, (3, 3), 2, 1, 1, 32, F16, 0.5, "block", NCHW),
        ("b64-same-bf16-cl", 2, 96, (16, 16), 128, (2, 4), 1, "same", 1, 64, BF16, 0.3, "mixed", CL),
        ("b128x32-7x7-bf16-cl", 2, 35, (30, 31), 130, (7, 7), 2, 3, 1, (128, 32), BF16, 0.5, "unstructured", CL),
    ]
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_compiled_conv_kernels_on_cuda(case):
    if sk.INTERPRET:
        pytest.skip("set SPARSEKERN_INTERPRET=0 to test the compiled kernels")
    _, n, c_in, hw, c_out, k, stride, padding, dilation, bs, dtype, density, kind, fmt = case
    p = ConvProblem(n, c_in, hw, c_out, k, stride, padding, dilation, bs, dtype, density, kind, fmt, device="cuda")
    check_forward(p)
    check_forward(p, bias=False)
    check_input_grad(p)
    check_weight_grad(p)
    check_weight_grad(p, splits=2)


# ------------------------------------------------------- pointwise convs
@pytest.mark.parametrize("dtype", DTYPES, ids=DT_NAME.get)
def test_pointwise_convs_run_the_linear_kernels(dtype, monkeypatch):
    """A 1x1 stride-1 conv on channels_last operands is the linear kernels' matmul over pixels, here
    with odd channel counts (the layout's overhang past Cin), mixed blocks, a bias and every pass."""
    dev = _need()
    from sparsekern.kernels import bsmm

    calls = []
    for name in ("bsmm_forward", "bsmm_input_grad", "bsmm_weight_grad"):
        real = getattr(bsmm, name)
        monkeypatch.setattr(bsmm, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    p = ConvProblem(3, 33, (5, 4), 40, (1, 1), bs=(16, 32), dtype=dtype, density=0.7, kind="mixed", device=dev)
    check_forward(p, out=p.nan_full(p.y_shape))
    check_input_grad(p, out=p.nan_full(tuple(p.x.shape)))
    check_weight_grad(p, splits=2)
    assert calls == ["bsmm_forward", "bsmm_input_grad", "bsmm_weight_grad"]
    calls.clear()
    p.fmt = NCHW  # NCHW outputs have no token matrix: the conv kernels run
    check_forward(p, out=p.nan_full(p.y_shape))
    assert calls == []


def test_token_matrix_views_only_evenly_spaced_pixels():
    from sparsekern.kernels import conv_routes

    x = torch.randn(2, 6, 3, 4).to(memory_format=CL)
    v = conv_routes.token_matrix(x)
    assert v.data_ptr() == x.data_ptr() and torch.equal(v, x.permute(0, 2, 3, 1).reshape(24, 6))
    sliced = torch.randn(2, 10, 3, 4).to(memory_format=CL)[:, 2:8]  # a channel slice: pixels 10 apart
    assert torch.equal(conv_routes.token_matrix(sliced), sliced.permute(0, 2, 3, 1).reshape(24, 6))
    assert conv_routes.token_matrix(torch.randn(2, 6, 3, 4)) is None  # NCHW
    assert conv_routes.token_matrix(x[:, :, :, :3]) is None  # a spatial crop: rows not evenly spaced
