"""``"zscore"`` (ZClip): clip gradient-norm spikes found by a z-score against EMAs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from .. import functional as F
from .._protocol import ClipInputs, ClipResult, Measurement, Scale
from .._registry import register_strategy
from .._validation import (
    Schedule,
    check_bool,
    check_choice,
    check_foreach,
    check_int,
    check_range,
    check_schedule,
    check_threshold,
    threshold_at,
)
from ._common import TensorState, check_shape, recordable, state_dtype, total_norm_of

__all__ = ["ZScoreClip"]


@register_strategy("zscore", aliases=("zclip",))
class ZScoreClip(TensorState):
    r"""ZClip: clip gradient-norm spikes detected by a z-score against EMA statistics.

    After ``warmup_steps`` norms initialise the mean :math:`\mu` and variance
    :math:`\sigma^2`, each step computes :math:`z = (n - \mu)/(\sigma + \epsilon)`. A
    spike (:math:`z > z_{thresh}`) is clipped to

    - ``clip_option="adaptive_scaling"``:
      :math:`(\mu + z_{thresh}^2\,\sigma / z)\cdot\text{clip\_factor}`, which clips
      larger outliers harder;
    - ``clip_option="mean"``: :math:`\mu`.

    With ``mode="percentile"`` the threshold is :math:`\mu + z_{thresh}\sigma` and every
    norm above it is clipped to it. The EMAs then take the clipped norm on a spike
    (nothing with ``skip_update_on_spike``) and the norm otherwise:
    :math:`\mu \leftarrow \alpha\mu + (1-\alpha)x`,
    :math:`\sigma^2 \leftarrow \alpha\sigma^2 + (1-\alpha)(x - \mu)^2` with the updated
    :math:`\mu`.

    This reproduces ``zclip`` 1.0.0 step for step. Where its code and paper differ, the
    code is followed: ``clip_factor`` multiplies the whole adaptive threshold (the
    docstring says only :math:`z_{thresh}\sigma`), it is not applied with ``"mean"`` or in
    percentile mode, and the variance uses the updated mean. One deliberate difference:
    ``max_norm`` defaults to None here (zclip: 1.0), so the strategy is purely adaptive
    unless a cap is asked for; with a cap, warmup steps are clipped to it and later
    thresholds are capped by it. Non-finite and zero norms are not recorded.

    Args:
        alpha: EMA smoothing factor in (0, 1).
        z_thresh: z-score above which a norm is a spike, > 0.
        warmup_steps: Norms collected before the EMAs start, >= 1.
        max_norm: Optional cap (a number or a schedule), or None.
        clip_option: ``"adaptive_scaling"`` or ``"mean"`` (zscore mode).
        mode: ``"zscore"`` or ``"percentile"``.
        clip_factor: Multiplier of the adaptive threshold, > 0.
        skip_update_on_spike: Leave the EMAs unchanged on spikes.
        eps: Added to :math:`\sigma` in the z-score, > 0.
        foreach: ``None`` uses the foreach kernels where the device supports them.

    References:
        Kumar, Owen, Ashkboos, Hoefler, "ZClip: Adaptive Spike Mitigation for LLM
        Pre-Training", arXiv:2504.02507, 2025.

    Example:
        >>> import clipopt
        >>> clipopt.get_strategy("zscore", z_thresh=3.0, max_norm=1.0).z_thresh
        3.0
    """

    single_factor = True

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        *,
        max_norm: Schedule | None = None,
        clip_option: Literal["adaptive_scaling", "mean"] = "adaptive_scaling",
        mode: Literal["zscore", "percentile"] = "zscore",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
        eps: float = 1e-6,
        foreach: bool | None = None,
    ) -> None:
        self.alpha = check_range("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
        self.z_thresh = check_threshold("z_thresh", z_thresh, allow_inf=False)
        self.warmup_steps = check_int("warmup_steps", warmup_steps, minimum=1)
        self.max_norm = None if max_norm is None else check_schedule("max_norm", max_norm)
        self.clip_option = check_choice(
            "clip_option", clip_option, ("adaptive_scaling", "mean")
        )
        self.mode = check_choice("mode", mode, ("zscore", "percentile"))
        self.clip_factor = check_threshold("clip_factor", clip_factor, allow_inf=False)
        self.skip_update_on_spike = check_bool("skip_update_on_spike", skip_update_on_spike)
        self.eps = check_threshold("eps", eps, allow_inf=False)
        self.foreach = check_foreach(foreach)

    def _fresh_state(self, norm: Tensor, num_params: int) -> dict[str, Tensor]:
        dtype = state_dtype(norm)
        return {
            "buffer": torch.zeros(self.warmup_steps, dtype=dtype, device=norm.device),
            "count": torch.zeros((), dtype=torch.int64, device=norm.device),
            "mean": torch.zeros((), dtype=dtype, device=norm.device),
            "var": torch.zeros((), dtype=dtype, device=norm.device),
        }

    def _check_state(self, state: Mapping[str, Tensor]) -> None:
        check_shape("ZScoreClip", "buffer", state["buffer"], (self.warmup_steps,))
        for key in ("count", "mean", "var"):
            check_shape("ZScoreClip", key, state[key], ())

    def measure(self, inputs: ClipInputs) -> Measurement:
        """Return the total L2 norm of the gradients."""
        return Measurement(total_norm_of(inputs, 2.0, self.foreach))

    def clip(
        self, inputs: ClipInputs, measured: Measurement, skip: Tensor | None = None
    ) -> ClipResult:
        """Detect a spike against the EMAs, update them, and return the factor."""
        norm = measured.norm
        state = self._state_on(norm)
        buffer, count, mean, var = (
            state["buffer"],
            state["count"],
            state["mean"],
            state["var"],
        )
        cap = (
            math.inf
            if self.max_norm is None
            else threshold_at("max_norm", self.max_norm, inputs.step)
        )
        usable = recordable(norm, skip)
        n = norm.to(mean.dtype)
        warming = count < self.warmup_steps

        # Warmup: collect the norm; the last warmup step initialises the EMAs.
        slots = torch.arange(self.warmup_steps, device=norm.device)
        write = (slots == count) & usable & warming
        new_buffer = torch.where(write, n, buffer)
        new_count = count + usable.to(count.dtype)
        initialising = warming & usable & (new_count == self.warmup_steps)
        buffer_mean = new_buffer.mean()
        buffer_var = (new_buffer - buffer_mean).square().mean()

        # After warmup: z-score against the EMAs.
        std = var.sqrt()
        if self.mode == "zscore":
            z = (n - mean) / (std + self.eps)
            spike = z > self.z_thresh
            if self.clip_option == "adaptive_scaling":
                adaptive = (
                    mean + (self.z_thresh * std) / (z / self.z_thresh)
                ) * self.clip_factor
            else:
                adaptive = mean
            level = mean + self.z_thresh * (std + self.eps)
        else:
            adaptive = mean + self.z_thresh * std
            spike = n > adaptive
            level = adaptive
        effective = torch.where(spike, adaptive, n).clamp(max=cap)
        coef_after = torch.where(n > effective, effective / (n + 1e-6), torch.ones_like(n))
        coef_warmup = torch.ones_like(n) if math.isinf(cap) else F.clip_coef(n, cap)
        coef = torch.where(warming, coef_warmup, coef_after).to(norm.dtype)

        x = torch.where(spike, adaptive, n)
        ema_mean = self.alpha * mean + (1 - self.alpha) * x
        ema_var = self.alpha * var + (1 - self.alpha) * (x - ema_mean).square()
        update = usable & torch.logical_not(warming)
        if self.skip_update_on_spike:
            update = update & torch.logical_not(spike)
        state["buffer"], state["count"] = new_buffer, new_count
        state["mean"] = torch.where(
            initialising, buffer_mean, torch.where(update, ema_mean, mean)
        )
        state["var"] = torch.where(
            initialising, buffer_var, torch.where(update, ema_var, var)
        )
        threshold = torch.where(
            warming,
            torch.full_like(n, cap),
            torch.where(spike, effective, level.clamp(max=cap)),
        ).to(norm.dtype)
        return ClipResult(threshold, coef, coef < 1.0, (Scale(coef),))
