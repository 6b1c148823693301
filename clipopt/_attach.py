"""Attach mode: clipping for code that must keep its own optimizer object."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ._base import ClipStats, ClipStrategy
from ._optimizer import (
    _HANDED,
    _SKIP,
    STATE_KEY,
    ClippedOptimizer,
    NonfinitePolicy,
    _FusedPlan,
    hand_over,
    take_back,
)

__all__ = ["Attachment", "attach"]


class Attachment:
    """Clipping attached to an optimizer through its own hooks; made by :func:`attach`.

    Attributes:
        optimizer: The optimizer clipping is attached to.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        strategy: str | ClipStrategy,
        *,
        nonfinite: NonfinitePolicy,
        process_group: Any,
        strategy_kwargs: Mapping[str, Any],
    ) -> None:
        if isinstance(optimizer, ClippedOptimizer):
            raise TypeError(
                "optimizer is already a ClippedOptimizer; attach to a plain optimizer"
            )
        if getattr(optimizer, "_clipopt_attachment", None) is not None:
            raise TypeError("clipping is already attached to this optimizer")
        # The engine is a ClippedOptimizer that is never stepped itself: the same code
        # clips here as in the wrapper, so results are identical.
        self._engine = ClippedOptimizer(
            optimizer,
            strategy,
            nonfinite=nonfinite,
            process_group=process_group,
            **strategy_kwargs,
        )
        self.optimizer = optimizer
        self._pending_state: Mapping[str, Any] | None = None
        self._saved: dict[str, Any] | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
            optimizer.register_state_dict_post_hook(self._add_state),
            optimizer.register_load_state_dict_pre_hook(self._take_state),
            optimizer.register_load_state_dict_post_hook(self._load_state),
        ]
        optimizer._clipopt_attachment = self  # type: ignore[attr-defined]

    @property
    def strategy(self) -> ClipStrategy:
        """The clipping strategy."""
        return self._engine.strategy

    @property
    def last_stats(self) -> ClipStats | None:
        """Statistics of the last step that had gradients (see ``ClippedOptimizer``)."""
        return self._engine.last_stats

    def counts(self) -> dict[str, int]:
        """The running counts (see :meth:`ClippedOptimizer.counts`)."""
        return self._engine.counts()

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # torch passes step()'s own arguments, the optimizer first
        closure = args[1] if len(args) > 1 else kwargs.get("closure")
        if closure is not None:
            raise RuntimeError(
                "attach mode clips before step() runs, so it cannot clip the gradients a "
                "closure computes; wrap the optimizer in clipopt.ClippedOptimizer instead"
            )
        engine = self._engine
        scaler_attrs = {
            k: optimizer.__dict__[k] for k in _HANDED if k in optimizer.__dict__
        }
        if scaler_attrs and not engine._fused_capable():
            raise RuntimeError(
                f"GradScaler hands {type(optimizer).__name__}(fused=True) scaled "
                f"gradients, which {engine.strategy!r} cannot clip (it needs a single "
                "factor); use "
                "clipopt.ClippedOptimizer, or a non-fused optimizer"
            )
        engine.__dict__.update(scaler_attrs)  # GradScaler's one-pass protocol, if any
        try:
            plan = engine._clip()
        finally:
            for key in scaler_attrs:
                engine.__dict__.pop(key, None)
        if plan is _SKIP:
            # Nothing to step: without gradients the optimizer leaves parameters and its
            # state as they were, which is exactly a skipped step.
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        elif isinstance(plan, _FusedPlan):
            saved = hand_over(optimizer, plan)
            # GradScaler deletes its own attributes after the step; ours we take back
            self._saved = None if scaler_attrs else saved

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if self._saved is not None:
            take_back(optimizer, self._saved)
            self._saved = None

    def _add_state(self, optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        state_dict[STATE_KEY] = self._engine.clipopt_state_dict()
        return state_dict

    def _take_state(self, optimizer: Any, state_dict: dict[str, Any]) -> dict[str, Any]:
        own = state_dict.get(STATE_KEY)
        if own is not None:
            self._engine._check_own_state(own)  # before anything changes
        self._pending_state = own
        return {k: v for k, v in state_dict.items() if k != STATE_KEY}

    def _load_state(self, optimizer: Any) -> None:
        if self._pending_state is not None:
            self._engine.load_clipopt_state_dict(self._pending_state)
            self._pending_state = None

    def detach(self) -> None:
        """Remove every hook: the optimizer no longer clips."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.optimizer.__dict__.pop("_clipopt_attachment", None)

    def __repr__(self) -> str:
        return (
            f"Attachment(strategy={self.strategy!r}, nonfinite={self._engine.nonfinite!r}, "
            f"optimizer={type(self.optimizer).__name__})"
        )


def attach(
    optimizer: torch.optim.Optimizer,
    strategy: str | ClipStrategy = "norm",
    *,
    nonfinite: NonfinitePolicy = "skip",
    process_group: Any = None,
    **strategy_kwargs: Any,
) -> Attachment:
    """Make an optimizer clip in its own ``step()``, keeping the optimizer object.

    For code that must hold on to its own optimizer (Hugging Face ``Trainer``,
    ``torch.distributed.checkpoint`` helpers): clipping runs in a step pre-hook, and the
    strategy's state and counts live in the optimizer's own ``state_dict()`` under
    ``"clipopt"`` through state-dict hooks. Results equal those of
    :class:`clipopt.ClippedOptimizer` with the same arguments (tested), including the
    fused path and GradScaler. A skipped non-finite step drops the gradients, so the
    optimizer does nothing. Closures are refused: use the wrapper for closure optimizers.

    Args:
        optimizer: The optimizer.
        strategy: As for :class:`clipopt.ClippedOptimizer`.
        nonfinite: As for :class:`clipopt.ClippedOptimizer`.
        process_group: As for :class:`clipopt.ClippedOptimizer`.
        **strategy_kwargs: The strategy's parameters, when ``strategy`` is a name.

    Returns:
        The attachment: ``last_stats``, ``counts()``, ``strategy``, ``detach()``.

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
    return Attachment(
        optimizer,
        strategy,
        nonfinite=nonfinite,
        process_group=process_group,
        strategy_kwargs=strategy_kwargs,
    )
