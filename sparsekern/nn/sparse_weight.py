"""What every block-sparse layer shares: the two value stores, the layout, mask updates and checkpoints.

Why one file of this size: every path that replaces the stores (construction, ``set_masks``,
loading, ``.to()``, deepcopy, unpickling) must keep ``weight_train`` and ``weight_frozen`` views of
one buffer, so they stay beside each other; so do the ~70 lines that ``SparseLinear`` and
``SparseConv2d`` share with their torch twins (initialisation, ``from_dense``, ``to_dense``), which
fill the stores through the same ``_copy_dense_``. The read-only weight is in ``readonly.py`` and
the foreign-mask reader in ``foreign_masks.py``.

A layer's weight has a user-facing shape (``(out, in)`` for linear,
``(Cout, Cin, kh, kw)`` for conv) and a *matrix view* on which the
:class:`~sparsekern.layout.BlockLayout` is built. Subclasses say how to go
between the two (:meth:`_to_matrix` / :meth:`_from_matrix`); everything else
lives here:

* ``weight_train`` (Parameter): the trainable blocks only, so gradients and
  optimizer state exist for nothing else.
* ``weight_frozen`` (buffer): frozen blocks and the fixed values of mixed blocks.

Both are views of one buffer, ``[weight_train | weight_frozen]``, which is the
single value store the kernels address (``kernels/store.py``): no copy per
call, one TMA descriptor for every block. Every place that replaces the stores
(construction, ``set_masks``, loading a checkpoint of another layout,
``.to()``/``.half()``/``to_empty()``, ``copy.deepcopy`` and unpickling) lays
them out in one buffer again.

* ``block_code`` / ``element_state`` (buffers): the layout's compact form; the
  full layout is rebuilt from them on load, and also when a loader wrote them
  in place (``torch.distributed.checkpoint`` fills ``state_dict()`` tensors).

A mask change that keeps the number of trainable blocks (SET, RigL) moves
values, gradient and optimizer state in place, in the same ``weight_train``
Parameter; one that changes it makes a new Parameter (and says so). Loading
a checkpoint never replaces the Parameter: a checkpoint of another trainable
count resizes its storage (``.data``), so an optimizer built before keeps
stepping the live tensor, whichever of the two ``load_state_dict`` calls
comes first.

``weight`` is computed from the stores on each access: differentiable, so
penalties on it train the stored blocks, and read-only (``ReadOnlyWeight``):
writes raise instead of vanishing (``readonly.py``). ``copy_dense_`` and ``reset_parameters``
set values.

Known limits: on the meta device the layout is built on the CPU (masks need
values) and the stores stay meta until ``to_empty()``; a sharded (FSDP2)
``weight_train`` supports count-preserving mask changes only.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from sparsekern.functional import with_dense_grad
from sparsekern.kernels.store import adjacent, join_stores
from sparsekern.layout import BlockLayout, as_bool_mask
from sparsekern.nn.foreign_masks import dense_weight_and_mask
from sparsekern.nn.readonly import ReadOnlyWeight


def _bool_mask(mask: torch.Tensor, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    return as_bool_mask(mask, name, shape)


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a sharded ``DTensor`` (FSDP2's parameters and their optimizer state) is gathered."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def _is_sharded(t: torch.Tensor) -> bool:
    return callable(getattr(t, "full_tensor", None))


def _copy_into_(dst: torch.Tensor, full: torch.Tensor) -> None:
    """``dst.copy_(full)`` in place; for a ``DTensor`` only this rank's shard of ``full`` is written."""
    if _is_sharded(dst):
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(dst.dtype), dst.device_mesh, dst.placements).to_local()
        dst = dst.to_local()
    dst.copy_(full)


def _warn_count_change(layer: nn.Module, before: int, after: int) -> None:
    """Say loudly that ``weight_train`` is a new Parameter: once per layer, and every time under distributed."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if getattr(layer, "_warned_new_count", False) and not distributed:
        return
    layer._warned_new_count = True
    name = type(layer).__name__
    warnings.warn(
        f"{name}.set_masks: the number of trainable blocks changed ({before} -> {after}), so weight_train is "
        "a new Parameter. The optimizer passed as optimizer= follows; anything else built on the old one "
        "(DDP, FSDP, other optimizers, EMA copies, compiled graphs) must be rebuilt. Mask updates that keep "
        "the count (SET, RigL) move everything in place instead." + ("" if distributed else " (Said once per layer.)"),
        stacklevel=3,
    )


_warned_no_empty_block = False


def _warn_if_nothing_skipped(layout: BlockLayout, what: str) -> None:
    """Say once per process when a layout skips no work: every block computed and mixed (an element mask)."""
    global _warned_no_empty_block
    rb, cb = layout.grid
    if _warned_no_empty_block or rb * cb < 4 or layout.n_mixed < rb * cb:
        return
    _warned_no_empty_block = True
    warnings.warn(
        f"{what}: every block of its {layout.shape} weight holds kept and pruned elements, so no block is empty "
        "and the block kernels skip no work; such layouts run slower than a dense layer, except linear layers "
        "on the CPU at most about 30% dense, which run element-sparse kernels instead. Prune in blocks (e.g. "
        "sparsekern.sparsify(..., granularity='block')) to gain speed. (Said once per process.)",
        stacklevel=4,
    )


class BlockSparseWeight(nn.Module):
    """Base class of the sparse layers; not used directly.

    Subclasses set ``weight_shape`` and ``block_size`` and call
    :meth:`_init_weight` from their constructor.
    """

    weight_shape: tuple[int, ...]
    block_size: tuple[int, int]
    _dense_grad_probe: torch.Tensor | None = None

    # -------------------------------------------------- matrix view (subclass)
    def _to_matrix(self, t: torch.Tensor, fill=0) -> torch.Tensor:
        raise NotImplementedError

    def _from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --------------------------------------------------------------- building
    def _build_layout(self, mask, frozen_mask, device) -> BlockLayout:
        mask = _bool_mask(mask, "mask", self.weight_shape).to(device)
        if frozen_mask is not None:
            frozen_mask = self._to_matrix(_bool_mask(frozen_mask, "frozen_mask", self.weight_shape).to(device), False)
        return BlockLayout.from_masks(self._to_matrix(mask, False), frozen_mask, self.block_size)

    def _init_weight(self, dense: torch.Tensor, mask, frozen_mask) -> None:
        # On the meta device (deferred initialisation) the layout is still real, on the CPU: masks need
        # values. The stores stay meta until to_empty(); reset_parameters() then initialises them.
        where = torch.device("cpu") if dense.is_meta else dense.device
        if mask is None:
            mask = torch.ones(self.weight_shape, dtype=torch.bool, device=where)
        layout = self._build_layout(mask, frozen_mask, where)
        if dense.is_meta:
            bm, bk = self.block_size
            w_train = dense.new_empty(layout.n_train, bm, bk)
            w_frozen = dense.new_empty(layout.n_frozen_slots, bm, bk)
        else:
            w_train, w_frozen = layout.split_values(self._to_matrix(dense))
        self.weight_train, frozen = self._joined_stores(w_train, w_frozen, True)
        self.register_buffer("weight_frozen", frozen)
        self._dense_grad_probe = None  # an instance attribute from the start: one compiled graph less
        self._install_layout(layout)

    @staticmethod
    def _joined_stores(w_train: torch.Tensor, w_frozen: torch.Tensor, requires_grad: bool):
        """``(Parameter, buffer)``: views of one fresh ``[w_train | w_frozen]`` buffer."""
        buf = join_stores(w_train, w_frozen)
        n = w_train.shape[0]
        return nn.Parameter(buf[:n], requires_grad=requires_grad), buf[n:]

    def _install_layout(self, layout: BlockLayout) -> None:
        """Make ``layout`` current; its compact form goes into the ``block_code``/``element_state`` buffers.

        The buffers are copies, written in place when their shape allows (DDP's buffer list and compiled
        graphs keep seeing the same tensors), so the layout keeps a snapshot to tell when something else
        (a checkpoint loader writing into ``state_dict()`` tensors) changed them.
        """
        _warn_if_nothing_skipped(layout, type(self).__name__)
        self._layout = layout
        for name in ("block_code", "element_state"):
            value, buf = getattr(layout, name), getattr(self, name, None)
            if buf is not None and buf.shape == value.shape and buf.device == value.device:
                buf.copy_(value)
            else:
                self.register_buffer(name, value.clone())
        self._code_version = self._buffer_versions()

    def _buffer_versions(self):
        """The buffers' version counters; ``None`` for inference tensors, which have none."""
        if self.block_code.is_inference() or self.element_state.is_inference():
            return None
        return (self.block_code._version, self.element_state._version)

    def _current_layout(self) -> BlockLayout:
        """The layout, rebuilt first if its buffers were written in place since it was installed.

        Loaders that fill ``model.state_dict()`` tensors in place (``dcp.load``) change the buffers without
        calling ``load_state_dict``; running on the old layout would be silently wrong. This is a safety net
        for eager mode only: a compiled forward does not run it (nor do writes that skip version counters,
        such as collectives), so after such a load call ``load_state_dict`` (``set_state_dict`` does).
        """
        if torch.compiler.is_compiling():
            return self._layout
        versions = self._buffer_versions()
        if versions is not None and versions != self._code_version:
            lay = self._layout
            if torch.equal(self.block_code, lay.block_code) and torch.equal(self.element_state, lay.element_state):
                self._code_version = versions
            else:
                new = BlockLayout.from_block_code(self.block_code, self.element_state, lay.shape, self.block_size)
                if (new.n_train, new.n_frozen_slots) != (self.weight_train.shape[0], self.weight_frozen.shape[0]):
                    raise RuntimeError(
                        f"{type(self).__name__}: block_code/element_state were overwritten in place with a layout "
                        f"of {new.n_train} trainable and {new.n_frozen_slots} frozen slots, but the stores hold "
                        f"{self.weight_train.shape[0]} and {self.weight_frozen.shape[0]}: load checkpoints with "
                        "load_state_dict (or set_model_state_dict), which resizes the stores"
                    )
                self._install_layout(new)
        return self._layout

    # ------------------------------------ what nn.Linear and nn.Conv2d share: init, conversion, export
    def _torch_init_(self, dense: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Initialise a dense weight and bias in place as ``nn.Linear`` and ``nn.Conv2d`` do.

        Kaiming-uniform weight (``a = sqrt(5)``), then the bias uniform in ``±1/sqrt(fan_in)`` with
        ``fan_in = prod(weight_shape[1:])`` (``in_features``; ``Cin * kh * kw``): the same draws in the
        same order as torch's ``reset_parameters``, so a seeded model starts where its dense twin would.
        """
        nn.init.kaiming_uniform_(dense, a=math.sqrt(5))
        if bias is not None:
            fan_in = math.prod(self.weight_shape[1:])
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            bias.uniform_(-bound, bound)

    def _init_dense(self, bias: bool, device, dtype) -> torch.Tensor:
        """A constructor's starting dense weight, and the ``bias`` Parameter (or ``None``), as torch's layer.

        The bias is registered here, before :meth:`_init_weight` adds the stores, so ``state_dict()``
        keeps its order (``bias``, ``weight_train``, ...).
        """
        factory = {"device": device, "dtype": dtype}
        dense = torch.empty(self.weight_shape, **factory)
        b = torch.empty(self.weight_shape[0], **factory) if bias else None
        self._torch_init_(dense, b)
        if b is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(b)
        return dense

    def reset_parameters(self) -> None:
        """Initialise the stored blocks and the bias as ``nn.Linear``/``nn.Conv2d`` do (after ``to_empty()``, say)."""
        w = self.weight_train
        dense = torch.empty(self.weight_shape, device=w.device, dtype=w.dtype)
        bias = None if self.bias is None else torch.empty_like(self.bias)
        self._torch_init_(dense, bias)
        self._copy_dense_(dense, bias)

    @classmethod
    def _converted(cls, weight, mask, frozen_mask, bias, block_size, *args, **kwargs):
        """The end of every ``from_dense``: ``cls(*args, **kwargs)`` on ``weight``'s device and dtype with
        these masks, holding ``weight`` (cut to the masks) and ``bias``."""
        mod = cls(
            *args,
            bias=bias is not None,
            block_size=block_size,
            mask=mask,
            frozen_mask=frozen_mask,
            device=weight.device,
            dtype=weight.dtype,
            **kwargs,
        )
        mod._copy_dense_(weight, bias)
        return mod

    def _filled(self, dense_layer: nn.Module, weight: torch.Tensor) -> nn.Module:
        """``dense_layer`` (a fresh ``nn.Linear``/``nn.Conv2d``) holding ``weight`` and this layer's bias.

        ``weight`` is passed in, not read here: the caller already read it for the device and dtype, and
        under FSDP2 each read of ``self.weight`` is a collective.
        """
        with torch.no_grad():
            dense_layer.weight.copy_(weight)
            if self.bias is not None:
                dense_layer.bias.copy_(self.bias)
        return dense_layer

    def _blocks_repr(self) -> str:
        """The end of ``extra_repr``: block size, block density, trainable blocks."""
        lay = self._layout
        return f"block_size={self.block_size}, block_density={lay.block_density:.3f}, trainable_blocks={lay.n_train}"

    @staticmethod
    def _dense_parts(module: nn.Module, mask: torch.Tensor | None):
        """``(weight, mask, bias)`` of a dense module for ``from_dense``.

        The module's own torch prune / torch.ao mask wins over ``weight != 0``
        when no ``mask`` is given (``nn/foreign_masks.py``); values come back detached.
        """
        w, foreign = dense_weight_and_mask(module)
        if mask is None:
            mask = foreign if foreign is not None else w != 0
        bias = None if module.bias is None else dense_weight_and_mask(module, "bias")[0]
        return w, mask, bias

    def _copy_dense_(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Load a dense weight (cut to the masks) and bias in place."""
        with torch.no_grad():
            w_train, w_frozen = self._layout.split_values(self._to_matrix(weight.detach()))
            _copy_into_(self.weight_train, w_train)
            self.weight_frozen.copy_(w_frozen)
            if bias is not None:
                self.bias.copy_(bias)

    # ------------------------------------------------------- dense gradient
    def enable_dense_grad(self) -> None:
        """From the next forward on, backward also computes the dense ``dL/dW`` (see :attr:`dense_grad`).

        What RigL's update steps need; costs one dense weight-gradient product per backward.
        """
        if self._dense_grad_probe is None:
            w = self.weight_train
            self._dense_grad_probe = torch.zeros(self.weight_shape, dtype=torch.float32, device=w.device)
            self._dense_grad_probe.requires_grad_(True)

    def disable_dense_grad(self) -> None:
        """Stop computing the dense weight gradient and free it."""
        self._dense_grad_probe = None

    @property
    def dense_grad(self) -> torch.Tensor | None:
        """The dense, weight-shaped fp32 ``dL/dW`` summed over backwards since :meth:`enable_dense_grad`.

        ``None`` when not enabled or when no backward has reached the layer since.
        """
        probe = self._dense_grad_probe
        return None if probe is None else probe.grad

    def _with_dense_grad(self, y: torch.Tensor, x: torch.Tensor, conv=None) -> torch.Tensor:
        probe = self._dense_grad_probe
        if probe is None or not (torch.is_grad_enabled() and y.requires_grad):
            return y
        return with_dense_grad(y, x, probe, conv)

    # ------------------------------------------------------------- inspection
    @property
    def layout(self) -> BlockLayout:
        """The :class:`~sparsekern.layout.BlockLayout` of the weight's matrix view."""
        return self._layout

    @property
    def weight(self) -> torch.Tensor:
        """The effective dense weight ``W * mask``: computed on each access, differentiable, read-only.

        Gradients flow from it to ``weight_train``, so a penalty written on it
        (``loss + 1e-4 * layer.weight.square().sum()``) trains the stored blocks.
        Writes raise an error: the tensor is computed, so an in-place change
        (``nn.init.zeros_(layer.weight)``, ``layer.weight.data.mul_(2)``) would be lost.
        To set values, use :meth:`copy_dense_` (or ``load_state_dict`` with a dense
        ``weight``); to initialise as ``nn.Linear``/``nn.Conv2d`` do, use
        ``reset_parameters()``. For metadata use ``weight_shape`` and
        ``weight_train.dtype``/``.device``: under FSDP2 every access gathers the
        shards, a collective that all ranks must make.
        """
        dense = self._from_matrix(self._layout.to_dense(_full(self.weight_train), self.weight_frozen))
        if torch.compiler.is_compiling():
            return dense  # dynamo does not trace the subclass; a compiled graph never writes into it anyway
        return dense.as_subclass(ReadOnlyWeight)

    def copy_dense_(self, weight: torch.Tensor) -> BlockSparseWeight:
        """Set the stored values from a dense, weight-shaped tensor, cut to the current masks.

        Returns:
            ``self``.

        Example:
            >>> layer.copy_dense_(torch.zeros_like(layer.weight))
        """
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != self.weight_shape:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"copy_dense_ expects a tensor of the weight's shape {self.weight_shape}, got {shape}")
        self._copy_dense_(weight.as_subclass(torch.Tensor), None)
        return self

    @property
    def mask(self) -> torch.Tensor:
        """Bool, weight-shaped: True where the weight is kept."""
        return self._from_matrix(self._layout.dense_masks()[0])

    @property
    def frozen_mask(self) -> torch.Tensor:
        """Bool, weight-shaped: True where the weight is kept but never updated."""
        return self._from_matrix(self._layout.dense_masks()[1])

    # ----------------------------------------------------------- mask updates
    def set_masks(
        self,
        mask: torch.Tensor,
        frozen_mask: torch.Tensor | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        reset_mask: torch.Tensor | None = None,
    ):
        """Rebuild the layout in place for new (weight-shaped) masks.

        Kept values are preserved; newly kept weights start at zero. When the
        number of trainable blocks stays the same (SET and RigL keep it), nothing
        is replaced: the values, the gradient and the optimizer state move to
        their new slots *in place*, in the same ``weight_train`` Parameter, so DDP's
        buckets, FSDP2's shards, optimizers and compiled graphs all stay valid.
        Copies of the values (an EMA, ``AveragedModel``) are not moved: after a
        change their slots hold other blocks. When the count changes, ``weight_train`` becomes a new Parameter
        (resizing one in place would break a graph still alive), with a warning:
        the optimizer passed follows; anything else built on the old one (DDP,
        FSDP, other optimizers, EMA copies) must be rebuilt.

        Pass the ``optimizer`` that holds the layer: its state moves with the
        blocks, so state of elements that stay trainable is kept, grown elements
        start from zero state and dropped elements lose theirs. Without it, an
        optimizer holding ``weight_train`` would keep state at the old positions.

        Args:
            mask: bool (or exactly 0/1) weight-shaped, True = kept.
            frozen_mask: same shape, True = kept but never updated; must lie in ``mask``.
            optimizer: the optimizer holding ``weight_train`` (checked).
            reset_mask: optional, weight-shaped: kept elements that restart at zero
                with zero optimizer state, as if newly grown (DST's drop-and-regrow).

        Returns:
            ``self``. Nothing is changed if an argument is invalid.

        Example:
            >>> opt = torch.optim.AdamW(layer.parameters())
            >>> layer.set_masks(new_mask, optimizer=opt)
        """
        param = self.weight_train
        if optimizer is not None and not any(p is param for g in optimizer.param_groups for p in g["params"]):
            raise ValueError(
                f"set_masks: the optimizer passed does not hold this {type(self).__name__}'s weight_train; its state "
                "could not follow the new layout (pass the optimizer built on this model's parameters)"
            )
        old = self._current_layout()
        with torch.no_grad():
            new = self._build_layout(mask, frozen_mask, param.device)
            if _is_sharded(param) and new.n_train != old.n_train:
                raise ValueError(
                    f"set_masks: the number of trainable blocks would change ({old.n_train} -> {new.n_train}) on a "
                    "sharded (FSDP2) weight_train; only count-preserving updates are supported there"
                )
            keep = None
            if reset_mask is not None:
                reset = _bool_mask(reset_mask, "reset_mask", self.weight_shape).to(param.device)
                if bool((reset & self._from_matrix(new.dense_masks()[1])).any()):
                    raise ValueError("reset_mask marks frozen elements; only trainable weights can restart at zero")
                keep = self._to_matrix(~reset, True)
            zeros = torch.zeros_like(self.weight_frozen)

            def moved(t: torch.Tensor, frozen: torch.Tensor):
                dense = old.to_dense(_full(t), frozen.to(t.dtype))
                return new.split_values(dense if keep is None else torch.where(keep, dense, 0))

            w_train, w_frozen = moved(param, self.weight_frozen)
            grad = None if param.grad is None else moved(param.grad, zeros)[0]
            state = {}
            if optimizer is not None:
                for key, val in optimizer.state.get(param, {}).items():
                    if isinstance(val, torch.Tensor) and val.shape == param.shape:
                        state[key] = moved(val, zeros)[0]
                    elif isinstance(val, torch.Tensor) and val.dim() > 0:
                        raise ValueError(
                            f"set_masks: optimizer state {key!r} has shape {tuple(val.shape)}, not the parameter's "
                            f"{tuple(param.shape)} (a factored optimizer?); it cannot follow the blocks to new slots"
                        )
        # Everything above can fail; nothing below can, so the module never ends half-changed.
        with torch.no_grad():
            if new.n_train == old.n_train:
                _copy_into_(param, w_train)
                if grad is not None:
                    _copy_into_(param.grad, grad)
                for key, val in state.items():
                    _copy_into_(optimizer.state[param][key], val)
                if self.weight_frozen.shape == w_frozen.shape:
                    self.weight_frozen.copy_(w_frozen)
                elif _is_sharded(param):
                    self.weight_frozen = w_frozen
                else:
                    self._set_stores(param.detach(), w_frozen)
            else:
                # A new Parameter, not a resized one: a graph still alive (the previous step's loss) keeps
                # its own, and the passed optimizer is pointed at the new one.
                _warn_count_change(self, old.n_train, new.n_train)
                fresh, self.weight_frozen = self._joined_stores(w_train, w_frozen, param.requires_grad)
                self.weight_train = fresh
                fresh.grad = grad
                if optimizer is not None:
                    for group in optimizer.param_groups:
                        group["params"] = [fresh if p is param else p for p in group["params"]]
                    old_state = optimizer.state.pop(param, None)
                    if old_state is not None:
                        optimizer.state[fresh] = {**old_state, **state}
        self._install_layout(new)
        return self

    def _set_stores(self, w_train: torch.Tensor, w_frozen: torch.Tensor) -> None:
        """Lay ``[w_train | w_frozen]`` out in one fresh buffer, keeping the ``weight_train`` Parameter object."""
        buf = join_stores(w_train, w_frozen).to(self.weight_frozen.dtype)
        n = w_train.shape[0]
        self.weight_train.data = buf[:n]
        self.weight_frozen = buf[n:]

    # ------------------------------------------------------------ state, devices
    def _apply(self, fn, recurse=True):
        was_meta = self.weight_train.is_meta
        if not was_meta:
            self._current_layout()  # take in any in-place write to the buffers before they are converted
        super()._apply(fn, recurse)
        if was_meta and not self.weight_train.is_meta:
            # to_empty() from the meta device: the buffers came back uninitialised; the layout knows them.
            self._layout = self._layout.to(self.block_code.device)
            self.block_code.copy_(self._layout.block_code)
            self.element_state.copy_(self._layout.element_state)
            self._code_version = self._buffer_versions()
        elif not self.weight_train.is_meta:
            self._layout = self._layout.to(self.block_code.device)
            self._code_version = self._buffer_versions()
        self._rejoin_stores()
        return self

    def __setstate__(self, state):
        state.setdefault("_dense_grad_probe", None)  # pickles of layers from before these attributes
        super().__setstate__(state)
        if "_code_version" not in self.__dict__:
            self._code_version = self._buffer_versions()
        self._rejoin_stores()  # copy.deepcopy and pickle copy the Parameter apart from the buffer

    def _rejoin_stores(self) -> None:
        """Lay the stores out in one buffer again after something copied or converted them one by one.

        ``.data`` keeps the Parameter object, so optimizers and hooks holding it stay valid.
        """
        wt, wf = self.weight_train, self.weight_frozen
        if wt.shape[0] and wf.shape[0] and not wt.is_meta and not _is_sharded(wt) and not adjacent(wt, wf):
            buf = join_stores(wt, wf)
            wt.data = buf[: wt.shape[0]]
            self.weight_frozen = buf[wt.shape[0] :]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors):
        dense_key = prefix + "weight"
        code_key, es_key = prefix + "block_code", prefix + "element_state"
        layout = self._layout
        # Compared with the layout's own snapshot, not the buffers: a loader may already have written the
        # checkpoint into the buffers in place (they are what state_dict() hands out).
        if (
            code_key in state_dict
            and es_key in state_dict
            and not (
                torch.equal(state_dict[code_key].cpu(), layout.block_code.cpu())
                and torch.equal(state_dict[es_key].cpu(), layout.element_state.cpu())
            )
        ):
            layout = BlockLayout.from_block_code(
                state_dict[code_key].to(self.block_code.device),
                state_dict[es_key].to(self.block_code.device),
                layout.shape,
                self.block_size,
            )
        if dense_key in state_dict:
            # A dense checkpoint (nn.Linear / nn.Conv2d): cut it to this layer's masks.
            dense = state_dict.pop(dense_key)
            if tuple(dense.shape) != self.weight_shape:
                errors.append(f"size mismatch for {dense_key}: got {tuple(dense.shape)}, expected {self.weight_shape}")
                return
            dense = self._to_matrix(dense.to(self.weight_train.device, self.weight_train.dtype))
            w_train, w_frozen = layout.split_values(dense)
            state_dict[prefix + "weight_train"] = w_train
            state_dict[prefix + "weight_frozen"] = w_frozen
            state_dict[code_key] = layout.block_code
            state_dict[es_key] = layout.element_state
        if layout is not self._layout:
            wt, wf = state_dict.get(prefix + "weight_train"), state_dict.get(prefix + "weight_frozen")
            bm, bk = self.block_size
            if (
                wt is None
                or wf is None
                or tuple(wt.shape) != (layout.n_train, bm, bk)
                or (tuple(wf.shape) != (layout.n_frozen_slots, bm, bk))
            ):
                errors.append(f"{prefix}weight_train/weight_frozen do not match the layout in {code_key}")
                return
            # The masks differ. The weight_train Parameter object stays (an optimizer built before the load
            # keeps stepping it, and its own load_state_dict may come before or after this one); only its
            # storage is resized when the checkpoint's slot counts differ. The default loader below copies
            # the checkpoint's values in, cast as nn.Linear would.
            param = self.weight_train
            if (param.shape[0], self.weight_frozen.shape[0]) != (wt.shape[0], wf.shape[0]):
                if _is_sharded(param):
                    errors.append(
                        f"{prefix}weight_train: the checkpoint's layout has {wt.shape[0]} trainable blocks, this "
                        f"sharded layer {param.shape[0]}; load it into an unsharded model, then shard"
                    )
                    return
                with torch.no_grad():
                    self._set_stores(param.new_zeros(wt.shape), self.weight_frozen.new_zeros(wf.shape))
                param.grad = None
            self._install_layout(layout)
            # The loader copies these in as well; give it the layout's values so both agree.
            state_dict[code_key], state_dict[es_key] = layout.block_code, layout.element_state
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors)
