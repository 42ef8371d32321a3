"""What real training stacks rely on: in-place mask changes, exact resume, strict masks, a read-only
``.weight``, meta-device construction and RigL under ``torch.compile`` (the distributed side is in
``test_distributed.py``)."""

import copy
import io

import pytest
import torch
from torch import nn

from sparsekern import SparseConv2d, SparseLinear
from sparsekern.methods.blocks import expand_blocks
from sparsekern.methods.dst import DSTScheduler
from sparsekern.testing import assert_close

BS = 16


def block_mask(shape, density, bs=BS):
    grid = ((shape[0] + bs - 1) // bs, (shape[1] + bs - 1) // bs)
    return expand_blocks(torch.rand(grid) < density, tuple(shape), bs)


def mlp(frozen=True):
    m1 = block_mask((64, 48), 0.6)
    f1 = m1 & block_mask((64, 48), 0.3) if frozen else None
    return nn.Sequential(
        SparseLinear(48, 64, block_size=BS, mask=m1, frozen_mask=f1),
        nn.ReLU(),
        SparseLinear(64, 32, block_size=BS, mask=block_mask((32, 64), 0.5)),
    )


def batch(step):
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(6, 2, 48, generator=gen), torch.randn(6, 2, 32, generator=gen)


def train(model, opt, steps):
    for step in steps:
        x, t = batch(step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), t).backward()
        opt.step()


# ------------------------------------------------------------ mask changes in place
def test_count_preserving_set_masks_keeps_every_tensor_object():
    layer = mlp()[0]
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer(torch.randn(3, 48)).sum().backward()
    opt.step()
    param, grad, state = layer.weight_train, layer.weight_train.grad, dict(opt.state[layer.weight_train])
    storage = param.untyped_storage().data_ptr()
    trainable = layer.mask & ~layer.frozen_mask
    # Move one trainable block to an empty place: the same count of trainable blocks.
    kept = layer.mask.view(4, BS, 3, BS).any(3).any(1)
    train_blocks = kept & ~layer.frozen_mask.view(4, BS, 3, BS).any(3).any(1)
    if int(train_blocks.sum()) < 2 or bool(kept.all()):
        pytest.skip("the drawn layout has too few trainable or no empty blocks")
    moved = kept.clone()
    moved[tuple(train_blocks.nonzero()[0])] = False
    moved[tuple((~kept).nonzero()[0])] = True
    new, frozen = expand_blocks(moved, (64, 48), BS), layer.frozen_mask
    dense_grad = layer.layout.to_dense(grad, torch.zeros_like(layer.weight_frozen))
    before = layer.weight
    layer.set_masks(new, frozen, optimizer=opt)
    assert layer.weight_train is param and param.grad is grad
    assert all(opt.state[param][k] is v for k, v in state.items())
    assert param.untyped_storage().data_ptr() == storage
    stay = trainable & (new & ~frozen)
    assert stay.any()
    assert torch.equal(layer.weight[stay], before[stay])
    moved_grad = layer.layout.to_dense(param.grad, torch.zeros_like(layer.weight_frozen))
    assert torch.equal(moved_grad[stay], dense_grad[stay])
    assert not moved_grad[(new & ~frozen) & ~trainable].any(), "grown elements must start with zero gradient"


def test_count_change_makes_a_new_parameter_and_warns():
    layer = mlp(frozen=False)[0]
    opt = torch.optim.Adam(layer.parameters(), lr=1e-2)
    layer(torch.randn(3, 48)).sum().backward()
    opt.step()
    param = layer.weight_train
    fewer = layer.mask.clone()
    fewer[:BS] = False
    if torch.equal(fewer, layer.mask):
        pytest.skip("the drawn mask has no kept block in the first block row")
    with pytest.warns(UserWarning, match="number of trainable blocks changed"):
        layer.set_masks(fewer, optimizer=opt)
    fresh = layer.weight_train
    assert fresh is not param and fresh.shape[0] == layer.layout.n_train
    assert any(p is fresh for p in opt.param_groups[0]["params"]) and param not in opt.state
    assert opt.state[fresh]["exp_avg"].shape == fresh.shape
    train(nn.Sequential(layer, nn.Linear(64, 32)), opt, range(1))  # the optimizer keeps stepping it


def test_set_masks_rejects_an_optimizer_without_the_layer():
    layer, other = mlp()[0], nn.Linear(3, 3)
    opt = torch.optim.SGD(other.parameters(), lr=0.1)
    mask0 = layer.mask
    with pytest.raises(ValueError, match="does not hold"):
        layer.set_masks(torch.roll(mask0, BS, 0), optimizer=opt)
    assert torch.equal(layer.mask, mask0)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda m: torch.full(m.shape, float("nan")), "NaN"),
        (lambda m: torch.rand(m.shape), "only 0 and 1"),
        (lambda m: m.float() * 2, "only 0 and 1"),
    ],
    ids=["nan", "soft", "two"],
)
def test_non_binary_masks_are_errors_and_change_nothing(bad, match):
    layer = mlp()[0]
    mask0, w0 = layer.mask, layer.weight_train.detach().clone()
    with pytest.raises(ValueError, match=match):
        layer.set_masks(bad(mask0))
    with pytest.raises(ValueError, match=match):
        SparseLinear(48, 64, block_size=BS, mask=bad(mask0))
    assert torch.equal(layer.mask, mask0) and torch.equal(layer.weight_train, w0)
    # Exact 0/1 floats are fine.
    layer.set_masks(mask0.float())
    assert torch.equal(layer.mask, mask0)


def test_frozen_outside_mask_is_an_error():
    layer = mlp()[0]
    with pytest.raises(ValueError, match="frozen elements must be kept"):
        layer.set_masks(layer.mask, ~layer.mask)


# ------------------------------------------------------------------ exact resume
@pytest.mark.parametrize("order", ["model_first", "optimizer_first"])
@pytest.mark.parametrize("granularity", ["block", "element"])
def test_resume_mid_dst_is_bit_exact(order, granularity):
    torch.manual_seed(0)
    init = mlp()

    def build():
        model = copy.deepcopy(init)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        sched = DSTScheduler(model, opt, method="rigl", delta_t=3, end_step=100, granularity=granularity)
        return model, opt, sched

    model, opt, _ = build()
    train(model, opt, range(10))
    straight = [p.detach().clone() for p in model.parameters()]

    model, opt, sched = build()
    train(model, opt, range(7))
    assert not torch.equal(model[0].mask, init[0].mask), "no layout change before the checkpoint"
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)

    model, opt, sched = build()  # a fresh model and optimizer, built the usual way, then loaded
    if order == "model_first":
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["opt"])
    else:
        opt.load_state_dict(ckpt["opt"])
        model.load_state_dict(ckpt["model"])
    sched.load_state_dict(ckpt["sched"])
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held for p in model.parameters()), "the optimizer holds stale parameters"
    train(model, opt, range(7, 10))
    for i, (a, b) in enumerate(zip(straight, model.parameters(), strict=True)):
        assert torch.equal(a, b), f"parameter {i} differs after save and restore"


def test_buffers_written_in_place_rebuild_the_layout():
    """A loader that fills state_dict() tensors in place (as DCP does) must not leave a stale layout."""
    torch.manual_seed(1)
    a, b = mlp(frozen=False)[0], mlp(frozen=False)[0]
    if a.layout.n_train != b.layout.n_train:
        pytest.skip("the two drawn layouts hold different trainable counts")
    sd = b.state_dict()
    for key, t in a.state_dict().items():  # what DCP does: copy into the current tensors
        t.copy_(sd[key])
    x = torch.randn(4, 48)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    a.load_state_dict(a.state_dict())  # the usual call after an in-place load is fine as well
    assert torch.equal(a.mask, b.mask)
    # A second in-place load: the layout must be a snapshot, not an alias of the buffers it was built from.
    c = SparseLinear(48, 64, block_size=BS, mask=torch.roll(a.mask, BS, 0))  # the same count, moved
    if torch.equal(c.mask, a.mask):
        pytest.skip("the drawn mask is the same after moving every block down one block row")
    sd = c.state_dict()
    for key, t in a.state_dict().items():
        t.copy_(sd[key])
    torch.testing.assert_close(a(x), c(x), rtol=0, atol=0)
    assert torch.equal(a.mask, c.mask)


def test_reset_mask_never_touches_frozen_weights():
    layer = mlp()[0]
    frozen = layer.frozen_mask
    if not frozen.any():
        pytest.skip("no frozen block drawn")
    with pytest.raises(ValueError, match="reset_mask marks frozen"):
        layer.set_masks(layer.mask, frozen, reset_mask=frozen)
    w0 = layer.weight.detach().clone()
    trainable = layer.mask & ~frozen
    layer.set_masks(layer.mask, frozen, reset_mask=trainable)
    w1 = layer.weight
    assert torch.equal(w1[frozen], w0[frozen]) and not w1[trainable].any()


def test_layers_build_under_inference_mode():
    with torch.inference_mode():
        layer = mlp()[0]
        y = layer(torch.randn(2, 48))
    assert y.shape == (2, 64)


# ------------------------------------------------------------- the .weight property
def test_weight_writes_raise_and_penalties_train_the_blocks():
    layer = mlp()[0]
    w0 = layer.weight_train.detach().clone()
    buf = torch.empty(64, 48)
    for write in (
        lambda w: nn.init.zeros_(w),
        lambda w: nn.init.eye_(w),
        lambda w: w.mul_(2),
        lambda w: w.__setitem__(0, 1.0),
        lambda w: w.data.zero_(),
        lambda w: w[0].fill_(1.0),
        lambda w: w.T.mul_(2),
        lambda w: w.view(-1).zero_(),
        lambda w: torch.nn.functional.relu(w, inplace=True),
        lambda w: torch.add(buf, 1, out=w),
    ):
        with torch.no_grad(), pytest.raises(RuntimeError, match="computed from its stored blocks"):
            write(layer.weight)
    # Reads, also of .data, and copies work; copies are plain tensors.
    assert torch.equal(layer.weight.data, layer.weight.detach())
    assert type(copy.deepcopy(layer.weight)) is torch.Tensor
    blob = io.BytesIO()
    torch.save(layer.weight, blob)
    blob.seek(0)
    assert type(torch.load(blob)) is torch.Tensor
    assert torch.equal(layer.weight_train, w0)
    penalty = layer.weight.square().sum()
    penalty.backward()
    trainable = layer.mask & ~layer.frozen_mask
    expected = torch.where(trainable, 2 * layer.weight.detach(), 0).double()
    got = layer.layout.to_dense(layer.weight_train.grad, torch.zeros_like(layer.weight_frozen))
    assert_close(got, expected, torch.float32, 1, "grad of a penalty on .weight")
    assert type(layer.weight.detach()) is torch.Tensor
    layer.copy_dense_(torch.zeros(64, 48))
    assert not layer.weight.any()


# ------------------------------------------------------------------ meta device
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_meta_construction_then_to_empty(kind):
    mask = block_mask((64, 48), 0.5) if kind == "linear" else None
    with torch.device("meta"):
        if kind == "linear":
            layer = SparseLinear(48, 64, block_size=BS, mask=mask)
        else:
            layer = SparseConv2d(16, 32, 3, padding=1, block_size=BS)
    assert layer.weight_train.is_meta
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert not layer.weight_train.is_meta and torch.isfinite(layer.weight_train).all()
    if kind == "linear":
        assert torch.equal(layer.mask, mask)
        x = torch.randn(3, 48)
        ref = torch.nn.functional.linear(x.double(), layer.weight.double(), layer.bias.double())
        assert_close(layer(x), ref, torch.float32, 48, "forward after to_empty")
    else:
        assert layer.mask.all()
        assert layer(torch.randn(1, 16, 5, 5)).shape == (1, 32, 5, 5)


# ---------------------------------------------------------- RigL under torch.compile
def test_rigl_under_torch_compile_updates_and_matches_eager():
    torch.manual_seed(3)
    init = mlp(frozen=False)
    runs = {}
    for mode in ("eager", "compiled"):
        model = copy.deepcopy(init)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        sched = DSTScheduler(model, opt, method="rigl", delta_t=2, end_step=100, drop_fraction=0.5)
        fwd = torch.compile(model, backend="aot_eager") if mode == "compiled" else model
        masks = []
        for step in range(6):
            x, t = batch(step)
            opt.zero_grad()
            nn.functional.mse_loss(fwd(x), t).backward()
            opt.step()
            masks.append(model[0].mask.clone())
        runs[mode] = (masks, sched.dense_grad_count, [p.detach().clone() for p in model.parameters()])
    masks, count, params = runs["compiled"]
    assert count == runs["eager"][1] == 3 * 2, "update steps 2, 4 and 6, two layers: six dense gradients"
    assert not torch.equal(masks[0], masks[-1]), "RigL changed no mask under torch.compile"
    for a, b in zip(runs["eager"][0], masks, strict=True):
        assert torch.equal(a, b), "compiled RigL chose other blocks than eager RigL"
    for a, b in zip(runs["eager"][2], params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layer_outputs_are_not_views(kind):
    """FSDP2 warns (rightly) when a module returns a view: an in-place op on it would drop its hooks."""
    if kind == "linear":
        layer, x = mlp()[0], torch.randn(2, 3, 48)
    else:
        layer, x = SparseConv2d(16, 32, 3, padding=1, block_size=BS), torch.randn(2, 16, 5, 5)
    y = layer(x)
    assert y._base is None and y.requires_grad
    g = torch.randn_like(y)
    y += 1.0  # an in-place op on the output: the gradient must still reach the layer unchanged
    (g * y).sum().backward()
    got = layer.weight_train.grad.clone()
    layer.zero_grad()
    (g * (layer(x) + 1.0)).sum().backward()
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, layer.weight_train.grad, rtol=0, atol=0)
