"""Shared fixtures: hypothesis profiles and the matrix of every torch.optim optimizer."""

from __future__ import annotations

import inspect
import os
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)
settings.register_profile("dev", max_examples=300, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# SparseAdam takes sparse gradients only, which clipopt rejects with a clear error (no
# clip function in torch supports them either: see tests/test_optimizer.py).
SKIPPED_OPTIMIZERS = {"SparseAdam": "sparse gradients only"}


def optimizer_classes() -> list[type[torch.optim.Optimizer]]:
    classes = []
    for name in torch.optim.__all__:
        cls = getattr(torch.optim, name)
        if (
            isinstance(cls, type)
            and issubclass(cls, torch.optim.Optimizer)
            and cls is not torch.optim.Optimizer
            and name not in SKIPPED_OPTIMIZERS
        ):
            classes.append(cls)
    return classes


def optimizer_variants() -> list[Any]:
    """Every optimizer class with its for-loop, foreach and fused variants."""
    params = []
    for cls in optimizer_classes():
        accepted = inspect.signature(cls.__init__).parameters
        variants: list[dict[str, Any]] = [{}]
        if "foreach" in accepted:
            variants = [{"foreach": False}, {"foreach": True}]
        if "fused" in accepted:
            variants.append({"fused": True})
        for kwargs in variants:
            kwargs = {**OPTIMIZER_KWARGS.get(cls.__name__, {}), **kwargs}
            label = "-".join(k for k in ("foreach", "fused") if kwargs.get(k)) or "forloop"
            params.append(pytest.param(cls, kwargs, id=f"{cls.__name__}-{label}"))
    return params


# Settings that keep a few steps of each optimizer on the small model finite (LBFGS with an
# active clip inside its line search diverges at lr=1).
OPTIMIZER_KWARGS: dict[str, dict[str, Any]] = {"LBFGS": {"lr": 0.1, "max_iter": 4}}


def make_model(cls: type[torch.optim.Optimizer], dtype: torch.dtype = torch.float32):
    """A small MLP; Muon only takes 2-D parameters, so it gets no biases."""
    bias = cls is not torch.optim.Muon
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5, bias=bias),
        torch.nn.Tanh(),
        torch.nn.Linear(5, 3, bias=bias),
    ).to(dtype)


def batches(n: int, dtype: torch.dtype = torch.float32, seed: int = 1):
    """Batches whose target scale varies, so some steps clip and others do not."""
    g = torch.Generator().manual_seed(seed)
    scales = [10.0, 0.05, 3.0, 0.01, 30.0, 0.2, 1.0]
    return [
        (
            torch.randn(8, 6, generator=g, dtype=dtype),
            scales[i % len(scales)] * torch.randn(8, 3, generator=g, dtype=dtype),
        )
        for i in range(n)
    ]


def load_script(path):
    """Import a script (an example, the benchmark) by file path, as a module."""
    import importlib.util
    import pathlib

    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loss_of(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return torch.nn.functional.mse_loss(model(x), y)


@pytest.fixture
def threads(request):
    """Run a numerics test with ``request.param`` torch threads, then restore the count."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    try:
        yield request.param
    finally:
        torch.set_num_threads(before)
