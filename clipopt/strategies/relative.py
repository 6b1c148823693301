"""``"relative"``, the default: clip the total norm to a fraction of its own running level.

No threshold to pick: the level is the run's own gradient norm, so the rule behaves the
same whether a model's natural norm is 1e-3 or 1e3. Chosen on the stability benchmark
(``benchmarks/stability/``, ``docs/strategies/which.md``): no divergence there, within
+2 % of a grid-tuned ``clip_grad_norm_`` on seven of nine tasks; where it falls behind
is written down on that page.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .._protocol import ClipInputs, ClipResult, Measurement, Scale
from .._registry import register_strategy
from .._validation import check_foreach, check_int, check_range, check_threshold
from ._common import TensorState, check_shape, recordable, state_dtype, total_norm_of

__all__ = ["RelativeClip"]


@register_strategy("relative", aliases=("default", "auto"))
class RelativeClip(TensorState):
    r"""Clip the total norm to ``ratio`` times a running reference of the norm itself.

    With :math:`m_t` the total L2 norm at step :math:`t` and :math:`t` counting the steps
    whose norm was recorded (finite, > 0, not skipped):

    .. math::

        \gamma_0 &= m_0 \quad\text{(the first recorded norm seeds the reference)} \\
        \tau_t &= \rho\,\gamma_t \min\left(1, \tfrac{t+1}{R}\right), \qquad
        g \leftarrow g \cdot \min\left(1, \tau_t / m_t\right) \\
        x_t &= \min(m_t, K\gamma_t), \qquad
        \gamma_{t+1} = \gamma_t + (1-\beta)(x_t - \gamma_t),
        \quad \beta = \beta_\downarrow \text{ if } x_t < \gamma_t
        \text{ else } \beta_\uparrow

    Why each part (the evidence is in ``docs/strategies/which.md``):

    * The reference :math:`\gamma` follows the run's own *unclipped* norm, capped at
      :math:`K\gamma`, so no scale is assumed (multiplying the loss by any constant
      multiplies every threshold by it) and a ratio below one is usable: a reference fed
      the clipped norm (AdaGC) shrinks to zero when the ratio is below one.
    * The cap bounds how fast the reference can grow, by at most
      :math:`(K-1)(1-\beta_\uparrow)` per step (1% with the defaults), so an explosion
      cannot drag its own threshold up; it can fall faster (:math:`\beta_\downarrow`),
      following a norm that decays as training converges.
    * The first :math:`R` steps pass a growing fraction of the threshold: a warm-up of
      clipping that protects from step 0 with no history, the steps where Adam at a high
      learning rate and recurrent networks under SGD blow up.
    * A ratio below one clips most steps to a smoothed norm: the update direction is
      the gradient's, its length a running average's, which removes spikes of every
      size without a z-score's warm-up.

    State: three scalars (``gamma``, ``seen``, ``count``), fixed size. Sync-free. Under a
    process group the total norm is global, so every rank keeps the same state.

    Args:
        ratio: :math:`\rho`, the threshold as a multiple of the reference, > 0.
        beta_up: :math:`\beta_\uparrow`, EMA factor when the norm is above the
            reference, in [0, 1).
        beta_down: :math:`\beta_\downarrow`, EMA factor when it is below, in [0, 1).
        cap: :math:`K`, the most the reference sees as a multiple of itself, >= 1.
        ramp: :math:`R`, steps of clipping warm-up, >= 0 (0: none).
        foreach: ``None`` uses the foreach kernels where the device supports them.

    Example:
        >>> import clipopt
        >>> clipopt.get_strategy("default").hyperparameters()["ratio"]
        0.4
    """

    single_factor = True
    clips_most_steps = True  # ratio < 1: the threshold sits below the typical norm

    def __init__(
        self,
        ratio: float = 0.4,
        beta_up: float = 0.99,
        beta_down: float = 0.98,
        *,
        cap: float = 2.0,
        ramp: int = 20,
        foreach: bool | None = None,
    ) -> None:
        self.ratio = check_threshold("ratio", ratio, allow_inf=False)
        self.beta_up = check_range("beta_up", beta_up, 0.0, 1.0, high_open=True)
        self.beta_down = check_range("beta_down", beta_down, 0.0, 1.0, high_open=True)
        self.cap = check_threshold("cap", cap, allow_inf=False)
        if self.cap < 1.0:
            raise ValueError(
                f"cap must be >= 1, got {cap!r}: a reference that sees less than itself "
                "shrinks to zero; use cap=1 to feed it the norm capped at its own level"
            )
        self.ramp = check_int("ramp", ramp, minimum=0)
        # Above the reference, clipping every step is no longer the design: let
        # monitoring warn about it as for any other strategy.
        self.clips_most_steps = self.ratio < 1.0
        self.foreach = check_foreach(foreach)

    def _fresh_state(self, norm: Tensor, num_params: int) -> dict[str, Tensor]:
        return {
            "gamma": torch.zeros((), dtype=state_dtype(norm), device=norm.device),
            "seen": torch.zeros((), dtype=torch.bool, device=norm.device),
            "count": torch.zeros((), dtype=torch.int64, device=norm.device),
        }

    def _check_state(self, state: Mapping[str, Tensor]) -> None:
        for key in ("gamma", "seen", "count"):
            check_shape("RelativeClip", key, state[key], ())

    def measure(self, inputs: ClipInputs) -> Measurement:
        """Return the total L2 norm of the gradients."""
        return Measurement(total_norm_of(inputs, 2.0, self.foreach))

    def clip(
        self, inputs: ClipInputs, measured: Measurement, skip: Tensor | None = None
    ) -> ClipResult:
        """Clip to ``ratio`` times the reference, then move the reference."""
        norm = measured.norm
        state = self._state_on(norm)
        gamma, seen, count = state["gamma"], state["seen"], state["count"]
        record = recordable(norm, skip)
        m = norm.to(gamma.dtype)
        reference = torch.where(seen, gamma, m)  # the first recorded norm seeds it
        threshold = self.ratio * reference
        if self.ramp:
            warm = ((count + 1).to(gamma.dtype) / self.ramp).clamp(max=1.0)
            threshold = threshold * warm
        over = m > threshold
        # Exactly threshold / m: no epsilon, so the rule is scale-free at any norm.
        coef = torch.where(over, threshold / m, torch.ones_like(m))
        x = torch.minimum(m, self.cap * reference)
        beta = torch.where(x < reference, self.beta_down, self.beta_up)
        moved = reference + (1 - beta) * (x - reference)
        state["gamma"] = torch.where(record, torch.where(seen, moved, m), gamma)
        state["seen"] = seen | record
        state["count"] = count + record.to(count.dtype)
        coef = coef.to(norm.dtype)
        return ClipResult(threshold.to(norm.dtype), coef, over, (Scale(coef),))
