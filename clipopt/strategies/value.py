"""``"value"``: clamp every gradient entry to ``[-clip_value, clip_value]``."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .. import _norms
from .._protocol import Clamp, ClipInputs, ClipResult, ClipStrategy, Measurement
from .._registry import register_strategy
from .._validation import (
    Schedule,
    check_choice,
    check_foreach,
    check_schedule,
    threshold_at,
)
from ._common import (
    PerTensorNorms,
    group_members,
    group_spans,
    group_threshold,
    per_tensor_norms,
    total_norm_of,
)

__all__ = ["ValueClip"]


@register_strategy("value")
class ValueClip(ClipStrategy):
    r"""Clamp every gradient entry to ``[-clip_value, clip_value]``.

    .. math::

        g_i \leftarrow \max(-c, \min(c, g_i))

    Bit-identical to ``torch.nn.utils.clip_grad_value_(params, clip_value,
    foreach=foreach)``. Clamping changes the gradient's direction; prefer ``"norm"``
    unless a few entries are known to spike. The statistic reported as ``norm`` is the
    largest absolute entry (the inf-norm), and ``coef`` is the factor applied to that
    entry. With ``scope="group"``, a parameter group's ``"clipopt_clip_value"``
    overrides ``clip_value`` for its gradients.

    Args:
        clip_value: Largest absolute entry allowed, > 0; ``math.inf`` never clips. A
            callable of the step count is a schedule.
        scope: ``"global"`` or ``"group"``.
        foreach: ``None`` uses the foreach kernels where the device supports them.

    Raises:
        TypeError: A parameter has the wrong type.
        ValueError: ``clip_value`` is NaN or <= 0, or ``scope`` is unknown.

    Example:
        >>> import torch, clipopt
        >>> p = torch.nn.Parameter(torch.zeros(3))
        >>> p.grad = torch.tensor([-2.0, 0.1, 5.0])
        >>> sgd = torch.optim.SGD([p], lr=1.0)
        >>> opt = clipopt.ClippedOptimizer(sgd, "value", clip_value=0.5)
        >>> opt.step()
        >>> p.grad
        tensor([-0.5000,  0.1000,  0.5000])
    """

    honours_skip = True  # no state
    sparse_gradients = True

    def __init__(
        self,
        clip_value: Schedule,
        *,
        scope: Literal["global", "group"] = "global",
        foreach: bool | None = None,
    ) -> None:
        self.clip_value = check_schedule("clip_value", clip_value)
        self.scope = check_choice("scope", scope, ("global", "group"))
        self.foreach = check_foreach(foreach)
        self.group_keys = ("clipopt_clip_value",) if self.scope == "group" else ()

    def measure(self, inputs: ClipInputs) -> Measurement:
        """Return the largest absolute gradient entry (per tensor too, by group)."""
        if self.scope == "global":
            return Measurement(total_norm_of(inputs, math.inf, self.foreach))
        per = per_tensor_norms(inputs, math.inf, self.foreach)
        return Measurement(per.total, per)

    def clip(
        self, inputs: ClipInputs, measured: Measurement, skip: Tensor | None = None
    ) -> ClipResult:
        """Clamp the gradients to ``[-clip_value, clip_value]`` (per group's limit)."""
        clip_value = threshold_at("clip_value", self.clip_value, inputs.step)
        norm = measured.norm
        if self.scope == "global":
            if math.isinf(clip_value):
                one = torch.ones_like(norm)
                return ClipResult(clip_value, one, one < 1.0)
            # clip_value / norm is Tensor.__rdiv__: these ops, without its Python frames
            coef = norm.reciprocal().mul_(clip_value).clamp_(max=1.0)
            return ClipResult(clip_value, coef, norm > clip_value, (Clamp(clip_value),))
        threshold = torch.full_like(norm, clip_value)
        per: PerTensorNorms = measured.parts
        maxima = per.norms.unbind()
        spans = None if per.everywhere is None else group_spans(inputs)
        members = group_members(inputs)
        factors, after = [], []
        for group in members if spans is None else range(len(spans) - 1):
            limit = group_threshold(inputs, group, "clip_value", clip_value)
            if spans is None:
                top = torch.stack([maxima[i] for i in members[group]]).amax()
            elif spans[group] == spans[group + 1]:
                continue  # a parameter group without parameters
            else:  # every rank's gradients of the group: the same on every rank
                assert per.everywhere is not None
                top = _norms.reduce_norms(
                    per.everywhere[spans[group] : spans[group + 1]], math.inf
                )
            after.append(torch.clamp(top, max=limit))
            if group in members and not math.isinf(limit):
                factors.append(Clamp(limit, members[group]))
        post = torch.stack(after).amax()  # the largest entry left
        coef = torch.where(norm > 0, post / norm, torch.ones_like(norm))
        return ClipResult(threshold, coef, post < norm, tuple(factors))
