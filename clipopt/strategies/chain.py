"""``Chain``: several strategies in turn, e.g. value clipping then norm clipping."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from .._apply import apply_factors, as_measurement
from .._protocol import ClipInputs, ClipResult, ClipStrategy, Measurement
from .._registry import get_strategy

__all__ = ["Chain"]


class Chain(ClipStrategy):
    """Apply several strategies in turn, e.g. value clipping then norm clipping.

    Each strategy measures the gradients as the previous one left them (the chain has
    the engine apply each member's factors before the next member measures). The
    chain's statistic is the first strategy's (so a non-finite gradient is detected
    before anything changes), its threshold the last one's, its coefficient the product
    of the coefficients, and it counts as clipped when any member clipped. State is
    saved per member.

    Args:
        *strategies: Strategy objects or registered names (with default parameters).

    Raises:
        TypeError: A member is neither a strategy nor a name.
        ValueError: No member, or an unknown name.

    Example:
        >>> import clipopt
        >>> clipopt.Chain(clipopt.ValueClip(5.0), clipopt.NormClip(1.0))
        Chain(ValueClip(clip_value=5.0, scope='global', foreach=None), NormClip(max_norm=1.0, norm_type=2.0, scope='global', foreach=None))
    """  # noqa: E501

    def __init__(self, *strategies: ClipStrategy | str) -> None:
        if not strategies:
            raise ValueError("Chain needs at least one strategy, got none")
        members: list[ClipStrategy] = []
        for s in strategies:
            if isinstance(s, str):
                members.append(get_strategy(s))
            elif isinstance(s, ClipStrategy):
                members.append(s)
            else:
                raise TypeError(
                    f"Chain members must be strategies or registered names, got {s!r}"
                )
        self.strategies = tuple(members)
        # Members after the first measure gradients the earlier ones changed, so only a
        # lone member may measure GradScaler's scaled gradients.
        self.single_factor = len(members) == 1 and members[0].single_factor
        self.honours_skip = all(s.honours_skip for s in members)
        self.exact_norms = any(s.exact_norms for s in members)
        self.sparse_gradients = all(s.sparse_gradients for s in members)
        self.group_keys = tuple(sorted({k for s in members for k in s.group_keys}))
        self.clips_most_steps = any(s.clips_most_steps for s in members)

    def _member(self, inputs: ClipInputs, i: int) -> ClipInputs:
        plans = inputs.plan
        return dataclasses.replace(inputs, plan=None if plans is None else plans[i])

    def plan(self, inputs: ClipInputs) -> tuple[Any, ...]:
        """Each member's plan."""
        return tuple(s.plan(inputs) for s in self.strategies)

    def measure(self, inputs: ClipInputs) -> Measurement:
        """Return the first strategy's measurement."""
        return as_measurement(self.strategies[0].measure(self._member(inputs, 0)))

    def clip(
        self, inputs: ClipInputs, measured: Measurement, skip: Tensor | None = None
    ) -> ClipResult:
        """Clip with each strategy in turn; return the last one's factors to apply."""
        results = []
        last = len(self.strategies) - 1
        for i, strategy in enumerate(self.strategies):
            member = self._member(inputs, i)
            if i > 0:
                measured = as_measurement(strategy.measure(member))
            result = strategy.clip(member, measured, skip)
            if i < last:
                apply_factors(member, result, measured.norm)
            results.append(result)
        coef = results[0].coef
        clipped = results[0].clipped
        for r in results[1:]:
            coef = coef * r.coef.to(coef.device)
            clipped = clipped | r.clipped.to(clipped.device)
        return ClipResult(results[-1].threshold, coef, clipped, results[-1].factors)

    def state_dict(self) -> dict[str, Any]:
        """Return each member's state under its position ("0", "1", ...)."""
        return {str(i): s.state_dict() for i, s in enumerate(self.strategies)}

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if the keys or a member's state do not fit."""
        if not state_dict:
            return
        expected = {str(i) for i in range(len(self.strategies))}
        if set(state_dict) != expected:
            raise ValueError(
                f"Chain state needs keys {sorted(expected)}, got {sorted(state_dict)}"
            )
        for i, s in enumerate(self.strategies):
            s.check_state_dict(state_dict[str(i)])

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore each member's state; checks every member before changing any.

        Raises:
            ValueError: The keys or a member's state do not fit.
        """
        self.check_state_dict(state_dict)
        if not state_dict:
            self.reset()
            return
        for i, s in enumerate(self.strategies):
            s.load_state_dict(state_dict[str(i)])

    def reset(self) -> None:
        """Reset every member."""
        for s in self.strategies:
            s.reset()

    def __repr__(self) -> str:
        return f"Chain({', '.join(map(repr, self.strategies))})"
