"""Adapters: torch prune, torch.ao, mask dicts and files, checkpoints; ``nn.foreign_masks``.

``granularity="exact"`` must keep outputs and gradients (float64 references from
``sparsekern.testing``, gradients only at trainable elements); ``"block"`` must keep
each layer's density in whole blocks. Tiny layers: 48x40 and 32x48 in 16x16 blocks.
"""

import pytest
import torch
from torch import nn
from torch.ao.pruning import WeightNormSparsifier
from torch.nn.utils import parametrize, prune

import sparsekern
from sparsekern import convview
from sparsekern.adapters import from_checkpoint, from_mask_dict, from_torch_ao, from_torch_prune
from sparsekern.methods.blocks import block_grid, expand_blocks
from sparsekern.nn import SparseConv2d, SparseLinear
from sparsekern.nn.foreign_masks import dense_weight_and_mask, has_foreign_mask
from sparsekern.testing import (
    assert_close,
    random_block_mask,
    reference_conv2d,
    reference_conv_grads,
    reference_grads,
    reference_linear,
)

F32, BS = torch.float32, 16


def make_model():
    return nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 32))


def source_masks():
    """Layer 0: an unstructured mask; layer 2: a block mask (so exact conversion skips blocks)."""
    return {"0": torch.rand(48, 40) < 0.3, "2": random_block_mask((32, 48), BS, 0.5)}


def dense_grad(layer):
    lay = layer.layout
    return lay.to_dense(layer.weight_train.grad, torch.zeros(lay.n_frozen_slots, *lay.block_size))


def assert_no_foreign_masks(model):
    for name, mod in model.named_modules():
        assert not has_foreign_mask(mod), f"{name} still carries a mask"
        assert not any(isinstance(h, prune.BasePruningMethod) for h in mod._forward_pre_hooks.values())
        assert not parametrize.is_parametrized(mod)
        assert not hasattr(mod, "weight_orig")


def check_exact(model, converted, refs):
    """Converted layers against float64 references, then the whole model before and after.

    ``refs``: ``{name: (effective weight, mask, bias)}`` taken before conversion.
    """
    for name, (weight, mask, bias) in refs.items():
        layer = converted.get_submodule(name)
        assert isinstance(layer, SparseLinear)
        assert torch.equal(layer.mask, mask)
        x = torch.randn(6, layer.in_features, requires_grad=True)
        y = layer(x)
        dy = torch.randn_like(y)
        y.backward(dy)
        k, n = layer.in_features, layer.out_features
        assert_close(y, reference_linear(x, weight, mask, bias), F32, k, f"{name}: y")
        dx, dw, db = reference_grads(x, weight, mask, None, dy, bias)
        assert_close(x.grad, dx, F32, n, f"{name}: dx")
        assert_close(dense_grad(layer), dw, F32, 6, f"{name}: dW (zero off the mask)")
        assert_close(layer.bias.grad, db, F32, 6, f"{name}: dbias")


def model_io(model, x):
    """Output and the input gradient of a fixed loss."""
    x = x.clone().requires_grad_()
    y = model(x)
    y.square().sum().backward()
    return y.detach(), x.grad


def compare_models(before, after, x):
    y0, dx0 = before
    y1, dx1 = model_io(after, x)
    assert_close(y1, y0.double(), F32, 48, "model output before/after")
    assert_close(dx1, dx0.double(), F32, 48, "model input gradient before/after")


def refs_of(model, masks):
    return {
        name: (torch.where(m, model.get_submodule(name).weight.detach(), 0), m, model.get_submodule(name).bias.detach())
        for name, m in masks.items()
    }


# --------------------------------------------------------------- torch prune
def test_torch_prune_exact():
    model, masks = make_model(), source_masks()
    for name, m in masks.items():
        prune.custom_from_mask(model.get_submodule(name), "weight", m)
    refs = {n: (*dense_weight_and_mask(model.get_submodule(n)), model.get_submodule(n).bias.detach()) for n in masks}
    x = torch.randn(5, 40)
    before = model_io(model, x)
    out, rep = from_torch_prune(model, granularity="exact", block_size=BS)
    assert out is model
    assert_no_foreign_masks(model)
    check_exact(model, model, refs)
    compare_models(before, model, x)
    assert list(rep.layers) == ["0", "2"]
    row = rep["2"]
    assert (row.kind, row.shape, row.granularity, row.block_size) == ("linear", (32, 48), "exact", (BS, BS))
    assert row.mask_density == pytest.approx(masks["2"].float().mean().item())
    exact = row.choices["exact"]
    assert exact.block_fraction == row.block_fraction == pytest.approx(model[2].layout.block_density)
    assert exact.flops_saved["forward"] > 0.25  # the block mask skips about half
    flops = model[2].layout.flops(1)
    for p in ("forward", "input_grad", "weight_grad"):
        assert exact.flops_per_token[p] == row.flops_per_token[p] == flops[p]
        assert exact.flops_saved[p] == pytest.approx(1 - flops[p]["block"] / flops[p]["dense"])
    assert rep["0"].choices["exact"].flops_saved["forward"] == pytest.approx(0.0)  # unstructured: nothing empty
    assert "exact fwd saved" in rep.table() and "| total |" in rep.table()


def test_torch_prune_block_keeps_density():
    model = make_model()
    prune.l1_unstructured(model[0], "weight", amount=0.75)
    prune.random_unstructured(model[2], "weight", amount=0.5)
    out, rep = from_torch_prune(model, granularity="block", block_size=BS)
    assert_no_foreign_masks(out)
    for name, density, grid in (("0", 0.25, (3, 3)), ("2", 0.5, (2, 3))):
        layer = out.get_submodule(name)
        assert layer.layout.nnz_blocks == round(density * grid[0] * grid[1])
        assert layer.layout.n_mixed == 0
        row = rep[name]
        assert row.mask_density == pytest.approx(density, abs=1e-6) and row.granularity == "block"
        assert row.choices["block"].block_fraction == row.block_fraction == pytest.approx(layer.layout.block_density)
        assert row.choices["block"].flops_saved["forward"] > row.choices["exact"].flops_saved["forward"]
    total = rep.total()
    assert total.granularity == "block" and total.mask_density == pytest.approx((0.25 * 48 * 40 + 0.5 * 32 * 48) / 3456)
    assert total.choices["block"].flops_saved["forward"] > total.choices["exact"].flops_saved["forward"]
    # The kept blocks are those of largest pooled |W * mask|; pruned weights inside them start at zero.
    assert out[0].weight[out[0].mask].count_nonzero() <= int(0.25 * 48 * 40) + 1


def test_torch_prune_bias_and_frozen_weight():
    model = make_model()
    prune.random_unstructured(model[0], "weight", amount=0.5)
    prune.random_unstructured(model[0], "bias", amount=0.5)
    model[0].weight_orig.requires_grad_(False)
    bias = torch.where(model[0].bias_mask.bool(), model[0].bias_orig, 0).detach()
    out, _ = from_torch_prune(model, block_size=BS)
    assert torch.equal(out[0].bias.detach(), bias)
    assert not out[0].weight_train.requires_grad
    assert_no_foreign_masks(out)


# ---------------------------------------------------------------- torch.ao
def ao_model():
    model = make_model()
    sparsifier = WeightNormSparsifier(sparsity_level=0.7, sparse_block_shape=(1, 4), zeros_per_block=4)
    sparsifier.prepare(model, config=[{"tensor_fqn": "0.weight"}, {"tensor_fqn": "2.weight"}])
    sparsifier.step()
    return model, sparsifier


def test_torch_ao_exact():
    model, _ = ao_model()
    masks = {n: model.get_submodule(n).parametrizations.weight[0].mask.bool() for n in ("0", "2")}
    refs = refs_of(model, masks)
    x = torch.randn(5, 40)
    before = model_io(model, x)
    out, rep = from_torch_ao(model, granularity="exact", block_size=BS)
    assert_no_foreign_masks(out)
    check_exact(model, out, refs)
    compare_models(before, out, x)
    assert len(rep) == 2


def test_torch_ao_block():
    model, _ = ao_model()
    out, rep = from_torch_ao(model, granularity="block", block_size=BS)
    assert_no_foreign_masks(out)
    assert out[0].layout.nnz_blocks == round(rep["0"].mask_density * 9)


def test_sparsifier_convert_keeps_exact_mask():
    """``sparsifier.convert(model, mapping={nn.Linear: SparseLinear})``: ``from_dense`` reads the FakeSparsity mask."""
    model, sparsifier = ao_model()
    fake = model[0].parametrizations.weight[0]
    kept = fake.mask.nonzero()[0]
    with torch.no_grad():
        model[0].parametrizations.weight.original[tuple(kept)] = 0.0  # a kept weight that is zero
    expected = fake.mask.bool().clone()
    refs = refs_of(model, {"0": expected})
    converted = sparsifier.convert(model, mapping={nn.Linear: SparseLinear})
    assert isinstance(converted[0], SparseLinear) and isinstance(converted[2], SparseLinear)
    assert torch.equal(converted[0].mask, expected)
    assert_no_foreign_masks(converted)
    check_exact(converted, converted, refs)


def test_from_dense_reads_torch_prune_masks():
    lin = nn.Linear(40, 48)
    mask = torch.rand(48, 40) < 0.3
    prune.custom_from_mask(lin, "weight", mask)
    prune.random_unstructured(lin, "bias", amount=0.5)
    sparse = SparseLinear.from_dense(lin, block_size=BS)
    assert torch.equal(sparse.mask, mask)
    assert torch.equal(sparse.weight, torch.where(mask, lin.weight_orig, 0))
    assert torch.equal(sparse.bias, torch.where(lin.bias_mask.bool(), lin.bias_orig, 0))


def test_a_nan_in_a_torch_prune_mask_is_refused_not_read_as_kept():
    lin = nn.Linear(40, 48)
    prune.random_unstructured(lin, "weight", amount=0.5)
    lin.weight_mask[0, 0] = float("nan")  # NaN != 0: taken at face value it would count as kept
    with pytest.raises(ValueError, match="weight_mask holds 1 NaN entries"):
        SparseLinear.from_dense(lin, block_size=BS)
    with pytest.raises(ValueError, match="1 NaN entries"):
        from_torch_prune(nn.Sequential(lin), block_size=BS)


# ------------------------------------------------------------- foreign_masks
def test_ingest_forms():
    lin = nn.Linear(40, 48)
    w, m = dense_weight_and_mask(lin)
    assert m is None and torch.equal(w, lin.weight) and not w.requires_grad
    mask = torch.rand(48, 40) < 0.5
    prune.custom_from_mask(lin, "weight", mask)
    with torch.no_grad():
        lin.weight_orig.add_(1.0)  # stale lin.weight: the ingest reads weight_orig and weight_mask
    w, m = dense_weight_and_mask(lin)
    assert torch.equal(m, mask) and torch.equal(w, torch.where(mask, lin.weight_orig, 0))
    model, _ = ao_model()
    w, m = dense_weight_and_mask(model[0])
    assert torch.equal(m, model[0].parametrizations.weight[0].mask.bool()) and torch.equal(w, model[0].weight)


# --------------------------------------------------------------- mask dicts
@pytest.mark.parametrize("form", ["nni", "nni_file", "param_names", "list"])
def test_mask_dict_exact(form, tmp_path):
    model, masks = make_model(), source_masks()
    refs = refs_of(model, masks)
    x = torch.randn(5, 40)
    with torch.no_grad():
        for name, m in masks.items():
            model.get_submodule(name).weight.mul_(m)
    before = model_io(model, x)
    if form == "nni":
        src = {n: {"weight": m.float()} for n, m in masks.items()}
    elif form == "nni_file":
        src = tmp_path / "masks.pth"
        torch.save({n: {"weight": m} for n, m in masks.items()}, src)
    elif form == "param_names":
        src = {f"{n}.weight": m for n, m in masks.items()}
    else:
        src = [masks["0"], masks["2"]]
    out, rep = from_mask_dict(model, src, granularity="exact", block_size=BS)
    check_exact(model, out, refs)
    compare_models(before, out, x)
    assert list(rep.layers) == ["0", "2"]


def test_mask_dict_block_and_bias_mask():
    model = make_model()
    bias_mask = torch.arange(48) % 2 == 0
    out, rep = from_mask_dict(
        model, {"0": {"weight": torch.rand(48, 40) < 0.4, "bias": bias_mask}}, granularity="block", block_size=BS
    )
    assert out[0].layout.nnz_blocks == round(rep["0"].mask_density * 9)
    assert not out[0].bias[~bias_mask].any()
    assert isinstance(out[2], nn.Linear)


@pytest.mark.parametrize(
    "masks, error, match",
    [
        ({"fc9": {"weight": torch.ones(48, 40)}}, ValueError, "does not have"),
        ({"0": {"weight": torch.ones(40, 48)}}, ValueError, "shape"),
        ({"0.weight": torch.ones(48, 40), "2.weight": torch.ones(3, 3)}, ValueError, "shape"),
        ({"0": {"gamma": torch.ones(48, 40)}}, ValueError, "weight"),
        ([torch.ones(48, 40)], ValueError, "align"),
        ({"1": {"weight": torch.ones(2)}}, TypeError, "ReLU"),
        ({"0": {"weight": [[1]]}}, TypeError, "tensor"),
        ({"0": {"weight": torch.ones(48, 40).index_fill_(1, torch.tensor([3]), float("nan"))}}, ValueError, "48 NaN"),
        (42, TypeError, "dict"),
    ],
)
def test_mask_dict_bad_input_leaves_model_unchanged(masks, error, match):
    model = make_model()
    if match == "ReLU":  # a mask on a module with no weight: ingest fails before any conversion
        model[1].weight = nn.Parameter(torch.ones(2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        from_mask_dict(model, masks, block_size=BS)
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_bad_options():
    with pytest.raises(ValueError, match="granularity"):
        from_mask_dict(make_model(), {}, granularity="row")
    with pytest.raises(ValueError, match="reduce"):
        from_torch_prune(make_model(), reduce="mean")
    with pytest.raises(ValueError, match="block_size"):
        from_torch_prune(make_model(), block_size=24)


# ---------------------------------------------------------------- checkpoints
def pruned_state_dict():
    src, masks = make_model(), source_masks()
    with torch.no_grad():
        src[0].weight.mul_(masks["0"])
        src[2].weight.mul_(masks["2"])
    return src.state_dict(), masks


@pytest.mark.parametrize("as_file", [False, True])
def test_checkpoint_exact(as_file, tmp_path):
    sd, masks = pruned_state_dict()
    ref = make_model()
    ref.load_state_dict(sd)
    x = torch.randn(5, 40)
    before = model_io(ref, x)
    refs = refs_of(ref, masks)
    if as_file:
        torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pt")
    model = make_model()
    out, rep = from_checkpoint(model, tmp_path / "ckpt.pt" if as_file else sd, block_size=BS)
    check_exact(model, out, refs)
    compare_models(before, out, x)


def test_checkpoint_layer_selection():
    sd, masks = pruned_state_dict()  # layer 0 is 70% zeros, layer 2 50%
    out, rep = from_checkpoint(make_model(), sd, block_size=BS, min_sparsity=0.6)
    assert isinstance(out[0], SparseLinear) and isinstance(out[2], nn.Linear)
    out, rep = from_checkpoint(make_model(), sd, block_size=BS, modules=["2"], granularity="block")
    assert isinstance(out[0], nn.Linear) and isinstance(out[2], SparseLinear)
    assert out[2].layout.nnz_blocks == round(rep["2"].mask_density * 6)


def test_checkpoint_bad_input_leaves_model_unchanged():
    sd, _ = pruned_state_dict()
    model = make_model()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bad = {**sd, "0.weight": torch.zeros(3, 3)}
    with pytest.raises(ValueError, match="shape"):
        from_checkpoint(model, bad)
    with pytest.raises(ValueError, match="missing"):
        from_checkpoint(model, {k: v for k, v in sd.items() if k != "2.bias"})
    with pytest.raises(ValueError, match="unknown"):
        from_checkpoint(model, sd, modules=["7"])
    with pytest.raises(ValueError, match="supported"):
        from_checkpoint(model, sd, modules=["1"])
    with pytest.raises(ValueError, match="min_sparsity"):
        from_checkpoint(model, sd, min_sparsity=2)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# ---------------------------------------------------------------- convolutions
@pytest.fixture
def cpu_path(monkeypatch):
    """SparseConv2d on the CPU path: these tests are about masks and state, and the interpreter is slow
    (the conv kernels themselves are checked in test_conv_kernels.py and test_conv.py)."""
    import sparsekern.kernels as sk

    monkeypatch.setattr(sk, "INTERPRET", False)


@pytest.mark.parametrize("granularity", ["exact", "block"])
def test_conv_torch_prune(cpu_path, granularity):
    model = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 16, 1))
    grid = block_grid(model[0].weight.shape, BS)  # (2, 9): 16 channels in one block column per tap
    mask = expand_blocks(torch.rand(grid) < 0.5, model[0].weight.shape, BS) & (torch.rand(32, 16, 3, 3) < 0.8)
    prune.custom_from_mask(model[0], "weight", mask)
    weight, bias = dense_weight_and_mask(model[0])[0], model[0].bias.detach()
    out, rep = from_torch_prune(model, granularity=granularity, block_size=BS)
    conv = out[0]
    assert isinstance(conv, SparseConv2d) and isinstance(out[2], nn.Conv2d)
    assert_no_foreign_masks(out)
    if granularity == "block":
        assert conv.layout.nnz_blocks == round(rep["0"].mask_density * 18) and conv.layout.n_mixed == 0
        return
    assert torch.equal(conv.mask, mask)
    assert rep["0"].kind == "conv2d" and rep["0"].shape == (32, 16, 3, 3)
    assert rep["0"].choices["exact"].block_fraction == pytest.approx(conv.layout.block_density)
    assert rep["0"].element_density == pytest.approx(mask.float().mean().item())  # of the real weights
    x = torch.randn(2, 16, 5, 5, requires_grad=True)
    y = conv(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert_close(y, reference_conv2d(x, weight, mask, bias, padding=1), F32, 16 * 9, "conv y")
    dx, dw, db = reference_conv_grads(x, weight, mask, None, dy, bias, padding=1)
    assert_close(x.grad, dx, F32, 32 * 9, "conv dx")
    lay = conv.layout
    dense = lay.to_dense(conv.weight_train.grad, torch.zeros(lay.n_frozen_slots, *lay.block_size))
    assert_close(convview.from_matrix(dense, 16, 3, 3), dw, F32, 50, "conv dW")
    assert_close(conv.bias.grad, db, F32, 50, "conv dbias")


def test_unsupported_modules_are_refused():
    model = nn.Sequential(nn.Conv2d(16, 16, 3, groups=2), nn.MultiheadAttention(16, 2))
    prune.random_unstructured(model[0], "weight", amount=0.5)
    with pytest.raises(TypeError, match="groups=2"):
        from_torch_prune(model, block_size=BS)
    with pytest.raises(TypeError, match="NonDynamicallyQuantizableLinear"):
        from_mask_dict(model, {"1.out_proj": {"weight": torch.ones(16, 16)}}, block_size=BS)
    assert isinstance(model[0], nn.Conv2d) and prune.is_pruned(model)


def test_a_shared_module_is_replaced_at_every_name():
    # The adapters swap layers in through the methods' spine (targets.replace_module): a module
    # registered under two names stays one module, now sparse at both.
    lin = nn.Linear(40, 48)
    prune.l1_unstructured(lin, "weight", amount=0.7)
    model = nn.ModuleDict({"a": lin, "b": lin})
    model, rep = from_torch_prune(model, block_size=BS)
    assert list(rep.layers) == ["a"]
    assert isinstance(model["a"], SparseLinear) and model["b"] is model["a"]


def test_a_model_that_is_a_pruned_layer_is_returned_converted():
    lin = nn.Linear(40, 48)
    prune.l1_unstructured(lin, "weight", amount=0.7)
    model, _ = from_torch_prune(lin, block_size=BS)
    assert isinstance(model, SparseLinear)


# ------------------------------------------------------------- tied weights
def tied_model():
    """An embedding and a head sharing one Parameter (Hugging Face's lm_head tying), and a free layer."""
    model = nn.ModuleDict({"emb": nn.Embedding(48, 40), "body": nn.Linear(40, 40), "head": nn.Linear(40, 48)})
    model["head"].weight = model["emb"].weight
    return model


def assert_still_tied(model):
    assert type(model["head"]) is nn.Linear and model["head"].weight is model["emb"].weight
    assert type(model["body"]) is nn.Linear


@pytest.mark.parametrize("adapter", ["mask_dict", "torch_prune", "torch_ao", "checkpoint", "checkpoint_modules"])
def test_tied_weights_are_refused_naming_the_tie_and_the_model_is_unchanged(adapter):
    """A sparse layer holds its own stores: converting a tied head would untie it silently. Every adapter refuses."""
    model = tied_model()
    head_mask = torch.rand(48, 40) < 0.3
    match = r"tied weights, so nothing was converted: head: its (weight|weight_orig|parametrizations\.weight\.original)"
    match += r" is tied to emb\.weight"
    with pytest.raises(ValueError, match=match):
        if adapter == "mask_dict":
            from_mask_dict(model, {"body": {"weight": torch.rand(40, 40) < 0.3}, "head": {"weight": head_mask}})
        elif adapter == "torch_prune":
            prune.l1_unstructured(model["body"], "weight", amount=0.7)
            prune.l1_unstructured(model["head"], "weight", amount=0.7)
            from_torch_prune(model, block_size=BS)
        elif adapter == "torch_ao":
            sparsifier = WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4), zeros_per_block=4)
            sparsifier.prepare(model, config=[{"tensor_fqn": "body.weight"}, {"tensor_fqn": "head.weight"}])
            sparsifier.step()
            from_torch_ao(model, block_size=BS)
        else:
            sd = {k: v.clone() for k, v in model.state_dict().items()}
            sd["body.weight"][torch.rand(40, 40) < 0.7] = 0
            sd["emb.weight"][~head_mask] = 0
            sd["head.weight"] = sd["emb.weight"]
            before = {k: v.clone() for k, v in model.state_dict().items()}
            try:
                from_checkpoint(model, sd, block_size=BS, modules=["head"] if adapter == "checkpoint_modules" else None)
            finally:  # refused before loading: the model's values are untouched too
                assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    if adapter in ("mask_dict", "checkpoint", "checkpoint_modules"):
        assert_still_tied(model)
    elif adapter == "torch_prune":
        assert prune.is_pruned(model) and model["head"].weight_orig is model["emb"].weight
    else:
        assert model["head"].parametrizations.weight.original is model["emb"].weight


def test_untied_layers_of_a_tied_model_convert():
    model = tied_model()
    out, rep = from_mask_dict(model, {"body": {"weight": torch.rand(40, 40) < 0.3}}, block_size=BS)
    assert list(rep.layers) == ["body"] and isinstance(out["body"], SparseLinear)
    assert out["head"].weight is out["emb"].weight


def test_a_parametrized_layer_left_dense_by_a_method_says_why():
    """``register_parametrization`` makes a ``ParametrizedLinear`` subclass: the reason names the parametrization."""
    model, _ = ao_model()
    rep = sparsekern.sparsify(model, "magnitude", 0.5, block_size=BS)
    reason = rep["0"].reason
    assert not rep["0"].sparse and "a Linear with parametrizations on weight" in reason, reason
    assert "subclasses" not in reason and "from_torch_ao" in reason
