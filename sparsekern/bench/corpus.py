"""The fidelity suite's data: the Python standard library's own source, as bytes, and a byte-level GPT.

Corpus: every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]`` (site-packages
excluded), ordered by the SHA-256 of its path relative to the stdlib, so the
order mixes packages yet is the same on every run. A file whose hash is 0 mod
10 is validation, the rest training; files are taken in hash order until each
side holds its byte budget. The same Python version gives the same bytes; the
corpus description (:func:`describe`) says which.

Model (:class:`ByteGPT`): a pre-norm GPT over bytes. Token and position
embeddings and the 256-way head are dense; in every block the attention's
``q``/``k``/``v``/``o`` projections and the MLP's ``fc``/``proj`` are plain
``nn.Linear`` without bias, the layers the methods sparsify
(:func:`sparse_layer_names`). RMSNorm instead of LayerNorm: SynFlow scores
the network on an all-ones input, which LayerNorm maps to zero (so every score
would be 0), RMSNorm keeps it. Attention is written out (softmax of masked
scores) so GraSP's Hessian-gradient product can differentiate it twice.

``ByteGPT.forward`` takes byte ids ``(B, T)`` or, for SynFlow's data-free
scoring, a float tensor ``(B, T, width)`` used in place of the embeddings.

Example:
    >>> data = load_corpus(train_bytes=1 << 20, val_bytes=1 << 17)
    >>> model = ByteGPT(layers=2, width=128, context=64)
    >>> x, y = train_batch(data.train, batch=8, context=64, generator=torch.Generator().manual_seed(0))
    >>> model(x).shape
    torch.Size([8, 64, 256])
"""

from __future__ import annotations

import hashlib
import math
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ByteGPT", "Corpus", "load_corpus", "sparse_layer_names", "train_batch", "val_windows"]

VAL_MOD = 10  # one file in ten is validation


@dataclass
class Corpus:
    """Train and validation bytes (uint8 tensors) and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    root: str
    train_files: int
    val_files: int

    def describe(self) -> str:
        return (
            f"stdlib source at {self.root}: {self.train.numel() / 1e6:.1f} MB train ({self.train_files} files), "
            f"{self.val.numel() / 1e6:.2f} MB validation ({self.val_files} files), split by path hash"
        )


def _stdlib_files(root: Path) -> list[tuple[str, Path]]:
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("site-packages/") or "/site-packages/" in rel:
            continue
        out.append((hashlib.sha256(rel.encode()).hexdigest(), path))
    return sorted(out)


def load_corpus(train_bytes: int, val_bytes: int, root: str | None = None) -> Corpus:
    """The stdlib's ``.py`` bytes, split by file hash, cut at ``train_bytes`` / ``val_bytes``.

    Args:
        train_bytes, val_bytes: byte budgets (the last file taken is truncated).
        root: the folder to read (default: this interpreter's stdlib).

    Returns:
        A :class:`Corpus`.
    """
    base = Path(root or sysconfig.get_paths()["stdlib"])
    train, val = bytearray(), bytearray()
    counts = [0, 0]
    for digest, path in _stdlib_files(base):
        is_val = int(digest, 16) % VAL_MOD == 0
        buf, budget = (val, val_bytes) if is_val else (train, train_bytes)
        if len(buf) >= budget:
            if len(train) >= train_bytes and len(val) >= val_bytes:
                break
            continue
        try:
            buf.extend(path.read_bytes())
        except OSError:
            continue
        counts[is_val] += 1
    if len(train) < 2 or len(val) < 2:
        raise RuntimeError(f"the stdlib at {base} gave too little text ({len(train)} / {len(val)} bytes)")

    def tensor(buf: bytearray, n: int) -> torch.Tensor:
        return torch.frombuffer(bytearray(buf[:n]), dtype=torch.uint8)

    return Corpus(tensor(train, train_bytes), tensor(val, val_bytes), str(base), counts[0], counts[1])


def train_batch(data: torch.Tensor, batch: int, context: int, generator: torch.Generator):
    """``batch`` random windows: inputs ``(batch, context)`` and next-byte targets, as int64."""
    idx = torch.randint(0, data.numel() - context - 1, (batch,), generator=generator)
    chunk = data[idx[:, None] + torch.arange(context + 1)].long()
    return chunk[:, :-1], chunk[:, 1:]


def val_windows(data: torch.Tensor, count: int, context: int):
    """``count`` windows evenly spaced over ``data`` (the same every call): inputs and targets."""
    span = data.numel() - context - 1
    idx = torch.linspace(0, span, count).long()
    chunk = data[idx[:, None] + torch.arange(context + 1)].long()
    return chunk[:, :-1], chunk[:, 1:]


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width, bias=False)
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width, bias=False)
        self.o = nn.Linear(width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = self.heads

        def split(y):
            return y.view(b, t, h, c // h).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // h)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = att.masked_fill(~causal, float("-inf")).softmax(-1)
        return self.o((att @ v).transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm1 = nn.RMSNorm(width)
        self.attn = Attention(width, heads)
        self.norm2 = nn.RMSNorm(width)
        self.fc = nn.Linear(width, 4 * width, bias=False)
        self.proj = nn.Linear(4 * width, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.proj(F.gelu(self.fc(self.norm2(x))))


class ByteGPT(nn.Module):
    """A pre-norm byte-level GPT; see the module docstring."""

    def __init__(self, layers: int, width: int, context: int, heads: int = 4):
        super().__init__()
        self.tok = nn.Embedding(256, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(layers))
        self.norm = nn.RMSNorm(width)
        self.head = nn.Linear(width, 256, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("o.weight", "proj.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point():  # SynFlow's ones: stand-ins for the embeddings
            h = x
        else:
            h = self.tok(x) + self.pos(torch.arange(x.shape[1], device=x.device))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def sparse_layer_names(model: ByteGPT) -> list[str]:
    """The names of the layers the methods sparsify: every block's q, k, v, o, fc and proj."""
    return [
        f"blocks.{i}.{name}"
        for i in range(len(model.blocks))
        for name in ("attn.q", "attn.k", "attn.v", "attn.o", "fc", "proj")
    ]


def byte_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy in nats."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
