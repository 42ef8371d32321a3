"""The sm_90 descriptor conv kernels (``kernels/bsconv_tma.py``) vs float64 references, through the interpreter.

``SPARSEKERN_TMA=1`` makes the interpreter take the descriptor path (Triton 3.9's interpreter runs
tensor-descriptor loads and stores, out-of-bounds zero fill included); every test asserts that the
descriptor kernels really ran. Operands, NaN-poisoned outputs and tolerances are those of
``test_conv_kernels.py``; the geometries here have channel counts the descriptors accept (16-byte rows).
"""

import itertools

import pytest
import torch

pytest.importorskip("triton")

from test_conv_kernels import (  # noqa: E402
    BF16,
    CL,
    F16,
    F32,
    NAN,
    NCHW,
    ConvProblem,
    _candidates,
    _need,
    check_forward,
    check_input_grad,
    check_weight_grad,
    make_conv_masks,
)

from sparsekern import convview  # noqa: E402
from sparsekern.kernels import bsconv_tables, bsconv_tma, launch  # noqa: E402
from sparsekern.kernels.meta import Meta  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths:UserWarning")


def _count_launches(monkeypatch) -> dict:
    """Wrap the descriptor launchers so that a test can see which passes ran them, and record in
    ``TILINGS`` whether each weight-gradient launch (and its split sizing) took one-pixel tiles."""
    calls = {"forward": 0, "input_grad": 0, "weight_grad": 0}
    for name in calls:
        real = getattr(bsconv_tma, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(bsconv_tma, name, counted)
    real_tiling = bsconv_tma.wgrad_tiling
    TILINGS.clear()

    def recorded(*a):
        out = real_tiling(*a)
        TILINGS.append(out[2])
        return out

    monkeypatch.setattr(bsconv_tma, "wgrad_tiling", recorded)
    return calls


TILINGS: list[bool] = []  # one-pixel tiles or not, per wgrad_tiling call of the current test


@pytest.fixture
def rect(monkeypatch):
    """Route the launchers to the descriptor kernels (interpreter) and count their launches per pass."""
    if launch.TensorDescriptor is None:
        pytest.skip("this Triton has no tensor descriptors")
    if _need() != "cpu":
        pytest.skip("the descriptor path is forced only under the interpreter here")
    monkeypatch.setenv("SPARSEKERN_TMA", "1")
    return _count_launches(monkeypatch)


def _all_passes(p, calls, splits=None):
    check_forward(p, bias=True, out=p.nan_full(p.y_shape))
    check_input_grad(p, out=p.nan_full(tuple(p.x.shape)))
    check_weight_grad(p, splits=splits)
    want = {"forward": 1, "input_grad": 1, "weight_grad": int(p.lay.n_train > 0)}  # no trainable block: no launch
    assert calls == want, f"a pass ran the pointer kernels: {calls}"


# (id, N, Cin, (H, W), Cout, (kh, kw), stride, padding, dilation); Cin and Cout multiples of 8 (16-byte
# fp16 pixels, what a descriptor needs); Cout not a multiple of the block: the store clips the last row.
GEOMS = [
    ("3x3-s1-p1", 2, 16, (7, 6), 24, (3, 3), 1, 1, 1),
    ("3x3-s1-ctail", 1, 24, (5, 7), 40, (3, 3), 1, 1, 1),  # c_pad 32: the last channel block is half zero fill
    ("2x4-same", 1, 8, (6, 7), 8, (2, 4), 1, "same", 1),  # Cin < bk and asymmetric padding
    ("3x3-valid-d2", 2, 16, (9, 9), 16, (3, 3), 1, "valid", 2),
    ("1x1-p1", 3, 24, (5, 4), 40, (1, 1), 1, 1, 1),  # padded: not pointwise (those run the linear kernels)
    ("3x3-s2-p1", 2, 32, (8, 8), 24, (3, 3), 2, 1, 1),  # the stride-phase view in both dimensions
    ("3x2-s2x1-p1x2", 2, 32, (8, 6), 16, (3, 2), (2, 1), (1, 2), 1),
    ("1x1-s2", 2, 32, (6, 6), 24, (1, 1), 2, 0, 1),
]
BLOCK_SIZES = [16, 32, (16, 32), (32, 16)]
KINDS = ["block", "unstructured", "mixed"]


def _cases():
    out = []
    for i, (geom, bs) in enumerate(itertools.product(GEOMS, BLOCK_SIZES)):
        kind, dtype, density = KINDS[i % 3], (F32, F16, BF16)[(i // 3) % 3], (0.5, 1.0, 0.0, 0.7)[i % 4]
        if geom[6] != 1 and (geom[2] % (bs if isinstance(bs, int) else bs[1])):
            continue  # a strided conv needs C_in % bk == 0 (see rect_reason): the pointer kernels run it
        out.append(pytest.param(geom, bs, kind, dtype, density, id=f"{geom[0]}-b{bs}-{kind}-{dtype}-d{density}"))
    return out


@pytest.mark.parametrize("geom, bs, kind, dtype, density", _cases())
def test_all_passes(rect, geom, bs, kind, dtype, density):
    _, n, c_in, hw, c_out, k, stride, padding, dilation = geom
    p = ConvProblem(n, c_in, hw, c_out, k, stride, padding, dilation, bs, dtype, density, kind, CL, device="cpu")
    _all_passes(p, rect)


def test_weight_grad_splits_and_rectangles_past_the_image(rect):
    """10x10 images in 8x8/8x16 rectangles: most rectangles hang over the edge (zero-filled dy)."""
    p = ConvProblem(3, 16, (10, 10), 24, (3, 3), padding=1, bs=16, dtype=F16, density=0.6, device="cpu")
    split = check_weight_grad(p, splits=3)
    check_weight_grad(p, splits=1, expected=split.double())
    assert rect["weight_grad"] == 2


# Batches large enough that the weight gradient takes one-pixel tiles of BLOCK_M images (64 for 16-bit
# operands, 32 for fp32): (id, N, Cin, (H, W), Cout, (kh, kw), stride, padding, dilation, dtype).
BATCH_INNER_CASES = [
    ("3x3-s1-p1-fp16", 64, 16, (5, 6), 24, (3, 3), 1, 1, 1, F16),
    ("3x3-s1-tail-bf16", 120, 16, (3, 3), 16, (3, 3), 1, 1, 1, BF16),  # 2 tiles of 64 images, 8 zero-filled
    ("3x3-s2-p1-fp16", 64, 32, (8, 8), 24, (3, 3), 2, 1, 1, F16),  # the stride-phase view, N inside
    ("3x2-s2x1-fp32", 60, 32, (8, 6), 16, (3, 2), (2, 1), (1, 2), 1, F32),  # 4 images zero-filled
    ("3x3-d2-fp32", 64, 16, (5, 5), 16, (3, 3), 1, 2, 2, F32),
]


def _block_m(dtype):
    """The weight gradient's default token step for ``dtype`` on the descriptor path."""
    from sparsekern.kernels import configs

    elem = torch.empty(0, dtype=dtype).element_size()
    return configs.default_config("conv_wgrad", 16, 16, elem, cap=90, variant="rect").kwargs["BLOCK_M"]


@pytest.mark.parametrize("case", [pytest.param(c, id=c[0]) for c in BATCH_INNER_CASES])
@pytest.mark.parametrize("splits", [None, 3])
def test_one_pixel_tiles(rect, case, splits):
    """The weight gradient on tiles of one output pixel of BLOCK_M images (descriptors ordered
    [H, W, N, C]), split over programs at arbitrary tile boundaries, the batch past N zero-filled; the
    forward and input gradient of the same problem on rectangles."""
    _, n, c_in, hw, c_out, k, stride, padding, dilation, dtype = case
    p = ConvProblem(n, c_in, hw, c_out, k, stride, padding, dilation, 16, dtype, 0.6, "mixed", CL, device="cpu")
    assert bsconv_tma.wgrad_tiling(_block_m(dtype), n, *p.y_shape[2:])[2], "the case must take one-pixel tiles"
    _all_passes(p, rect, splits=splits)
    assert TILINGS and all(TILINGS), "the weight gradient's launch took rectangles"


@pytest.mark.parametrize(
    "block_m, n, hw, tile, inner",
    [
        (64, 256, (14, 14), (64, 1, 1), True),
        (64, 300, (14, 14), (64, 1, 1), True),
        (64, 8, (14, 14), (2, 2, 16), False),
        (64, 48, (14, 14), (16, 2, 2), False),
    ],
)
def test_wgrad_tiling_docstring_examples(block_m, n, hw, tile, inner):
    """256 and 300 images of 14x14 take one-pixel tiles (1.0x and 1.07x the pixels; rectangles 1.0x and
    1.01x); 48 images take rectangles (1.0x against 1.33x), and so do 8 (1.14x against 8x)."""
    got_tile, grid, got_inner = bsconv_tma.wgrad_tiling(block_m, n, *hw)
    assert (got_tile, got_inner) == (tile, inner)
    cover = tuple(-(-d // t) for d, t in zip((n, *hw), tile, strict=True))
    assert grid == ((-(-n // block_m), *hw) if inner else cover)


@pytest.mark.parametrize("n", [2, 64])  # 64 images: the weight gradient's [H, W, N, C] descriptors
def test_views_into_nan_buffers_are_never_read_outside_the_tensor(rect, n):
    """x, dy and the outputs as views into NaN-filled buffers with a spatial halo and extra channels:
    boxes past the view's edge are zero-filled by the descriptor's bounds, never read from the halo."""
    p = ConvProblem(n, 16, (6, 5), 16, (3, 3), stride=1, padding=(2, 1), bs=16, dtype=F16, device="cpu")

    def embed(t):
        n, c, h, w = t.shape
        big = torch.full((n, c + 8, h + 4, w + 6), NAN, dtype=t.dtype).to(memory_format=CL)
        view = big[:, 8:, 2 : 2 + h, 3 : 3 + w]
        view.copy_(t)
        return view

    y_ref, (dx_ref, dw_ref, _) = p.ref_y(), p.ref_grads()
    p.x, p.dy = embed(p.x), embed(p.dy)
    assert not p.x.is_contiguous(memory_format=CL)
    check_forward(p, out=embed(p.nan_full(p.y_shape)), expected=y_ref)
    check_input_grad(p, out=embed(p.nan_full(tuple(p.x.shape))), expected=dx_ref)
    check_weight_grad(p, expected=p.dw_blocks(dw_ref))
    assert all(rect.values())
    assert TILINGS and all(t == (n == 64) for t in TILINGS)


@pytest.mark.parametrize("n", [2, 64])  # 64 images: the weight gradient's one-pixel tiles
def test_pruned_input_channels_are_never_read(rect, n):
    """NaN in x at channels whose block columns are pruned at every tap reaches neither y nor dw."""
    c_in, bs = 48, (16, 16)
    mask, frozen = make_conv_masks((24, c_in, 3, 3), bs, 0.7, "mixed")
    mask[:, 16:32] = False
    frozen[:, 16:32] = False
    p = ConvProblem(n, c_in, (5, 6), 24, (3, 3), padding=1, bs=bs, fmt=CL, mask=mask, frozen=frozen, device="cpu")
    assert bsconv_tma.wgrad_tiling(_block_m(p.dtype), n, 5, 6)[2] == (n == 64)
    y_ref, dw_ref = p.ref_y(), p.ref_grads()[1]
    p.x[:, 16:32] = NAN
    check_forward(p, expected=y_ref)
    check_weight_grad(p, expected=p.dw_blocks(dw_ref))
    assert rect["forward"] and rect["weight_grad"]


@pytest.mark.parametrize("n", [2, 64])  # 64 images: the weight gradient's one-pixel tiles
def test_pruned_output_channels_never_reach_dx(rect, n):
    """NaN in dy at output channels whose block row is empty never reaches dx (nor dw), strided conv."""
    bs = (16, 16)
    mask, frozen = make_conv_masks((48, 16, 3, 3), bs, 0.7, "mixed")
    mask[16:32] = False
    frozen[16:32] = False
    p = ConvProblem(n, 16, (6, 8), 48, (3, 3), stride=2, padding=1, bs=bs, dtype=F16, fmt=CL,
                    mask=mask, frozen=frozen, device="cpu")  # fmt: skip
    assert bsconv_tma.wgrad_tiling(_block_m(F16), n, *p.y_shape[2:])[2] == (n == 64)
    dx_ref, dw_ref, _ = p.ref_grads()
    p.dy[:, 16:32] = NAN
    check_input_grad(p, expected=dx_ref)
    check_weight_grad(p, expected=p.dw_blocks(dw_ref))
    assert rect["input_grad"] and rect["weight_grad"]


def test_stale_store_values_are_never_read(rect):
    """Mixed blocks: values a store does not own are NaN and never used (the merge of _weight_rows)."""
    p = ConvProblem(1, 16, (5, 5), 24, (3, 3), padding=1, bs=16, dtype=F16, density=0.6, device="cpu")
    lay = p.lay
    aux = lay.aux.long()[lay.train_index.long()]
    has = aux >= 0
    assert bool(has.any()), "needs trainable mixed blocks"
    y_ref, dx_ref = p.ref_y(), p.ref_grads()[0]
    p.wt[has] = torch.where(lay.element_state[aux[has]] == 2, p.wt[has], NAN)
    p.wf[lay.n_frozen :] = torch.where(lay.element_state == 2, NAN, p.wf[lay.n_frozen :])
    check_forward(p, expected=y_ref)
    check_input_grad(p, expected=dx_ref)
    assert rect["forward"] and rect["input_grad"]


CONFIG_CASES = [
    pytest.param(kind, cfg, id=f"{kind}-" + "-".join(f"{k}{v}" for k, v in sorted(cfg.kwargs.items())))
    for kind in ("conv_fwd", "conv_dx", "conv_wgrad")
    for cfg in _candidates(kind, (32, 16))
]


@pytest.mark.parametrize("kind, cfg", CONFIG_CASES)
def test_every_tuning_candidate(rect, kind, cfg):
    """Every candidate a GPU may pick runs on the descriptor kernels (grouped weight-gradient configs
    run the pointer kernel, by design)."""
    p = ConvProblem(3, 32, (12, 9), 40, (3, 3), stride=1, padding=1, bs=(32, 16), dtype=F16, density=0.7,
                    device="cpu")  # fmt: skip
    run = {"conv_fwd": check_forward, "conv_dx": check_input_grad, "conv_wgrad": check_weight_grad}[kind]
    run(p, config=cfg)
    want = 0 if cfg.kwargs.get("GROUP", 1) > 1 else 1
    assert rect[{"conv_fwd": "forward", "conv_dx": "input_grad", "conv_wgrad": "weight_grad"}[kind]] == want


@pytest.mark.parametrize(
    "cfg",
    [pytest.param(c, id="-".join(f"{k}{v}" for k, v in sorted(c.kwargs.items())))
     for c in _candidates("conv_wgrad", (32, 16)) if c.kwargs.get("GROUP", 1) == 1],
)  # fmt: skip
def test_every_weight_grad_candidate_on_one_pixel_tiles(rect, cfg):
    """128 images of 3x3: every token step a GPU may pick (64 and 128 images) takes the one-pixel tiles."""
    p = ConvProblem(128, 32, (3, 3), 40, (3, 3), stride=1, padding=1, bs=(32, 16), dtype=F16, density=0.7,
                    device="cpu")  # fmt: skip
    check_weight_grad(p, config=cfg)
    assert rect["weight_grad"] == 1
    assert TILINGS and all(TILINGS)


# ------------------------------------------------------------ the host side
@pytest.mark.parametrize(
    "shape, why",
    [
        ((2, 5, 6, 6), "rows are not 16-byte aligned"),  # 5 fp16 channels: 10-byte pixels
        ((2, 16, 7, 8), "H=7 is not a multiple of the stride 2"),
    ],
)
def test_rect_reason_names_the_obstacle(shape, why):
    x = torch.zeros(shape, dtype=F16).to(memory_format=CL)
    geom = convview.conv_geometry(x.shape, (16, shape[1], 3, 3), 2, 1, 1, 16)
    assert why in bsconv_tma.rect_reason(geom, 16, {}, x)
    nchw = torch.zeros(2, 16, 8, 8, dtype=F16)
    geom = convview.conv_geometry(nchw.shape, (16, 16, 3, 3), 1, 1, 1, 16)
    assert bsconv_tma.rect_reason(geom, 16, {"dy": nchw}) == "dy is not channels_last"
    assert bsconv_tma.rect_reason(geom, 16, {"dy": nchw.to(memory_format=CL)}) is None


def test_nchw_runs_the_pointer_kernels(rect):
    p = ConvProblem(1, 16, (5, 5), 16, (3, 3), padding=1, bs=16, dtype=F16, fmt=NCHW, device="cpu")
    check_forward(p, out=p.nan_full(p.y_shape))
    assert rect["forward"] == 0


@pytest.mark.parametrize(
    "block_m, n, h, w, tile", [(256, 1, 14, 14, (1, 16, 16)), (256, 1, 56, 56, (1, 4, 64)), (256, 8, 7, 7, (4, 8, 8))]
)
def test_pixel_tile_docstring_examples(block_m, n, h, w, tile):
    assert bsconv_tables.pixel_tile(block_m, n, h, w) == tile


@pytest.mark.parametrize("block_m", [64, 128, 256])
@pytest.mark.parametrize("n, h, w", [(1, 14, 14), (3, 5, 9), (16, 7, 7), (2, 1, 300)])
def test_pixel_tile_wastes_least(block_m, n, h, w):
    """Against every power-of-two rectangle of ``block_m`` pixels: none computes fewer."""

    def cost(t):
        return -(-n // t[0]) * t[0] * -(-h // t[1]) * t[1] * -(-w // t[2]) * t[2]

    tn, th, tw = bsconv_tables.pixel_tile(block_m, n, h, w)
    assert tn * th * tw == block_m
    pows = [2**i for i in range(block_m.bit_length())]
    best = min(cost((block_m // (a * b), a, b)) for a in pows for b in pows if a * b <= block_m)
    assert cost((tn, th, tw)) == best


def test_forward_table_worked_example():
    """The docstring of ``rect_forward_table``: 3x3, pad 1, stride 1, one channel block per tap."""
    geom = convview.conv_geometry((1, 16, 5, 5), (16, 16, 3, 3), 1, 1, 1, 16)
    meta = Meta(*[torch.zeros(0, dtype=torch.int32)] * len(Meta._fields))._replace(
        col_indices=torch.tensor([4, 0], dtype=torch.int32), storage=torch.tensor([1, 0], dtype=torch.int32)
    )
    words = bsconv_tables.rect_forward_table(meta, geom, 16, 16).view(torch.int32).view(-1, 2).long()
    # (low, high) = (store row | dh << 24, channel field | dw << 24); the last entry is the sentinel
    low, high = words[:, 0], words[:, 1]
    assert (low & 0xFFFFFF).tolist() == [16, 0, 0] and (high & 0xFFFFFF).tolist() == [0, 0, 0]
    assert (low >> 24).tolist() == [0, -1, 0] and (high >> 24).tolist() == [0, -1, 0]


@pytest.mark.parametrize(
    "conv, why",
    [
        (dict(kernel=(3, 3), padding=130), "tap offset of 130 pixels"),
        (dict(kernel=(1, 300), dilation=1), "tap offset of 299 pixels"),
    ],
)
def test_table_reason_names_what_does_not_fit(conv, why):
    """Geometries past the tables' 8-bit offsets run the pointer kernels, and the reason says why."""
    k, pad, dil = conv["kernel"], conv.get("padding", 0), conv.get("dilation", 1)
    geom = convview.conv_geometry((1, 16, 400, 400), (16, 16, *k), 1, pad, dil, 16)
    assert why in bsconv_tables.table_reason(geom, 16, 16, 64)
    fine = convview.conv_geometry((1, 16, 9, 9), (16, 16, 3, 3), 1, 1, 1, 16)
    assert bsconv_tables.table_reason(fine, 16, 16, 64) is None
    assert "store row" in bsconv_tables.table_reason(fine, 16, 16, 1 << 25)


# ---------------------------------------------------------------------- GPU
GPU_CASES = [
    pytest.param(c, id=c[0])
    for c in [
        ("b64-s1-bf16-14x14", 4, 64, (14, 14), 128, (3, 3), 1, 1, 1, 64, BF16, 0.3, "block"),
        ("b32-s2-fp16", 4, 64, (16, 16), 96, (3, 3), 2, 1, 1, 32, F16, 0.5, "mixed"),
        ("b128-d2-bf16", 2, 128, (15, 13), 136, (3, 3), 1, 2, 2, 128, BF16, 0.5, "block"),
        ("b32-fp32-unstructured", 2, 32, (9, 9), 64, (3, 3), 1, 1, 1, 32, F32, 0.5, "unstructured"),
    ]
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES)
def test_compiled_descriptor_kernels_on_sm90(case, monkeypatch):
    """What sm_90 runs for aligned channels_last activations, compiled (``pytest -m gpu``)."""
    from sparsekern import kernels as sk

    if sk.INTERPRET or not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("needs an sm_90 GPU without the interpreter")
    calls = _count_launches(monkeypatch)
    _, n, c_in, hw, c_out, k, stride, padding, dilation, bs, dtype, density, kind = case
    p = ConvProblem(n, c_in, hw, c_out, k, stride, padding, dilation, bs, dtype, density, kind, CL, device="cuda")
    check_forward(p, out=p.nan_full(p.y_shape))
    check_input_grad(p, out=p.nan_full(tuple(p.x.shape)))
    check_weight_grad(p, splits=2)
    assert all(v >= 1 for v in calls.values()), calls
