"""Lottery tickets: iterative magnitude pruning (IMP) with weight or learning-rate rewinding.

``imp`` trains the dense model once, then ``rounds`` times: prunes
``prune_fraction`` of the remaining weights (blocks, for ``granularity="block"``)
by magnitude, rewinds, and trains again. Round 1 converts the layers to
``SparseLinear`` (``from_dense``); later rounds call ``set_masks``, so every
round after the first trains on the sparse kernels. Masks are nested: a pruned
weight never comes back.

Rewinding modes (``ImpRound.mode`` tells ``train_fn`` which one runs):

* ``"weights"`` (Frankle et al., 2020): the kept weights, and every other
  parameter and buffer, go back exactly to the state stored at step
  ``rewind_step`` of the dense run (``rewind_step=0``: the initialisation, the
  original lottery ticket). ``train_fn`` resumes its schedule at ``start_step``.
* ``"lr"`` (Renda et al., 2020): the trained weights are kept and only the
  learning-rate schedule is rewound: ``train_fn`` restarts it at ``start_step``.

Known limits: ``train_fn`` must build its optimizer each round (the sparse
layers' parameters change when masks change); only magnitude scores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from sparsekern.methods.api import apply_masks
from sparsekern.methods.config import MethodConfig
from sparsekern.methods.planning import plan
from sparsekern.methods.report import layer_report, sparsify_report
from sparsekern.methods.select import check_fraction
from sparsekern.methods.targets import current_masks
from sparsekern.nn.hf import is_conv1d
from sparsekern.reports import Report

__all__ = ["ImpResult", "ImpRound", "imp"]

REWIND = ("weights", "lr")
_SPARSE_KEYS = ("weight_train", "weight_frozen", "block_code", "element_state")


def dense_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of ``model.state_dict()`` with every sparse layer stored as a dense ``weight`` (``W * mask``)."""
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, mod in model.named_modules():
        if current_masks(mod) is not None:
            prefix = f"{name}." if name else ""
            for key in _SPARSE_KEYS:
                sd.pop(prefix + key, None)
            sd[prefix + "weight"] = mod.weight.detach().clone()
    return sd


def _in_current_orientation(state: dict[str, torch.Tensor], conv1d: set[str], model: nn.Module) -> dict:
    """``state`` (saved from the dense model) with the weights of ``Conv1D`` layers converted since transposed.

    A ``Conv1D`` weight is ``(in, out)``; the ``SparseLinear`` it became loads ``(out, in)``.
    """
    out = dict(state)
    for name in conv1d:
        key = f"{name}.weight" if name else "weight"
        if key in out and current_masks(model.get_submodule(name)) is not None:
            out[key] = out[key].T
    return out


@dataclass
class ImpRound:
    """What ``train_fn(model, info)`` is told about the round it trains.

    Attributes:
        round: 0 for the dense run, then 1 .. ``rounds``.
        rounds: the number of pruning rounds.
        density: the target density of the sparsified layers (1.0 in round 0).
        mode: ``"weights"`` or ``"lr"`` rewinding.
        rewind_step: the step rewound to.
        start_step: the step the schedule should start from this round: 0 in
            round 0, ``rewind_step`` afterwards.
    """

    round: int
    rounds: int
    density: float
    mode: str
    rewind_step: int
    start_step: int
    _save: Callable[[], None] | None = field(default=None, repr=False)

    def checkpoint(self) -> None:
        """Store the model's current state as the rewind point; call it at step ``rewind_step`` of round 0.

        Only round 0 records; later calls do nothing.
        """
        if self._save is not None:
            self._save()


@dataclass
class ImpResult:
    """Outcome of :func:`imp`.

    Attributes:
        model: the pruned, trained model (the object passed in).
        masks: ``{name: mask}`` of the last round, shaped as the sparse layers' weights
            (``(out, in)`` for a layer that was a ``Conv1D``).
        history: one :class:`~sparsekern.reports.Report` per pruning round (as ``sparsify`` returns).
        rewind_state: the stored rewind point (dense ``state_dict``), or ``None`` for ``"lr"``.
    """

    model: nn.Module
    masks: dict[str, torch.Tensor]
    history: list[Report]
    rewind_state: dict[str, torch.Tensor] | None


def imp(
    model: nn.Module,
    train_fn: Callable[[nn.Module, ImpRound], object],
    rounds: int,
    prune_fraction: float = 0.2,
    *,
    rewind: str = "weights",
    rewind_step: int = 0,
    block_size=32,
    granularity: str = "block",
    distribution: str = "uniform",
    reduce: str = "l1",
    layers=None,
    exclude=(),
    exclude_first: bool = False,
    exclude_last: bool = False,
    min_blocks: int = 4,
) -> ImpResult:
    """Find a lottery ticket by iterative magnitude pruning; ``model`` is changed in place.

    Args:
        model: a model with dense ``nn.Linear`` (or ``Conv1D``, ``nn.Conv2d``) layers.
        train_fn: ``train_fn(model, info)`` trains ``model`` for one round;
            ``info`` is an :class:`ImpRound`. In round 0 it calls
            ``info.checkpoint()`` at step ``rewind_step`` (not needed when
            ``rewind_step == 0`` or ``rewind == "lr"``).
        rounds: pruning rounds; ``train_fn`` runs ``rounds + 1`` times.
        prune_fraction: fraction of the remaining weights pruned per round, so
            round ``r`` keeps ``(1 - prune_fraction) ** r``.
        rewind: ``"weights"`` or ``"lr"`` (see the module docstring).
        rewind_step: the step whose weights (``"weights"``) or schedule
            position (``"lr"``) later rounds restart from.
        block_size, granularity, distribution, reduce, layers, exclude,
            exclude_first, exclude_last, min_blocks: as for :func:`sparsify`
            (``distribution`` is ``"uniform"`` or ``"global"``).

    Returns:
        An :class:`ImpResult`.

    Raises:
        ValueError: bad arguments.
        RuntimeError: ``rewind == "weights"`` and ``rewind_step > 0`` but round 0
            never called ``info.checkpoint()``.

    Example:
        >>> def train(model, info):
        ...     opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ...     for step in range(info.start_step, 100):
        ...         if step == info.rewind_step:
        ...             info.checkpoint()
        ...         ...  # one training step
        >>> result = imp(model, train, rounds=3, prune_fraction=0.5, rewind_step=10, block_size=16)
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative int, got {rounds!r}")
    prune_fraction = check_fraction(prune_fraction, "prune_fraction")
    if rewind not in REWIND:
        raise ValueError(f"rewind must be one of {REWIND}, got {rewind!r}")
    if isinstance(rewind_step, bool) or not isinstance(rewind_step, int) or rewind_step < 0:
        raise ValueError(f"rewind_step must be a non-negative int, got {rewind_step!r}")
    if distribution not in ("uniform", "global"):
        raise ValueError(f"imp supports distribution 'uniform' or 'global', got {distribution!r}")

    config = MethodConfig(
        method="magnitude",
        block_size=block_size,
        distribution=distribution,
        granularity=granularity,
        exclude=exclude,
        exclude_first=exclude_first,
        exclude_last=exclude_last,
        reduce=reduce,
        layers=layers,
        seed=0,
        min_blocks=min_blocks,
    )
    plan(model, replace(config, density=1.0))  # fail on bad options before any training
    saved: dict[str, dict] = {}

    def save():
        saved["state"] = dense_state(model)
        saved["conv1d"] = {name for name, mod in model.named_modules() if is_conv1d(mod)}

    if rewind == "weights" and rewind_step == 0:
        save()
    train_fn(model, ImpRound(0, rounds, 1.0, rewind, rewind_step, 0, save if rewind == "weights" else None))
    if rewind == "weights" and "state" not in saved:
        raise RuntimeError(f"train_fn never called info.checkpoint() in round 0 (rewind_step={rewind_step})")

    history: list[Report] = []
    kept: dict[str, torch.Tensor] | None = None
    for r in range(1, rounds + 1):
        density = (1.0 - prune_fraction) ** r
        chosen = plan(model, replace(config, density=density), prior=kept)
        new = {n: (m & kept[n] if kept is not None else m) for n, (m, _) in chosen.masks.items()}
        apply_masks(model, {n: (m, None) for n, m in new.items()}, block_size)
        if rewind == "weights":
            model.load_state_dict(_in_current_orientation(saved["state"], saved["conv1d"], model))
        # The layers' own masks: a Conv1D's plan mask is (in, out), the SparseLinear it became is (out, in).
        kept = {n: model.get_submodule(n).mask for n in new}
        modules = dict(model.named_modules())
        history.append(sparsify_report(layer_report(t, modules[t.name], t.skip) for t in chosen.targets))
        train_fn(model, ImpRound(r, rounds, density, rewind, rewind_step, rewind_step))
    return ImpResult(model, kept or {}, history, saved.get("state"))
