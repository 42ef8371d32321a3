"""The end-to-end suite's networks and how each provider's copy is made (``e2e.py`` runs them).

Import path: ``sparsekern.bench.e2e_models``. The models and the sparsification are described in
``e2e.py``'s module docstring; ``build`` takes that suite's ``SuiteConfig``.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import sparsekern
from sparsekern.methods.blocks import block_grid, expand_blocks, keep_top_blocks, pool_blocks

MODELS = ("mlp", "cnn", "transformer")


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut (1x1 strided conv + BN on a shape change), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetish(nn.Module):
    """A 3x3 stem, one basic block per entry of ``channels`` (stride 2 from the second on), pool, classifier."""

    def __init__(self, channels: tuple[int, ...], classes: int):
        super().__init__()
        c0 = channels[0]
        self.stem = nn.Sequential(nn.Conv2d(3, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU())
        blocks, c_in = [], channels[0]
        for i, c in enumerate(channels):
            blocks.append(BasicBlock(c_in, c, 1 if i == 0 else 2))
            c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class TransformerMLP(nn.Module):
    """``x + fc2(GELU(fc1(LayerNorm(x))))`` with ``fc1: d -> 4d``, ``fc2: 4d -> d``."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def build(name: str, cfg, device: torch.device):
    """``(model, x, target, loss_fn, shape text)`` of one model, seeded."""
    torch.manual_seed(cfg.seed)
    kw = {"device": device, "dtype": cfg.dtype}
    if name == "mlp":
        d = cfg.mlp_dims
        layers: list[nn.Module] = []
        for i in range(len(d) - 1):
            layers += [nn.Linear(d[i], d[i + 1]), nn.ReLU()]
        model = nn.Sequential(*layers[:-1])
        x, target = torch.randn(cfg.tokens, d[0], **kw), torch.randn(cfg.tokens, d[-1], **kw)
        return model.to(**kw), x, target, F.mse_loss, f"{cfg.tokens}x{'-'.join(map(str, d))}"
    if name == "cnn":
        model = ResNetish(cfg.cnn_channels, cfg.classes)
        x = torch.randn(cfg.batch, 3, cfg.image, cfg.image, **kw)
        target = torch.randint(0, cfg.classes, (cfg.batch,), device=device)
        shape = f"{cfg.batch}x3x{cfg.image}x{cfg.image}/{'-'.join(map(str, cfg.cnn_channels))}"
        return model.to(**kw), x, target, F.cross_entropy, shape
    if name == "transformer":
        model = TransformerMLP(cfg.d_model)
        x, target = torch.randn(cfg.tokens, cfg.d_model, **kw), torch.randn(cfg.tokens, cfg.d_model, **kw)
        return model.to(**kw), x, target, F.mse_loss, f"{cfg.tokens}x{cfg.d_model}-{4 * cfg.d_model}-{cfg.d_model}"
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


# ------------------------------------------------------------ sparsifying
MASK_METHOD = (
    'sparsekern.sparsify(method="magnitude", granularity="block"), the same density in every layer it '
    "converts; the masked peer uses the same masks"
)


def targets(model: nn.Module, block: int) -> dict[str, nn.Module]:
    """The linear and conv layers to sparsify: both matrix-view dimensions at least one block."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            n, k = mod.out_features, mod.in_features
        elif isinstance(mod, nn.Conv2d) and mod.groups == 1:
            n, k = mod.out_channels, mod.in_channels  # a block spans bk input channels at one filter tap
        else:
            continue
        if n >= block and k >= block:
            out[name] = mod
    return out


def block_masks(model: nn.Module, density: float, block: int) -> dict[str, torch.Tensor]:
    """Weight-shaped bool masks keeping the top ``round(density x blocks)`` blocks of ``|W|`` per layer."""
    masks = {}
    for name, mod in targets(model, block).items():
        w = mod.weight.detach()
        rb, cb = block_grid(tuple(w.shape), block)
        keep = keep_top_blocks(pool_blocks(w.abs(), block), round(density * rb * cb))
        masks[name] = expand_blocks(keep, tuple(w.shape), block).to(w.device)
    return masks


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def masked_model(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose masked weights are parametrized as ``weight * mask`` (what pruning libraries do)."""
    out = copy.deepcopy(model)
    mods = dict(out.named_modules())
    for name, mask in masks.items():
        parametrize.register_parametrization(mods[name], "weight", _Mask(mask.to(mods[name].weight.dtype)))
    return out


def sparse_model(model: nn.Module, density: float, block: int):
    """``(copy sparsified by sparsekern.sparsify, note)``: magnitude, block granularity, the same density in
    every layer it converts. If the call fails, the copy stays dense and ``note`` says why (the suite then
    reports the rows as unavailable instead of timing a dense model twice)."""
    out = copy.deepcopy(model)
    try:
        sparsekern.sparsify(out, method="magnitude", density=density, granularity="block", block_size=block)
    except Exception as exc:  # keep the other rows; say why this one has no numbers
        return copy.deepcopy(model), f"sparsekern.sparsify failed ({type(exc).__name__}: {exc})"[:200]
    return out, ""


def sparse_masks(sparse: nn.Module) -> dict[str, torch.Tensor]:
    """Weight-shaped masks of the sparse layers of ``sparse``, by module name (for the masked peer)."""
    return {name: m.mask for name, m in sparse.named_modules() if hasattr(m, "layout") and hasattr(m, "mask")}
