"""Dynamic sparse training: SET and RigL at constant density, by whole blocks or by elements.

Every ``delta_t`` optimizer steps (until ``end_step``) each sparse layer drops
a fraction of its trainable kept weights, the ones of lowest magnitude, and
grows as many pruned ones: at random (SET, Mocanu et al. 2018) or where the
dense gradient is largest (RigL, Evci et al. 2020). The fraction decays with a
cosine from ``drop_fraction`` to 0 at ``end_step``.

Granularity:

* ``"block"``: scores are pooled per block (``sparsekern.methods.blocks``) and
  whole blocks are dropped and grown, so the layer keeps exactly as many
  computed and trainable blocks and the kernels keep skipping the rest. With
  block-aligned masks (every kept block full) the element count is constant
  too; a dropped partly kept block is replaced by a full one.
* ``"element"``: the published element-level methods; the element count is
  constant exactly. The layer still runs, but blocks end up mixed, so little
  work is skipped.

Frozen weights are never dropped or grown: a block holding any frozen element
is never dropped, and only blocks (elements) with nothing kept are grown.
Masks change through ``layer.set_masks(mask, frozen_mask, optimizer=...)``: no
kernel recompiles, grown weights start at zero with zero optimizer state,
dropped weights lose theirs. A weight dropped and grown again in the same
update restarts at zero as well (the published behaviour), in the same call
(``reset_mask``), so the trainable count never dips. At a constant count of
trainable blocks (always at block granularity) ``set_masks`` moves values,
gradients and optimizer state *in place*: the Parameter objects, DDP's
buckets, FSDP2's shards and compiled graphs all stay valid (copies of the values, such as an EMA, are not
moved).

RigL's dense gradient is computed only on update steps. After the optimizer
step that precedes an update step, the scheduler calls ``enable_dense_grad()``
on each sparse layer: the layer's forward then passes its output through
``sparsekern.functional.with_dense_grad``, whose backward adds the dense
``dW = dy^T x`` (for a convolution, ``torch.nn.grad.conv2d_weight``) into a
probe. No hooks are involved, so this works under ``torch.compile`` (the
armed forward is a second compiled graph, used on update steps only) and
sums over gradient-accumulation micro-batches. The optimizer step of the
update step uses it to grow, then the probes are freed. On every other step
the weight gradient stays block-sparse. ``dense_grad_count`` counts the layer
gradients used (one per layer per update step). Layers of the plain protocol
(no ``enable_dense_grad``) get a forward hook instead, which ``torch.compile``
does not see.

Under ``torch.distributed`` (DDP, FSDP2) every rank makes the same decision:
RigL's dense gradients are averaged over the ranks first (each rank only saw
its own batch), SET draws from a generator seeded alike on every rank, and
after each update the ranks compare layout checksums
(:func:`check_same_layouts`); a difference raises ``RuntimeError`` instead
of letting the models drift apart. Give every rank the same ``seed``.

Supported layers: any submodule with ``set_masks``, ``mask``, ``frozen_mask``,
``weight`` and ``block_size`` (``SparseLinear`` and ``SparseConv2d``, whose conv
weights are 4-D and are pooled in their matrix view).

Known limits: a RigL update step needs a forward and backward through the
model with gradients enabled (otherwise that layer skips the update, with a
warning); at element granularity the count of trainable blocks can change,
and then ``weight_train`` becomes a new Parameter (with a warning), which DDP,
FSDP2 and other holders of the old one cannot follow; save the scheduler's
``state_dict()`` beside the model's and the optimizer's to resume exactly.

Example:
    >>> opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    >>> sched = DSTScheduler(model, opt, method="rigl", delta_t=100, end_step=3000, drop_fraction=0.3)
    >>> for x, t in loader:  # the ordinary loop: the scheduler acts inside opt.step()
    ...     opt.zero_grad()
    ...     loss_fn(model(x), t).backward()
    ...     opt.step()
"""

from __future__ import annotations

import hashlib
import inspect
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sparsekern import convview
from sparsekern.methods.blocks import REDUCTIONS, expand_blocks, keep_top_blocks, pool_blocks
from sparsekern.methods.select import GRANULARITIES, check_fraction

__all__ = ["DSTScheduler", "METHODS", "GRANULARITIES", "check_same_layouts", "layout_fingerprint"]

METHODS = ("rigl", "set")
DECAYS = ("cosine", "constant")


def _is_sparse_layer(mod: nn.Module) -> bool:
    return callable(getattr(mod, "set_masks", None)) and hasattr(mod, "frozen_mask") and hasattr(mod, "block_size")


def _weight_shape(mod: nn.Module) -> tuple[int, ...]:
    if hasattr(mod, "weight_shape"):
        return tuple(mod.weight_shape)
    if hasattr(mod, "in_features"):
        return (mod.out_features, mod.in_features)
    if hasattr(mod, "kernel_size"):
        return (mod.out_channels, mod.in_channels // getattr(mod, "groups", 1), *convview.pair(mod.kernel_size, "k"))
    return tuple(mod.mask.shape)


def _dense_weight_grad(layer: nn.Module, x: torch.Tensor, dy: torch.Tensor, weight_shape) -> torch.Tensor:
    """The dense ``dL/dW`` of one call, weight-shaped (2-D linear or 4-D conv)."""
    if len(weight_shape) == 2:
        n, k = weight_shape
        return dy.reshape(-1, n).T.to(x.dtype) @ x.reshape(-1, k)
    kh, kw = weight_shape[2:]
    stride = convview.pair(getattr(layer, "stride", 1), "stride")
    dilation = convview.pair(getattr(layer, "dilation", 1), "dilation")
    top, bottom, left, right = convview.resolve_padding(getattr(layer, "padding", 0), (kh, kw), dilation, stride)
    x = F.pad(x, (left, right, top, bottom))
    groups = getattr(layer, "groups", 1)
    return torch.nn.grad.conv2d_weight(x, weight_shape, dy.to(x.dtype), stride, 0, dilation, groups)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _device(mod: nn.Module) -> torch.device:
    return next(iter(mod.buffers()), torch.empty(0)).device


def layout_fingerprint(layer: nn.Module) -> torch.Tensor:
    """A SHA-256 digest (32 uint8) of a sparse layer's kept and frozen masks: equal masks, equal digests.

    Hashes the bytes of both masks packed 8 elements per byte, so any difference (a swap of two
    blocks included) changes it, and ranks compare 32 bytes per layer instead of whole masks.

    Example:
        >>> a = SparseLinear(64, 32, block_size=16)
        >>> torch.equal(layout_fingerprint(a), layout_fingerprint(a))
        True
    """
    digest = hashlib.sha256()
    for m in (layer.mask, layer.frozen_mask):
        digest.update(str(tuple(m.shape)).encode())
        digest.update(np.packbits(m.detach().cpu().flatten().numpy()).tobytes())
    return torch.frombuffer(bytearray(digest.digest()), dtype=torch.uint8)


def check_same_layouts(layers, group=None) -> None:
    """Raise ``RuntimeError`` unless every rank holds the same layout in each of ``layers``.

    Args:
        layers: ``(name, layer)`` pairs, in the same order on every rank.
        group: the process group (default: the world).

    Example:
        >>> check_same_layouts(list(model.named_modules())[1:], group=None)  # doctest: +SKIP
    """
    mine = torch.stack([layout_fingerprint(layer).cpu() for _, layer in layers])
    world = torch.distributed.get_world_size(group)
    # gloo reduces CPU tensors; the other backends (nccl and the like) the layers' own device.
    dev = torch.device("cpu") if torch.distributed.get_backend(group) == "gloo" else _device(layers[0][1])
    seen = [torch.empty_like(mine, device=dev) for _ in range(world)]
    torch.distributed.all_gather(seen, mine.to(dev), group=group)
    for rank, theirs in enumerate(seen):
        differ = (theirs.cpu() != mine).any(1).nonzero().flatten().tolist()
        if differ:
            names = [layers[i][0] for i in differ]
            raise RuntimeError(
                f"DSTScheduler: after the mask update, rank {torch.distributed.get_rank(group)} and rank {rank} "
                f"hold different layouts in {names}; every rank must see the same scores (same seed for SET, "
                "the same replicated weights) or the models diverge"
            )


class DSTScheduler:
    """SET or RigL mask updates, run from the optimizer's step.

    Args:
        model: the module holding the sparse layers (every submodule with
            ``set_masks``; see the module docstring).
        optimizer: the optimizer holding their parameters; the scheduler
            registers a step post-hook on it and passes it to ``set_masks``.
        method: ``"rigl"`` (grow by dense gradient magnitude) or ``"set"``
            (grow at random).
        delta_t: optimizer steps between mask updates.
        end_step: no updates from this step on; the drop fraction reaches 0 there.
        drop_fraction: fraction of the trainable kept weights (blocks) swapped
            at step 0, in ``(0, 1]``.
        granularity: ``"block"`` or ``"element"``.
        reduce: how block scores are pooled: ``"l1"``, ``"l2"`` or ``"max"``.
        decay: ``"cosine"`` (default) or ``"constant"`` drop fraction.
        seed: seed of SET's random growth. Under ``torch.distributed`` give
            every rank the same seed.
        group: the process group of a distributed run (default: the world);
            ignored when ``torch.distributed`` is not initialized.

    Attributes:
        step_count: optimizer steps seen.
        dense_grad_count: layer dense gradients used for growth (one per
            layer per update step, however many backwards it summed).
        last_update: per-layer ``{"step", "dropped", "grown", "regrown"}`` of
            the latest update (counts in blocks or elements).

    Example:
        >>> sched = DSTScheduler(model, opt, method="set", delta_t=50, end_step=1000, granularity="block")
        >>> # train as usual; after the loop, sched.remove() detaches the hook
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        method: str = "rigl",
        delta_t: int = 100,
        end_step: int | None = None,
        drop_fraction: float = 0.3,
        granularity: str = "block",
        reduce: str = "l1",
        decay: str = "cosine",
        seed: int = 0,
        group=None,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        if decay not in DECAYS:
            raise ValueError(f"decay must be one of {DECAYS}, got {decay!r}")
        if isinstance(delta_t, bool) or not isinstance(delta_t, int) or delta_t < 1:
            raise ValueError(f"delta_t must be a positive int, got {delta_t!r}")
        if end_step is None or isinstance(end_step, bool) or not isinstance(end_step, int) or end_step < 1:
            raise ValueError(f"end_step must be a positive int (the step where updates stop), got {end_step!r}")
        if check_fraction(drop_fraction, "drop_fraction") == 0.0:
            raise ValueError("drop_fraction must be above 0 (0 would never change a mask)")
        if granularity == "element" and _distributed():
            raise ValueError(
                "granularity='element' under torch.distributed: element updates change a layer's number of "
                "trainable blocks, so weight_train becomes a new Parameter that DDP/FSDP cannot follow; use "
                "granularity='block', which keeps the count and moves everything in place"
            )
        self.layers = [(name, mod) for name, mod in model.named_modules() if _is_sparse_layer(mod)]
        if not self.layers:
            raise ValueError("model has no sparse layers (modules with set_masks, e.g. SparseLinear)")
        in_opt = {id(p) for group in optimizer.param_groups for p in group["params"]}
        for name, mod in self.layers:
            missing = [n for n, p in mod.named_parameters(recurse=False) if p.requires_grad and id(p) not in in_opt]
            if missing:
                raise ValueError(f"layer {name!r} has trainable parameters {missing} that the optimizer does not hold")
        self.optimizer = optimizer
        self.group = group
        self.method, self.granularity, self.reduce, self.decay = method, granularity, reduce, decay
        self.delta_t, self.end_step, self.drop_fraction = delta_t, end_step, float(drop_fraction)
        self.generator = torch.Generator().manual_seed(seed)
        self.step_count = 0
        self.dense_grad_count = 0
        self.last_update: list[dict] = []
        self._grads: dict[str, torch.Tensor] = {}
        self._nonfinite: set[str] = set()
        self._armed: list = []
        self._step_hook = optimizer.register_step_post_hook(self._after_step)
        self._arm_if_next_updates()

    # --------------------------------------------------------------- schedule
    def is_update_step(self, step: int) -> bool:
        """Whether the optimizer step that brings ``step_count`` to ``step`` updates the masks."""
        return 0 < step < self.end_step and step % self.delta_t == 0

    def current_drop_fraction(self, step: int | None = None) -> float:
        """The drop fraction at ``step`` (default: the current step)."""
        step = self.step_count if step is None else step
        if step >= self.end_step:
            return 0.0
        if self.decay == "constant":
            return self.drop_fraction
        return self.drop_fraction * 0.5 * (1.0 + math.cos(math.pi * step / self.end_step))

    def wants_dense_grad(self) -> bool:
        """True while the hooks that capture RigL's dense gradient are armed (the next step updates)."""
        return bool(self._armed)

    # ------------------------------------------------------------------ hooks
    def _after_step(self, optimizer, args, kwargs) -> None:
        self.step_count += 1
        if self.is_update_step(self.step_count):
            try:
                self._collect_dense_grads()
                self.update()
            finally:
                self._disarm()
        self._arm_if_next_updates()

    def _arm_if_next_updates(self) -> None:
        if self.method == "rigl" and not self._armed and self.is_update_step(self.step_count + 1):
            for name, mod in self.layers:
                if callable(getattr(mod, "enable_dense_grad", None)):
                    # The layer computes the dense gradient in its own forward: no hooks, so this works
                    # under torch.compile (a second graph for update steps) and DDP alike.
                    mod.enable_dense_grad()
                    self._armed.append(mod)
                else:
                    self._armed.append(mod.register_forward_hook(self._capture(name)))

    def _collect_dense_grads(self) -> None:
        """Take the layers' dense gradients (summed over the ranks' batches under ``torch.distributed``)."""
        self._nonfinite = set()
        armed = {id(a) for a in self._armed}
        for name, mod in self.layers:
            if id(mod) in armed and mod.dense_grad is not None:
                self._grads[name] = mod.dense_grad.detach().clone()
        if self.method == "rigl" and _distributed():
            # Every rank must score the same gradient, the mean over all ranks' batches (as DDP's), and a
            # layer missing its gradient on any rank is skipped on all of them, or the models would part.
            world = torch.distributed.get_world_size(self.group)
            for name, mod in self.layers:
                grad = self._grads.get(name)
                buf = torch.zeros(_weight_shape(mod), device=_device(mod)) if grad is None else grad
                have = torch.tensor([float(grad is not None)], device=buf.device)
                torch.distributed.all_reduce(buf, group=self.group)
                torch.distributed.all_reduce(have, group=self.group)
                if int(have.item()) == world:
                    self._grads[name] = buf / world
                else:
                    self._grads.pop(name, None)
        for name in [n for n, g in self._grads.items() if not bool(g.isfinite().all())]:
            # A step skipped by a GradScaler leaves its inf/NaN gradient in the probe; never grow from it.
            # After the all-reduce every rank sees the same non-finite values, so all skip alike.
            warnings.warn(
                f"DSTScheduler: the dense gradient of layer {name!r} holds inf or NaN on update step "
                f"{self.step_count} (an overflow, e.g. a step a GradScaler skipped); layer not updated",
                stacklevel=4,
            )
            del self._grads[name]
            self._nonfinite.add(name)
        if self.method == "rigl":
            self.dense_grad_count += len(self._grads)

    def _disarm(self) -> None:
        for armed in self._armed:
            if isinstance(armed, nn.Module):
                armed.disable_dense_grad()
            else:
                armed.remove()
        self._armed = []
        self._grads = {}

    def _capture(self, name: str):
        def forward_hook(mod, args, out):
            if not (torch.is_grad_enabled() and isinstance(out, torch.Tensor) and out.requires_grad):
                return
            x, shape = args[0].detach(), _weight_shape(mod)

            def grad_hook(dy):
                with torch.no_grad():
                    dw = _dense_weight_grad(mod, x, dy, shape).float()
                self._grads[name] = dw if name not in self._grads else self._grads[name] + dw

            out.register_hook(grad_hook)

        return forward_hook

    def remove(self) -> None:
        """Detach the scheduler from the optimizer and the model; masks stay as they are."""
        self._step_hook.remove()
        self._disarm()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self.generator.set_state(state["generator"])
        self._disarm()
        self._arm_if_next_updates()

    # ----------------------------------------------------------------- update
    def update(self) -> list[dict]:
        """Drop and grow in every layer now (called from the optimizer hook on update steps).

        Returns:
            ``last_update``: per layer, the step and the number of blocks (or
            elements) dropped, grown, and dropped-then-grown.
        """
        frac = self.current_drop_fraction()
        report = []
        for name, layer in self.layers:
            grad = self._grads.get(name)
            if self.method == "rigl" and grad is None and name in self._nonfinite:
                continue  # said when the gradient was collected
            if self.method == "rigl" and grad is None:
                warnings.warn(
                    f"DSTScheduler: layer {name!r} got no dense gradient for update step {self.step_count}: no "
                    "backward reached it with grad enabled since the previous optimizer step (a forward under "
                    "no_grad or inference_mode, an unused layer, or a step without backward); layer not updated",
                    stacklevel=3,
                )
                continue
            report.append({"layer": name, "step": self.step_count, **self._update_layer(layer, frac, grad)})
        self.last_update = report
        if _distributed():
            check_same_layouts(self.layers, self.group)
        return report

    def _grow_scores(self, grad: torch.Tensor | None, like: torch.Tensor, block_size) -> torch.Tensor:
        if self.method == "set":
            return torch.rand(like.shape, generator=self.generator).to(like.device)
        if self.granularity == "block":
            return pool_blocks(grad, block_size, self.reduce)
        return grad.abs()

    def _update_layer(self, layer: nn.Module, frac: float, grad: torch.Tensor | None) -> dict:
        with torch.no_grad():
            mask, frozen = layer.mask, layer.frozen_mask
            weight = layer.weight
            trainable = mask & ~frozen
            if self.granularity == "block":
                bs = layer.block_size
                kept = pool_blocks(mask, bs, "max") > 0
                candidates = kept & ~(pool_blocks(frozen, bs, "max") > 0)
                magnitude = pool_blocks(torch.where(trainable, weight, 0), bs, self.reduce)
            else:
                kept, candidates, magnitude = mask, trainable, weight.abs().float()
            n_swap = int(frac * int(candidates.sum()))
            if n_swap == 0:
                return {"dropped": 0, "grown": 0, "regrown": 0}
            neg_inf = torch.tensor(-math.inf, device=magnitude.device)
            drop = keep_top_blocks(torch.where(candidates, -magnitude, neg_inf), n_swap)
            open_ = ~(kept & ~drop)
            grow_score = self._grow_scores(grad, open_, getattr(layer, "block_size", None)).to(open_.device)
            grow = keep_top_blocks(torch.where(open_, grow_score, neg_inf), n_swap)
            regrown = drop & grow
            if self.granularity == "block":
                shape = tuple(mask.shape)
                drop_e, grow_e = expand_blocks(drop, shape, bs), expand_blocks(grow, shape, bs)
            else:
                drop_e, grow_e = drop, grow
            # Dropped and grown again in one update: the weight and its optimizer state restart at zero
            # (reset_mask), in the same set_masks call, so the trainable count never dips.
            new_mask = (mask & ~drop_e) | grow_e
            if not bool(regrown.any()):
                layer.set_masks(new_mask, frozen, optimizer=self.optimizer)
            elif "reset_mask" in inspect.signature(layer.set_masks).parameters:
                layer.set_masks(new_mask, frozen, optimizer=self.optimizer, reset_mask=drop_e & grow_e)
            else:  # a layer of the plain protocol: drop first, then grow, so the regrown restart at zero
                layer.set_masks(mask & ~drop_e, frozen, optimizer=self.optimizer)
                layer.set_masks(new_mask, frozen, optimizer=self.optimizer)
        return {"dropped": n_swap, "grown": n_swap, "regrown": int(regrown.sum())}
