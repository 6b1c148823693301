"""``"adagc"``: clip each tensor relative to an EMA of its own clipped norms."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .. import _distributed as D
from .. import functional as F
from .._protocol import ClipInputs, ClipResult, Measurement, ScaleEach
from .._registry import register_strategy
from .._validation import (
    Schedule,
    check_foreach,
    check_int,
    check_range,
    check_schedule,
    check_threshold,
    threshold_at,
)
from ._common import (
    PerTensorNorms,
    TensorState,
    check_shape,
    per_tensor_norms,
    recordable,
    state_dtype,
)

__all__ = ["AdaGC"]


@register_strategy("adagc")
class AdaGC(TensorState):
    r"""AdaGC: clip each tensor relative to an EMA of its own clipped norms.

    For tensor :math:`i` with gradient norm :math:`m_i` and EMA :math:`\gamma_i`:

    .. math::

        g_i \leftarrow g_i \cdot \frac{\lambda_{rel}\gamma_i}{m_i + \epsilon}
        \ \text{if}\ m_i > \lambda_{rel}\gamma_i, \qquad
        \gamma_i \leftarrow \beta\gamma_i + (1-\beta)\min(m_i, \lambda_{rel}\gamma_i)

    During the first ``warmup_steps`` steps the gradients are clipped globally to
    ``max_norm`` instead, and :math:`\gamma_i` is the running minimum of each tensor's
    (globally clipped) norm. A tensor seen for the first time after warmup starts with
    :math:`\gamma_i = m_i`. These are the semantics of the official reference (AdaGC's
    Megatron patch), golden values included. Per-tensor state is keyed by the
    parameter's position in the optimizer, so parameters may gain and lose gradients
    between steps. Non-finite and zero norms are not recorded.

    OLMo's adaptive clipping is the same rule without the warmup stage; use
    ``warmup_steps=0`` for it (and ``beta = max(beta1, beta2)`` of the optimizer, as OLMo
    does).

    Args:
        clip_ratio: :math:`\lambda_{rel}`, > 0 (reference: 1.04; pytorch_optimizer 1.05).
        beta: EMA factor in [0, 1) (reference: 0.99; pytorch_optimizer 0.98).
        warmup_steps: Steps of global clipping first, >= 0 (reference: 100).
        max_norm: :math:`\lambda_{abs}`, the global threshold during warmup (a number or a
            schedule).
        eps: Added to the norm when dividing, > 0.
        foreach: ``None`` uses the foreach kernels where the device supports them.

    References:
        Wang et al., "AdaGC: Improving Training Stability for Large Language Model
        Pretraining", arXiv:2502.11034, 2025. Groeneveld et al., "OLMo", 2024.

    Example:
        >>> import clipopt
        >>> clipopt.AdaGC(warmup_steps=10).hyperparameters()["clip_ratio"]
        1.04
    """

    def __init__(
        self,
        clip_ratio: float = 1.04,
        beta: float = 0.99,
        warmup_steps: int = 100,
        *,
        max_norm: Schedule = 1.0,
        eps: float = 1e-6,
        foreach: bool | None = None,
    ) -> None:
        self.clip_ratio = check_threshold("clip_ratio", clip_ratio, allow_inf=False)
        self.beta = check_range("beta", beta, 0.0, 1.0, high_open=True)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=0)
        self.max_norm = check_schedule("max_norm", max_norm)
        self.eps = check_threshold("eps", eps, allow_inf=False)
        self.foreach = check_foreach(foreach)

    def _fresh_state(self, norm: Tensor, num_params: int) -> dict[str, Tensor]:
        return {
            "gamma": torch.zeros(num_params, dtype=state_dtype(norm), device=norm.device),
            "initialized": torch.zeros(num_params, dtype=torch.bool, device=norm.device),
            "steps": torch.zeros((), dtype=torch.int64, device=norm.device),
        }

    def _check_state(self, state: Mapping[str, Tensor]) -> None:
        gamma = state["gamma"]
        if gamma.dim() != 1:
            raise ValueError(
                f"AdaGC state['gamma'] must be 1-D, got shape {tuple(gamma.shape)}"
            )
        check_shape("AdaGC", "initialized", state["initialized"], tuple(gamma.shape))
        check_shape("AdaGC", "steps", state["steps"], ())

    def _grown(self, norm: Tensor, num_params: int) -> dict[str, Tensor]:
        state = self._state_on(norm, num_params)
        missing = num_params - state["gamma"].numel()
        if missing > 0:  # parameter groups were added
            state["gamma"] = torch.cat([state["gamma"], state["gamma"].new_zeros(missing)])
            state["initialized"] = torch.cat(
                [state["initialized"], state["initialized"].new_zeros(missing)]
            )
        return state

    def measure(self, inputs: ClipInputs) -> Measurement:
        """Return the total L2 norm of the gradients (and their per-tensor norms)."""
        per = per_tensor_norms(inputs, 2.0, self.foreach)
        return Measurement(per.total, per)

    def clip(
        self, inputs: ClipInputs, measured: Measurement, skip: Tensor | None = None
    ) -> ClipResult:
        """Clip globally during warmup, then each tensor against its EMA."""
        per: PerTensorNorms = measured.parts
        norm = measured.norm
        state = self._grown(norm, max(inputs.num_params, max(inputs.indices) + 1))
        gamma, initialized, steps = state["gamma"], state["initialized"], state["steps"]
        record = recordable(norm, skip)
        new_steps = steps + record.to(steps.dtype)
        warming = new_steps <= self.warmup_steps
        cap = threshold_at("max_norm", self.max_norm, inputs.step)
        m = per.norms.to(gamma.dtype)
        n = norm.to(gamma.dtype)
        old = D.from_positions(gamma, inputs.indices)
        known = D.from_positions(initialized, inputs.indices)

        # Warmup: global clipping; gamma is the running minimum of the clipped norms.
        ratio = cap / (n + self.eps)
        global_coef = torch.where(ratio < 1, ratio, torch.ones_like(ratio))
        clipped_norms = m * global_coef
        gamma_warm = torch.where(known, torch.minimum(old, clipped_norms), clipped_norms)

        # After warmup: each tensor against ratio * gamma.
        base = torch.where(known, old, m)
        limit = self.clip_ratio * base
        over = m > limit
        tensor_coef = torch.where(over, limit / (m + self.eps), torch.ones_like(m))
        gamma_after = self.beta * base + (1 - self.beta) * torch.where(over, limit, m)

        coefs = torch.where(warming, global_coef.expand_as(m), tensor_coef)
        take = record & F.finite(m) & (m > 0)
        new_gamma = torch.where(take, torch.where(warming, gamma_warm, gamma_after), old)
        state["gamma"] = D.place(gamma, new_gamma, inputs.indices)
        state["initialized"] = D.place(initialized, known | take, inputs.indices)
        state["steps"] = new_steps
        post = torch.linalg.vector_norm(m * coefs)
        total_coef = torch.where(n > 0, post / n, torch.ones_like(n)).to(norm.dtype)
        threshold = torch.where(
            warming, torch.full_like(n, cap), torch.linalg.vector_norm(limit)
        ).to(norm.dtype)
        factors = ScaleEach(coefs.to(norm.dtype))
        return ClipResult(threshold, total_coef, (coefs < 1).any(), (factors,))
