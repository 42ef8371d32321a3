"""Hugging Face models: tiny GPT-2, BERT and Llama built from configs (no downloads), sparsified and trained.

Each model trains one step sparse and as the masked dense model in float64; outputs and every gradient
agree within the chained-reduction tolerance (``sparsekern.testing.assert_chain_close``). GPT-2's
``Conv1D`` layers (weight ``(in, out)``) must be converted with blocks in the right orientation, which the
rectangular ``(16, 32)`` block checks; tied output embeddings stay tied, so ``tie_weights()`` works.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern import SparseLinear  # noqa: E402
from sparsekern.methods import imp, masks  # noqa: E402
from sparsekern.nn.hf import is_conv1d  # noqa: E402
from sparsekern.reports import PASSES  # noqa: E402
from sparsekern.testing import assert_chain_close, assert_close, reference_linear  # noqa: E402

VOCAB, SEQ, BATCH = 128, 16, 2
# No dropout (the sparse and the dense run must see the same function); eager attention runs in float64.
COMMON = {"vocab_size": VOCAB, "attn_implementation": "eager", "bos_token_id": 0, "eos_token_id": 0}


def gpt2():
    cfg = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=SEQ, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **COMMON
    )
    return transformers.GPT2LMHeadModel(cfg), ("transformer.wte", "lm_head"), 256  # widest reduction: 4 * 64


def bert():
    cfg = transformers.BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=SEQ,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **COMMON,
    )
    return transformers.BertForMaskedLM(cfg), ("bert.embeddings.word_embeddings", "cls.predictions.decoder"), 128


def llama():
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=SEQ,
        tie_word_embeddings=True,
        pad_token_id=0,
        **COMMON,
    )
    return transformers.LlamaForCausalLM(cfg), ("model.embed_tokens", "lm_head"), 128


def lm_loss(out, labels):
    return F.cross_entropy(out.logits.flatten(0, 1), labels.flatten())


def _module_grads(model, ref, name):
    """The module's parameter gradients (sparse ones as dense, masked) flattened, with the reference's."""
    mod, rmod = model.get_submodule(name), ref.get_submodule(name)
    got, want = [], []
    for pname, p in mod.named_parameters(recurse=False):
        if pname == "weight_train":
            got.append(mod.layout.to_dense(p.grad, torch.zeros_like(mod.weight_frozen)).flatten())
            g = rmod.weight.grad.T if is_conv1d(rmod) else rmod.weight.grad
            want.append(torch.where(mod.mask & ~mod.frozen_mask, g, 0.0).flatten())
        else:
            got.append(p.grad.flatten())
            want.append(rmod.get_parameter(pname).grad.flatten())
    return torch.cat(got), torch.cat(want)


CASES = {
    # model, block size, method: rectangular blocks on GPT-2 catch a Conv1D oriented the wrong way.
    "gpt2": (gpt2, (16, 32), "snip"),
    "bert": (bert, 32, "magnitude"),
    "llama": (llama, 16, "snip"),
}


@pytest.mark.parametrize("arch", list(CASES))
def test_sparsified_hf_model_trains_like_the_masked_dense_model(arch):
    build, block_size, method = CASES[arch]
    model, (emb, head), k = build()
    model.train()
    ref = copy.deepcopy(model).double()  # deepcopy keeps the tie
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    labels = torch.randint(0, VOCAB, (BATCH, SEQ))
    rep = sparsekern.sparsify(
        model, method, 0.3, block_size=block_size, data=[(ids, labels)], loss_fn=lm_loss, seed=0
    )  # fmt: skip

    # The tied head stays dense, with the tie named; everything else of the blocks' size is converted.
    assert not rep[head].sparse and f"tied to {emb}.weight" in rep[head].reason
    assert model.get_submodule(head).weight is model.get_submodule(emb).weight
    convertible = [n for n, m in ref.named_modules() if isinstance(m, (nn.Linear, Conv1D)) and n != head]
    assert convertible and rep.sparse_layers == convertible
    if arch == "gpt2":
        conv1d = [n for n, m in ref.named_modules() if isinstance(m, Conv1D)]
        assert len(conv1d) == 8 and all(rep[n].kind == "conv1d" and "Conv1D" in rep[n].note for n in conv1d)
        assert all(rep[n].shape == tuple(ref.get_submodule(n).weight.shape) for n in conv1d)
    for name in rep.sparse_layers:
        layer = model.get_submodule(name)
        assert isinstance(layer, SparseLinear) and layer.layout.n_mixed == 0
        assert layer.block_size == sparsekern.layout.normalize_block_size(block_size)
        assert layer.layout.block_density == pytest.approx(0.3, abs=0.05)
    # The totals cover every reported layer (converted ones and the dense head), weighted by size.
    numel = {n: r.shape[0] * r.shape[1] for n, r in rep.layers.items()}
    expect = sum(r.element_density * numel[n] for n, r in rep.layers.items()) / sum(numel.values())
    assert rep.total().element_density == pytest.approx(expect)
    assert len(rep) == len(convertible) + 1

    with torch.no_grad():
        for name in rep.sparse_layers:
            r, mask = ref.get_submodule(name), model.get_submodule(name).mask
            r.weight.mul_(mask.T if is_conv1d(r) else mask)
    # Chained reductions per block: q/k/v (c_attn), scores, values, out, MLP in, MLP out; then the head
    # (and BERT's transform).
    depth = 6 * 2 + 2
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(2):
        out, ref_out = model(ids), ref(ids)
        assert_chain_close(out.logits, ref_out.logits, torch.float32, k, depth, f"logits after {step} steps")
        if step == 1:
            break
        lm_loss(out, labels).backward()
        lm_loss(ref_out, labels).backward()
        names = {n.rpartition(".")[0] for n, _ in model.named_parameters()}
        assert len(names) > 10
        for name in sorted(names):
            got, want = _module_grads(model, ref, name)
            assert_chain_close(got, want, torch.float32, k, 2 * depth, f"grad of {name}")
        with torch.no_grad():  # the masked dense model keeps its pruned weights at zero
            for name in rep.sparse_layers:
                r, mask = ref.get_submodule(name), model.get_submodule(name).mask
                r.weight.grad.mul_(mask.T if is_conv1d(r) else mask)
        opt.step()
        ref_opt.step()

    model.tie_weights()
    assert model.get_submodule(head).weight is model.get_submodule(emb).weight


def test_conv1d_from_dense_uses_the_conv1d_orientation_for_masks():
    conv = Conv1D(nf=96, nx=64)  # weight (in=64, out=96)
    nn.init.normal_(conv.bias)
    block = torch.rand(64 // 32, 96 // 16) < 0.5  # (16, 32) blocks of the (out, in) layer are (32, 16) here
    mask = block.repeat_interleave(32, 0).repeat_interleave(16, 1)
    layer = SparseLinear.from_dense(conv, mask=mask, block_size=(16, 32))
    assert (layer.in_features, layer.out_features) == (64, 96) and layer.weight.shape == (96, 64)
    assert torch.equal(layer.mask, mask.T) and layer.layout.n_mixed == 0
    assert layer.layout.nnz_blocks == int(block.sum())
    x = torch.randn(5, 64)
    assert_close(layer(x), reference_linear(x, conv.weight.T, mask.T, conv.bias), torch.float32, 64, "y")
    with pytest.raises(ValueError, match=r"\(in, out\) orientation \(64, 96\)"):
        SparseLinear.from_dense(conv, mask=mask.T)
    with pytest.raises(TypeError, match="nn.Linear or a transformers Conv1D"):
        SparseLinear.from_dense(nn.Embedding(4, 4))


def test_masks_of_a_conv1d_are_in_its_orientation_and_aligned_to_the_layer_blocks():
    model = nn.Sequential(Conv1D(nf=96, nx=64), nn.ReLU(), Conv1D(nf=64, nx=96))
    m = masks(model, "magnitude", 0.25, block_size=(16, 32), seed=0)
    assert m["0"][0].shape == (64, 96) and m["2"][0].shape == (96, 64)
    sparsekern.sparsify(model, "magnitude", 0.25, block_size=(16, 32), seed=0)
    for name in ("0", "2"):
        layout = model.get_submodule(name).layout
        assert torch.equal(model.get_submodule(name).mask, m[name][0].T)
        assert layout.n_mixed == 0 and layout.nnz_blocks == round(0.25 * layout.grid[0] * layout.grid[1])


def test_imp_rewinds_conv1d_weights_in_the_converted_orientation():
    # Layer "0" is square: a rewind or a mask nesting that forgot the transpose would run silently, and wrongly.
    model = nn.Sequential(Conv1D(nf=64, nx=64), nn.ReLU(), Conv1D(nf=32, nx=64))
    init = {n: model.get_submodule(n).weight.detach().clone() for n in ("0", "2")}
    seen = {}

    def train(m, info):
        if info.round > 0:
            seen[info.round] = {n: (m.get_submodule(n).weight.clone(), m.get_submodule(n).mask) for n in init}
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            m(torch.randn(4, 64)).square().mean().backward()
            opt.step()

    result = imp(model, train, rounds=2, prune_fraction=0.5, block_size=16)
    for n, w0 in init.items():
        assert isinstance(model.get_submodule(n), SparseLinear)
        for r in (1, 2):
            w, mask = seen[r][n]
            assert torch.equal(w, torch.where(mask, w0.T, 0.0)), f"round {r}: layer {n} is not the rewound init"
        assert not (seen[2][n][1] & ~seen[1][n][1]).any(), "round 2 keeps a subset of round 1"
        assert torch.equal(result.masks[n], seen[2][n][1]) and result.masks[n].shape == w0.T.shape


def test_flop_report_counts_conv1d_layers_dense_and_sparse():
    model, _, _ = gpt2()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ))
    dense = sparsekern.report(model, ids)
    names = list(dense.layers)
    assert sum(".c_" in n for n in names) == 8 and "lm_head" in names
    c_fc_name = next(n for n in names if n.endswith("h.0.mlp.c_fc"))
    assert dense[c_fc_name].kind == "conv1d" and dense[c_fc_name].shape == (64, 256)  # Conv1D's (in, out)
    sparsekern.sparsify(model, "magnitude", 0.25, block_size=16, seed=0)
    sparse = sparsekern.report(model, ids)
    assert list(sparse.layers) == names
    dense_total, sparse_total = dense.total().flops, sparse.total().flops
    assert all(sparse_total[p]["dense"] == dense_total[p]["dense"] for p in PASSES)
    c_fc = sparse[c_fc_name]
    assert c_fc.kind == "linear" and c_fc.sparse  # now a SparseLinear
    assert c_fc.flops["forward"]["block"] == c_fc.flops["forward"]["dense"] // 4 == 2 * BATCH * SEQ * 64 * 256 // 4
