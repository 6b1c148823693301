"""Every place where clipopt relies on torch internals, in one module.

Checked against torch 2.13 (and the oldest supported release, 2.6, where noted).
``tests/test_torch_private.py`` exercises each item and fails with a message naming it
if a torch release changes it. Nothing else in clipopt imports a private torch name or
reads a private attribute; add new touchpoints here, with a test.

1. ``torch.utils._foreach_utils``: torch's own grouping of tensors by device and dtype
   and its foreach-support checks, so that clipopt groups exactly as
   ``clip_grad_norm_`` does (and keeps its bits); and ``torch._C._set_grad_enabled``,
   the switch behind ``torch.no_grad``.
2. The fused-kernel protocol of ``torch.optim`` (Adam, AdamW, SGD, Adagrad with
   ``fused=True``): an optimizer whose ``_step_supports_amp_scaling`` is True reads the
   attributes ``grad_scale`` (it divides the gradients by it, and writes the divided
   gradients back to ``.grad``) and ``found_inf`` (a nonzero value skips the update and
   leaves ``step`` alone) from its own ``__dict__`` in ``step()``. GradScaler uses the
   same protocol.
3. ``Optimizer.__setstate__({})`` creates the hook registries and patches ``step`` of
   the class (``_patch_step_function``); a ``step`` marked ``hooked = True`` is not
   patched again, so the wrapper's own ``step`` runs hooks only through the wrapped
   optimizer.
4. DTensor and FSDP1 detection by type name, so that importing clipopt never imports
   ``torch.distributed`` submodules.
5. GradScaler's bookkeeping: ``GradScaler.step`` (fused optimizers) and
   ``GradScaler._maybe_opt_step`` (the others) call ``optimizer.step()``, and
   ``GradScaler._per_optimizer_states[id(optimizer)]["stage"]`` is ``OptState.UNSCALED``
   after ``unscale_(optimizer)``. The wrapper reads them to report ``unscale_`` called
   on the wrapped optimizer instead of the wrapper.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _foreach_supported_types,
    _group_tensors_by_device_and_dtype,
)

__all__ = [
    "FUSED_ATTRIBUTES",
    "calling_gradscaler",
    "finish_optimizer",
    "fused_kernel",
    "group_by_device_and_dtype",
    "hand_over",
    "is_dtensor",
    "is_flat_parameter",
    "kernel_skip_is_safe",
    "mark_hooked",
    "read_handed",
    "set_grad_mode",
    "take_back",
    "unscaled",
    "use_foreach",
]

#: The attributes a fused optimizer's ``step()`` reads (item 2 above).
FUSED_ATTRIBUTES = ("grad_scale", "found_inf")
_MISSING = object()


# -- 1. foreach grouping -----------------------------------------------------------------


def group_by_device_and_dtype(
    tensors: Sequence[Tensor],
) -> Iterator[tuple[torch.device, list[Tensor], list[int]]]:
    """Yield (device, tensors, their positions) per (device, dtype), as torch groups."""
    grouped = _group_tensors_by_device_and_dtype([list(tensors)], with_indices=True)
    for (device, _dtype), ([group], positions) in grouped.items():
        yield device, list(group), list(positions)  # type: ignore[arg-type]


def group_pairs_by_device_and_dtype(
    tensors: Sequence[Tensor], others: Sequence[Tensor]
) -> list[tuple[torch.device, torch.dtype, list[Tensor], list[Tensor]]]:
    """Group ``tensors`` and their same-position ``others`` by the first's device/dtype."""
    grouped = _group_tensors_by_device_and_dtype([list(tensors), list(others)])
    return [
        (device, dtype, list(lists[0]), list(lists[1]))  # type: ignore[arg-type]
        for (device, dtype), (lists, _) in grouped.items()
    ]


#: torch's answer per device type (asked at every step; a device type's never changes).
_FOREACH_DEVICES: dict[str, bool] = {}


def use_foreach(tensors: list[Tensor], device: torch.device, foreach: bool | None) -> bool:
    """Whether to use the foreach kernels, as ``torch.nn.utils`` decides it.

    torch's ``_has_foreach_support``, with the device's answer kept: the step asks
    this every time, and torch's check is a chain of calls that costs more in a
    training loop (cold caches) than the whole norm of a small model's gradients.

    Raises:
        RuntimeError: ``foreach=True`` on a device without foreach kernels (torch's
            message).
    """
    supported = _FOREACH_DEVICES.get(device.type)
    if supported is None:
        supported = _FOREACH_DEVICES[device.type] = bool(
            _device_has_foreach_support(device)
        )
    if foreach is None:
        if not supported:
            return False
        for t in tensors:  # (a loop, not all() of a generator: one frame less)
            if t is not None and type(t) not in _foreach_supported_types:
                return False
        return True
    if foreach and not supported:
        raise RuntimeError(
            f"foreach=True was passed, but the foreach API does not support "
            f"{device.type} tensors"
        )
    return foreach


#: Sets autograd's grad mode (``torch._C._set_grad_enabled``): what ``torch.no_grad``
#: does inside, without the context manager's Python objects (the engine's step).
set_grad_mode = torch._C._set_grad_enabled


# -- 2. the fused-kernel protocol --------------------------------------------------------


def fused_kernel(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` reads ``grad_scale`` and ``found_inf`` (item 2)."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False))


def kernel_skip_is_safe(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    group_index: Sequence[int],
) -> bool:
    """Whether a fused kernel that skips this step leaves a sound optimizer state.

    Fused SGD with momentum creates a parameter's momentum buffer with
    ``torch.empty_like`` and fills it in the kernel at the first step: a kernel that
    skips that step leaves the buffer uninitialised, and later steps use it (torch's
    GradScaler has the same hazard). So until every stepping parameter has a buffer,
    the host decides. The other fused optimizers start their state from zeros. Checked
    every step (a dictionary lookup per parameter, only on this path), so a state that
    is loaded or cleared is checked again.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        return True
    groups = optimizer.param_groups
    state = optimizer.state
    for param, g in zip(params, group_index, strict=True):
        if (
            groups[g].get("momentum", 0)
            and state.get(param, {}).get("momentum_buffer") is None
        ):
            return False
    return True


def read_handed(obj: Any) -> tuple[Tensor | None, Tensor | None]:
    """The ``grad_scale`` and ``found_inf`` set on ``obj`` (by GradScaler or a user)."""
    state = vars(obj)
    return state.get("grad_scale"), state.get("found_inf")


def hand_over(
    optimizer: torch.optim.Optimizer, grad_scale: Tensor | None, found_inf: Tensor | None
) -> dict[str, Any]:
    """Set what the fused kernel reads; return what was there, for :func:`take_back`."""
    state = vars(optimizer)
    saved = {k: state.get(k, _MISSING) for k in FUSED_ATTRIBUTES}
    state.update(grad_scale=grad_scale, found_inf=found_inf)
    return saved


def take_back(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    """Undo :func:`hand_over`: restore (or remove) what it replaced."""
    state = vars(optimizer)
    for key, value in saved.items():
        if value is _MISSING:
            state.pop(key, None)
        else:
            state[key] = value


# -- 3. finishing an Optimizer subclass without Optimizer.__init__ -----------------------


def finish_optimizer(optimizer: torch.optim.Optimizer) -> None:
    """Create the hook registries and patch ``step``, as unpickling an optimizer does.

    ``Optimizer.__init__`` would rebuild ``param_groups`` and ``state`` (for the wrapper,
    those of the wrapped optimizer: its state would be wiped).
    """
    torch.optim.Optimizer.__setstate__(optimizer, {})


def mark_hooked(step: Any) -> Any:
    """Mark a ``step`` function as already hooked, so torch does not wrap it (item 3)."""
    step.hooked = True
    return step


# -- 4. detection by type name -----------------------------------------------------------


def is_dtensor(tensor: Tensor) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor``."""
    return type(tensor).__name__ == "DTensor" and hasattr(tensor, "to_local")


def is_flat_parameter(tensor: Tensor) -> bool:
    """Whether ``tensor`` is an FSDP1 ``FlatParameter`` (a shard of many parameters)."""
    return type(tensor).__name__ == "FlatParameter"


# -- 5. GradScaler's bookkeeping ---------------------------------------------------------

_SCALER_STEPS = (
    torch.amp.GradScaler.step.__code__,
    torch.amp.GradScaler._maybe_opt_step.__code__,
)


def calling_gradscaler(depth: int = 2) -> Any:
    """The GradScaler whose ``step`` called the caller of this function's caller, or None.

    Cheap when no scaler called: one frame lookup and two identity checks.
    """
    frame = sys._getframe(depth)
    if frame.f_code in _SCALER_STEPS:
        return frame.f_locals.get("self")
    return None


def unscaled(scaler: Any, optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``scaler.unscale_(optimizer)`` ran since the scaler's last update."""
    from torch.amp.grad_scaler import OptState

    states = getattr(scaler, "_per_optimizer_states", {})
    state = states.get(id(optimizer)) if isinstance(states, dict) else None
    return state is not None and state.get("stage") is OptState.UNSCALED
