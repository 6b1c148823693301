"""Tools to prove a step reads nothing from the device and copies nothing to it.

- On ``device="meta"`` tensors any read of a value raises.
- On fake CUDA tensors (``FakeTensorMode``) a host read raises
  ``DataDependentOutputException``, and :func:`no_host_to_device` raises on any copy
  from the host to the device (a ``torch.tensor(..., device=...)`` of host data, or a
  CPU tensor moved over), which synchronises a real GPU stream.
- :func:`no_tensors_from_host_data` catches ``torch.tensor`` / ``torch.as_tensor`` calls
  on any device, for paths that fake CUDA cannot run (DTensors, process groups).
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_COPIES = {torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default}


class HostToDeviceError(AssertionError):
    """A host-to-device copy happened where none may."""


class _NoHostToDeviceError(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _COPIES and isinstance(out, torch.Tensor) and out.device.type != "cpu":
            sources = [a for a in args if isinstance(a, torch.Tensor)]
            if any(s.device.type == "cpu" and s.dim() > 0 for s in sources) or any(
                s.device.type == "cpu"
                for s in sources
                if func is torch.ops.aten._to_copy.default
            ):
                raise HostToDeviceError(f"{func} copied host data to {out.device}")
        return out


@contextlib.contextmanager
def no_host_to_device():
    """Raise :class:`HostToDeviceError` on a copy from the host to another device."""
    with _NoHostToDeviceError():
        yield


@contextlib.contextmanager
def no_tensors_from_host_data():
    """Raise on ``torch.tensor`` or ``torch.as_tensor`` (a copy of host data)."""

    def refuse(*args, **kwargs):
        raise HostToDeviceError(f"a tensor was built from host data: {args!r:.80}")

    with (
        mock.patch.object(torch, "tensor", refuse),
        mock.patch.object(torch, "as_tensor", refuse),
    ):
        yield
