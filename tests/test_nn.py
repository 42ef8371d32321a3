"""``SparseLinear``: numerics, optimizer invariance, ``torch.compile``, state dicts, ``set_masks``, bad input.

Runs on both CPU backends through the ``backend`` fixture (Triton's interpreter, and the
gathered CPU path selected by patching ``sparsekern.kernels.INTERPRET``); see
test_functional.py for the op-level tests.
"""

import io
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch import nn

from sparsekern.nn import SparseLinear
from sparsekern.testing import assert_close, random_block_mask, reference_grads, reference_linear

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
DT_NAME = {F32: "fp32", F16: "fp16", BF16: "bf16"}
# --------------------------------------------------------------------- masks
# One letter per element state in a block: P pruned, F frozen, T trainable.
PLAN = [
    ["T", "P", "F", "PT"],
    ["FT", "PFT", "P", "PF"],
    ["T", "F", "PFT", "T"],
]


def plan_masks(n=45, k=61, bs=16, plan=PLAN):
    """``(mask, frozen_mask)`` with a chosen state mix per block (edge blocks overhang).

    Covers every block code and every kind of mixed block, including a mixed block with
    nothing to train (``PF``).
    """
    rb, cb = len(plan), len(plan[0])
    mask = torch.zeros(rb * bs, cb * bs, dtype=torch.bool)
    frozen = torch.zeros_like(mask)
    for i in range(rb):
        for j in range(cb):
            states = plan[i][j]
            r = torch.rand(bs, bs)
            r[0, 0], r[-1, -1] = 0.0, 0.99  # every listed state occurs at least once
            if states == "P":
                kept, frz = torch.zeros(bs, bs, dtype=torch.bool), torch.zeros(bs, bs, dtype=torch.bool)
            elif states in ("T", "F"):
                kept = torch.ones(bs, bs, dtype=torch.bool)
                frz = kept.clone() if states == "F" else ~kept
            else:
                cuts = {"PT": (0.3, 0.3), "FT": (0.0, 0.4), "PFT": (0.3, 0.6), "PF": (0.4, 1.01)}[states]
                kept, frz = r >= cuts[0], (r >= cuts[0]) & (r < cuts[1])
            blk = (slice(i * bs, (i + 1) * bs), slice(j * bs, (j + 1) * bs))
            mask[blk], frozen[blk] = kept, frz
    return mask[:n, :k].contiguous(), frozen[:n, :k].contiguous()


def mixed_masks(n, k, bs, density=0.5):
    """Random block mask with some blocks thinned, some wholly and some partly frozen."""
    mask = random_block_mask((n, k), bs, density)
    thin, frz = random_block_mask((n, k), bs, 0.5), random_block_mask((n, k), bs, 0.5)
    r = torch.rand(n, k)
    mask &= ~(thin & (r < 0.25))
    return mask, mask & frz & (~thin | (r > 0.7))


def make_layer(k, n, bs, mask, frozen, dtype=F32, bias=True):
    """A ``SparseLinear`` with unit-normal weights (via ``from_dense``) and the dense weight it was cut from."""
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k))
        if bias:
            lin.bias.copy_(torch.randn(n))
    lin = lin.to(dtype)
    return SparseLinear.from_dense(lin, mask=mask, frozen_mask=frozen, block_size=bs), lin


def dense_state(layout, store):
    """A ``w_train``-shaped tensor (gradient, optimizer state) as a dense ``(N, K)`` tensor, zero off trainable."""
    return layout.to_dense(store, torch.zeros(layout.n_frozen_slots, *layout.block_size, dtype=store.dtype))


def weight_state_tensors(opt, layer):
    state = opt.state[layer.weight_train]
    return {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0}


# ------------------------------------------------------------------ numerics
CASES = [
    pytest.param((45, 61, 16, "plan"), id="plan-b16"),
    pytest.param((70, 100, (16, 32), "mixed"), id="mixed-b16x32"),
    pytest.param((100, 70, 32, "dense"), id="dense-b32"),
]


def _masks(n, k, bs, kind):
    if kind == "plan":
        return plan_masks(n, k, bs)
    if kind == "dense":
        return torch.ones(n, k, dtype=torch.bool), None
    return mixed_masks(n, k, bs)


@pytest.mark.parametrize("dtype", [F32, F16, BF16], ids=DT_NAME.get)
@pytest.mark.parametrize("case", CASES)
def test_forward_and_grads_match_masked_dense(backend, case, dtype):
    n, k, bs, kind = case
    mask, frozen = _masks(n, k, bs, kind)
    layer, lin = make_layer(k, n, bs, mask, frozen, dtype)
    x = torch.randn(3, 5, k).to(dtype).requires_grad_()
    y = layer(x)
    assert y.shape == (3, 5, n) and y.dtype == dtype
    dy = torch.randn(3, 5, n).to(dtype)
    y.backward(dy)
    xf, dyf = x.detach().reshape(15, k), dy.reshape(15, n)
    assert_close(y.reshape(15, n), reference_linear(xf, lin.weight, mask, lin.bias), dtype, k, "y")
    dx, dw, db = reference_grads(xf, lin.weight, mask, frozen, dyf, lin.bias)
    assert_close(x.grad.reshape(15, k), dx, dtype, n, "x.grad")
    assert_close(dense_state(layer.layout, layer.weight_train.grad), dw, dtype, 15, "weight grad")
    assert_close(layer.bias.grad, db, dtype, 15, "bias.grad")
    assert layer.weight_frozen.grad is None


def test_module_dtype_conversion(backend):
    """``.to(dtype)`` converts the value stores and bias but not the layout's integer buffers."""
    mask, frozen = plan_masks()
    layer, lin = make_layer(61, 45, 16, mask, frozen)
    code = layer.block_code.clone()
    layer = layer.to(F16)
    assert layer.weight_train.dtype == layer.weight_frozen.dtype == layer.bias.dtype == F16
    assert layer.block_code.dtype == torch.int8 and torch.equal(layer.block_code, code)
    x = torch.randn(7, 61).to(F16)
    assert_close(layer(x), reference_linear(x, lin.weight.to(F16), mask, lin.bias.to(F16)), F16, 61, "y fp16")


@pytest.mark.parametrize("frozen_by", ["weight", "module"])
def test_frozen_weight_launches_no_weight_grad(backend, launches, frozen_by):
    """A weight frozen with ``requires_grad_(False)`` gets no gradient and no dW launch."""
    mask, frozen = plan_masks()
    layer, lin = make_layer(61, 45, 16, mask, frozen)
    if frozen_by == "weight":
        layer.weight_train.requires_grad_(False)
    else:
        layer.requires_grad_(False)
    x = torch.randn(9, 61, requires_grad=True)
    dy = torch.randn(9, 45)
    layer(x).backward(dy)
    launches.assert_counts(backend, forward=1, input_grad=1, weight_grad=0)
    assert layer.weight_train.grad is None
    assert (layer.bias.grad is None) == (frozen_by == "module")
    assert_close(x.grad, reference_grads(x, lin.weight, mask, frozen, dy)[0], F32, 45, "x.grad")


def test_input_without_grad_launches_no_input_grad(backend, launches):
    mask, frozen = plan_masks()
    layer, lin = make_layer(61, 45, 16, mask, frozen)
    x, dy = torch.randn(9, 61), torch.randn(9, 45)
    layer(x).backward(dy)
    launches.assert_counts(backend, forward=1, input_grad=0, weight_grad=1)
    dw = reference_grads(x, lin.weight, mask, frozen, dy)[1]
    assert_close(dense_state(layer.layout, layer.weight_train.grad), dw, F32, 9, "weight grad")


# ------------------------------------------------------- optimizer invariance
def _optimizer(name, params):
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.1)
    return torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)


STATE_KEYS = {"sgd": {"momentum_buffer"}, "adamw": {"exp_avg", "exp_avg_sq"}}


@pytest.mark.parametrize("opt_name", ["sgd", "adamw"])
def test_optimizer_moves_only_trainable_elements(backend, opt_name):
    """Many steps with momentum / Adam moments and weight decay: pruned elements stay exactly
    0, frozen ones exactly unchanged, trainable ones all move; state exists for trainable blocks only."""
    mask, frozen = plan_masks()
    trainable = mask & ~frozen
    layer, _ = make_layer(61, 45, 16, mask, frozen)
    lay = layer.layout
    assert set(lay.block_code.unique().tolist()) == {0, 1, 2, 3}
    assert {n for n, _ in layer.named_parameters()} == {"weight_train", "bias"}
    assert not layer.weight_frozen.requires_grad
    w0, wf0 = layer.weight.clone(), layer.weight_frozen.clone()
    # w_train positions that are not trainable (mixed blocks, overhang) hold zero and must stay so.
    off = lay.split_values(trainable.float())[0] == 0
    assert bool(off.any())
    opt = _optimizer(opt_name, layer.parameters())
    target = torch.randn(4, 45)
    for _ in range(12):
        loss = (layer(torch.randn(4, 61)) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        w = layer.weight
        assert bool((w[~mask] == 0).all()), "a pruned element moved"
        assert torch.equal(w[frozen], w0[frozen]), "a frozen element moved"
    assert torch.equal(layer.weight_frozen, wf0)
    assert bool((w[trainable] != w0[trainable]).all()), "a trainable element never moved"
    assert bool((layer.weight_train.detach()[off] == 0).all())
    assert set(opt.state) == {layer.weight_train, layer.bias}
    state = weight_state_tensors(opt, layer)
    assert set(state) == STATE_KEYS[opt_name]
    bm, bk = lay.block_size
    for key, val in state.items():
        assert val.numel() == layer.weight_train.numel() == lay.n_train * bm * bk, key


def test_adamw_state_is_about_five_percent_of_dense(backend):
    """90% of blocks pruned, half of the rest frozen: AdamW keeps state for ~5% of the dense weight."""
    n = k = 256
    bs = 16
    mask = random_block_mask((n, k), bs, 0.1)  # 26 of 256 blocks
    kept_blocks = mask[::bs, ::bs].nonzero()
    frozen_blocks = kept_blocks[torch.randperm(len(kept_blocks))[: len(kept_blocks) // 2]]
    frozen = torch.zeros_like(mask)
    for r, c in frozen_blocks.tolist():
        frozen[r * bs : (r + 1) * bs, c * bs : (c + 1) * bs] = True
    layer = SparseLinear(k, n, block_size=bs, mask=mask, frozen_mask=frozen)
    lay = layer.layout
    assert (lay.nnz_blocks, lay.n_frozen, lay.n_train, lay.n_mixed) == (26, 13, 13, 0)
    opt = torch.optim.AdamW(layer.parameters(), weight_decay=0.1)
    layer(torch.randn(8, k)).square().mean().backward()
    opt.step()
    state_numel = sum(v.numel() for v in weight_state_tensors(opt, layer).values())
    assert state_numel == 2 * lay.n_train * bs * bs
    ratio = state_numel / (2 * n * k)  # dense AdamW keeps exp_avg and exp_avg_sq for every element
    assert 0.04 <= ratio <= 0.06, f"AdamW weight state is {ratio:.1%} of dense"


# ------------------------------------------------------------ torch.compile
def test_torch_compile_fullgraph_matches_eager(backend):
    """``torch.compile(fullgraph=True)`` traces through the custom ops (their fake
    implementations report the real output strides) and gives eager's results.

    Slow part: one inductor compile of forward + backward (about 15 s on the CPU path,
    30 s under the interpreter); the cache is private so a compile made for the other
    backend (whose outputs have other strides) is never reused.
    """
    from torch._inductor.utils import fresh_cache  # after sparsekern: importing triton first breaks the interpreter

    m1, f1 = mixed_masks(48, 40, 16)
    m2 = random_block_mask((24, 48), 16, 0.5)
    model = nn.Sequential(
        SparseLinear(40, 48, block_size=16, mask=m1, frozen_mask=f1),
        nn.ReLU(),
        SparseLinear(48, 24, block_size=16, mask=m2),
    )
    x, dy = torch.randn(10, 40), torch.randn(10, 24)

    def run(fn):
        xr = x.clone().requires_grad_()
        model.zero_grad(set_to_none=True)
        y = fn(xr)
        y.backward(dy)
        return y.detach(), xr.grad, {n: p.grad.clone() for n, p in model.named_parameters()}

    y_e, gx_e, g_e = run(model)
    torch._dynamo.reset()
    try:
        with fresh_cache():
            y_c, gx_c, g_c = run(torch.compile(model, fullgraph=True))
    finally:
        torch._dynamo.reset()
    assert_close(y_c, y_e.double(), F32, 48, "compiled y")
    assert_close(gx_c, gx_e.double(), F32, 48, "compiled x.grad")
    assert set(g_c) == set(g_e)
    for name in g_e:
        assert_close(g_c[name], g_e[name].double(), F32, 10, f"compiled grad {name}")


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import torch
    from sparsekern.nn import SparseLinear
    torch.manual_seed(0)
    mask = torch.zeros(48, 64, dtype=torch.bool)
    mask[:16, :32] = True
    mask[32:, 16:] = True
    layer = SparseLinear(64, 48, block_size=16, mask=mask)
    x = torch.randn(8, 64)
    with torch.no_grad():
        y = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(y, layer(x))
    print("compiled ok")
    """
)


def test_compile_cache_is_not_shared_between_interpreter_and_cpu_runs(tmp_path):
    """Two processes, one with ``SPARSEKERN_INTERPRET=1`` and one without, compile the same
    layer with one inductor cache directory (the default is shared per user). The fake
    implementation's output strides depend on the process's backend (contiguous for Triton,
    transposed on the gathered CPU path), so a cached artifact from one must not be reused
    by the other.

    Slow part: two fresh processes with an inductor compile each (about 30 s).
    """
    pytest.importorskip("triton")  # the SPARSEKERN_INTERPRET=1 run needs it
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SPARSEKERN_INTERPRET")}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(tmp_path)
    for flag in ("1", "0"):
        proc = subprocess.run(
            [sys.executable, "-c", _COMPILE_SCRIPT],
            env={**env, "SPARSEKERN_INTERPRET": flag},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0 and "compiled ok" in proc.stdout, (
            f"SPARSEKERN_INTERPRET={flag} run failed after a run with the other setting:\n{proc.stderr[-1500:]}"
        )


# ----------------------------------------------------------- state dicts
def _trained(layer, steps=2):
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        layer(torch.randn(5, layer.in_features)).square().mean().backward()
        opt.step()
    return layer


def test_state_dict_round_trip_into_layer_with_other_mask(backend):
    mask_a, frozen_a = plan_masks()
    a = _trained(make_layer(61, 45, 16, mask_a, frozen_a)[0])
    mask_b, frozen_b = mixed_masks(45, 61, 16, 0.3)
    b = SparseLinear(61, 45, block_size=16, mask=mask_b, frozen_mask=frozen_b)
    assert not torch.equal(b.mask, a.mask)
    sd = a.state_dict()
    assert set(sd) == {"weight_train", "weight_frozen", "block_code", "element_state", "bias"}
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf))
    assert torch.equal(b.mask, mask_a) and torch.equal(b.frozen_mask, frozen_a)
    assert torch.equal(b.weight, a.weight) and torch.equal(b.bias, a.bias)
    assert b.layout.n_train == a.layout.n_train
    assert isinstance(b.weight_train, nn.Parameter) and b.weight_train.requires_grad
    x = torch.randn(6, 61)
    assert torch.equal(b(x), a(x))
    # b trains on its new layout
    _trained(b, 1)
    assert b.weight_train.grad.shape == b.weight_train.shape


def test_state_dict_round_trip_nested_and_back_to_dense(backend):
    mask, frozen = plan_masks()
    a = nn.Sequential(make_layer(61, 45, 16, mask, frozen)[0], nn.ReLU())
    b = nn.Sequential(SparseLinear(61, 45, block_size=16), nn.ReLU())
    b.load_state_dict(a.state_dict())
    assert torch.equal(b[0].weight, a[0].weight) and torch.equal(b[0].mask, mask)
    x = torch.randn(4, 61)
    assert torch.equal(b(x), a(x))


def test_load_state_dict_with_same_layout_keeps_parameter_object():
    """Resuming: model and optimizer are built, then both load a checkpoint. With an unchanged
    layout the loaded values must land in the existing Parameter (as for ``nn.Linear``), or
    the optimizer keeps stepping a Parameter the module no longer uses."""
    mask, frozen = plan_masks()
    ckpt = _trained(make_layer(61, 45, 16, mask, frozen)[0]).state_dict()
    layer = SparseLinear(61, 45, block_size=16, mask=mask, frozen_mask=frozen)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    param = layer.weight_train
    layer.load_state_dict(ckpt)
    assert torch.equal(layer.weight_train.detach(), ckpt["weight_train"])
    assert layer.weight_train is param, "load_state_dict replaced weight_train although the layout is unchanged"
    w0 = layer.weight.clone()
    _train_steps(layer, opt, 1)
    assert not torch.equal(layer.weight, w0), "the optimizer built before loading no longer trains the layer"


@pytest.mark.parametrize("same_layout", [True, False], ids=["same-layout", "other-layout"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=DT_NAME.get)
def test_loading_checkpoint_keeps_module_dtype(dtype, same_layout):
    """Like ``nn.Linear``, loading a checkpoint of another dtype casts into the module's dtype,
    also when the checkpoint's layout differs from the module's."""
    mask, frozen = plan_masks()
    src = make_layer(61, 45, 16, mask, frozen, dtype=F16)[0]
    dst_mask, dst_frozen = (mask, frozen) if same_layout else (torch.ones(45, 61, dtype=torch.bool), None)
    dst = SparseLinear(61, 45, block_size=16, mask=dst_mask, frozen_mask=dst_frozen, dtype=dtype)
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.mask, mask)
    assert dst.weight_train.dtype == dtype, f"weight_train became {dst.weight_train.dtype}"
    assert dst.weight_frozen.dtype == dtype, f"weight_frozen became {dst.weight_frozen.dtype}"
    assert torch.equal(dst.weight, src.weight.to(dtype))
    x = torch.randn(3, 61).to(dtype)
    assert dst(x).dtype == dtype  # a mix of dtypes raises TypeError here


def test_loads_dense_linear_state_dict(backend):
    mask, frozen = plan_masks()
    layer = SparseLinear(61, 45, block_size=16, mask=mask, frozen_mask=frozen)
    lin = nn.Linear(61, 45)
    layer.load_state_dict(lin.state_dict())
    assert torch.equal(layer.mask, mask) and torch.equal(layer.frozen_mask, frozen)
    assert torch.equal(layer.weight, torch.where(mask, lin.weight.detach(), 0))
    assert torch.equal(layer.bias, lin.bias)
    x = torch.randn(6, 61)
    assert_close(layer(x), reference_linear(x, lin.weight, mask, lin.bias), F32, 61, "y after dense load")
    # nested, as when a dense model's checkpoint is loaded into its sparsified copy
    dense_model = nn.Sequential(nn.Linear(61, 45), nn.ReLU())
    sparse_model = nn.Sequential(SparseLinear(61, 45, block_size=16, mask=mask), nn.ReLU())
    sparse_model.load_state_dict(dense_model.state_dict())
    assert torch.equal(sparse_model[0].weight, torch.where(mask, dense_model[0].weight.detach(), 0))


def test_dense_state_dict_of_wrong_shape_is_rejected():
    layer = SparseLinear(61, 45, block_size=16)
    before = layer.weight.clone()
    with pytest.raises(RuntimeError, match="size mismatch"):
        layer.load_state_dict(nn.Linear(60, 45).state_dict())
    assert torch.equal(layer.weight, before)


def test_from_dense_default_mask_is_nonzero_weights(backend):
    lin = nn.Linear(61, 45)
    with torch.no_grad():
        lin.weight[:16, 16:48] = 0  # whole blocks
        lin.weight[torch.rand(45, 61) < 0.2] = 0  # scattered elements
    layer = SparseLinear.from_dense(lin, block_size=16)
    assert torch.equal(layer.mask, lin.weight != 0)
    assert not bool(layer.frozen_mask.any())
    assert torch.equal(layer.weight, lin.weight.detach()) and torch.equal(layer.bias, lin.bias)
    assert layer.block_code[0, 1] == 0 and layer.block_code[0, 2] == 0  # the zeroed blocks are skipped
    x = torch.randn(5, 61)
    assert_close(layer(x), reference_linear(x, lin.weight, lin.weight != 0, lin.bias), F32, 61, "y")


def test_from_dense_with_masks_and_dtype():
    lin = nn.Linear(61, 45, bias=False).to(BF16)
    mask, frozen = plan_masks()
    layer = SparseLinear.from_dense(lin, mask=mask, frozen_mask=frozen, block_size=16)
    assert layer.bias is None and layer.weight_train.dtype == BF16
    assert torch.equal(layer.mask, mask) and torch.equal(layer.frozen_mask, frozen)
    assert torch.equal(layer.weight, torch.where(mask, lin.weight.detach(), 0))
    with pytest.raises(TypeError):
        SparseLinear.from_dense(nn.Conv1d(3, 3, 1))


def test_to_dense_equals_effective_weight(backend):
    mask, frozen = plan_masks()
    layer, lin = make_layer(61, 45, 16, mask, frozen)
    _trained(layer)
    dense = layer.to_dense()
    assert type(dense) is nn.Linear and (dense.in_features, dense.out_features) == (61, 45)
    assert torch.equal(dense.weight, layer.weight) and torch.equal(dense.bias, layer.bias)
    assert bool((dense.weight[~mask] == 0).all())
    assert torch.equal(dense.weight[frozen], lin.weight[frozen])
    assert layer.weight.requires_grad  # differentiable (penalties on .weight train the blocks), but read-only
    x = torch.randn(5, 61)
    assert_close(layer(x), dense(x).double(), F32, 61, "sparse vs to_dense()")
    with torch.no_grad():  # a copy, not a view of the layer's stores
        dense.weight.add_(1.0)
    assert not torch.equal(dense.weight, layer.weight)


# ---------------------------------------------------------------- set_masks
def _new_masks(mask, frozen):
    """Masks after a prune/grow step: drop some, grow some (also in new blocks), change frozen-ness."""
    n, k = mask.shape
    r = torch.rand(n, k)
    new_mask = (mask & (r > 0.2)) | (r < 0.15)
    new_mask[:16, 16:32] = True  # a wholly pruned block grows back in full
    new_frozen = new_mask & ((frozen & (torch.rand(n, k) > 0.3)) | (torch.rand(n, k) < 0.1))
    return new_mask, new_frozen


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_set_masks_preserves_values_and_optimizer_state(backend, opt_name):
    mask0, frozen0 = plan_masks()
    train0 = mask0 & ~frozen0
    layer, _ = make_layer(61, 45, 16, mask0, frozen0)
    opt = _optimizer(opt_name, layer.parameters())
    _train_steps(layer, opt, 3)
    old_param, old_layout = layer.weight_train, layer.layout
    w0 = layer.weight.clone()
    state0 = {key: dense_state(old_layout, v) for key, v in weight_state_tensors(opt, layer).items()}
    assert set(state0) == STATE_KEYS[opt_name]
    scalars0 = {key: v for key, v in opt.state[old_param].items() if key not in state0}

    mask1, frozen1 = _new_masks(mask0, frozen0)
    train1 = mask1 & ~frozen1
    grown = mask1 & ~mask0
    assert bool(grown.any()) and bool((mask0 & ~mask1).any()) and bool((train1 & frozen0).any())
    assert layer.set_masks(mask1, frozen1, optimizer=opt) is layer

    assert torch.equal(layer.mask, mask1) and torch.equal(layer.frozen_mask, frozen1)
    w1 = layer.weight
    assert torch.equal(w1[mask0 & mask1], w0[mask0 & mask1]), "a kept value changed"
    assert bool((w1[grown] == 0).all()), "a newly kept weight does not start at zero"
    assert bool((w1[~mask1] == 0).all())
    new_param = layer.weight_train
    assert new_param is not old_param and isinstance(new_param, nn.Parameter) and new_param.requires_grad
    params = [p for g in opt.param_groups for p in g["params"]]
    assert any(p is new_param for p in params) and not any(p is old_param for p in params)
    assert old_param not in opt.state
    state1 = weight_state_tensors(opt, layer)
    assert set(state1) == STATE_KEYS[opt_name]
    for key, val in state1.items():
        assert val.shape == new_param.shape, key
        dense1 = dense_state(layer.layout, val)
        assert torch.equal(dense1[train0 & train1], state0[key][train0 & train1]), f"{key} not kept"
        assert bool((dense1[train1 & ~train0] == 0).all()), f"{key} of a grown element is not zero"
    for key, val in scalars0.items():
        assert torch.equal(torch.as_tensor(opt.state[new_param][key]), torch.as_tensor(val)), key

    # training continues on the new layout: grown elements move, frozen/pruned ones do not
    w1 = layer.weight.clone()
    _train_steps(layer, opt, 3)
    w2 = layer.weight
    assert bool((w2[~mask1] == 0).all()) and torch.equal(w2[frozen1], w1[frozen1])
    assert bool((w2[train1] != w1[train1]).all())


def _train_steps(layer, opt, steps):
    for _ in range(steps):
        opt.zero_grad()
        layer(torch.randn(6, layer.in_features)).square().mean().backward()
        opt.step()


def test_set_masks_while_old_graph_is_alive(backend):
    """The previous step's graph (still holding the old Parameter and layout) stays valid."""
    mask0, frozen0 = plan_masks()
    layer, _ = make_layer(61, 45, 16, mask0, frozen0)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.01)
    x = torch.randn(6, 61)
    old_param = layer.weight_train
    loss0 = layer(x).square().mean()  # kept alive across the mask change
    layer.set_masks(*_new_masks(mask0, frozen0), optimizer=opt)
    loss1 = layer(x).square().mean()
    loss1.backward()
    g1 = layer.weight_train.grad.clone()
    loss0.backward()  # the old graph still runs, into the old Parameter
    assert old_param.grad is not None and old_param.grad.shape == old_param.shape
    assert torch.equal(layer.weight_train.grad, g1)
    opt.step()
    _train_steps(layer, opt, 2)
    assert bool(layer.weight.isfinite().all())


def test_set_masks_keeps_requires_grad_and_works_without_optimizer(backend):
    mask0, frozen0 = plan_masks()
    layer, _ = make_layer(61, 45, 16, mask0, frozen0)
    layer.weight_train.requires_grad_(False)
    mask1, frozen1 = _new_masks(mask0, frozen0)
    layer.set_masks(mask1, frozen1)
    assert not layer.weight_train.requires_grad
    x = torch.randn(3, 61)
    y = layer(x)
    assert_close(y, reference_linear(x, layer.weight, mask1, layer.bias), F32, 61, "y after set_masks")


# ---------------------------------------------------------------- bad input
@pytest.fixture
def layer():
    mask, frozen = plan_masks()
    return make_layer(61, 45, 16, mask, frozen)[0]


def test_rejects_wrong_input_width(layer):
    with pytest.raises(ValueError, match="in_features"):
        layer(torch.randn(4, 60))


@pytest.mark.parametrize("x_dtype", [F16, BF16, torch.float64])
def test_rejects_input_of_other_dtype(layer, x_dtype):
    with pytest.raises(TypeError, match="dtype"):
        layer(torch.randn(4, 61).to(x_dtype))


def test_constructor_rejects_bad_masks():
    with pytest.raises(ValueError, match="mask"):
        SparseLinear(61, 45, block_size=16, mask=torch.ones(61, 45, dtype=torch.bool))
    with pytest.raises(ValueError, match="frozen_mask"):
        SparseLinear(61, 45, block_size=16, frozen_mask=torch.ones(45, 60, dtype=torch.bool))
    mask = torch.rand(45, 61) < 0.5
    with pytest.raises(ValueError, match="frozen"):
        SparseLinear(61, 45, block_size=16, mask=mask, frozen_mask=~mask)


@pytest.mark.parametrize("bs", [8, 48, 256, (16, 8), (16, 256), 0])
def test_constructor_rejects_unsupported_block_size(bs):
    with pytest.raises(ValueError, match="block_size"):
        SparseLinear(64, 64, block_size=bs)


BAD_SET_MASKS = {
    "mask-shape": lambda m, f: (torch.ones(61, 45, dtype=torch.bool), None),
    "frozen-shape": lambda m, f: (m, torch.zeros(45, 60, dtype=torch.bool)),
    "frozen-outside-mask": lambda m, f: (m, ~m),
    "mask-1d": lambda m, f: (m.flatten(), None),
}


@pytest.mark.parametrize("bad", list(BAD_SET_MASKS))
def test_failed_set_masks_leaves_module_unchanged(layer, bad):
    opt = torch.optim.AdamW(layer.parameters())
    _train_steps(layer, opt, 1)
    param, lay, wf, code = layer.weight_train, layer.layout, layer.weight_frozen, layer.block_code
    w = layer.weight.clone()
    state = dict(opt.state[param])
    groups = [list(g["params"]) for g in opt.param_groups]
    x = torch.randn(3, 61)
    y = layer(x).detach()
    with pytest.raises(ValueError):
        layer.set_masks(*BAD_SET_MASKS[bad](layer.mask, layer.frozen_mask), optimizer=opt)
    assert layer.weight_train is param and layer.layout is lay
    assert layer.weight_frozen is wf and layer.block_code is code
    assert torch.equal(layer.weight, w)
    assert [list(g["params"]) for g in opt.param_groups] == groups
    assert set(opt.state) == {param, layer.bias}
    assert all(opt.state[param][k] is v for k, v in state.items())
    assert torch.equal(layer(x), y)


def test_warns_once_when_no_block_is_empty(monkeypatch):
    """An element mask that leaves no block empty skips nothing: said once, not on every layer."""
    import sparsekern.nn.sparse_weight as base

    monkeypatch.setattr(base, "_warned_no_empty_block", False)
    unstructured = torch.rand(64, 64) < 0.5  # 16x16 blocks of a random mask: all mixed
    with pytest.warns(UserWarning, match="no block is empty"):
        SparseLinear(64, 64, block_size=16, mask=unstructured)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SparseLinear(64, 64, block_size=16, mask=unstructured)  # the second time it stays quiet
    monkeypatch.setattr(base, "_warned_no_empty_block", False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SparseLinear(64, 64, block_size=16, mask=random_block_mask((64, 64), 16, 0.5))  # blocks: no warning


# ------------------------------------------------------------ the joined store
def _joined(layer):
    from sparsekern.kernels.store import adjacent

    wt, wf = layer.weight_train, layer.weight_frozen
    return not (wt.shape[0] and wf.shape[0]) or adjacent(wt, wf)


def test_stores_stay_one_buffer_through_every_change(backend, recwarn):
    """Construction, a step, set_masks, a checkpoint of another layout and dtype/device moves all
    leave weight_train and weight_frozen as halves of one buffer: the kernels then never copy."""
    mask, frozen = plan_masks()
    layer, _ = make_layer(61, 45, 16, mask, frozen)
    assert layer.weight_frozen.shape[0] and layer.weight_train.shape[0] and _joined(layer)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    param = layer.weight_train
    layer(torch.randn(5, 61)).square().sum().backward()
    opt.step()
    assert _joined(layer) and layer.weight_train is param
    mask2, frozen2 = mixed_masks(45, 61, 16, 0.6)
    layer.set_masks(mask2, frozen2, optimizer=opt)
    assert _joined(layer) and layer.weight_frozen.shape[0]
    other = SparseLinear(61, 45, block_size=16, mask=plan_masks()[0])
    other.load_state_dict(layer.state_dict())
    assert _joined(other) and torch.equal(other.weight, layer.weight)
    param = layer.weight_train
    layer.to(F16)
    assert _joined(layer) and layer.weight_train is param and layer.weight_train.dtype == F16
    layer.float()
    assert _joined(layer)
    assert not [w for w in recwarn.list if "not one buffer" in str(w.message)]


def test_a_rebuilt_parameter_still_computes_the_same(backend, monkeypatch):
    """A sharder that replaces weight_train with a fresh tensor breaks the shared buffer: the
    result stays identical, and the copy it costs the Triton kernels is said once (the CPU path
    gathers the blocks anyway, so it pays nothing extra and says nothing)."""
    from sparsekern.kernels import store

    mask, frozen = plan_masks()
    layer, _ = make_layer(61, 45, 16, mask, frozen)
    x = torch.randn(7, 61)
    y = layer(x).detach()
    monkeypatch.setattr(store, "_warned_copy", False)
    layer.weight_train = nn.Parameter(layer.weight_train.detach().clone())
    assert not _joined(layer)
    if backend == "triton":
        with pytest.warns(UserWarning, match="not one buffer"):
            y2 = layer(x)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            y2 = layer(x)
    assert torch.equal(y2.detach(), y)
