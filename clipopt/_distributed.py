"""Every reduction over ranks, and the DTensor helpers, in one place.

Two kinds of sharded gradients reach clipopt:

- DTensors (FSDP2, tensor parallelism): their own collectives give global values
  (``full_tensor``), so clipopt adds none;
- plain tensors sharded over a ``process_group`` (FSDP1's flat parameters, hand-made
  model parallelism): each rank holds different parts, or different tensors, and the
  functions here reduce what the ranks measured.

Per-tensor values are reduced *by parameter position*: one entry per parameter of the
optimizer, zero where a rank holds no gradient, so that ranks holding different
gradients (FSDP1 with ``use_orig_params=True``) still line up. Positions are placed with
Python lists of 0-dim tensors, never with an index tensor made on the host, which would
be a host-to-device copy every time the set of gradients changes.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ._torch_private import is_dtensor, is_flat_parameter

__all__ = [
    "SharedGroup",
    "all_reduce_norms",
    "as_group",
    "by_position",
    "from_positions",
    "global_value",
    "local",
    "locals_of",
    "mixed",
    "place",
    "reduce_any",
    "reduce_sum",
    "warn_if_fsdp1_without_group",
]

_PLAIN = frozenset((Tensor, torch.nn.Parameter))


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: writing to it writes the DTensor)."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def locals_of(tensors: Sequence[Tensor]) -> list[Tensor]:
    """:func:`local` of each tensor (no Python loop for plain tensors)."""
    if set(map(type, tensors)) <= _PLAIN:
        return list(tensors)
    return [local(t) for t in tensors]


def mixed(tensors: Sequence[Tensor]) -> bool:
    """DTensors next to plain tensors (tensor parallelism leaves some replicated)."""
    return len({is_dtensor(t) for t in tensors}) > 1


def global_value(t: Tensor) -> Tensor:
    """A DTensor reduced to its global value (torch's collectives), else ``t``."""
    return t.full_tensor() if is_dtensor(t) else t  # type: ignore[attr-defined]


def all_reduce_norms(norms: Tensor, norm_type: float, group: Any) -> Tensor:
    """Norms of shards -> norms of the whole, in one collective (elementwise)."""
    import torch.distributed as dist

    if math.isinf(norm_type):
        # A NaN must survive the maximum, and gloo's MAX keeps it or not depending on
        # the ranks' order: as inf it survives, and still marks the step non-finite.
        reduced = torch.where(torch.isnan(norms), math.inf, norms)
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=group)
        return reduced
    powered = norms.pow(norm_type)
    dist.all_reduce(powered, op=dist.ReduceOp.SUM, group=group)
    return powered.pow(1.0 / norm_type)


def reduce_sum(value: Tensor, group: Any) -> Tensor:
    """Sum a per-rank value over ``group`` (one collective); ``value`` if no group."""
    if group is None:
        return value
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value


def reduce_any(flag: Tensor, group: Any) -> Tensor:
    """Whether ``flag`` is True on any rank of ``group``."""
    return reduce_sum(flag.to(torch.int32), group) > 0


def by_position(values: Tensor, indices: Sequence[int], count: int) -> Tensor:
    """Place one value per gradient at its parameter position; zero elsewhere.

    Args:
        values: 1-D, one entry per gradient.
        indices: Each gradient's position among ``count`` parameters (increasing).
        count: The number of parameters.
    """
    if len(indices) == count:  # every parameter has a gradient: already in place
        return values
    return place(values.new_zeros(()).expand(count), values, indices)


def place(base: Tensor, values: Tensor, indices: Sequence[int]) -> Tensor:
    """A copy of the 1-D ``base`` with ``values`` at ``indices``."""
    if len(indices) == base.numel():
        return values
    out = list(base.unbind())
    for i, v in zip(indices, values.unbind(), strict=True):
        out[i] = v
    return torch.stack(out)


def from_positions(values: Tensor, indices: Sequence[int]) -> Tensor:
    """The entries of a by-position vector at ``indices`` (the inverse of placing)."""
    if len(indices) == values.numel():
        return values
    parts = values.unbind()
    return torch.stack([parts[i] for i in indices])


def as_group(value: Any) -> Any:
    """A process group, from a group or a 1-D DeviceMesh (or None).

    Raises:
        ValueError: A mesh with more than one dimension.
    """
    if value is None or not hasattr(value, "get_group"):
        return value
    if getattr(value, "ndim", 1) != 1:
        raise ValueError(
            "process_group must be a process group or a 1-D DeviceMesh, got a mesh with "
            f"{value.ndim} dimensions; pass the mesh dimension that shards, e.g. mesh['tp']"
        )
    return value.get_group()


def warn_if_fsdp1_without_group(
    optimizer: torch.optim.Optimizer, group: Any, stacklevel: int
) -> None:
    """FSDP1 flat parameters hold shards: without a group the norm would be local."""
    if group is not None:
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    if any(is_flat_parameter(p) for g in optimizer.param_groups for p in g["params"]):
        warnings.warn(
            "the optimizer holds FSDP1 FlatParameters, which are shards: pass "
            "process_group=fsdp_model.process_group so that clipping uses the global norm",
            UserWarning,
            stacklevel=stacklevel + 1,
        )


class SharedGroup:
    """Holds a process group that copies must share, and that pickle cannot carry."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedGroup:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        if self.value is not None:
            raise TypeError(
                "clipping with a process_group cannot be pickled (process groups "
                "cannot); pickle its state_dict() instead"
            )
        return (SharedGroup, (None,))
