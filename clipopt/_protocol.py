"""The strategy protocol: what the clipping engine asks of a strategy, and what it gets.

A strategy measures the gradients and decides *factors*; the engine
(:class:`clipopt.Clipper`) applies them, in one place, in the cheapest way the step
allows: a scaling pass, the fused optimizer kernel's ``grad_scale``, per-tensor scaling,
or an element-wise clamp.
"""

from __future__ import annotations

import copy
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Union

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ._norms import NormPlan

__all__ = [
    "Clamp",
    "ClipInputs",
    "ClipResult",
    "ClipStats",
    "ClipStrategy",
    "Factor",
    "Measurement",
    "Scale",
    "ScaleEach",
]


@dataclass(frozen=True)
class ClipInputs:
    """What a strategy sees at one step.

    Only ``params``, ``grads`` and ``step`` are required; the engine fills in the rest.

    Attributes:
        params: The parameters that have a gradient, in ``param_groups`` order.
        grads: Their gradients, same order (for a sparse gradient, its coalesced
            values).
        step: How many steps with gradients came before this one (0 at the first),
            skipped ones included: the count an LR scheduler stepped every iteration
            sees. Known on the host, so schedules can use it without reading the device.
        indices: For each gradient, the position of its parameter among all the
            optimizer's parameters (counting those without a gradient). Stable across
            steps, so per-tensor state can be keyed by it. Defaults to
            ``0 .. len(grads) - 1``.
        num_params: How many parameters the optimizer holds in all.
        group_index: For each gradient, the index of its parameter group.
        groups: The optimizer's parameter groups (dicts); a strategy that lists a key in
            :attr:`ClipStrategy.group_keys` reads a per-group override from them.
        names: For each gradient, its parameter's name, when the optimizer was built from
            ``model.named_parameters()``; otherwise None.
        uniform: True when all gradients share one device and one dtype, which lets
            kernels skip grouping them.
        process_group: The ``torch.distributed`` group over which plain-tensor
            gradients are shards (hand-made model parallelism, FSDP1), or None. Total
            norms reduce the ranks' totals; per-tensor values are reduced by parameter
            position (see ``clipopt.strategies.per_tensor_norms``).
        norm_plan: How the engine batches this layout's norms on the CPU, or None; pass
            it on to the norm helpers of ``clipopt.strategies``.
        plan: What :meth:`ClipStrategy.plan` derived for this layout (None by default).
        apply: The engine's way to apply a :class:`ClipResult` at once, for strategies
            that compose others (``apply(inputs, result, statistic)``); None outside
            the engine (``clipopt.strategies.apply_factors`` then applies them plainly).
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
    norm_plan: NormPlan | None = None
    plan: Any = None
    apply: Callable[[ClipInputs, ClipResult, Tensor], None] | None = None

    def __post_init__(self) -> None:
        if not self.indices:
            object.__setattr__(self, "indices", range(len(self.grads)))
        if not self.num_params:
            object.__setattr__(self, "num_params", max(self.indices, default=-1) + 1)
        if not self.group_index:
            object.__setattr__(self, "group_index", (0,) * len(self.grads))
        if not self.groups:
            object.__setattr__(self, "groups", ({},))


def inputs_of(fields: dict[str, Any], grads: Sequence[Tensor], step: int) -> ClipInputs:
    """The engine's :class:`ClipInputs` of a step, from a selection's complete fields.

    Every field but ``grads`` and ``step`` was checked and filled once for the
    selection, so the generated ``__init__`` and ``__post_init__`` (a dozen frozen
    assignments) are not run again at every step: a small model's step pays for them.
    """
    inputs = object.__new__(ClipInputs)
    vars(inputs).update(fields, grads=grads, step=step)
    return inputs


class Measurement(NamedTuple):
    """What :meth:`ClipStrategy.measure` found.

    Attributes:
        norm: The pre-clip statistic, a 0-dim tensor, compared with the threshold. It
            is non-finite whenever a gradient entry is: the engine decides from it
            whether the step is non-finite.
        parts: Anything else the strategy measured (per-tensor norms, ...), handed back
            to :meth:`ClipStrategy.clip` unchanged, so nothing is measured twice.
    """

    norm: Tensor
    parts: Any = None


class Scale(NamedTuple):
    """Multiply every gradient by one 0-dim ``factor``.

    The engine hands it to a fused optimizer's kernel as ``grad_scale = 1 / factor``
    (no separate pass), or scales in one foreach pass.
    """

    factor: Tensor


class ScaleEach(NamedTuple):
    """Multiply gradients by their own factors.

    Attributes:
        factors: A 1-D tensor with one factor per gradient, or one tensor per gradient
            broadcastable to it (e.g. one value per row).
        at: The positions in ``ClipInputs.grads`` the factors are for, increasing; None
            for all of them, in order.
    """

    factors: Tensor | Sequence[Tensor]
    at: Sequence[int] | None = None


class Clamp(NamedTuple):
    """Clamp every entry of the gradients at ``at`` (None: all) to ``[-limit, limit]``."""

    limit: float
    at: Sequence[int] | None = None


#: What a strategy asks the engine to apply.
Factor = Union[Scale, ScaleEach, Clamp]  # noqa: UP007  (a runtime alias on Python 3.10)


class ClipResult(NamedTuple):
    """What a strategy decided at one step; the statistics are 0-dim tensors.

    Attributes:
        threshold: The threshold that applied at this step (a Python float is fine: the
            engine makes a tensor of it only when the statistics are read).
        coef: The overall factor: the post-clip statistic over the pre-clip one (1 when
            nothing was clipped).
        clipped: Bool tensor, True when clipping changes the gradients.
        factors: What the engine applies to the gradients, in order; empty when nothing
            needs to change.
    """

    threshold: Tensor | float
    coef: Tensor
    clipped: Tensor
    factors: tuple[Factor, ...] = ()


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
        skipped: True when the update was skipped (non-finite gradients under
            ``"skip"``, a spike, or a GradScaler overflow).
    """

    norm: Tensor
    threshold: Tensor
    coef: Tensor
    clipped: Tensor
    nonfinite: Tensor
    skipped: Tensor

    def to_dict(self) -> dict[str, float]:
        """Return the statistics as plain floats, with a single device-to-host copy.

        Example:
            >>> import torch
            >>> values = (2.0, 1.0, 0.5, True, False, False)
            >>> s = ClipStats(*(torch.tensor(v) for v in values))
            >>> s.to_dict()["coef"], s.to_dict()["skipped"]
            (0.5, 0.0)
        """
        values = torch.stack([t.detach().to(torch.float64) for t in self]).tolist()
        return dict(zip(self._fields, values, strict=True))


class ClipStrategy(ABC):
    """Base class of clipping strategies.

    The engine calls a strategy in two phases at every step that has gradients:

    1. :meth:`measure` returns a :class:`Measurement` (or just its 0-dim statistic). It
       must not change the gradients or the strategy's state, and the statistic must be
       non-finite whenever a gradient entry is.
    2. :meth:`clip` updates the strategy's state and returns a :class:`ClipResult`: the
       statistics and the :class:`Scale`, :class:`ScaleEach` or :class:`Clamp` factors
       the engine applies. It never changes the gradients itself. Under
       ``nonfinite="propagate"`` it may see a non-finite statistic and must then leave
       its state unchanged (``torch.where``, not a Python ``if``, so no host read
       happens).

    Capabilities are attributes the engine reads (subclasses set them):

    - ``single_factor``: :meth:`clip` returns at most one :class:`Scale`, so a fused
      kernel can take it and GradScaler's scaled gradients can be measured directly.
    - ``honours_skip``: :meth:`clip` leaves the state unchanged where its ``skip``
      argument is True, so a fused kernel may skip a step without a host read; without
      it the engine decides on the host and calls :meth:`clip` only for applied steps.
    - ``exact_norms``: the norms must have torch's exact bits (False lets the engine use
      faster, more accurate dot products on the CPU).
    - ``sparse_gradients``: sparse gradients are supported (their values are clipped).
    - ``group_keys``: the ``param_groups`` keys the strategy reads (e.g.
      ``"clipopt_max_norm"``); any other ``"clipopt_*"`` key is reported as a mistake.
    - ``clips_most_steps``: clipping nearly every step is the design (the default
      strategy's threshold sits below the typical norm), so monitoring does not warn
      about a threshold set too low.

    Stateful strategies override :meth:`state_dict`, :meth:`load_state_dict`,
    :meth:`check_state_dict` and :meth:`reset`; state holds tensors and plain numbers
    only, so ``torch.load(..., weights_only=True)`` can read a checkpoint.

    Register a subclass with :func:`clipopt.register_strategy` to make it available by
    name. The constructor's keyword parameters are the strategy's hyperparameters: the
    registry checks names against them and ``repr`` shows them.

    Example:
        >>> import torch, clipopt
        >>> from clipopt import functional as F
        >>> class HalfNorm(clipopt.ClipStrategy):
        ...     '''Clip to half of a fixed L2 norm.'''
        ...     single_factor = True
        ...     def __init__(self, max_norm: float = 2.0) -> None:
        ...         self.max_norm = max_norm
        ...     def measure(self, inputs):
        ...         return F.total_norm(inputs.grads)
        ...     def clip(self, inputs, measured, skip=None):
        ...         coef = F.clip_coef(measured.norm, self.max_norm / 2)
        ...         t = torch.full_like(coef, self.max_norm / 2)
        ...         return clipopt.ClipResult(t, coef, coef < 1, (clipopt.Scale(coef),))
        >>> HalfNorm()
        HalfNorm(max_norm=2.0)
    """

    #: The registry name, set by :func:`clipopt.register_strategy`.
    name: ClassVar[str | None] = None
    single_factor: bool = False
    honours_skip: bool = False
    exact_norms: bool = True
    sparse_gradients: bool = False
    group_keys: tuple[str, ...] = ()
    clips_most_steps: bool = False

    def plan(self, inputs: ClipInputs) -> Any:
        """Derive what depends only on the layout; the engine calls it once per layout.

        The result comes back as ``inputs.plan`` at every step of that layout (the same
        parameters with gradients, in the same groups). The default plans nothing.
        """
        return None

    @abstractmethod
    def measure(self, inputs: ClipInputs) -> Measurement | Tensor:
        """Return the pre-clip statistic (and what else was measured), without effects."""

    @abstractmethod
    def clip(
        self, inputs: ClipInputs, measured: Measurement, skip: Tensor | None = None
    ) -> ClipResult:
        """Update the state and decide the factors for the gradients ``measured``.

        Args:
            inputs: The step's inputs.
            measured: What :meth:`measure` returned (a bare tensor wrapped).
            skip: A 0-dim bool tensor, True when the update will be skipped (only given
                to strategies with ``honours_skip``); None when the step is applied.
        """

    def state_dict(self) -> dict[str, Any]:
        """Return the strategy's state (tensors and plain numbers); empty if stateless."""
        return {}

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if :meth:`load_state_dict` would reject ``state_dict``.

        Changes nothing. The default suits stateless strategies; a strategy that
        overrides :meth:`load_state_dict` but not this one is checked by loading into a
        deep copy of itself (override this to check without copying).
        """
        if type(self).load_state_dict is ClipStrategy.load_state_dict:
            ClipStrategy.load_state_dict(self, state_dict)  # raises, or changes nothing
        else:
            copy.deepcopy(self).load_state_dict(state_dict)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict`.

        Raises:
            ValueError: The state does not fit this strategy; nothing changes.
        """
        if state_dict:
            raise ValueError(
                f"{type(self).__name__} has no state, got keys {sorted(state_dict)!r}"
            )

    def reset(self) -> None:  # noqa: B027  (a deliberate no-op default)
        """Forget all state, as if freshly constructed."""

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
