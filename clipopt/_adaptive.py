"""Adaptive strategies: percentile (AutoClip), z-score (ZClip), AdaGC, AGC, and Chain.

Every one of them keeps its state in fixed-size tensors on the gradients' device and
updates it with ``torch.where`` instead of Python branches, so ``clip_`` never reads the
device. A statistic that is not finite, or zero (the all-zero step that
``torch.distributed.checkpoint`` issues to initialise optimizer state), never enters the
state.
"""

from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from . import functional as F
from ._base import ClipInputs, ClipResult, ClipStrategy
from ._registry import get_strategy, register_strategy
from ._strategies import NormClip, ValueClip, _PerTensorNorms, _total_norm
from ._validation import (
    Schedule,
    check_bool,
    check_choice,
    check_foreach,
    check_int,
    check_norm_type,
    check_range,
    check_schedule,
    check_threshold,
    threshold_at,
)

__all__ = ["AGC", "AdaGC", "Chain", "PercentileClip", "ZScoreClip"]


def _state_dtype(norm: Tensor) -> torch.dtype:
    return torch.promote_types(norm.dtype, torch.float32)


def _usable(norm: Tensor) -> Tensor:
    """Whether a statistic may enter the state: finite and > 0."""
    return F.finite(norm) & (norm > 0)


class _Stateful(ClipStrategy):
    """Lazily created tensor state, moved to the gradients' device, checked on load."""

    _state: dict[str, Tensor] | None = None

    def exact_norms(self) -> bool:
        """False: adaptive thresholds need accurate norms, not torch's exact bits."""
        return False

    def _fresh_state(self, norm: Tensor, num_params: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def _check_state(self, state: Mapping[str, Tensor]) -> None:
        """Raise ValueError if ``state`` (keys already checked) does not fit."""

    def _state_on(self, norm: Tensor, num_params: int = 0) -> dict[str, Tensor]:
        if self._state is None:
            self._state = self._fresh_state(norm, num_params)
        elif next(iter(self._state.values())).device != norm.device:
            self._state = {k: v.to(norm.device) for k, v in self._state.items()}
        return self._state

    def state_dict(self) -> dict[str, Any]:
        """Return copies of the state tensors (empty before the first step)."""
        if self._state is None:
            return {}
        return {k: v.detach().clone() for k, v in self._state.items()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict`; ``{}`` resets.

        Raises:
            ValueError: Keys, shapes or types do not fit this strategy; nothing changes.
        """
        if not state_dict:
            self.reset()
            return
        expected = set(self._fresh_state(torch.zeros(()), 1))
        if set(state_dict) != expected:
            raise ValueError(
                f"{type(self).__name__} state needs keys {sorted(expected)}, "
                f"got {sorted(state_dict)}"
            )
        for key, value in state_dict.items():
            if not isinstance(value, Tensor):
                raise ValueError(
                    f"{type(self).__name__} state[{key!r}] must be a tensor, "
                    f"got {type(value).__name__}"
                )
        self._check_state(state_dict)
        self._state = {k: v.detach().clone() for k, v in state_dict.items()}

    def reset(self) -> None:
        """Forget all state."""
        self._state = None

    def _slots(self, size: int, device: torch.device) -> Tensor:
        cached = getattr(self, "_cache_slots", None)
        if cached is None or cached.device != device or cached.numel() != size:
            cached = torch.arange(size, device=device)
            self._cache_slots = cached
        return cached


def _check_shape(owner: str, key: str, value: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(value.shape) != shape:
        raise ValueError(
            f"{owner} state[{key!r}] has shape {tuple(value.shape)}, expected {shape}"
        )


@register_strategy("percentile")
class PercentileClip(_Stateful):
    r"""AutoClip: clip to a percentile of the recent gradient norms.

    .. math::

        \eta_t = \operatorname{percentile}_p\left(\lVert g_{t-w+1}\rVert, \dots,
        \lVert g_t \rVert\right), \qquad
        g \leftarrow g \cdot \min\left(1, \frac{\eta_t}{\lVert g_t \rVert + 10^{-6}}\right)

    The history is a fixed-size ring buffer of the last ``window`` pre-clip total norms,
    and the percentile interpolates linearly, as ``numpy.percentile``. While the history
    fits the window this is the paper's algorithm step for step. Non-finite and zero
    norms are not recorded.

    Args:
        percentile: p in ``[0, 100]``. The paper's recommendation is 10: about 90% of
            the steps are clipped, which stabilises training like a smaller LR on spikes.
        window: Number of recent norms kept (the paper keeps all of them).
        include_current: Whether this step's norm is in the history the percentile is
            taken over, as in the paper (True). False follows the ``autoclip`` package:
            the threshold comes from past steps only, and the first step is not clipped.
        norm_type: p of the norm.
        foreach: ``None`` uses the foreach kernels where the device supports them.

    References:
        Seetharaman, Wichern, Pardo, Le Roux, "AutoClip: Adaptive Gradient Clipping for
        Source Separation Networks", MLSP 2020.

    Example:
        >>> import torch, clipopt
        >>> strategy = clipopt.PercentileClip(percentile=10, window=1000)
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> opt = clipopt.ClippedOptimizer(torch.optim.SGD([p], lr=1.0), strategy)
        >>> for norm in [1.0, 2.0, 0.5, 4.0]:
        ...     p.grad = torch.tensor([norm])
        ...     opt.step()
        >>> round(float(opt.last_stats.threshold), 4)  # np.percentile([1, 2, .5, 4], 10)
        0.65
    """

    def __init__(
        self,
        percentile: float = 10.0,
        window: int = 1000,
        *,
        include_current: bool = True,
        norm_type: float = 2.0,
        foreach: bool | None = None,
    ) -> None:
        self.percentile = check_range("percentile", percentile, 0.0, 100.0)
        self.window = check_int("window", window, minimum=1)
        self.include_current = check_bool("include_current", include_current)
        self.norm_type = check_norm_type(norm_type)
        self.foreach = check_foreach(foreach)

    def _fresh_state(self, norm: Tensor, num_params: int) -> dict[str, Tensor]:
        return {
            "history": torch.full(
                (self.window,), math.nan, dtype=_state_dtype(norm), device=norm.device
            ),
            "count": torch.zeros((), dtype=torch.int64, device=norm.device),
        }

    def _check_state(self, state: Mapping[str, Tensor]) -> None:
        _check_shape("PercentileClip", "history", state["history"], (self.window,))
        _check_shape("PercentileClip", "count", state["count"], ())

    def measure(self, inputs: ClipInputs) -> Tensor:
        """Return the total ``norm_type``-norm of the gradients."""
        return _total_norm(inputs, self.norm_type, self.foreach)

    def supports_coefficient(self) -> bool:
        """True: one factor for all gradients."""
        return True

    def reset(self) -> None:
        """Forget all state."""
        super().reset()
        self._cache_sorted: Tensor | None = None

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict`; ``{}`` resets."""
        super().load_state_dict(state_dict)
        self._cache_sorted = None

    def _sorted(self, history: Tensor) -> Tensor:
        """The window in ascending order, empty slots (NaN in history) last as inf.

        Kept up to date by insertion and eviction; sorted from scratch only after a
        load, a reset or a device move.
        """
        cached = getattr(self, "_cache_sorted", None)
        if cached is None or cached.device != history.device:
            cached = torch.sort(history.nan_to_num(nan=math.inf)).values
        return cached

    def clip_coefficient(self, inputs: ClipInputs, norm: Tensor) -> ClipResult:
        """Record the norm and return the factor that clips to the percentile."""
        state = self._state_on(norm)
        if F.is_host_readable(norm):
            return self._clip_coefficient_on_host(state, norm)
        history, count = state["history"], state["count"]
        ordered = self._sorted(history)
        usable = _usable(norm)
        n = norm.to(history.dtype)
        slots = self._slots(self.window, norm.device)
        slot = torch.remainder(count, self.window)
        evicted = history.gather(0, slot.reshape(1)).nan_to_num(nan=math.inf)
        inf = ordered.new_full((), math.inf)
        last = self.window - 1
        # Shifts by one rank as gathers: torch.cat has no kernel for fake CUDA tensors.
        left = ordered.gather(0, (slots + 1).clamp(max=last))
        # Evict the value the ring overwrites (an inf while the window fills) ... The rank
        # of a value in the sorted window is the count of smaller entries (searchsorted
        # would do, but has no kernel for the fake CUDA tensors of the sync-free tests).
        at = (ordered < evicted).sum()
        shrunk = torch.where(slots >= at, torch.where(slots == last, inf, left), ordered)
        # ... and insert the new norm at its rank: one elementwise pass each, no sort.
        at = (shrunk < n).sum()
        grown = torch.where(
            slots < at,
            shrunk,
            torch.where(slots == at, n, shrunk.gather(0, (slots - 1).clamp(min=0))),
        )
        new_ordered = torch.where(usable, grown, ordered)
        new_history = torch.where((slots == slot) & usable, n, history)
        new_count = count + usable.to(count.dtype)
        return self._result(
            state, norm, new_history, new_count, new_ordered, ordered, count
        )

    def _clip_coefficient_on_host(
        self, state: dict[str, Tensor], norm: Tensor
    ) -> ClipResult:
        """The same update for CPU tensors, whose values are free to read.

        Only the entries between the evicted and the inserted rank move (one slice copy),
        instead of several passes over the whole window.
        """
        history, count = state["history"], state["count"]
        ordered = self._sorted(history)
        previous = ordered.clone() if not self.include_current else ordered
        old_count = count  # count is replaced below, never changed in place
        if bool(_usable(norm)):
            n = norm.to(history.dtype)
            slot = int(count) % self.window
            evicted = float(history[slot].nan_to_num(nan=math.inf))
            at = int(torch.searchsorted(ordered, ordered.new_tensor(evicted)))
            to = int(torch.searchsorted(ordered, n))
            if to <= at:  # shift [to, at) one right
                ordered[to + 1 : at + 1] = ordered[to:at].clone()
                ordered[to] = n
            else:  # shift (at, to) one left
                ordered[at : to - 1] = ordered[at + 1 : to].clone()
                ordered[to - 1] = n
            history[slot] = n  # in place: state_dict() hands out copies
            count = count + 1
        return self._result(state, norm, history, count, ordered, previous, old_count)

    def _result(
        self,
        state: dict[str, Tensor],
        norm: Tensor,
        history: Tensor,
        count: Tensor,
        ordered: Tensor,
        ordered_before: Tensor,
        count_before: Tensor,
    ) -> ClipResult:
        """Store the updated window; clip to its percentile (or the previous one's)."""
        if self.include_current:
            window, valid = ordered, count
        else:
            window, valid = ordered_before, count_before
        threshold = F.percentile_sorted(
            window, valid.clamp(max=self.window), self.percentile
        ).to(norm.dtype)
        state["history"], state["count"] = history, count
        self._cache_sorted = ordered
        coef = F.clip_coef(norm, threshold)
        return ClipResult(threshold, coef, norm > threshold)

    def clip_(self, inputs: ClipInputs, norm: Tensor) -> ClipResult:
        """Record the norm, then clip to the percentile of the history."""
        result = self.clip_coefficient(inputs, norm)
        F.scale_(inputs.grads, result.coef, foreach=self.foreach)
        return result


@register_strategy("zscore")
class ZScoreClip(_Stateful):
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
        dtype = _state_dtype(norm)
        return {
            "buffer": torch.zeros(self.warmup_steps, dtype=dtype, device=norm.device),
            "count": torch.zeros((), dtype=torch.int64, device=norm.device),
            "mean": torch.zeros((), dtype=dtype, device=norm.device),
            "var": torch.zeros((), dtype=dtype, device=norm.device),
        }

    def _check_state(self, state: Mapping[str, Tensor]) -> None:
        _check_shape("ZScoreClip", "buffer", state["buffer"], (self.warmup_steps,))
        for key in ("count", "mean", "var"):
            _check_shape("ZScoreClip", key, state[key], ())

    def measure(self, inputs: ClipInputs) -> Tensor:
        """Return the total L2 norm of the gradients."""
        return _total_norm(inputs, 2.0, self.foreach)

    def supports_coefficient(self) -> bool:
        """True: one factor for all gradients."""
        return True

    def clip_(self, inputs: ClipInputs, norm: Tensor) -> ClipResult:
        """Detect a spike against the EMAs, clip it, and update the EMAs."""
        result = self.clip_coefficient(inputs, norm)
        F.scale_(inputs.grads, result.coef, foreach=self.foreach)
        return result

    def clip_coefficient(self, inputs: ClipInputs, norm: Tensor) -> ClipResult:
        """Detect a spike, update the EMAs, and return the clipping factor."""
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
        usable = _usable(norm)
        n = norm.to(mean.dtype)
        warming = count < self.warmup_steps

        # Warmup: collect the norm; the last warmup step initialises the EMAs.
        write = (self._slots(self.warmup_steps, norm.device) == count) & usable & warming
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
        return ClipResult(threshold, coef, coef < 1.0)


@register_strategy("adagc")
class AdaGC(_Stateful):
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
        self._norms = _PerTensorNorms()

    def _fresh_state(self, norm: Tensor, num_params: int) -> dict[str, Tensor]:
        return {
            "gamma": torch.zeros(num_params, dtype=_state_dtype(norm), device=norm.device),
            "initialized": torch.zeros(num_params, dtype=torch.bool, device=norm.device),
            "steps": torch.zeros((), dtype=torch.int64, device=norm.device),
        }

    def _check_state(self, state: Mapping[str, Tensor]) -> None:
        gamma = state["gamma"]
        if gamma.dim() != 1:
            raise ValueError(
                f"AdaGC state['gamma'] must be 1-D, got shape {tuple(gamma.shape)}"
            )
        _check_shape("AdaGC", "initialized", state["initialized"], tuple(gamma.shape))
        _check_shape("AdaGC", "steps", state["steps"], ())

    def _grown(self, norm: Tensor, num_params: int) -> dict[str, Tensor]:
        state = self._state_on(norm, num_params)
        missing = num_params - state["gamma"].numel()
        if missing > 0:  # parameter groups were added
            state["gamma"] = torch.cat([state["gamma"], state["gamma"].new_zeros(missing)])
            state["initialized"] = torch.cat(
                [state["initialized"], state["initialized"].new_zeros(missing)]
            )
        return state

    def _factor_views(self, factors: Tensor) -> list[Tensor]:
        """0-dim views of a kept buffer, filled with ``factors`` (host-readable path)."""
        cached = getattr(self, "_cache_factors", None)
        if (
            cached is None
            or cached[0].shape != factors.shape
            or cached[0].dtype != factors.dtype
        ):
            buffer = torch.empty_like(factors)
            cached = self._cache_factors = (buffer, list(buffer.unbind()))
        cached[0].copy_(factors)
        return cached[1]

    def measure(self, inputs: ClipInputs) -> Tensor:
        """Return the total L2 norm of the gradients (from per-tensor norms)."""
        self._norms.compute(inputs, 2.0, self.foreach)
        return self._norms.total()

    def clip_(self, inputs: ClipInputs, norm: Tensor) -> ClipResult:
        """Clip globally during warmup, then each tensor against its EMA."""
        norms = self._norms.take(inputs, 2.0, self.foreach)
        state = self._grown(norm, max(inputs.num_params, max(inputs.indices) + 1))
        gamma, initialized, steps = state["gamma"], state["initialized"], state["steps"]
        index = self._norms.positions(inputs, norm.device)
        usable = _usable(norm)
        new_steps = steps + usable.to(steps.dtype)
        warming = new_steps <= self.warmup_steps
        cap = threshold_at("max_norm", self.max_norm, inputs.step)
        m = norms.to(gamma.dtype)
        n = norm.to(gamma.dtype)

        # Warmup: global clipping; gamma is the running minimum of the clipped norms.
        ratio = cap / (n + self.eps)
        global_coef = torch.where(ratio < 1, ratio, torch.ones_like(ratio))
        clipped_norms = m * global_coef
        old = gamma.index_select(0, index)
        known = initialized.index_select(0, index)
        gamma_warm = torch.where(known, torch.minimum(old, clipped_norms), clipped_norms)

        # After warmup: each tensor against ratio * gamma.
        base = torch.where(known, old, m)
        limit = self.clip_ratio * base
        over = m > limit
        tensor_coef = torch.where(over, limit / (m + self.eps), torch.ones_like(m))
        gamma_after = self.beta * base + (1 - self.beta) * torch.where(over, limit, m)

        coefs = torch.where(warming, global_coef.expand_as(m), tensor_coef)
        factors = coefs.to(norm.dtype)
        if F.is_host_readable(factors):
            # On the CPU, reading which tensors clip is free: scale only those, in one
            # foreach call (unless told otherwise) by 0-dim views of a buffer kept
            # between steps: making thousands of views each step would cost more, and
            # Python floats are twice as slow in the CPU foreach loop.
            chosen = (factors < 1).nonzero().flatten().tolist()
            if chosen:
                views = _gather(self._factor_views(factors), chosen)
                grads = _gather(inputs.grads, chosen)
                if self.foreach is False:
                    for grad, view in zip(grads, views, strict=True):
                        grad.mul_(view)
                else:
                    torch._foreach_mul_(F._locals(grads), views)
        else:
            F.scale_each_(inputs.grads, factors.unbind(), foreach=self.foreach)
        take = usable & F.finite(m) & (m > 0)
        gamma.index_copy_(
            0, index, torch.where(take, torch.where(warming, gamma_warm, gamma_after), old)
        )
        initialized.index_copy_(0, index, known | take)
        state["steps"] = new_steps
        post = torch.linalg.vector_norm(m * coefs)
        total_coef = torch.where(n > 0, post / n, torch.ones_like(n)).to(norm.dtype)
        threshold = torch.where(
            warming, torch.full_like(n, cap), torch.linalg.vector_norm(limit)
        ).to(norm.dtype)
        return ClipResult(threshold, total_coef, (coefs < 1).any())


@register_strategy("agc")
class AGC(ClipStrategy):
    r"""Adaptive gradient clipping: clip each unit relative to its weight's norm.

    For every unit :math:`i` (a row along dim 0 of a parameter with 2+ dims, or a whole
    parameter with fewer) with weight :math:`W_i` and gradient :math:`G_i`:

    .. math::

        G_i \leftarrow G_i \cdot
        \frac{\lambda \max(\lVert W_i\rVert, \epsilon)}{\max(\lVert G_i\rVert, 10^{-6})}
        \quad\text{if}\quad \lVert G_i\rVert \ge \lambda \max(\lVert W_i\rVert, \epsilon)

    Same results as timm's ``adaptive_clip_grad`` on the same tensors, computed with one
    batched norm per group of same-shaped tensors instead of a loop of small ops. The
    paper does not clip the final classifier's weight: exclude it by parameter or by
    name (names come from an optimizer built with ``model.named_parameters()``).

    Args:
        clipping: :math:`\lambda`, > 0 (a number or a schedule). 0.01 is the paper's
            value for batch 4096 with SGD; larger batches want smaller values.
        eps: :math:`\epsilon`, the smallest weight norm considered, > 0. A zero-initialised
            bias thus gets a tiny threshold (:math:`\lambda\epsilon`).
        exclude: Parameters (tensors) or parameter names left unclipped.
        foreach: ``None`` uses the foreach kernels where the device supports them.

    Raises:
        TypeError: ``exclude`` holds something other than tensors and strings.

    References:
        Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition
        Without Normalization", ICML 2021.

    Example:
        >>> import torch, clipopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> sgd = torch.optim.SGD(model.named_parameters(), lr=0.1)
        >>> opt = clipopt.ClippedOptimizer(sgd, "agc", clipping=0.01, exclude=["1.weight"])
    """

    def __init__(
        self,
        clipping: Schedule = 0.01,
        eps: float = 1e-3,
        *,
        exclude: Iterable[Tensor | str] = (),
        foreach: bool | None = None,
    ) -> None:
        self.clipping = check_schedule("clipping", clipping, allow_inf=False)
        self.eps = check_threshold("eps", eps, allow_inf=False)
        items = list(exclude) if not isinstance(exclude, (str, Tensor)) else [exclude]
        bad = [x for x in items if not isinstance(x, (str, Tensor))]
        if bad:
            raise TypeError(
                f"exclude must hold parameters (tensors) or names (str), got {bad[0]!r}"
            )
        self.exclude = items
        self.foreach = check_foreach(foreach)

    def exact_norms(self) -> bool:
        """False: AGC matches timm to float rounding, not torch's clipping bits."""
        return False

    def hyperparameters(self) -> dict[str, Any]:
        """Return the constructor arguments (excluded parameters by name or shape)."""
        shown = [
            x if isinstance(x, str) else f"<tensor {tuple(x.shape)}>" for x in self.exclude
        ]
        return {
            "clipping": self.clipping,
            "eps": self.eps,
            "exclude": shown,
            "foreach": self.foreach,
        }

    @torch.no_grad()
    def measure(self, inputs: ClipInputs) -> Tensor:
        """Return the total L2 norm of the gradients, from their unit norms.

        The unit norms are kept for :meth:`clip_`, so the gradients are read once.
        """
        plan = self._plan(inputs)
        dtype = inputs.grads[0].dtype
        device = inputs.grads[0].device
        units = [self._unit_norms(_gather(inputs.grads, at)) for at in plan.grad_at]
        device = units[0].device if units else device
        unit_sq = [u.square().sum().to(device, dtype) for u in units]
        excluded = _gather(inputs.grads, plan.excluded)
        excluded_sq = self._excluded_squares(excluded, inputs, device, dtype)
        squares = _with_excluded(unit_sq, plan.split, excluded_sq, inputs)
        self._cache_units: _AGCUnits | None = (inputs, units, excluded_sq)
        return torch.stack(squares).sum().sqrt()

    def _excluded_squares(
        self, excluded: list[Tensor], inputs: ClipInputs, device: torch.device, dtype: Any
    ) -> _Excluded:
        """The excluded gradients' sums of squares: (to reduce over the group, global).

        Without a process group everything is global already (one process, or
        DTensors' own collectives). With one, plain shards give this rank's own sum,
        zero if it holds none, so that every rank makes the same collective.
        """

        def sum_sq(tensors: list[Tensor]) -> Tensor:
            norms = F.tensor_norms(tensors, foreach=self.foreach)
            return norms.square().sum().to(device, dtype)

        if inputs.process_group is None:
            return None, sum_sq(excluded) if excluded else None
        plain = [t for t in excluded if not F._is_dtensor(t)]
        whole = [t for t in excluded if F._is_dtensor(t)]
        local = sum_sq(plain) if plain else torch.zeros((), device=device, dtype=dtype)
        return local, sum_sq(whole) if whole else None

    def _plan(self, inputs: ClipInputs) -> _AGCPlan:
        """Which gradients are clipped, grouped by shape: all that the parameters decide.

        Cached while the wrapper passes the same parameter list (it does while the param
        groups and the set of missing gradients do not change), so a step does no
        per-tensor Python work beyond gathering the gradients.
        """
        cached: _AGCPlan | None = getattr(self, "_cache_plan", None)
        if cached is not None and cached.params is inputs.params:
            return cached
        included = self._included(inputs)
        groups: dict[Any, list[int]] = {}
        for k, i in enumerate(included):
            p, g = inputs.params[i], inputs.grads[i]
            # Small same-shaped tensors are batched (one op instead of one per tensor);
            # large ones go alone: their op overhead is amortised, and stacking would
            # copy them.
            key = (tuple(g.shape), g.dtype, g.device, p.dtype) if g.numel() <= 65536 else k
            groups.setdefault(key, []).append(k)
        kept = set(included)
        _check_agc_placements(inputs)
        plan = _AGCPlan(
            inputs.params, included, list(groups.values()),
            [i for i in range(len(inputs.grads)) if i not in kept],
        )  # fmt: skip
        self._cache_plan = plan
        self._cache_views: tuple[list[Tensor], list[Tensor]] | None = None
        return plan

    def _included(self, inputs: ClipInputs) -> list[int]:
        names = {x for x in self.exclude if isinstance(x, str)}
        tensors = {id(x) for x in self.exclude if isinstance(x, Tensor)}
        if names:
            if inputs.names is None:
                raise ValueError(
                    "AGC excludes parameters by name, but the optimizer has no parameter "
                    "names: build it from model.named_parameters(), or exclude the "
                    "parameters themselves"
                )
            known = {n for g in inputs.groups for n in g.get("param_names", ())}
            unknown = sorted(names - known)
            if unknown:
                raise ValueError(
                    f"AGC exclude names not found among the parameters: {unknown}"
                )
        return [
            i
            for i, p in enumerate(inputs.params)
            if id(p) not in tensors
            and (inputs.names is None or inputs.names[i] not in names)
        ]

    @torch.no_grad()
    def clip_(self, inputs: ClipInputs, norm: Tensor) -> ClipResult:
        """Clip each unit whose gradient norm reaches ``clipping`` x its weight norm."""
        clipping = threshold_at("clipping", self.clipping, inputs.step)
        cached, self._cache_units = getattr(self, "_cache_units", None), None
        if cached is None or cached[0] is not inputs:
            self.measure(inputs)
            cached, self._cache_units = self._cache_units, None
        assert cached is not None
        _, units, excluded_sq = cached
        plan = self._plan(inputs)
        post_sq: list[Tensor] = []
        any_clipped: list[Tensor] = []
        group_coefs = []
        for n, grad_norms in enumerate(units):
            weight_norms = self._unit_norms(plan.weights[n])
            limit = weight_norms.clamp(min=self.eps) * clipping
            coef = torch.where(
                grad_norms < limit,
                torch.ones_like(limit),
                limit / grad_norms.clamp(min=1e-6),
            )
            post_sq.append((grad_norms * coef).square().sum().to(norm.device, norm.dtype))
            any_clipped.append((coef < 1).any().to(norm.device))
            group_coefs.append(coef.to(inputs.grads[plan.grad_at[n][0]].dtype))
        coefs = self._per_tensor(group_coefs, plan.groups, len(plan.included))
        grouped = inputs.process_group is not None
        local_any = (
            torch.stack(any_clipped).any()
            if any_clipped
            else torch.zeros_like(norm, dtype=torch.bool)
        )
        # with a process group every rank reduces, whatever gradients it holds
        clipped = _reduce_any(local_any, inputs) if any_clipped or grouped else local_any
        post_sq = _with_excluded(post_sq, plan.split, excluded_sq, inputs)
        if plan.included and not F.is_cpu_false(clipped):
            # gradients get coefficients of their own dtype (see above)
            F.scale_each_(
                _gather(inputs.grads, plan.included),
                coefs,
                foreach=self.foreach,
                uniform=inputs.uniform or plan.uniform,
            )
        post = torch.stack(post_sq).sum().sqrt() if post_sq else torch.zeros_like(norm)
        total_coef = torch.where(norm > 0, post / norm, torch.ones_like(norm))
        return ClipResult(torch.full_like(norm, clipping), total_coef, clipped)

    def _per_tensor(
        self, group_coefs: list[Tensor], groups: list[list[int]], count: int
    ) -> list[Tensor]:
        """One coefficient tensor per gradient, as views of the groups' coefficients.

        Making thousands of views costs more than the clipping itself, so outside
        torch.compile they are made once, over buffers that each step fills in place.
        """
        if count == 0:  # nothing included (on this rank)
            return []
        if torch.compiler.is_compiling():
            coefs: list[Tensor] = [group_coefs[0]] * count
            for positions, coef in zip(groups, group_coefs, strict=True):
                for k, part in zip(positions, coef.unbind(0), strict=True):
                    coefs[k] = part
            return coefs
        cached = getattr(self, "_cache_views", None)
        if cached is None or any(
            b.shape != c.shape or b.dtype != c.dtype or b.device != c.device
            for b, c in zip(cached[0], group_coefs, strict=True)
        ):
            buffers = [torch.empty_like(c) for c in group_coefs]
            views: list[Tensor] = [group_coefs[0]] * count
            for positions, buffer in zip(groups, buffers, strict=True):
                for k, part in zip(positions, buffer.unbind(0), strict=True):
                    views[k] = part
            cached = self._cache_views = (buffers, views)
        for buffer, coef in zip(cached[0], group_coefs, strict=True):
            buffer.copy_(coef)
        return cached[1]

    def _unit_norms(self, tensors: list[Tensor]) -> Tensor:
        """Unit norms of same-shaped tensors, batched along a new dim 0.

        Outside torch.compile the tensors are stacked a chunk at a time into one
        cache-sized buffer kept between steps (``functional._stacked_norms``): a
        model-sized stack would cost page faults or a trip to memory every step.
        """
        if F._is_dtensor(tensors[0]) and tensors[0].dim() <= 1:
            # A whole-tensor unit sharded over ranks: reduce its norm (DTensor's own
            # collectives, one for the group); the coefficient then applies to shards.
            return F.tensor_norms(tensors, foreach=self.foreach)
        tensors = F._locals(tensors)  # rows of Shard(0) DTensors are whole locally
        if len(tensors) == 1:
            return F.unit_norms(tensors[0]).unsqueeze(0)
        rank = tensors[0].dim()
        dims = tuple(range(2, rank + 1)) if rank >= 2 else tuple(range(1, rank + 1))
        if torch.compiler.is_compiling():
            stacked = torch.stack(tensors)
            result: Tensor = torch.linalg.vector_norm(stacked, dim=dims, keepdim=rank >= 2)
            return result
        self._cache_scratch = F._scratch(getattr(self, "_cache_scratch", None), tensors[0])
        return F._stacked_norms(tensors, 2.0, dims, rank >= 2, self._cache_scratch)


# The excluded gradients' sums of squares: (this rank's own, to reduce over the process
# group, or None without one; global, or None).
_Excluded = tuple[Tensor | None, Tensor | None]
# (inputs, unit norms, excluded sums of squares)
_AGCUnits = tuple[ClipInputs, list[Tensor], _Excluded]


def _gather(items: Sequence[Tensor], at: list[int]) -> list[Tensor]:
    """``[items[i] for i in at]``, in C outside torch.compile (thousands of gradients).

    ``at`` holds distinct positions in increasing order (every caller's), so as many
    positions as items means all of them.
    """
    if len(at) == len(items):
        return list(items)
    if len(at) > 1 and not torch.compiler.is_compiling():
        return list(operator.itemgetter(*at)(items))
    return [items[i] for i in at]


class _AGCPlan:
    """What AGC derives from the parameter list alone, built once per layout.

    Gradients share their parameter's type, shape, dtype and device (torch enforces it
    on assignment), so everything here can be read off the parameters.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        included: list[int],
        groups: list[list[int]],
        excluded: list[int],
    ) -> None:
        self.params = params
        #: positions of the clipped gradients, and the excluded ones
        self.included = included
        self.excluded = excluded
        #: same-shaped groups, as positions into ``included``
        self.groups = groups
        #: per group: positions into the gradient list, and the parameters themselves
        self.grad_at = [[included[k] for k in positions] for positions in groups]
        self.weights = [[params[i] for i in at] for at in self.grad_at]
        #: per group: are its units split over ranks (their norms are then global)?
        self.split = [F._is_dtensor(w[0]) and w[0].dim() <= 1 for w in self.weights]
        kinds = {(p.device, p.dtype) for p in (params[i] for i in included)}
        self.uniform = len(kinds) == 1 and not any(F._is_dtensor(p) for p in params)


def _dtensor_group(inputs: ClipInputs) -> Any:
    """The process group of Shard(0) DTensor gradients (checked by the plan), or None."""
    grad = inputs.grads[0]
    if F._is_dtensor(grad):
        return grad.device_mesh.get_group()  # type: ignore[attr-defined]
    return None


def _check_agc_placements(inputs: ClipInputs) -> None:
    if not F._is_dtensor(inputs.grads[0]):
        return
    from torch.distributed.tensor import Shard

    meshes = {id(g.device_mesh) for g in inputs.grads}  # type: ignore[attr-defined]
    placements = {tuple(g.placements) for g in inputs.grads}  # type: ignore[attr-defined]
    if len(meshes) != 1 or placements != {(Shard(0),)}:
        raise NotImplementedError(
            "AGC supports DTensor gradients sharded on dim 0 over one 1-D mesh (FSDP2's "
            f"layout), where every unit is whole on its rank; got placements {placements}"
        )


def _reduce_sum(value: Tensor, inputs: ClipInputs) -> Tensor:
    """Sum a per-rank partial sum over the ranks that hold shards (one collective)."""
    group = (
        inputs.process_group if inputs.process_group is not None else _dtensor_group(inputs)
    )
    if group is None:
        return value
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


def _sum_squares(
    squares: list[Tensor], split: list[bool], inputs: ClipInputs
) -> list[Tensor]:
    """Turn per-group sums of squares into global ones.

    Sums over local units are reduced over the ranks (one collective); sums over split
    units are global already and are added as they are.
    """
    local = [s for s, is_split in zip(squares, split, strict=True) if not is_split]
    whole = [s for s, is_split in zip(squares, split, strict=True) if is_split]
    out = [_reduce_sum(torch.stack(local).sum(), inputs)] if local else []
    return out + whole


def _with_excluded(
    squares: list[Tensor], split: list[bool], excluded: _Excluded, inputs: ClipInputs
) -> list[Tensor]:
    """Global sums of squares of the units and of the excluded gradients.

    A rank's own excluded sum joins the units' collective, so every rank makes it,
    whatever gradients it holds.
    """
    local, whole = excluded
    if local is None:
        out = _sum_squares(squares, split, inputs)
    else:
        out = _sum_squares([*squares, local], [*split, False], inputs)
    return out if whole is None else [*out, whole]


def _reduce_any(flag: Tensor, inputs: ClipInputs) -> Tensor:
    return _reduce_sum(flag.to(torch.int32), inputs) > 0


class Chain(ClipStrategy):
    """Apply several strategies in turn, e.g. value clipping then norm clipping.

    Each strategy measures the gradients as the previous one left them. The chain's
    statistic is the first strategy's (so a non-finite gradient is detected before
    anything changes), its threshold the last one's, its coefficient the product of the
    coefficients, and it counts as clipped when any member clipped. State is saved per
    member.

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

    def exact_norms(self) -> bool:
        """True if any member needs torch's exact bits."""
        return any(s.exact_norms() for s in self.strategies)

    def measure(self, inputs: ClipInputs) -> Tensor:
        """Return the first strategy's statistic."""
        return self.strategies[0].measure(inputs)

    def clip_(self, inputs: ClipInputs, norm: Tensor) -> ClipResult:
        """Clip with each strategy in turn."""
        results = []
        for i, strategy in enumerate(self.strategies):
            measured = norm if i == 0 else strategy.measure(inputs)
            results.append(strategy.clip_(inputs, measured))
        coef = results[0].coef
        clipped = results[0].clipped
        for r in results[1:]:
            coef = coef * r.coef.to(coef.device)
            clipped = clipped | r.clipped.to(clipped.device)
        return ClipResult(results[-1].threshold, coef, clipped)

    def state_dict(self) -> dict[str, Any]:
        """Return each member's state under its position ("0", "1", ...)."""
        return {str(i): s.state_dict() for i, s in enumerate(self.strategies)}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore each member's state; checks every member before changing any.

        Raises:
            ValueError: The keys or a member's state do not fit.
        """
        if not state_dict:
            self.reset()
            return
        expected = {str(i) for i in range(len(self.strategies))}
        if set(state_dict) != expected:
            raise ValueError(
                f"Chain state needs keys {sorted(expected)}, got {sorted(state_dict)}"
            )
        for i, s in enumerate(self.strategies):
            copy.deepcopy(s).load_state_dict(state_dict[str(i)])
        for i, s in enumerate(self.strategies):
            s.load_state_dict(state_dict[str(i)])

    def reset(self) -> None:
        """Reset every member."""
        for s in self.strategies:
            s.reset()

    def __repr__(self) -> str:
        return f"Chain({', '.join(map(repr, self.strategies))})"


_STATELESS: tuple[type[ClipStrategy], ...] = (NormClip, ValueClip, AGC)


def _skips_in_kernel(strategy: ClipStrategy) -> bool:
    """Whether a fused kernel may skip a non-finite step after ``strategy`` clipped it.

    The strategy then runs with a non-finite statistic, and must leave its state as it
    was. Single-factor strategies only compute a factor (``clip_coefficient``); the
    built-in per-tensor ones keep no state or, like AdaGC, guard it on the statistic.
    In a chain, the members after the first see gradients the first may have made
    finite again (a clamp turns inf into a number), so they must keep no state. User
    strategies (subclasses too) are not assumed to follow suit: their contract promises
    a finite statistic under ``"skip"``, so the host decides for them.
    """
    if type(strategy) is Chain:
        first, *rest = strategy.strategies
        return _skips_in_kernel(first) and all(_stateless(s) for s in rest)
    return type(strategy) in (*_STATELESS, AdaGC, PercentileClip, ZScoreClip)


def _stateless(strategy: ClipStrategy) -> bool:
    if type(strategy) is Chain:
        return all(_stateless(s) for s in strategy.strategies)
    return type(strategy) in _STATELESS
