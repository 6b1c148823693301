"""``"percentile"`` (AutoClip): clip to a percentile of the recent gradient norms."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from .._protocol import ClipInputs, ClipResult, Measurement, Scale
from .._registry import register_strategy
from .._validation import check_bool, check_foreach, check_int, check_norm_type, check_range
from ._common import TensorState, check_shape, recordable, state_dtype, total_norm_of

__all__ = ["PercentileClip"]


@register_strategy("percentile", aliases=("autoclip",))
class PercentileClip(TensorState):
    r"""AutoClip: clip to a percentile of the recent gradient norms.

    .. math::

        \eta_t = \operatorname{percentile}_p\left(\lVert g_{t-w+1}\rVert, \dots,
        \lVert g_t \rVert\right), \qquad
        g \leftarrow g \cdot \min\left(1, \frac{\eta_t}{\lVert g_t \rVert + 10^{-6}}\right)

    The history is a fixed-size ring buffer of the last ``window`` pre-clip total norms,
    and the percentile interpolates linearly, as ``numpy.percentile``. While the history
    fits the window this is the paper's algorithm step for step. Non-finite and zero
    norms are not recorded. The window is also kept sorted, updated by one eviction and
    one insertion per step (four passes over the window, no sort).

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

    single_factor = True

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
        self._sorted: _SortedWindow | None = None

    def _fresh_state(self, norm: Tensor, num_params: int) -> dict[str, Tensor]:
        return {
            "history": torch.full(
                (self.window,), math.nan, dtype=state_dtype(norm), device=norm.device
            ),
            "count": torch.zeros((), dtype=torch.int64, device=norm.device),
        }

    def _check_state(self, state: Mapping[str, Tensor]) -> None:
        check_shape("PercentileClip", "history", state["history"], (self.window,))
        check_shape("PercentileClip", "count", state["count"], ())

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict`; ``{}`` resets."""
        super().load_state_dict(state_dict)
        self._sorted = None

    def reset(self) -> None:
        """Forget all state."""
        super().reset()
        self._sorted = None

    def measure(self, inputs: ClipInputs) -> Measurement:
        """Return the total ``norm_type``-norm of the gradients."""
        return Measurement(total_norm_of(inputs, self.norm_type, self.foreach))

    def clip(
        self, inputs: ClipInputs, measured: Measurement, skip: Tensor | None = None
    ) -> ClipResult:
        """Record the norm, then clip to the percentile of the window.

        The ring buffer and the sorted window change by one entry each: the history in
        place (``state_dict`` hands out copies), the sorted window by two clamps.
        """
        norm = measured.norm
        state = self._state_on(norm)
        history, count = state["history"], state["count"]
        window = self._sorted
        if window is None or not window.fits(history):
            window = self._sorted = _SortedWindow(history)
        record = recordable(norm, skip)
        new_count = count + record.to(count.dtype)
        if not self.include_current:  # the window before this step's norm
            threshold = F.percentile_sorted(
                window.values, count.clamp(max=self.window), self.percentile
            )
        window.update(history, count, norm, record)
        if self.include_current:
            threshold = F.percentile_sorted(
                window.values, new_count.clamp(max=self.window), self.percentile
            )
        threshold = threshold.to(norm.dtype)
        state["count"] = new_count
        coef = F.clip_coef(norm, threshold)
        return ClipResult(threshold, coef, coef < 1.0, (Scale(coef),))


class _SortedWindow:
    """The ring buffer's values in ascending order (empty slots last, as inf).

    Derived from the history by one sort after a load, a reset or a device move, then
    updated step by step in place: :meth:`update` removes the evicted value and inserts
    the new one by two clamps over the window, no sort and no boolean mask (comparisons
    and ``where`` over the window cost 2-4x a min/max on the CPU). Removing: from the
    evicted value's rank on, every entry takes its successor's value, as a clamp of
    -inf/+inf (below/from the rank) between the entry and its successor. Inserting:
    each entry becomes the new value clamped between the entry's predecessor and the
    entry itself. Sentinels (-inf before the window, +inf after it) give the first and
    last entries their neighbours, so each step is four passes over the window (the
    +-inf marks take two) and a few one-entry ops. The buffers are kept, so a step
    allocates nothing of the window's size (a fresh one costs page faults on the CPU).
    All of it is tensor code: no host read.
    """

    def __init__(self, history: Tensor) -> None:
        w = history.numel()
        ordered = torch.sort(history.nan_to_num(nan=math.inf)).values
        low, high = ordered.new_full((1,), -math.inf), ordered.new_full((1,), math.inf)
        #: -inf, the window, +inf (filled on the device: no copy from the host)
        self._buffer = torch.cat((low, ordered, high))
        #: -inf, then the window with the evicted value removed (scratch)
        self._removed = torch.cat((low, torch.empty_like(ordered)))
        # the ranks and their half-steps are exact in float32 below 2**22
        exact = torch.float32 if w < 2**22 else torch.float64
        self._ranks = torch.arange(w, dtype=exact, device=history.device)

    @property
    def values(self) -> Tensor:
        """The window, ascending (a view, changed in place by the next update)."""
        return self._buffer.narrow(0, 1, self._ranks.numel())

    def fits(self, history: Tensor) -> bool:
        """Whether this was derived for a history of this device and dtype."""
        return (self._buffer.device, self._buffer.dtype) == (history.device, history.dtype)

    def update(self, history: Tensor, count: Tensor, norm: Tensor, record: Tensor) -> None:
        """Write ``norm`` over the ring's oldest entry and sort the window anew.

        Where ``record`` is False the evicted value is put back, which changes nothing.
        """
        w = history.numel()
        values, removed = self.values, self._removed.narrow(0, 1, w)
        slot = torch.remainder(count, w).reshape(1)
        old = history.gather(0, slot)
        evicted = old.nan_to_num(nan=math.inf)  # inf while filling
        n = torch.where(record, norm.to(history.dtype).reshape(1), evicted)
        rank = torch.searchsorted(values, evicted).to(self._ranks.dtype)
        # -inf below the evicted value's rank, +inf from it on (never 0 * inf)
        torch.sub(self._ranks, rank - 0.5, out=removed).mul_(math.inf)
        torch.clamp(removed, min=values, max=self._buffer.narrow(0, 2, w), out=removed)
        # the window without the evicted value ends with +inf: n takes its place
        torch.clamp(n, min=self._removed.narrow(0, 0, w), max=removed, out=values)
        history.scatter_(0, slot, torch.where(record, n, old))
