"""Per-element scores of the pruning-at-initialization methods (higher = keep).

=========  ===============================================  ====================
method     score of weight ``w`` (``g = dL/dw``)            needs
=========  ===============================================  ====================
random     uniform noise from the seed                      nothing
magnitude  ``|w|``                                          nothing
snip       ``|g * w|`` summed over the batches              data, loss
force      ``|w * dL/d(w*m)|`` at the current mask ``m``    data, loss
           (pruned weights may come back)
grasp      ``w * Hg`` (GraSP prunes the largest ``-w * Hg``;  data, loss
           signed, so blocks pool it by sum)
synflow    ``w' * dR/dw'`` with ``w' = |w| * m``,             an input shape
           ``R = sum(f(1))`` in float64, eval mode
=========  ===============================================  ====================

Everything runs through ``torch.func.functional_call`` on copies of the
weights and buffers, so the model's parameters, ``.grad`` fields and buffers
(BatchNorm statistics) are left exactly as they were. Scores are computed on
dense ``nn.Linear``/``nn.Conv2d``/``Conv1D`` layers, shaped as each layer's
own weight (``(in, out)`` for a ``Conv1D``); sparse modules only take the
data-free ``random`` and ``magnitude`` scores.
"""

from __future__ import annotations

import contextlib
import zlib

import torch
from torch import nn
from torch.func import functional_call

from sparsekern.methods.targets import Target, dense_weight, is_dense_target

__all__ = ["force_scores", "grasp_scores", "magnitude_scores", "random_scores", "snip_scores", "synflow_scores"]


def magnitude_scores(targets: list[Target]) -> dict[str, torch.Tensor]:
    """``|w|`` per layer.

    Args:
        targets: the layers (dense or sparse; a sparse layer's pruned weights score 0).

    Returns:
        ``{name: float32 weight-shaped scores}``.

    Example:
        >>> magnitude_scores(find_targets(nn.Sequential(nn.Linear(64, 64)), 16))["0"].shape
        torch.Size([64, 64])
    """
    return {t.name: dense_weight(t.module).abs().float() for t in targets}


def random_scores(targets: list[Target], seed: int) -> dict[str, torch.Tensor]:
    """Uniform noise per layer, from a generator seeded by ``seed`` and the layer's name.

    Args:
        targets: the layers.
        seed: the same seed gives the same scores; the global RNG is not used.

    Returns:
        ``{name: weight-shaped scores in [0, 1)}`` on each weight's device.

    Example:
        >>> s = random_scores(find_targets(model, 16), seed=0)
    """
    out = {}
    for t in targets:
        gen = torch.Generator().manual_seed((seed + zlib.crc32(t.name.encode())) % 2**63)
        out[t.name] = torch.rand(t.shape, generator=gen).to(dense_weight(t.module).device)
    return out


@contextlib.contextmanager
def _eval_mode(model: nn.Module, enabled: bool):
    """Switch to eval mode for the block when ``enabled``; restore every module's flag after."""
    flags = [(m, m.training) for m in model.modules()]
    if enabled:
        model.eval()
    try:
        yield
    finally:
        for m, f in flags:
            m.train(f)


def _dense_only(targets: list[Target], method: str) -> None:
    for t in targets:
        if not is_dense_target(t.module):
            raise ValueError(
                f"{method} scores a dense model, but {t.name} is a {type(t.module).__name__}; "
                "compute masks before converting (or use method='magnitude')"
            )


def _call(model: nn.Module, tensors: dict[str, torch.Tensor], inputs):
    """The model's output with ``tensors`` in place of its parameters, on copies of its buffers."""
    state = {n: b.clone() for n, b in model.named_buffers()}
    state.update(tensors)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    return functional_call(model, state, args)


def _weight_grads(
    model: nn.Module,
    targets: list[Target],
    weights: dict[str, torch.Tensor],
    batches,
    loss_fn,
    temperature: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Gradients of the loss, summed over ``batches``, with respect to the given weights (leaves)."""
    leaves = [weights[t.name] for t in targets]
    tensors = {f"{t.name}.weight": weights[t.name] for t in targets}
    total = [torch.zeros_like(w) for w in leaves]
    for inputs, labels in batches:
        out = _call(model, tensors, inputs)
        loss = loss_fn(out / temperature if temperature != 1.0 else out, labels)
        for acc, g in zip(total, torch.autograd.grad(loss, leaves), strict=True):
            acc += g
    return {t.name: g for t, g in zip(targets, total, strict=True)}


def _leaf(t: Target, mask: torch.Tensor | None = None) -> torch.Tensor:
    w = dense_weight(t.module)
    w = w * mask if mask is not None else w.clone()
    return w.requires_grad_(True)


def snip_scores(model: nn.Module, targets: list[Target], batches, loss_fn) -> dict[str, torch.Tensor]:
    """SNIP's connection sensitivity ``|g * w|`` (Lee et al., 2019), gradients summed over ``batches``.

    Args:
        model: the dense model.
        targets: its layers to score.
        batches: a list of ``(inputs, targets)``; ``inputs`` may be a tuple of arguments.
        loss_fn: ``loss_fn(outputs, targets)``.

    Returns:
        ``{name: float32 weight-shaped scores}``.

    Example:
        >>> s = snip_scores(model, find_targets(model, 16), [(x, y)], F.cross_entropy)
    """
    _dense_only(targets, "snip")
    with torch.enable_grad():
        w = {t.name: _leaf(t) for t in targets}
        g = _weight_grads(model, targets, w, batches, loss_fn)
    return {n: (g[n] * w[n].detach()).abs().float() for n in w}


def force_scores(
    model: nn.Module, targets: list[Target], batches, loss_fn, masks: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """FORCE's sensitivity (de Jorge et al., 2021) at ``masks``: ``|w * dL/d(w*m)|`` for every weight.

    Args:
        model, targets, batches, loss_fn: as for :func:`snip_scores`.
        masks: the current kept masks; the loss is taken on ``w * m``.

    Returns:
        ``{name: float32 weight-shaped scores}`` (pruned weights score too, so they may return).

    Example:
        >>> s = force_scores(model, targets, [(x, y)], F.cross_entropy, {t.name: t.module.weight != 0 for t in targets})
    """
    _dense_only(targets, "force")
    with torch.enable_grad():
        eff = {t.name: _leaf(t, masks[t.name]) for t in targets}
        g = _weight_grads(model, targets, eff, batches, loss_fn)
    return {t.name: (g[t.name] * dense_weight(t.module)).abs().float() for t in targets}


def grasp_scores(
    model: nn.Module, targets: list[Target], batches, loss_fn, temperature: float = 200.0
) -> dict[str, torch.Tensor]:
    """GraSP's keep score ``w * Hg`` (Wang et al., 2020), by double backward; logits divided by ``temperature``.

    ``g`` is the loss gradient summed over ``batches``; ``Hg`` is the Hessian
    times that (fixed) vector, summed over the batches.

    Args:
        model, targets, batches, loss_fn: as for :func:`snip_scores`.
        temperature: divides the outputs before ``loss_fn`` (200 in the paper).

    Returns:
        ``{name: float32 signed scores}``: GraSP removes the lowest.

    Example:
        >>> s = grasp_scores(model, targets, [(x, y)], F.cross_entropy)
    """
    _dense_only(targets, "grasp")
    with torch.enable_grad():
        w = {t.name: _leaf(t) for t in targets}
        g0 = _weight_grads(model, targets, w, batches, loss_fn, temperature)
        leaves = [w[t.name] for t in targets]
        tensors = {f"{t.name}.weight": w[t.name] for t in targets}
        hg = [torch.zeros_like(x) for x in leaves]
        for inputs, labels in batches:
            out = _call(model, tensors, inputs)
            g = torch.autograd.grad(loss_fn(out / temperature, labels), leaves, create_graph=True)
            z = sum((gi * g0[t.name]).sum() for gi, t in zip(g, targets, strict=True))
            for acc, h in zip(hg, torch.autograd.grad(z, leaves), strict=True):
                acc += h
    return {t.name: (w[t.name].detach() * h).float() for t, h in zip(targets, hg, strict=True)}


def synflow_scores(
    model: nn.Module, targets: list[Target], masks: dict[str, torch.Tensor], example_input: torch.Tensor
) -> dict[str, torch.Tensor]:
    """One SynFlow round (Tanaka et al., 2020): ``w' * dR/dw'``, ``w' = |w| * m``, ``R = sum(f(ones))``.

    Runs in float64 in eval mode, with every parameter replaced by its absolute value.

    Args:
        model, targets: the dense model and its layers to score.
        masks: the current kept masks.
        example_input: a tensor of the input's shape (its values are not used).

    Returns:
        ``{name: float64 non-negative scores}`` (they can exceed float32's range); pruned weights score 0.

    Example:
        >>> s = synflow_scores(model, targets, {t.name: torch.ones(t.shape, dtype=torch.bool) for t in targets}, x)
    """
    _dense_only(targets, "synflow")
    names = {f"{t.name}.weight" for t in targets}
    with torch.enable_grad(), _eval_mode(model, True):
        tensors = {
            n: p.detach().abs().double() for n, p in model.named_parameters(remove_duplicate=False) if n not in names
        }
        tensors.update({n: b.double() for n, b in model.named_buffers() if b.is_floating_point()})
        eff = {t.name: (dense_weight(t.module).abs().double() * masks[t.name]).requires_grad_(True) for t in targets}
        tensors.update({f"{t.name}.weight": eff[t.name] for t in targets})
        ones = torch.ones_like(example_input, dtype=torch.float64)
        r = _call(model, tensors, ones).sum()
        grads = torch.autograd.grad(r, [eff[t.name] for t in targets])
    return {t.name: g * eff[t.name].detach() for t, g in zip(targets, grads, strict=True)}
