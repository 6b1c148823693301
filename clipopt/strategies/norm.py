"""``"norm"``: scale the gradients so that their norm is at most ``max_norm``."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .. import functional as F
from .._protocol import ClipInputs, ClipResult, ClipStrategy, Measurement, Scale, ScaleEach
from .._registry import register_strategy
from .._validation import (
    Schedule,
    check_choice,
    check_foreach,
    check_norm_type,
    check_schedule,
    threshold_at,
)
from ._common import (
    PerTensorNorms,
    below,
    group_members,
    group_spans,
    group_threshold,
    per_tensor_norms,
    total_norm_of,
)

__all__ = ["NormClip"]

Scope = Literal["global", "group", "tensor"]


@register_strategy("norm")
class NormClip(ClipStrategy):
    r"""Scale the gradients by one factor so that their norm is at most ``max_norm``.

    .. math::

        g \leftarrow g \cdot \min\left(1, \frac{\text{max\_norm}}{\lVert g \rVert_p
        + 10^{-6}}\right)

    With ``scope="global"`` (the default) the norm is taken over all gradients of all
    parameter groups as one vector, bit-identical to
    ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, foreach=foreach)``.
    With ``scope="group"`` each parameter group is clipped on its own, to its own
    ``"clipopt_max_norm"`` if it has one; with ``scope="tensor"`` each gradient tensor
    is.

    Args:
        max_norm: Largest norm allowed, > 0; ``math.inf`` never clips. A callable of the
            step count (0, 1, ...) is a schedule, e.g. a warmup ramp. 1.0 is the common
            choice for transformers (Hugging Face ``max_grad_norm``, most LLM recipes),
            right only when the model's natural gradient norm is of order 1; tune it
            with an Optuna study, or use the default strategy, which needs no threshold.
        norm_type: p of the p-norm: any p > 0, or ``math.inf`` for the largest absolute
            entry.
        scope: ``"global"``, ``"group"`` or ``"tensor"``.
        foreach: ``None`` uses the foreach kernels where the device supports them.

    Raises:
        TypeError: A parameter has the wrong type.
        ValueError: ``max_norm`` or ``norm_type`` is NaN or <= 0, or ``scope`` is
            unknown.

    References:
        Pascanu, Mikolov, Bengio, "On the difficulty of training recurrent neural
        networks", ICML 2013.

    Example:
        >>> import torch, clipopt
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> p.grad = torch.tensor([3.0, 4.0])
        >>> sgd = torch.optim.SGD([p], lr=1.0)
        >>> opt = clipopt.ClippedOptimizer(sgd, "norm", max_norm=1.0)
        >>> opt.step()
        >>> p
        Parameter containing:
        tensor([-0.6000, -0.8000], requires_grad=True)

        A warmup ramp from 0.1 to 1.0 over 100 steps:

        >>> ramp = clipopt.NormClip(max_norm=lambda step: min(1.0, 0.1 + step * 0.009))
    """

    honours_skip = True  # no state
    sparse_gradients = True

    def __init__(
        self,
        max_norm: Schedule = 1.0,
        norm_type: float = 2.0,
        *,
        scope: Scope = "global",
        foreach: bool | None = None,
    ) -> None:
        self.max_norm = check_schedule("max_norm", max_norm)
        self.norm_type = check_norm_type(norm_type)
        self.scope = check_choice("scope", scope, ("global", "group", "tensor"))
        self.foreach = check_foreach(foreach)
        self.single_factor = self.scope == "global"
        self.group_keys = ("clipopt_max_norm",) if self.scope == "group" else ()

    def measure(self, inputs: ClipInputs) -> Measurement:
        """Return the total ``norm_type``-norm (and per-tensor norms for other scopes)."""
        if self.scope == "global":
            return Measurement(total_norm_of(inputs, self.norm_type, self.foreach))
        per = per_tensor_norms(inputs, self.norm_type, self.foreach)
        return Measurement(per.total, per)

    def clip(
        self, inputs: ClipInputs, measured: Measurement, skip: Tensor | None = None
    ) -> ClipResult:
        """Scale by ``min(1, max_norm / (norm + 1e-6))``, per scope."""
        max_norm = self.max_norm
        if callable(max_norm):
            max_norm = threshold_at("max_norm", max_norm, inputs.step)
        norm = measured.norm
        if self.scope == "global":
            if math.isinf(max_norm):
                coef = torch.ones_like(norm)
                return ClipResult(max_norm, coef, coef < 1.0)
            coef = F.clip_coef(norm, max_norm)
            return ClipResult(max_norm, coef, coef < 1.0, (Scale(coef),))
        threshold = torch.full_like(norm, max_norm)
        per: PerTensorNorms = measured.parts
        if self.scope == "tensor":
            coefs = below(per.norms, max_norm)
            # Under a process group the statistics come from every parameter position,
            # so they are the same on every rank whatever gradients it holds.
            seen = per.norms if per.everywhere is None else per.everywhere
            seen_coefs = coefs if per.everywhere is None else below(seen, max_norm)
            post = torch.linalg.vector_norm(seen * seen_coefs, self.norm_type)
            clipped = (seen_coefs < 1.0).any()
        else:
            coefs, post, clipped = self._by_group(inputs, per, max_norm)
        total_coef = torch.where(norm > 0, post / norm, torch.ones_like(norm))
        return ClipResult(threshold, total_coef, clipped, (ScaleEach(coefs),))

    def _by_group(
        self, inputs: ClipInputs, per: PerTensorNorms, max_norm: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-gradient factors of the group scope, the post-clip norm, and clipped."""
        parts = per.norms.unbind()
        per_tensor: list[Tensor] = list(parts)
        members = group_members(inputs)
        spans = None if per.everywhere is None else group_spans(inputs)
        groups = members if spans is None else range(len(spans) - 1)
        group_post, group_coefs = [], []
        for group in groups:
            if spans is None:
                held = torch.stack([parts[i] for i in members[group]])
            elif spans[group] == spans[group + 1]:
                continue  # a parameter group without parameters
            else:  # all the group's positions, also those other ranks hold
                assert per.everywhere is not None
                held = per.everywhere[spans[group] : spans[group + 1]]
            limit = group_threshold(inputs, group, "max_norm", max_norm)
            group_norm = torch.linalg.vector_norm(held, self.norm_type)
            group_coef = below(group_norm, limit)
            for i in members.get(group, ()):
                per_tensor[i] = group_coef
            group_post.append(group_norm * group_coef)
            group_coefs.append(group_coef)
        post = torch.linalg.vector_norm(torch.stack(group_post), self.norm_type)
        return torch.stack(per_tensor), post, (torch.stack(group_coefs) < 1.0).any()
