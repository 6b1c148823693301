"""Attach mode: clipping for code that must keep its own optimizer object."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._engine import STATE_KEY, Clipper, NonfinitePolicy
from ._front import ClipperView
from ._optimizer import ClippedOptimizer
from ._ownership import claim, release
from ._protocol import ClipStrategy
from ._spikes import SpikeSkip
from ._torch_private import hand_over, read_handed, take_back

__all__ = ["Attachment", "attach"]


class Attachment(ClipperView):
    """Clipping attached to an optimizer through its own hooks; made by :func:`attach`.

    Attributes:
        optimizer: The optimizer clipping is attached to.
        clipper: The :class:`clipopt.Clipper` that clips.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, clipper: Clipper) -> None:
        if isinstance(optimizer, ClippedOptimizer):
            raise TypeError(
                "optimizer is already a ClippedOptimizer, which clips in its step(); "
                "attach to a plain optimizer, or use the wrapper alone"
            )
        claim(optimizer, self, "attach()")
        self.optimizer = optimizer
        self.clipper = clipper
        self._pending_state: Mapping[str, Any] | None = None
        self._saved: dict[str, Any] | None = None
        self._dropped: list[tuple[Tensor, Tensor]] | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
            optimizer.register_state_dict_post_hook(self._add_state),
            optimizer.register_load_state_dict_pre_hook(self._take_state),
            optimizer.register_load_state_dict_post_hook(self._load_state),
        ]
        # torch's Optimizer.__getstate__ keeps no hooks, so a deep copy would lose the
        # clipping in silence; this instance attribute makes copies clip too.
        vars(optimizer)["__deepcopy__"] = self._copy_optimizer

    def observe_loss(self, loss: Tensor | float) -> None:
        """Give the next ``step()``'s loss to the spike gate (``skip_spikes``)."""
        self.clipper.observe_loss(loss)

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # torch passes step()'s own arguments, the optimizer first
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if closure is not None:
            raise RuntimeError(
                "attach mode clips before step() runs, so it cannot clip the gradients a "
                "closure computes; wrap the optimizer in clipopt.ClippedOptimizer instead"
            )
        handover = self.clipper.clip(*read_handed(optimizer))
        if handover is None:
            # Skipped: without gradients the optimizer leaves parameters and its state
            # as they were, which is exactly a skipped step. They come back afterwards.
            self._dropped = [
                (p, p.grad)
                for group in optimizer.param_groups
                for p in group["params"]
                if p.grad is not None
            ]
            for p, _ in self._dropped:
                p.grad = None
        else:
            self._saved = hand_over(optimizer, *handover)

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._saved is not None:
            take_back(optimizer, self._saved)
            self._saved = None
        if self._dropped is not None:
            for p, grad in self._dropped:
                p.grad = grad
            self._dropped = None

    def _add_state(self, optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict[STATE_KEY] = self.clipper.state_dict()
        return state_dict

    def _take_state(self, optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        own = state_dict.get(STATE_KEY)
        if own is not None:
            self.clipper.check_state_dict(own)  # before anything changes
        self._pending_state = own
        return {k: v for k, v in state_dict.items() if k != STATE_KEY}

    def _load_state(self, optimizer: Any) -> None:
        if self._pending_state is not None:
            self.clipper.load_state_dict(self._pending_state)
            self._pending_state = None

    def _copy_optimizer(self, memo: dict[int, Any]) -> torch.optim.Optimizer:
        """``copy.deepcopy(optimizer)``: the copy, with a copy of this clipping attached."""
        optimizer = self.optimizer
        own = vars(optimizer).pop("__deepcopy__")
        try:
            new = copy.deepcopy(optimizer, memo)
        finally:
            vars(optimizer)["__deepcopy__"] = own
        clipper = copy.deepcopy(self.clipper, memo)
        clipper.optimizer = new
        Attachment(new, clipper)
        return new

    def detach(self) -> None:
        """Remove every hook: the optimizer no longer clips."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        vars(self.optimizer).pop("__deepcopy__", None)
        release(self.optimizer)

    def __repr__(self) -> str:
        return (
            f"Attachment(strategy={self.strategy!r}, nonfinite={self.nonfinite!r}, "
            f"optimizer={type(self.optimizer).__name__})"
        )


def attach(
    optimizer: torch.optim.Optimizer,
    strategy: str | ClipStrategy | None = None,
    *,
    nonfinite: NonfinitePolicy = "skip",
    process_group: Any = None,
    skip_spikes: bool | SpikeSkip = False,
    **strategy_kwargs: Any,
) -> Attachment:
    """Make an optimizer clip in its own ``step()``, keeping the optimizer object.

    For code that must hold on to its own optimizer (Hugging Face ``Trainer``,
    ``torch.distributed.checkpoint`` helpers): clipping runs in a step pre-hook, and the
    strategy's state and counts live in the optimizer's own ``state_dict()`` under
    ``"clipopt"`` through state-dict hooks. The same engine clips as in
    :class:`clipopt.ClippedOptimizer`, so results are identical (tested), including the
    fused path and GradScaler. A step skipped on the host hides the gradients from the
    optimizer during its ``step()``, so it does nothing, and puts them back afterwards.
    Closures are refused: use the wrapper for closure optimizers. ``copy.deepcopy`` of
    the optimizer keeps the clipping (a pickle does not: pickle its state dict).

    Args:
        optimizer: The optimizer.
        strategy: As for :class:`clipopt.ClippedOptimizer`.
        nonfinite: As for :class:`clipopt.ClippedOptimizer`.
        process_group: As for :class:`clipopt.ClippedOptimizer`.
        skip_spikes: As for :class:`clipopt.ClippedOptimizer`; give each step's loss
            with ``attachment.observe_loss(loss)`` before ``step()``.
        **strategy_kwargs: The strategy's parameters, when ``strategy`` is a name.

    Returns:
        The attachment: ``last_stats``, ``counts()``, ``strategy``, ``clipper``,
        ``detach()``.

    Raises:
        TypeError: ``optimizer`` is a ``ClippedOptimizer`` or already clipped, or the
            strategy arguments are wrong (as for the wrapper).

    Example:
        >>> import torch, clipopt
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> sgd = torch.optim.SGD([p], lr=1.0)
        >>> clipping = clipopt.attach(sgd, "norm", max_norm=1.0)
        >>> p.grad = torch.tensor([3.0, 4.0])
        >>> sgd.step()
        >>> p
        Parameter containing:
        tensor([-0.6000, -0.8000], requires_grad=True)
        >>> "clipopt" in sgd.state_dict()
        True
    """
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
    return Attachment(optimizer, clipper)
