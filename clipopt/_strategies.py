"""The built-in fixed-threshold strategies: ``"value"`` and ``"norm"``."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import functional as F
from ._base import ClipInputs, ClipResult, ClipStrategy
from ._registry import register_strategy
from ._validation import check_foreach, check_norm_type, check_threshold

__all__ = ["NormClip", "ValueClip"]


@register_strategy("norm")
class NormClip(ClipStrategy):
    r"""Scale all gradients by one factor so that their total norm is at most ``max_norm``.

    .. math::

        g \leftarrow g \cdot \min\left(1, \frac{\text{max\_norm}}{\lVert g \rVert_p
        + 10^{-6}}\right)

    with the norm taken over all gradients as one vector. Bit-identical to
    ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, foreach=foreach)``.

    Args:
        max_norm: Largest total norm allowed, > 0; ``math.inf`` never clips. The default,
            1.0, is the common choice for transformers (Hugging Face ``max_grad_norm``,
            most LLM recipes); tune it with an Optuna study for anything else.
        norm_type: p of the p-norm: any p > 0, or ``math.inf`` for the largest absolute
            entry.
        foreach: ``None`` uses the foreach kernels where the device supports them.

    Raises:
        TypeError: A parameter has the wrong type.
        ValueError: ``max_norm`` or ``norm_type`` is NaN or <= 0.

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
    """

    def __init__(
        self,
        max_norm: float = 1.0,
        norm_type: float = 2.0,
        *,
        foreach: bool | None = None,
    ) -> None:
        self.max_norm = check_threshold("max_norm", max_norm)
        self.norm_type = check_norm_type(norm_type)
        self.foreach = check_foreach(foreach)

    def measure(self, inputs: ClipInputs) -> Tensor:
        """Return the total ``norm_type``-norm of the gradients."""
        return F.total_norm(inputs.grads, self.norm_type, foreach=self.foreach)

    def clip_(self, inputs: ClipInputs, norm: Tensor) -> ClipResult:
        """Scale the gradients by ``min(1, max_norm / (norm + 1e-6))``."""
        if math.isinf(self.max_norm):
            # "never clip": no pass over the gradients, and no inf / inf = NaN.
            coef = torch.ones_like(norm)
        else:
            coef = F.clip_coef(norm, self.max_norm)
            F.scale_(inputs.grads, coef, foreach=self.foreach)
        threshold = torch.full_like(norm, self.max_norm)
        return ClipResult(threshold, coef, coef < 1.0)


@register_strategy("value")
class ValueClip(ClipStrategy):
    r"""Clamp every gradient entry to ``[-clip_value, clip_value]``.

    .. math::

        g_i \leftarrow \max(-c, \min(c, g_i))

    Bit-identical to ``torch.nn.utils.clip_grad_value_(params, clip_value,
    foreach=foreach)``. Clamping changes the gradient's direction; prefer ``"norm"``
    unless a few entries are known to spike. The statistic reported as ``norm`` is the
    largest absolute entry (the inf-norm), and ``coef`` is the factor applied to that
    entry.

    Args:
        clip_value: Largest absolute entry allowed, > 0; ``math.inf`` never clips.
        foreach: ``None`` uses the foreach kernels where the device supports them.

    Raises:
        TypeError: A parameter has the wrong type.
        ValueError: ``clip_value`` is NaN or <= 0.

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

    def __init__(self, clip_value: float, *, foreach: bool | None = None) -> None:
        self.clip_value = check_threshold("clip_value", clip_value)
        self.foreach = check_foreach(foreach)

    def measure(self, inputs: ClipInputs) -> Tensor:
        """Return the largest absolute gradient entry."""
        return F.total_norm(inputs.grads, math.inf, foreach=self.foreach)

    def clip_(self, inputs: ClipInputs, norm: Tensor) -> ClipResult:
        """Clamp the gradients to ``[-clip_value, clip_value]``."""
        threshold = torch.full_like(norm, self.clip_value)
        if math.isinf(self.clip_value):
            return ClipResult(threshold, torch.ones_like(norm), torch.zeros_like(norm) > 0)
        F.clamp_(inputs.grads, self.clip_value, foreach=self.foreach)
        coef = torch.clamp(self.clip_value / norm, max=1.0)
        return ClipResult(threshold, coef, norm > self.clip_value)
