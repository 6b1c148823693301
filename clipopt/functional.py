"""Public tensor-list kernels: the building blocks of clipping strategies.

Every function works on lists of tensors, groups them by device and dtype as
``torch.nn.utils`` does, and uses one ``torch._foreach_*`` call per group where the
device supports it. None of them reads a tensor's value on the host, so none of them
stalls an accelerator.

``total_norm``, ``clip_coef`` and ``scale_`` reproduce
``torch.nn.utils.clip_grad_norm_`` bit for bit when the threshold is a Python float, and
``clamp_`` reproduces ``torch.nn.utils.clip_grad_value_``.

Example:
    >>> import torch
    >>> from clipopt import functional as F
    >>> grads = [torch.tensor([3.0, 4.0]), torch.tensor([12.0])]
    >>> norm = F.total_norm(grads)
    >>> norm
    tensor(13.)
    >>> F.scale_(grads, F.clip_coef(norm, 1.3))
    >>> grads[1]
    tensor([1.2000])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _distributed as D
from . import _norms
from ._torch_private import (
    group_by_device_and_dtype,
    group_pairs_by_device_and_dtype,
    use_foreach,
)

__all__ = [
    "NORM_EPS",
    "clamp_",
    "clip_coef",
    "finite",
    "nonfinite_to_zero_",
    "percentile",
    "percentile_sorted",
    "scale_",
    "scale_each_",
    "tensor_norms",
    "total_norm",
    "unit_norms",
]

#: Added to the norm before dividing, exactly as torch.nn.utils.clip_grad_norm_ does.
NORM_EPS = 1e-6
#: From this size on a tensor is clamped in one pass rather than by the foreach kernels.
_ONE_PASS_NUMEL = 1 << 16


def total_norm(
    tensors: Sequence[Tensor],
    norm_type: float = 2.0,
    *,
    foreach: bool | None = None,
    group: Any = None,
) -> Tensor:
    """Return the p-norm of all tensors viewed as one vector.

    Same arithmetic, in the same order, as ``torch.nn.utils.get_total_norm``: the norm of
    each tensor, then the norm of those norms, on the first tensor's device. Any NaN or
    infinite entry makes the result non-finite.

    Args:
        tensors: Non-empty sequence of tensors.
        norm_type: p > 0, or ``math.inf`` for the largest absolute value.
        foreach: ``None`` picks the foreach kernels where the device supports them.
        group: A ``torch.distributed`` process group over which the plain tensors are
            shards (each rank holds different parts, or different tensors): the ranks'
            totals are combined in one ``all_reduce`` of a scalar. DTensors need none:
            their own collectives give the global norm.

    Returns:
        A 0-dim tensor on ``tensors[0].device`` (the local shard's device for DTensors),
        the same on every rank.

    Raises:
        ValueError: ``tensors`` is empty.
    """
    return _norms.total_norm(tensors, norm_type, foreach=foreach, group=group)


def tensor_norms(
    tensors: Sequence[Tensor],
    norm_type: float = 2.0,
    *,
    foreach: bool | None = None,
    group: Any = None,
) -> Tensor:
    """Return the p-norm of each tensor, stacked in input order on the first device.

    Zero-size tensors have norm 0.

    Args:
        tensors: Non-empty sequence of tensors.
        norm_type: p > 0, or ``math.inf``.
        foreach: ``None`` picks the foreach kernels where the device supports them.
        group: A process group over which the tensors are shards, with the same list of
            tensors on every rank: the norms are combined element by element in one
            ``all_reduce``.

    Returns:
        A 1-D tensor of ``len(tensors)`` norms, the same on every rank.

    Raises:
        ValueError: ``tensors`` is empty.

    Example:
        >>> import torch
        >>> from clipopt import functional as F
        >>> F.tensor_norms([torch.tensor([3.0, 4.0]), torch.tensor([-2.0])])
        tensor([5., 2.])
    """
    norms = _norms.tensor_norms(tensors, norm_type, foreach=foreach)
    return norms if group is None else D.all_reduce_norms(norms, norm_type, group)


def clip_coef(norm: Tensor, threshold: float | Tensor, *, eps: float = NORM_EPS) -> Tensor:
    """Return ``min(threshold / (norm + eps), 1)`` as a tensor, without a host read.

    Args:
        norm: 0-dim tensor, the measured norm.
        threshold: The largest norm allowed, a float or a 0-dim tensor.
        eps: Added to ``norm`` to avoid dividing by zero.

    Returns:
        A 0-dim tensor in ``[0, 1]`` (NaN if ``norm`` is NaN).
    """
    shifted = norm + eps
    if isinstance(threshold, Tensor) or shifted.requires_grad:
        # (autograd saves reciprocal's output: no in-place op after it)
        return torch.clamp(threshold / shifted, max=1.0)
    # torch's arithmetic (``threshold / x`` is ``x.reciprocal() * threshold``), in place
    # on the new tensor: the same bits as ``clip_grad_norm_``'s coefficient
    return shifted.reciprocal_().mul_(threshold).clamp_(max=1.0)


def _mul_each(
    tensors: list[Tensor], coefs: list[Tensor], device: torch.device, foreach: bool | None
) -> None:
    """``t *= c`` for each pair of one (device, dtype) group."""
    if use_foreach(tensors[:1], device, foreach):
        torch._foreach_mul_(tensors, coefs)
    else:
        for t, c in zip(tensors, coefs, strict=True):
            t.mul_(c)


def _groups(
    tensors: Sequence[Tensor], uniform: bool
) -> list[tuple[torch.device, list[Tensor]]]:
    """The local tensors per (device, dtype), as torch groups them; one group if uniform."""
    local = D.locals_of(tensors)
    if uniform and local:
        return [(local[0].device, local)]
    return [(device, group) for device, group, _ in group_by_device_and_dtype(local)]


def scale_(
    tensors: Sequence[Tensor],
    coef: Tensor,
    *,
    foreach: bool | None = None,
    uniform: bool = False,
) -> None:
    """Multiply every tensor in place by the 0-dim tensor ``coef``.

    Args:
        tensors: Tensors to scale in place.
        coef: 0-dim tensor; copied once to each device.
        foreach: ``None`` picks the foreach kernels where the device supports them.
        uniform: The caller knows that the tensors share one device and one dtype:
            skip grouping them.
    """
    for device, group in _groups(tensors, uniform):
        coef_on_device = coef.to(device)
        if use_foreach(group, device, foreach):
            torch._foreach_mul_(group, coef_on_device)
        else:
            for t in group:
                t.mul_(coef_on_device)


def scale_each_(
    tensors: Sequence[Tensor],
    coefs: Sequence[Tensor],
    *,
    foreach: bool | None = None,
    uniform: bool = False,
) -> None:
    """Multiply each tensor in place by its own coefficient tensor.

    Args:
        tensors: Tensors to scale in place.
        coefs: One tensor per tensor, broadcastable to it (0-dim, or one value per unit).
        foreach: ``None`` picks the foreach kernels where the device supports them.
        uniform: The caller knows that tensors and coefficients all share one device and
            one dtype: skip grouping them.

    Raises:
        ValueError: ``coefs`` does not have one entry per tensor.

    Example:
        >>> import torch
        >>> from clipopt import functional as F
        >>> ts = [torch.ones(2), torch.ones(2, 2)]
        >>> F.scale_each_(ts, [torch.tensor(3.0), torch.tensor([[2.0], [0.5]])])
        >>> ts[1]
        tensor([[2.0000, 2.0000],
                [0.5000, 0.5000]])
    """
    if len(tensors) != len(coefs):
        raise ValueError(
            f"coefs must have one entry per tensor, got {len(coefs)} for {len(tensors)}"
        )
    if not tensors:
        return
    tensors = D.locals_of(tensors)
    if uniform:
        _mul_each(list(tensors), list(coefs), tensors[0].device, foreach)
        return
    for device, dtype, group, group_coefs in group_pairs_by_device_and_dtype(
        tensors, coefs
    ):
        if any(c.device != device or c.dtype != dtype for c in group_coefs):
            group_coefs = [c.to(device=device, dtype=dtype) for c in group_coefs]
        _mul_each(group, group_coefs, device, foreach)


def finite(tensor: Tensor) -> Tensor:
    """Return where ``tensor`` is finite (neither NaN nor infinite), without a host read.

    Same as ``torch.isfinite`` for real tensors; written as ``|x| < inf`` because that also
    runs on fake CUDA tensors of a CPU-only build (the sync-free tests use them), where
    ``isfinite`` may fall back to a real kernel.

    Example:
        >>> import torch, math
        >>> from clipopt import functional as F
        >>> F.finite(torch.tensor([1.0, math.inf, math.nan]))
        tensor([ True, False, False])
    """
    return tensor.abs() < math.inf


def clamp_(
    tensors: Sequence[Tensor],
    clip_value: float,
    *,
    foreach: bool | None = None,
    uniform: bool = False,
) -> None:
    """Clamp every entry in place to ``[-clip_value, clip_value]``.

    Large tensors are clamped in one read+write pass each (``clamp_(min, max)``); small
    ones with the foreach kernels, whose two passes cost less than one call per tensor.
    The results are the same either way.

    Args:
        tensors: Tensors to clamp in place.
        clip_value: Largest absolute value allowed.
        foreach: ``None`` picks the foreach kernels where the device supports them.
        uniform: The caller knows that the tensors share one device and one dtype:
            skip grouping them.
    """
    for device, group in _groups(tensors, uniform):
        if use_foreach(group, device, foreach):
            small = [t for t in group if t.numel() < _ONE_PASS_NUMEL]
            for t in group:
                if t.numel() >= _ONE_PASS_NUMEL:
                    t.clamp_(min=-clip_value, max=clip_value)
            if small:
                torch._foreach_clamp_min_(small, -clip_value)
                torch._foreach_clamp_max_(small, clip_value)
        else:
            for t in group:
                t.clamp_(min=-clip_value, max=clip_value)


def nonfinite_to_zero_(tensors: Sequence[Tensor]) -> None:
    """Set every NaN and infinite entry to zero, in place.

    Args:
        tensors: Tensors to clean in place.
    """
    for t in D.locals_of(tensors):
        torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)


def percentile(values: Tensor, count: Tensor, q: float) -> Tensor:
    """Return the ``q``-th percentile of the first ``count`` finite entries, sync-free.

    Linear interpolation between the closest ranks, as ``numpy.percentile``'s default
    method. Entries past ``count`` must be NaN (the layout of a ring buffer that is not
    full yet); with ``count == 0`` the result is ``inf``.

    Args:
        values: 1-D tensor; valid entries anywhere, unused slots NaN.
        count: 0-dim integer tensor, the number of valid entries.
        q: Percentile in ``[0, 100]``.

    Returns:
        A 0-dim tensor.

    Example:
        >>> import torch, math
        >>> from clipopt import functional as F
        >>> h = torch.tensor([1.0, 2.0, 0.5, math.nan])
        >>> F.percentile(h, torch.tensor(3), 10.0)
        tensor(0.6000)
    """
    return percentile_sorted(torch.sort(values).values, count, q)  # NaN sorts last


def percentile_sorted(ordered: Tensor, count: Tensor, q: float) -> Tensor:
    """:func:`percentile` of a tensor already sorted, valid entries first.

    Example:
        >>> import torch, math
        >>> from clipopt import functional as F
        >>> ordered = torch.tensor([0.5, 1.0, 2.0, math.inf])
        >>> F.percentile_sorted(ordered, torch.tensor(3), 50.0)
        tensor(1.)
    """
    last = ordered.numel() - 1
    top = (count.to(torch.int64) - 1).clamp(min=0)  # the last valid rank
    position = top.to(ordered.dtype) * (q / 100.0)
    low = position.floor()
    frac = position - low
    rank = low.to(torch.int64)
    # both neighbours in one gather (each op costs about as much as this whole lookup)
    ranks = torch.stack((rank, torch.minimum(rank + 1, top))).clamp_(0, last)
    a, b = ordered.gather(0, ranks).unbind()
    diff = b - a
    # numpy's lerp: from the nearer end, so that frac 0 and 1 give a and b exactly
    value = torch.where(frac >= 0.5, b - diff * (1 - frac), a + diff * frac)
    return torch.where(count > 0, value, math.inf)


def unit_norms(tensor: Tensor, norm_type: float = 2.0) -> Tensor:
    """Return the norms of a tensor's units: rows of dim 0 for 2+ dims, else the whole.

    The unit-wise norm of AGC (Brock et al. 2021) in torch's ``(out, in, ...)`` layout,
    kept broadcastable to ``tensor``.

    Example:
        >>> import torch
        >>> from clipopt import functional as F
        >>> F.unit_norms(torch.tensor([[3.0, 4.0], [0.0, 1.0]]))
        tensor([[5.],
                [1.]])
    """
    dims = tuple(range(1, tensor.dim())) if tensor.dim() > 1 else None
    result: Tensor = torch.linalg.vector_norm(
        tensor, norm_type, dim=dims, keepdim=dims is not None
    )
    return result
