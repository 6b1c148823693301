"""Every test and doctest leaves global state as it found it (checked, then restored).

A test that changes torch's thread count, default dtype or device, deterministic or
matmul flags, grad mode, or matplotlib's backend without restoring them fails: the suite
runs in random order (pytest-randomly), and such a change would make later tests depend
on the order and on the machine. torch's random state is seeded per test from the test's
name and restored afterwards, so a test's data does not depend on the order either. The
strategy registry is library state that tests and doctests may extend; it is restored.
"""

from __future__ import annotations

import sys
import zlib
from typing import Any

import pytest
import torch

from clipopt import _registry

try:  # a backend no test asks for, so that switching it (matplotlib.use) shows
    import matplotlib

    matplotlib.use("svg")
except ImportError:  # pragma: no cover - matplotlib is a dev dependency
    pass


def _global_state() -> dict[str, Any]:
    state = {
        "threads": torch.get_num_threads(),
        "default dtype": torch.get_default_dtype(),
        "default device": str(torch.get_default_device()),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
        "deterministic warn-only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "float32 matmul precision": torch.get_float32_matmul_precision(),
        "grad enabled": torch.is_grad_enabled(),
        "cudnn deterministic": torch.backends.cudnn.deterministic,
        "cudnn benchmark": torch.backends.cudnn.benchmark,
    }
    if "matplotlib" in sys.modules:
        rc = sys.modules["matplotlib"].rcParams
        state["matplotlib backend"] = rc._get_backend_or_none()
    return state


def _restore(state: dict[str, Any]) -> None:
    torch.set_num_threads(state["threads"])
    torch.set_default_dtype(state["default dtype"])
    torch.set_default_device(state["default device"])
    torch.use_deterministic_algorithms(
        state["deterministic"], warn_only=state["deterministic warn-only"]
    )
    torch.set_float32_matmul_precision(state["float32 matmul precision"])
    torch.set_grad_enabled(state["grad enabled"])
    torch.backends.cudnn.deterministic = state["cudnn deterministic"]
    torch.backends.cudnn.benchmark = state["cudnn benchmark"]
    if "matplotlib backend" in state and state["matplotlib backend"] is not None:
        sys.modules["matplotlib"].use(state["matplotlib backend"])


@pytest.fixture(autouse=True)
def _global_state_is_left_as_found(request: pytest.FixtureRequest) -> Any:
    before = _global_state()
    registry = dict(_registry._REGISTRY), dict(_registry._ALIASES)
    names = {cls: cls.name for cls in registry[0].values()}
    rng = torch.get_rng_state()
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
    torch.set_rng_state(rng)
    _registry._REGISTRY.clear()
    _registry._REGISTRY.update(registry[0])
    _registry._ALIASES.clear()
    _registry._ALIASES.update(registry[1])
    for cls, name in names.items():
        cls.name = name
    after = _global_state()
    if after != before:
        changed = {k: (before.get(k), v) for k, v in after.items() if v != before.get(k)}
        _restore(before)
        pytest.fail(f"the test changed global state without restoring it: {changed}")
