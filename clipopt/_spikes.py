"""Spike skipping: drop an update whose gradient norm (or loss) is an outlier.

OLMo 2 and OLMo 3 train with a step-skipping AdamW (OLMo-core ``SkipStepOptimizer``):
a step is skipped when its loss or gradient norm is more than ``sigma`` standard
deviations above the mean of the last ``window`` values, once ``min_samples`` values
are known. :class:`SpikeSkip` applies that rule to any optimizer and any strategy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ._validation import check_int, check_threshold

__all__ = ["Parts", "SpikeSkip", "spike_of"]

_SERIES = ("norm", "loss")


class SpikeSkip:
    r"""Skip the update when the gradient norm or the loss is an outlier.

    For each tracked series (the strategy's pre-clip statistic, and the loss when one
    is given), with :math:`\mu` and :math:`s` the mean and the (unbiased) standard
    deviation of the last ``window`` accepted values:

    .. math::

        \text{spike} \iff n \ge \text{min\_samples} \ \text{and}\
        \frac{x - \mu}{s} > \sigma

    A step is skipped when any series spikes: the optimizer does not step (its step
    counters and moments stay as they were), the strategy's state is left alone, and the
    step counts as a *spike* (``counts()["spike_steps"]``), apart from non-finite skips.
    These are OLMo-core's rule and defaults (sigma 6, window 128, active after 64
    samples; one-sided, as in OLMo-core since its first version: a step whose loss or
    norm falls suddenly, as at a learning-rate drop, is no spike), with two guards of
    our own:

    - outliers are kept out of the window, except the ``patience``-th outlier in a row,
      which enters it: a lasting change of level (a new phase of training) then becomes
      the new normal instead of skipping every step from then on (llm.c's outlier
      detector does the same on its third outlier in a row);
    - a window without spread (``s == 0``) calls nothing an outlier.

    Everything is tensor code on the statistic's device: with a fused optimizer on an
    accelerator the kernel skips (``found_inf``) with no host read; otherwise deciding
    costs the one read ``nonfinite="skip"`` makes anyway.

    Args:
        sigma: Outliers are more than this many standard deviations above the mean,
            > 0.
        window: How many recent accepted values make the statistics, >= 2.
        min_samples: Accepted values needed before anything is an outlier, >= 2.
        patience: The so-many-th outlier in a row enters the window, >= 1.

    Example:
        >>> import torch, clipopt
        >>> p = torch.nn.Parameter(torch.zeros(1))
        >>> opt = clipopt.ClippedOptimizer(
        ...     torch.optim.SGD([p], lr=0.1), "norm", max_norm=10.0,
        ...     skip_spikes=clipopt.SpikeSkip(window=8, min_samples=4))
        >>> for g in [1.0, 1.1, 0.9, 1.0, 1.05, 50.0]:
        ...     p.grad = torch.tensor([g])
        ...     opt.step()
        >>> opt.counts()["spike_steps"], round(float(p), 3)
        (1, -0.505)
    """

    def __init__(
        self,
        sigma: float = 6.0,
        window: int = 128,
        min_samples: int = 64,
        *,
        patience: int = 3,
    ) -> None:
        self.sigma = check_threshold("sigma", sigma, allow_inf=False)
        self.window = check_int("window", window, minimum=2)
        self.min_samples = check_int("min_samples", min_samples, minimum=2)
        if self.min_samples > self.window:
            raise ValueError(
                f"min_samples must be <= window ({window}), got {min_samples!r}"
            )
        self.patience = check_int("patience", patience, minimum=1)
        self._state: dict[str, Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"SpikeSkip(sigma={self.sigma!r}, window={self.window!r}, "
            f"min_samples={self.min_samples!r}, patience={self.patience!r})"
        )

    def _series(self, name: str, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        state = self._state
        if f"{name}_values" not in state:
            state[f"{name}_values"] = torch.zeros(
                self.window, dtype=torch.float64, device=like.device
            )
            state[f"{name}_count"] = torch.zeros((), dtype=torch.int64, device=like.device)
            state[f"{name}_run"] = torch.zeros((), dtype=torch.int64, device=like.device)
        keys = (f"{name}_values", f"{name}_count", f"{name}_run")
        for key in keys:
            if state[key].device != like.device:
                state[key] = state[key].to(like.device)
        values, count, run = (state[k] for k in keys)
        return values, count, run

    def outlier(self, name: str, value: Tensor) -> Tensor:
        """Whether ``value`` is an outlier of series ``name`` (a 0-dim bool tensor)."""
        values, count, _ = self._series(name, value)
        x = value.detach().to(torch.float64).reshape(())
        n = count.clamp(max=self.window)
        valid = torch.arange(self.window, device=x.device) < n
        size = n.clamp(min=2).to(torch.float64)
        mean = torch.where(valid, values, 0.0).sum() / n.clamp(min=1)
        var = torch.where(valid, (values - mean).square(), 0.0).sum() / (size - 1)
        std = var.sqrt()
        z = torch.where(std > 0, (x - mean) / std, 0.0)  # one-sided: only rises
        return (n >= self.min_samples) & torch.isfinite(x) & (z > self.sigma)

    def record(self, name: str, value: Tensor, outlier: Tensor, keep: Tensor) -> None:
        """Enter ``value`` into series ``name`` unless it is an outlier (see above).

        ``keep``: False where nothing may change (a step skipped for another reason).
        """
        values, count, run = self._series(name, value)
        x = value.detach().to(torch.float64).reshape(())
        run_now = torch.where(outlier, run + 1, 0)
        admitted = torch.logical_not(outlier) | (run_now >= self.patience)
        enter = keep & admitted & torch.isfinite(x)
        slot = torch.remainder(count, self.window).reshape(1)
        values.scatter_(0, slot, torch.where(enter, x, values.gather(0, slot)).reshape(1))
        state = self._state
        state[f"{name}_count"] = count + enter.to(count.dtype)
        run_kept = torch.where(admitted, 0, run_now)
        state[f"{name}_run"] = torch.where(keep, run_kept, run)

    # -- state ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The windows, counts and runs of outliers (tensors; empty before any step)."""
        return {k: v.clone() for k, v in self._state.items()}

    def check_state_dict(self, state: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if ``state`` does not fit these settings."""
        expected = {f"{s}_{k}" for s in _SERIES for k in ("values", "count", "run")}
        unknown = set(state) - expected
        if unknown:
            raise ValueError(f"SpikeSkip state has unknown keys {sorted(unknown)}")
        for key, value in state.items():
            if not isinstance(value, Tensor):
                raise ValueError(f"SpikeSkip state[{key!r}] must be a tensor")
            shape = (self.window,) if key.endswith("_values") else ()
            if tuple(value.shape) != shape:
                raise ValueError(
                    f"SpikeSkip state[{key!r}] has shape {tuple(value.shape)}, expected "
                    f"{shape} (window={self.window})"
                )

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s result, checked first."""
        self.check_state_dict(state)
        self._state = {k: v.detach().clone() for k, v in state.items()}

    def reset(self) -> None:
        """Forget every series."""
        self._state = {}


Parts = list[tuple[str, Tensor, Tensor]]


def spike_of(gate: SpikeSkip, norm: Tensor, loss: Tensor | None) -> tuple[Tensor, Parts]:
    """Whether the step spikes, and the (series, value, outlier) to record afterwards."""
    parts = [("norm", norm, gate.outlier("norm", norm))]
    if loss is not None:
        loss = loss.detach().reshape(()).to(norm.device)
        parts.append(("loss", loss, gate.outlier("loss", loss)))
    spike = parts[0][2]
    for _, _, outlier in parts[1:]:
        spike = spike | outlier
    return spike, parts
