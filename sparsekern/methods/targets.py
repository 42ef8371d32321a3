"""Which layers a method works on, and how their weights are read and replaced.

A *target* is a ``nn.Linear``, ``nn.Conv2d`` or ``transformers``' ``Conv1D``
(dense, before conversion) or a ``SparseLinear``/``SparseConv2d`` (after
conversion, e.g. in later rounds of IMP). Its weight is read as a dense
tensor in the module's own orientation: 2-D ``(out, in)`` for linear,
``(in, out)`` for a ``Conv1D`` (GPT-2's linear, ``y = x @ W + b``; see
``sparsekern/nn/hf.py``), 4-D for conv. Scores and masks of a ``Conv1D`` are
``(in, out)`` too; its blocks are ``(bk, bm)`` in that orientation
(:meth:`Target.block`), so they are exactly the ``(bm, bk)`` blocks of the
``SparseLinear`` it becomes. Layers are chosen in ``named_modules()`` order;
"first" and "last" mean the first and last of them.

A layer is *left dense* when sparse blocks could not pay off: a dimension of
its matrix view smaller than the block, or fewer than ``min_blocks`` blocks.
The reason is reported, never silently dropped.

Tied weights: a layer whose weight or bias is one Parameter shared with
another module (GPT-2's ``lm_head.weight is transformer.wte.weight``, BERT's
MLM decoder and word embeddings; any tie found by identity, see
:func:`tied_parameters`) is left dense with the tie named in the reason: a
sparse layer holds its own stores, so converting it would break the tie and
``model.tie_weights()`` (which assigns ``.weight``) would then fail. A module
registered under several names (the same object twice) is one target; it is
replaced at every name, so it stays shared.

Subclasses of ``nn.Linear``/``nn.Conv2d`` are left dense: their forward (or
their owner, as ``nn.MultiheadAttention`` does with ``out_proj.weight``) may
not go through the module's ``forward``.

Layers with ``torch.nn.utils.parametrize`` parametrizations (torch.ao.pruning's
``FakeSparsity``, weight norm, ...) are left dense, and the reason says so
(:func:`parametrized_reason`): ``sparsekern.adapters.from_torch_ao`` converts
torch.ao masks.

Known limits: grouped convolutions and ``padding_mode`` other than
``'zeros'`` are left dense (``SparseConv2d`` does not support them). A tie
that exists only in a model's configuration (``tie_word_embeddings`` set
after the weights were untied) is not seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from sparsekern import nn as sknn
from sparsekern.layout import normalize_block_size
from sparsekern.methods.blocks import block_grid
from sparsekern.nn.hf import is_conv1d
from sparsekern.nn.sparse_weight import BlockSparseWeight

__all__ = [
    "Target",
    "current_masks",
    "dense_weight",
    "find_targets",
    "is_dense_target",
    "module_names",
    "parametrized_reason",
    "replace_module",
    "sparse_class",
    "tie_reason",
    "tied_parameters",
]


@dataclass
class Target:
    """One layer a method may sparsify.

    Attributes:
        name: the module's name in ``model.named_modules()``.
        module: the module itself.
        shape: the weight's shape in the module's own orientation: ``(out, in)``,
            ``(in, out)`` for a ``Conv1D``, or ``(out, in, kh, kw)``.
        skip: ``None`` when the layer is sparsified, else why it stays dense.
        transposed: the weight is stored ``(in, out)`` (``transformers``' ``Conv1D``).
    """

    name: str
    module: nn.Module
    shape: tuple[int, ...]
    skip: str | None = None
    transposed: bool = False

    def block(self, block_size) -> tuple[int, int]:
        """The block in the orientation of ``shape``: ``(bm, bk)``, or ``(bk, bm)`` for a transposed weight.

        Example:
            >>> Target("c_attn", conv1d, (64, 192), transposed=True).block((32, 16))
            (16, 32)
        """
        bm, bk = normalize_block_size(block_size)
        return (bk, bm) if self.transposed else (bm, bk)


def is_dense_target(mod: nn.Module) -> bool:
    """Whether ``mod`` is a dense layer sparsekern converts or scores: ``nn.Linear``, ``nn.Conv2d`` or a ``Conv1D``.

    Subclasses of ``nn.Linear``/``nn.Conv2d`` count (they are candidates, reported as left dense).

    Example:
        >>> is_dense_target(nn.Linear(4, 3)), is_dense_target(nn.ReLU())
        (True, False)
    """
    return isinstance(mod, (nn.Linear, nn.Conv2d)) or is_conv1d(mod)


def _is_target(mod: nn.Module) -> bool:
    return is_dense_target(mod) or isinstance(mod, BlockSparseWeight)


def dense_weight(mod: nn.Module) -> torch.Tensor:
    """The layer's dense weight (effective ``W * mask`` for sparse modules), detached, in its own orientation.

    Example:
        >>> dense_weight(nn.Linear(4, 3)).shape
        torch.Size([3, 4])
    """
    return mod.weight.detach()


def current_masks(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mask, frozen_mask)`` of a sparse module, ``None`` for a dense one.

    Example:
        >>> current_masks(nn.Linear(4, 3)) is None
        True
    """
    if isinstance(mod, BlockSparseWeight):
        return mod.mask, mod.frozen_mask
    return None


def sparse_class(mod: nn.Module):
    """The sparsekern module class that replaces ``mod``, or ``None`` (subclasses and other layers).

    Example:
        >>> sparse_class(nn.Linear(4, 3)).__name__
        'SparseLinear'
    """
    if is_conv1d(mod):
        return sknn.SparseLinear
    return {nn.Linear: sknn.SparseLinear, nn.Conv2d: sknn.SparseConv2d}.get(type(mod))


def tied_parameters(model: nn.Module) -> dict[str, list[str]]:
    """Parameters held by more than one module (tied weights), found by identity.

    A module registered under several names is one holder: its parameters are
    not reported for that (see :func:`module_names`).

    Args:
        model: any module.

    Returns:
        ``{qualified name: [every qualified name of that Parameter]}`` for each
        name of each tied Parameter (each name sees the others), in module order.

    Example:
        >>> emb, head = nn.Embedding(100, 16), nn.Linear(16, 100, bias=False)
        >>> head.weight = emb.weight
        >>> tied_parameters(nn.ModuleDict({"emb": emb, "head": head}))["head.weight"]
        ['emb.weight', 'head.weight']
    """
    holders: dict[int, list[str]] = {}
    for mod_name, mod in model.named_modules():  # each module object once
        for p_name, p in mod.named_parameters(prefix=mod_name, recurse=False, remove_duplicate=False):
            holders.setdefault(id(p), []).append(p_name)
    return {n: names for names in holders.values() if len(names) > 1 for n in names}


def tie_reason(tied: dict[str, list[str]], name: str, module: nn.Module) -> str | None:
    """Why module ``name`` cannot be converted without breaking a tie, or ``None`` when none of its parameters is tied.

    Args:
        tied: :func:`tied_parameters` of the model.
        name: the module's name in the model.
        module: the module.

    Returns:
        e.g. ``"its weight is tied to transformer.wte.weight (one Parameter shared by several
        modules): a sparse layer would break the tie and model.tie_weights()"``, or ``None``.

    Example:
        >>> tie_reason(tied_parameters(gpt2), "lm_head", gpt2.lm_head)
        'its weight is tied to transformer.wte.weight (...)'
    """
    prefix = f"{name}." if name else ""
    ties = [
        f"its {p} is tied to {', '.join(o for o in tied[prefix + p] if o != prefix + p)}"
        # recurse: a parametrized layer keeps its weight as parametrizations.weight.original
        for p, _ in module.named_parameters(remove_duplicate=False)
        if prefix + p in tied
    ]
    if not ties:
        return None
    return (
        f"{'; '.join(ties)} (one Parameter shared by several modules): a sparse layer would break the tie "
        "and model.tie_weights()"
    )


def parametrized_reason(module: nn.Module) -> str | None:
    """Why a layer carrying ``torch.nn.utils.parametrize`` parametrizations is not converted, or ``None``.

    ``register_parametrization`` swaps the layer's class for a generated subclass (``ParametrizedLinear``);
    the layer is still an ``nn.Linear``/``nn.Conv2d``, so the reason names the parametrizations, not a
    subclass. A sparse layer cannot carry them; torch.ao.pruning's masks are read by
    ``sparsekern.adapters.from_torch_ao``.

    Example:
        >>> parametrize.register_parametrization(lin, "weight", FakeSparsity(mask))
        >>> parametrized_reason(lin)
        'a Linear with parametrizations on weight (torch.nn.utils.parametrize, e.g. torch.ao.pruning's ...'
    """
    if not parametrize.is_parametrized(module):
        return None
    kind = parametrize.type_before_parametrizations(module).__name__
    return (
        f"a {kind} with parametrizations on {', '.join(module.parametrizations.keys())} (torch.nn.utils.parametrize, "
        "e.g. torch.ao.pruning's FakeSparsity), which a sparse layer cannot carry: convert torch.ao masks with "
        "sparsekern.adapters.from_torch_ao, or remove the parametrizations first"
    )


def module_names(model: nn.Module) -> dict[int, list[str]]:
    """Every name of every submodule, keyed by ``id(module)``: more than one for a module registered twice.

    Example:
        >>> lin = nn.Linear(4, 4)
        >>> module_names(nn.Sequential(lin, lin))[id(lin)]
        ['0', '1']
    """
    names: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
    return names


def find_targets(
    model: nn.Module,
    block_size,
    layers=None,
    exclude=(),
    exclude_first: bool = False,
    exclude_last: bool = False,
    min_blocks: int = 4,
) -> list[Target]:
    """Every candidate layer of ``model``, each marked with ``skip`` (``None`` = sparsify it).

    Args:
        model: the model to search.
        block_size: int or ``(bm, bk)`` (``bm`` over output features), used by the too-small rule.
        layers: names to consider (default: every linear, ``Conv1D`` and conv layer).
        exclude: names to leave dense.
        exclude_first, exclude_last: leave the first/last candidate dense.
        min_blocks: layers with fewer blocks than this stay dense.

    Returns:
        A list of :class:`Target` in module order.

    Raises:
        ValueError: a name in ``layers`` or ``exclude`` is not a candidate layer of ``model``.

    Example:
        >>> [t.name for t in find_targets(nn.Sequential(nn.Linear(64, 64)), 16)]
        ['0']
    """
    normalize_block_size(block_size)  # validates it
    found = {name: mod for name, mod in model.named_modules() if _is_target(mod)}
    tied = tied_parameters(model)
    for arg, names in (("layers", layers or ()), ("exclude", exclude)):
        if isinstance(names, str):
            raise TypeError(f"{arg} must be a list of layer names, got the string {names!r}")
        unknown = [n for n in names if n not in found]
        if unknown:
            raise ValueError(f"{arg} names unknown layer(s) {unknown}; candidate layers are {sorted(found)}")
    names = list(found) if layers is None else [n for n in found if n in set(layers)]
    out = []
    for i, name in enumerate(names):
        mod = found[name]
        shape = tuple(mod.weight_shape if isinstance(mod, BlockSparseWeight) else mod.weight.shape)
        t = Target(name, mod, shape, transposed=is_conv1d(mod))
        b0, b1 = t.block(block_size)  # the block over shape[0] x shape[1]
        rb, cb = block_grid(shape, (b0, b1))
        tie = tie_reason(tied, name, mod)
        if name in exclude:
            t.skip = "excluded"
        elif exclude_first and i == 0:
            t.skip = "excluded (first layer)"
        elif exclude_last and i == len(names) - 1:
            t.skip = "excluded (last layer)"
        elif tie is not None:
            t.skip = f"{tie}, so it stays dense"
        elif parametrized_reason(mod) is not None:
            t.skip = f"{parametrized_reason(mod)}, so it stays dense"
        elif not isinstance(mod, BlockSparseWeight) and sparse_class(mod) is None:
            # e.g. MultiheadAttention's out_proj, whose weight is read directly, never through forward.
            t.skip = (
                f"{type(mod).__name__} subclasses a torch layer; only nn.Linear, nn.Conv2d and transformers' "
                "Conv1D are converted"
            )
        elif isinstance(mod, nn.Conv2d) and mod.groups != 1:
            t.skip = f"grouped convolution (groups={mod.groups}) is not supported"
        elif isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
            t.skip = f"padding_mode={mod.padding_mode!r} is not supported"
        elif shape[0] < b0 or shape[1] < b1:  # out and in features (channels, for a conv; in, out for a Conv1D)
            t.skip = f"weight {shape} is smaller than a {b0}x{b1} block"
        elif rb * cb < min_blocks:
            t.skip = f"only {rb * cb} block(s) of {b0}x{b1} (fewer than min_blocks={min_blocks})"
        out.append(t)
    return out


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``model``'s submodule ``name`` is, and at every other name of that module; return the old one.

    A module registered under several names stays shared: all of them get ``new``.

    Example:
        >>> old = replace_module(model, "encoder.fc1", SparseLinear.from_dense(model.encoder.fc1, mask))
    """
    old = model.get_submodule(name)
    for alias in module_names(model).get(id(old), [name]):
        parent, attr = _parent(model, alias)
        setattr(parent, attr, new)
    return old
