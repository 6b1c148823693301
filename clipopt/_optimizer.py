"""``ClippedOptimizer``: any ``torch.optim`` optimizer, clipping gradients in ``step()``."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, overload

import torch
from torch import Tensor

from ._closure import step_with_closure
from ._distributed import warn_if_fsdp1_without_group
from ._engine import STATE_KEY, Clipper, NonfinitePolicy
from ._front import ClipperView
from ._ownership import claim, release
from ._protocol import ClipStrategy
from ._shell import DelegatingOptimizer
from ._spikes import SpikeSkip
from ._torch_private import (
    calling_gradscaler,
    finish_optimizer,
    hand_over,
    mark_hooked,
    read_handed,
    take_back,
    unscaled,
)

__all__ = ["ClippedOptimizer"]


class ClippedOptimizer(ClipperView, DelegatingOptimizer):
    """Wrap a ``torch.optim`` optimizer so that ``step()`` clips the gradients first.

    The wrapper *is* a ``torch.optim.Optimizer``: LR schedulers, ``GradScaler``,
    checkpointing and frameworks that check ``isinstance`` accept it. Its
    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's very objects,
    also after ``load_state_dict`` on either of them. The clipping itself is done by its
    :class:`clipopt.Clipper` (``opt.clipper``).

    ``step()`` collects the gradients of every parameter group, lets the strategy measure
    them, applies the non-finite policy, clips, and calls the wrapped optimizer's
    ``step()``. With a closure, clipping happens after every evaluation of the closure,
    so closure-driven optimizers such as LBFGS see clipped gradients.

    Non-finite gradients (a NaN or infinite entry, or a norm that overflows) follow
    ``nonfinite``: ``"skip"`` (default: parameters, optimizer state and strategy state
    untouched, the step counted as skipped), ``"error"`` (raise, change nothing),
    ``"zero"`` (zero the entries, then clip and step) or ``"propagate"`` (torch's
    behaviour). ``docs/nonfinite.md`` gives each one's cost in host reads.

    Args:
        optimizer: The optimizer to wrap, an instance of ``torch.optim.Optimizer``.
        strategy: A registered strategy name (see :func:`clipopt.available_strategies`)
            or a :class:`clipopt.ClipStrategy` instance. ``None`` (default) is
            ``"relative"`` (:class:`clipopt.RelativeClip`), the one setting that needs
            no threshold (``docs/strategies/which.md``); a threshold such as ``max_norm``
            needs the strategy named, e.g. ``ClippedOptimizer(opt, "norm",
            max_norm=1.0)`` for torch's ``clip_grad_norm_``.
        nonfinite: The policy for non-finite gradients, one of ``"skip"``, ``"error"``,
            ``"zero"`` and ``"propagate"``.
        process_group: For plain-tensor gradients sharded over ranks (hand-made model
            parallelism, FSDP1's flat parameters): the group (or 1-D ``DeviceMesh``)
            whose ranks hold the shards; norms are then global, one ``all_reduce`` per
            step (``docs/distributed.md``). Not needed for DDP nor for FSDP2/DTensor.
        skip_spikes: Skip an update whose gradient norm (or loss, given to ``step``) is
            an outlier against recent steps: True for OLMo's rule and defaults, or a
            :class:`clipopt.SpikeSkip`; False (default) does not.
        **strategy_kwargs: The strategy's parameters, when ``strategy`` is a name.

    Attributes:
        optimizer: The wrapped optimizer.
        clipper: The :class:`clipopt.Clipper` that clips.

    Raises:
        TypeError: ``optimizer`` is not an optimizer, is already a ``ClippedOptimizer``
            or already clipped; ``strategy`` is neither a name nor a strategy; keyword
            arguments the strategy does not accept.
        ValueError: Unknown strategy name, unknown ``nonfinite`` policy, or an invalid
            strategy parameter.

    Example:
        >>> import torch, clipopt
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = clipopt.ClippedOptimizer(
        ...     torch.optim.AdamW(model.parameters(), lr=1e-3), "norm", max_norm=1.0)
        >>> loss = model(torch.randn(8, 4)).pow(2).mean()
        >>> loss.backward()
        >>> opt.step()
        >>> opt.last_stats.norm > 0
        tensor(True)
        >>> opt.param_groups is opt.optimizer.param_groups
        True
    """

    optimizer: torch.optim.Optimizer
    clipper: Clipper

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        strategy: str | ClipStrategy | None = None,
        *,
        nonfinite: NonfinitePolicy = "skip",
        process_group: Any = None,
        skip_spikes: bool | SpikeSkip = False,
        **strategy_kwargs: Any,
    ) -> None:
        if isinstance(optimizer, ClippedOptimizer):
            raise TypeError(
                "optimizer is already a ClippedOptimizer; wrap the inner optimizer once "
                "(use clipopt.Chain to combine strategies)"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        clipper = Clipper(
            optimizer,
            strategy,
            nonfinite=nonfinite,
            process_group=process_group,
            skip_spikes=skip_spikes,
            strategy_kwargs=strategy_kwargs,
        )
        claim(optimizer, self, "ClippedOptimizer")
        self.optimizer = optimizer
        self.clipper = clipper
        warn_if_fsdp1_without_group(optimizer, process_group, stacklevel=2)
        finish_optimizer(self)

    # -- the AMP contract ----------------------------------------------------------------

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Whether GradScaler hands us scaled gradients: with a fused wrapped optimizer.

        The engine then measures the scaled gradients (a single-factor strategy divides
        its norm by the scale and gives the kernel one combined ``grad_scale``) or
        unscales them first (other strategies), and hands the kernel ``found_inf``.
        """
        return self.clipper.fused

    # -- stepping ------------------------------------------------------------------------

    @overload
    def step(self, closure: None = None, *, loss: Tensor | float | None = None) -> None: ...

    @overload
    def step(
        self, closure: Callable[[], float], *, loss: Tensor | float | None = None
    ) -> float: ...

    @mark_hooked  # hooks registered here run once, through the wrapped optimizer
    def step(
        self,
        closure: Callable[[], float] | None = None,
        *,
        loss: Tensor | float | None = None,
    ) -> float | None:
        """Clip the gradients, then step the wrapped optimizer.

        Args:
            closure: Re-evaluates the model and returns the loss; clipping runs after
                every evaluation.
            loss: This step's loss, for the spike gate (``skip_spikes``); a closure's
                loss is used without it. ``scaler.step(opt, loss=loss)`` passes it on.

        Returns:
            The closure's loss, or None without a closure.
        """
        scaler = calling_gradscaler()
        if scaler is not None and unscaled(scaler, self.optimizer):
            raise RuntimeError(
                "GradScaler unscaled the wrapped optimizer (scaler.unscale_(opt.optimizer))"
                " and then the wrapper it steps again: the gradients are too small by the "
                "scale. Call scaler.unscale_(opt) on the ClippedOptimizer itself"
            )
        if loss is not None:
            self.clipper.observe_loss(loss)
        if closure is not None:
            return step_with_closure(self.optimizer, self.clipper, closure)
        handover = self.clipper.clip(*read_handed(self))
        if handover is None:
            return None  # skipped, decided on the host
        if handover.grad_scale is None and handover.found_inf is None:  # nothing handed
            self.optimizer.step()
            return None
        saved = hand_over(self.optimizer, *handover)
        try:
            self.optimizer.step()
        finally:
            take_back(self.optimizer, saved)
        return None

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Return the wrapped optimizer's state dict plus clipopt's own key.

        The extra top-level key ``"clipopt"`` holds the strategy's state and the running
        counts, as tensors and plain numbers only, so
        ``torch.load(path, weights_only=True)`` reads the checkpoint. A plain optimizer
        of the wrapped class can load the result (it ignores the extra key).
        """
        state_dict = self.optimizer.state_dict()
        state_dict[STATE_KEY] = self.clipper.state_dict()
        return state_dict

    def clipopt_state_dict(self) -> dict[str, Any]:
        """Return clipopt's own state: the strategy's state and the running counts.

        This is ``state_dict()["clipopt"]``. Save it next to the optimizer's state where
        the optimizer's state dict is rebuilt by other code, as
        ``torch.distributed.checkpoint`` does (it keeps only ``state`` and
        ``param_groups``); restore it with :meth:`load_clipopt_state_dict`.
        """
        return self.clipper.state_dict()

    def load_clipopt_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`clipopt_state_dict` returned; check it all first.

        Raises:
            ValueError: The state does not fit this wrapper's strategy.
        """
        self.clipper.load_state_dict(state_dict)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict`.

        Everything is checked before anything changes. A plain state dict of the wrapped
        optimizer (no ``"clipopt"`` key) loads too, with a warning, and the strategy's
        state and the counts start fresh.

        Raises:
            TypeError: ``state_dict`` is not a mapping.
            ValueError: clipopt's part does not fit this wrapper's strategy.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"state_dict must be a mapping, got {type(state_dict).__name__}"
            )
        inner = dict(state_dict)
        own = inner.pop(STATE_KEY, None)
        if own is None:
            self.optimizer.load_state_dict(inner)
            self.clipper.reset()
            warnings.warn(
                f"the state dict has no {STATE_KEY!r} entry (a plain "
                f"{type(self.optimizer).__name__} state dict?); the clipping strategy "
                "and the step counts start fresh",
                UserWarning,
                stacklevel=2,
            )
            return
        self.clipper.check_state_dict(own)
        self.optimizer.load_state_dict(inner)
        self.clipper.load_state_dict(own)

    # -- copying and printing ------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "clipper": self.clipper}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.clipper.optimizer = self.optimizer
        release(self.optimizer)
        claim(self.optimizer, self, "ClippedOptimizer")
        finish_optimizer(self)

    def __repr__(self) -> str:
        inner = repr(self.optimizer).replace("\n", "\n    ")
        return (
            f"ClippedOptimizer(\n    strategy={self.strategy!r},\n"
            f"    nonfinite={self.nonfinite!r},\n    optimizer={inner}\n)"
        )
