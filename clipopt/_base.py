"""The strategy protocol: what ``ClippedOptimizer`` asks of a clipping strategy."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor

if TYPE_CHECKING:
    from . import functional as F

__all__ = ["ClipInputs", "ClipResult", "ClipStats", "ClipStrategy"]


@dataclass(frozen=True)
class ClipInputs:
    """What a strategy sees at one step.

    Only ``params``, ``grads`` and ``step`` are required; the wrapper fills in the rest.

    Attributes:
        params: The parameters that have a gradient, in ``param_groups`` order.
        grads: Their gradients, same order; the strategy clips these in place.
        step: How many clipping steps ran before this one (0 at the first step).
            Known on the host, so schedules can use it without reading the device.
        indices: For each gradient, the position of its parameter among all the
            optimizer's parameters (counting those without a gradient). Stable across
            steps, so per-tensor state can be keyed by it. Defaults to
            ``0 .. len(grads) - 1``.
        num_params: How many parameters the optimizer holds in all.
        group_index: For each gradient, the index of its parameter group.
        groups: The optimizer's parameter groups (dicts); a group may override a
            strategy's threshold under a ``"clipopt_<parameter>"`` key.
        names: For each gradient, its parameter's name, when the optimizer was built from
            ``model.named_parameters()``; otherwise None.
        uniform: True when all gradients share one device and one dtype, which lets
            kernels skip grouping them (see ``functional.total_norm``).
        process_group: The ``torch.distributed`` group over which plain-tensor
            gradients are shards (hand-made model parallelism, FSDP1), or None. Total
            norms pass it to ``functional.total_norm``, which reduces the ranks'
            totals. Per-tensor norms must be reduced by position (one entry per
            ``num_params``, placed by ``indices``, zero where a rank has no gradient):
            ranks may hold different numbers of gradients, so ``tensor_norms(...,
            group=...)`` on ``grads`` alone would not line up.
        batches: How to batch the norms of many small gradients
            (:class:`clipopt.functional.NormBatches`), built by the wrapper once per
            layout; None when it does not apply. Norms pass it to
            ``functional.total_norm`` / ``tensor_norms``: same bits, fewer ops.
    """

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    step: int
    indices: Sequence[int] = ()
    num_params: int = 0
    group_index: Sequence[int] = ()
    groups: Sequence[Mapping[str, Any]] = ()
    names: Sequence[str] | None = None
    uniform: bool = False
    process_group: Any = None
    batches: F.NormBatches | None = None

    def __post_init__(self) -> None:
        if not self.indices:
            object.__setattr__(self, "indices", tuple(range(len(self.grads))))
        if not self.num_params:
            object.__setattr__(self, "num_params", max(self.indices, default=-1) + 1)
        if not self.group_index:
            object.__setattr__(self, "group_index", (0,) * len(self.grads))
        if not self.groups:
            object.__setattr__(self, "groups", ({},))


class ClipResult(NamedTuple):
    """What a strategy reports after clipping; 0-dim tensors on the norm's device.

    Attributes:
        threshold: The threshold that applied at this step.
        coef: The factor the gradients were scaled by (1 when nothing was clipped).
        clipped: Bool tensor, True when clipping changed the gradients.
    """

    threshold: Tensor
    coef: Tensor
    clipped: Tensor


class ClipStats(NamedTuple):
    """Statistics of the last clipping step, as 0-dim tensors on the gradients' device.

    Producing them never reads the device; :meth:`to_dict` does, once, on demand.

    Attributes:
        norm: The pre-clip statistic the strategy compares with its threshold: the total
            norm in the strategy's ``norm_type`` (the largest absolute entry for
            ``"value"``).
        threshold: The threshold that applied (NaN on a skipped step).
        coef: The factor the gradients were scaled by (1 when not clipped, 0 on a skipped
            step).
        clipped: True when clipping changed the gradients.
        nonfinite: True when the gradients held a NaN or infinite entry (or their norm
            overflowed).
    """

    norm: Tensor
    threshold: Tensor
    coef: Tensor
    clipped: Tensor
    nonfinite: Tensor

    def to_dict(self) -> dict[str, float]:
        """Return the statistics as plain floats, with a single device-to-host copy.

        Example:
            >>> import torch
            >>> s = ClipStats(*(torch.tensor(v) for v in (2.0, 1.0, 0.5, True, False)))
            >>> s.to_dict()
            {'norm': 2.0, 'threshold': 1.0, 'coef': 0.5, 'clipped': 1.0, 'nonfinite': 0.0}
        """
        values = torch.stack([t.detach().to(torch.float64) for t in self]).tolist()
        return dict(zip(self._fields, values, strict=True))


class ClipStrategy(ABC):
    """Base class of clipping strategies.

    ``ClippedOptimizer`` calls a strategy in two phases at every step that has gradients:

    1. :meth:`measure` returns the pre-clip statistic (a 0-dim tensor). It must not change
       the gradients or the strategy's state, and it must be non-finite whenever a
       gradient entry is, because the wrapper decides from it whether the step is
       non-finite.
    2. :meth:`clip_` clips the gradients in place and updates the strategy's state. It is
       called only for finite steps under ``nonfinite="skip"``; under ``"propagate"`` it
       may see a non-finite ``norm`` and must then leave its state unchanged (use
       ``torch.where``, not a Python ``if``, so no host read happens).

    Stateful strategies override :meth:`state_dict`, :meth:`load_state_dict` and
    :meth:`reset`; state holds tensors and plain numbers only, so
    ``torch.load(..., weights_only=True)`` can read a checkpoint.

    Register a subclass with :func:`clipopt.register_strategy` to make it available by
    name. The constructor's keyword parameters are the strategy's hyperparameters: the
    registry checks names against them and ``repr`` shows them.

    Example:
        >>> import torch, clipopt
        >>> from clipopt import functional as F
        >>> class HalfNorm(clipopt.ClipStrategy):
        ...     '''Clip to half of a fixed L2 norm.'''
        ...     def __init__(self, max_norm: float = 2.0) -> None:
        ...         self.max_norm = max_norm
        ...     def measure(self, inputs):
        ...         return F.total_norm(inputs.grads)
        ...     def clip_(self, inputs, norm):
        ...         coef = F.clip_coef(norm, self.max_norm / 2)
        ...         F.scale_(inputs.grads, coef)
        ...         t = torch.full_like(norm, self.max_norm / 2)
        ...         return clipopt.ClipResult(t, coef, coef < 1)
        >>> HalfNorm()
        HalfNorm(max_norm=2.0)
    """

    #: The registry name, set by :func:`clipopt.register_strategy`.
    name: ClassVar[str | None] = None

    @abstractmethod
    def measure(self, inputs: ClipInputs) -> Tensor:
        """Return the pre-clip statistic as a 0-dim tensor, without side effects."""

    @abstractmethod
    def clip_(self, inputs: ClipInputs, norm: Tensor) -> ClipResult:
        """Clip ``inputs.grads`` in place given ``norm`` from :meth:`measure`."""

    def exact_norms(self) -> bool:
        """Whether this strategy's norms must have torch's exact bits.

        True (the default) for strategies promised bit-identical to torch's clipping
        (``"norm"``, ``"value"``); the adaptive strategies return False, which lets the
        wrapper take large gradients' 2-norms from faster and more accurate dot products
        (see :class:`clipopt.functional.NormBatches`). On the fused path every strategy
        gets them: the kernel's result differs from clip-then-step in the last bits
        anyway.
        """
        return True

    def supports_coefficient(self) -> bool:
        """Whether this strategy clips by one factor that :meth:`clip_coefficient` returns.

        Such strategies let ``ClippedOptimizer`` hand the factor to a fused optimizer
        kernel (``grad_scale``) instead of scaling the gradients in a separate pass.
        """
        return False

    def clip_coefficient(self, inputs: ClipInputs, norm: Tensor) -> ClipResult:
        """Like :meth:`clip_`, but leave the gradients alone and only return the factor.

        Called instead of :meth:`clip_` (never both in one step), and only when
        :meth:`supports_coefficient` is True; it updates the state as :meth:`clip_`
        does.
        """
        raise NotImplementedError(f"{type(self).__name__} clips by more than one factor")

    def state_dict(self) -> dict[str, Any]:
        """Return the strategy's state (tensors and plain numbers); empty if stateless."""
        return {}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict`.

        Raises:
            ValueError: The state does not fit this strategy.
        """
        if state_dict:
            raise ValueError(
                f"{type(self).__name__} has no state, got keys {sorted(state_dict)!r}"
            )

    def reset(self) -> None:  # noqa: B027  (a deliberate no-op default)
        """Forget all state, as if freshly constructed."""

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles leave out ``_cache*`` attributes (rebuilt on first use).

        Caches hold the last step's parameters, gradients and scratch buffers: a copy
        (``ClippedOptimizer.load_state_dict`` checks a state on one) must not duplicate
        them.
        """
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_cache")}

    def hyperparameters(self) -> dict[str, Any]:
        """Return the constructor arguments, read back from same-named attributes."""
        names = [
            p.name
            for p in inspect.signature(type(self).__init__).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        return {n: getattr(self, n) for n in names if hasattr(self, n)}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hyperparameters().items())
        return f"{type(self).__name__}({args})"
