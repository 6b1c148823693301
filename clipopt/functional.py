"""Pure tensor-list kernels behind the clipping strategies.

Every function here works on lists of tensors, groups them by device and dtype, and uses
one ``torch._foreach_*`` call per group where the device supports it. None of them reads
a tensor's value on the host, so none of them stalls an accelerator.

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
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

__all__ = ["clamp_", "clip_coef", "nonfinite_to_zero_", "scale_", "total_norm"]

#: Added to the norm before dividing, exactly as torch.nn.utils.clip_grad_norm_ does.
NORM_EPS = 1e-6


def _groups(tensors: Sequence[Tensor]) -> Iterator[tuple[torch.device, list[Tensor]]]:
    grouped = _group_tensors_by_device_and_dtype([list(tensors)])
    for (device, _dtype), ([group], _indices) in grouped.items():
        yield device, group  # type: ignore[misc]


def _use_foreach(tensors: list[Tensor], device: torch.device, foreach: bool | None) -> bool:
    if foreach is None:
        return bool(_has_foreach_support(tensors, device))
    if foreach and not _device_has_foreach_support(device):
        raise RuntimeError(
            f"foreach=True was passed, but the foreach API does not support "
            f"{device.type} tensors"
        )
    return foreach


def total_norm(
    tensors: Sequence[Tensor], norm_type: float = 2.0, *, foreach: bool | None = None
) -> Tensor:
    """Return the p-norm of all tensors viewed as one vector.

    Same arithmetic, in the same order, as ``torch.nn.utils.get_total_norm``: the norm of
    each tensor, then the norm of those norms, on the first tensor's device. Any NaN or
    infinite entry makes the result non-finite.

    Args:
        tensors: Non-empty sequence of tensors.
        norm_type: p > 0, or ``math.inf`` for the largest absolute value.
        foreach: ``None`` picks the foreach kernels where the device supports them.

    Returns:
        A 0-dim tensor on ``tensors[0].device``.

    Raises:
        ValueError: ``tensors`` is empty.
    """
    if len(tensors) == 0:
        raise ValueError("tensors must not be empty")
    first = tensors[0].device
    if math.isinf(norm_type):
        # torch cannot take the max of an empty tensor (no identity), so drop zero-size
        # tensors: they hold no entry. (For p < inf they stay, to keep torch's summation
        # order and its exact bits.)
        tensors = [t for t in tensors if t.numel() > 0]
        if not tensors:
            return torch.zeros((), device=first)
    norms: list[Tensor] = []
    for device, group in _groups(tensors):
        if _use_foreach(group, device, foreach):
            norms.extend(torch._foreach_norm(group, norm_type))
        else:
            norms.extend(torch.linalg.vector_norm(t, norm_type) for t in group)
    result: Tensor = torch.linalg.vector_norm(
        torch.stack([n.to(first) for n in norms]), norm_type
    )
    return result


def clip_coef(norm: Tensor, threshold: float | Tensor, *, eps: float = NORM_EPS) -> Tensor:
    """Return ``min(threshold / (norm + eps), 1)`` as a tensor, without a host read.

    Args:
        norm: 0-dim tensor, the measured norm.
        threshold: The largest norm allowed, a float or a 0-dim tensor.
        eps: Added to ``norm`` to avoid dividing by zero.

    Returns:
        A 0-dim tensor in ``[0, 1]`` (NaN if ``norm`` is NaN).
    """
    return torch.clamp(threshold / (norm + eps), max=1.0)


def scale_(tensors: Sequence[Tensor], coef: Tensor, *, foreach: bool | None = None) -> None:
    """Multiply every tensor in place by the 0-dim tensor ``coef``.

    Args:
        tensors: Tensors to scale in place.
        coef: 0-dim tensor; copied once to each device.
        foreach: ``None`` picks the foreach kernels where the device supports them.
    """
    for device, group in _groups(tensors):
        coef_on_device = coef.to(device)
        if _use_foreach(group, device, foreach):
            torch._foreach_mul_(group, coef_on_device)
        else:
            for t in group:
                t.mul_(coef_on_device)


def clamp_(
    tensors: Sequence[Tensor], clip_value: float, *, foreach: bool | None = None
) -> None:
    """Clamp every entry in place to ``[-clip_value, clip_value]``.

    Args:
        tensors: Tensors to clamp in place.
        clip_value: Largest absolute value allowed.
        foreach: ``None`` picks the foreach kernels where the device supports them.
    """
    for device, group in _groups(tensors):
        if _use_foreach(group, device, foreach):
            torch._foreach_clamp_min_(group, -clip_value)
            torch._foreach_clamp_max_(group, clip_value)
        else:
            for t in group:
                t.clamp_(min=-clip_value, max=clip_value)


def nonfinite_to_zero_(tensors: Sequence[Tensor]) -> None:
    """Set every NaN and infinite entry to zero, in place.

    Args:
        tensors: Tensors to clean in place.
    """
    for t in tensors:
        torch.nan_to_num_(t, nan=0.0, posinf=0.0, neginf=0.0)
