"""Gradient health: per-parameter norms, a verdict, and a recorder for heatmaps.

Off the hot path: the device is read once per report, or when the history is asked for.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from . import functional as F

__all__ = ["GradRecorder", "GradReport", "GradReportRow", "grad_report"]

Status = Literal["ok", "vanishing", "exploding"]


@dataclass(frozen=True)
class GradReportRow:
    """One parameter of a :class:`GradReport`.

    Attributes:
        name: The parameter's name.
        grad_norm: L2 norm of its gradient (``torch.norm(p.grad)``).
        param_norm: L2 norm of the parameter.
        ratio: ``grad_norm / param_norm`` (inf for a zero parameter with a gradient).
        status: ``"ok"``, ``"vanishing"`` or ``"exploding"``.
    """

    name: str
    grad_norm: float
    param_norm: float
    ratio: float
    status: Status


@dataclass(frozen=True)
class GradReport:
    """Per-parameter gradient norms and a verdict; ``str()`` is a readable table.

    The rules, with the thresholds given to :func:`grad_report`:

    - **exploding**: the gradient norm is not finite, or exceeds ``explode_factor``
      times the median gradient norm of the model's parameters;
    - **vanishing**: the gradient norm is below ``vanish_factor`` times that median, or
      below ``vanish_abs``;
    - **ok** otherwise.

    Clipping helps against exploding gradients; against vanishing ones it cannot (it
    only scales down): look at initialisation, normalisation or the learning rate.

    Attributes:
        rows: One :class:`GradReportRow` per parameter that has a gradient.
        total_norm: The total L2 norm of all gradients.
        median_grad_norm: The median of the rows' gradient norms.
    """

    rows: list[GradReportRow]
    total_norm: float
    median_grad_norm: float
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def exploding(self) -> list[GradReportRow]:
        """The rows whose status is ``"exploding"``."""
        return [r for r in self.rows if r.status == "exploding"]

    @property
    def vanishing(self) -> list[GradReportRow]:
        """The rows whose status is ``"vanishing"``."""
        return [r for r in self.rows if r.status == "vanishing"]

    def __str__(self) -> str:
        width = max([len(r.name) for r in self.rows] + [9])
        lines = [
            f"{'parameter':<{width}}  {'grad norm':>10}  {'param norm':>10}  "
            f"{'ratio':>9}  status",
        ]
        for r in self.rows:
            lines.append(
                f"{r.name:<{width}}  {r.grad_norm:>10.3e}  {r.param_norm:>10.3e}  "
                f"{r.ratio:>9.2e}  {r.status}"
            )
        lines.append(
            f"total gradient norm {self.total_norm:.4g}; "
            f"median {self.median_grad_norm:.4g};"
            f" {len(self.exploding)} exploding, {len(self.vanishing)} vanishing"
        )
        return "\n".join(lines)


def _named(model_or_params: Any) -> list[tuple[str, Tensor]]:
    if isinstance(model_or_params, torch.nn.Module):
        return list(model_or_params.named_parameters())
    items = list(model_or_params)
    if items and isinstance(items[0], tuple):
        return [(str(n), p) for n, p in items]
    return [(str(i), p) for i, p in enumerate(items)]


def grad_report(
    model: torch.nn.Module | Iterable[Tensor] | Iterable[tuple[str, Tensor]],
    *,
    explode_factor: float = 100.0,
    vanish_factor: float = 1e-4,
    vanish_abs: float = 1e-12,
) -> GradReport:
    """Report every parameter's gradient norm and whether it explodes or vanishes.

    Call it after ``backward()`` (and before ``zero_grad``); it reads the device once.

    Args:
        model: A module (names from ``named_parameters()``), parameters, or
            ``(name, parameter)`` pairs.
        explode_factor: A gradient norm above this times the median is "exploding".
        vanish_factor: A gradient norm below this times the median is "vanishing".
        vanish_abs: A gradient norm below this is "vanishing" whatever the median.

    Returns:
        The report.

    Example:
        >>> import torch, clipopt
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
        >>> model(torch.randn(8, 4)).sum().backward()
        >>> report = clipopt.grad_report(model)
        >>> ", ".join(r.name for r in report.rows)
        '0.weight, 0.bias, 1.weight, 1.bias'
        >>> report.counts["exploding"]
        0
    """
    named = [(n, p) for n, p in _named(model) if p.grad is not None]
    if not named:
        return GradReport([], 0.0, 0.0, {"ok": 0, "vanishing": 0, "exploding": 0})
    grads = [p.grad for _, p in named]
    params = [p.detach() for _, p in named]
    grad_norms = F.tensor_norms([g for g in grads if g is not None])
    param_norms = F.tensor_norms(params)
    values = torch.stack([grad_norms.double(), param_norms.to(grad_norms).double()]).cpu()
    g_list, p_list = values.tolist()
    finite = [g for g in g_list if math.isfinite(g)]
    median = statistics.median(finite) if finite else math.nan
    rows = []
    for (name, _), g, p in zip(named, g_list, p_list, strict=True):
        status: Status = "ok"
        if not math.isfinite(g) or (math.isfinite(median) and g > explode_factor * median):
            status = "exploding"
        elif g < vanish_abs or (math.isfinite(median) and g < vanish_factor * median):
            status = "vanishing"
        ratio = g / p if p > 0 else (math.inf if g > 0 else 0.0)
        rows.append(GradReportRow(name, g, p, ratio, status))
    total = math.sqrt(sum(g * g for g in g_list)) if finite == g_list else math.inf
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "vanishing", "exploding")}
    return GradReport(rows, total, median, counts)


class GradRecorder:
    """Record per-parameter gradient norms over steps, for a heatmap or a report.

    :meth:`record` (call it after ``backward()``) keeps the norms on the device; the
    device is read when :attr:`history` is asked for.

    Args:
        model: A module, parameters, or ``(name, parameter)`` pairs.

    Example:
        >>> import torch, clipopt
        >>> model = torch.nn.Linear(3, 1)
        >>> recorder = clipopt.GradRecorder(model)
        >>> for _ in range(3):
        ...     model(torch.randn(4, 3)).sum().backward()
        ...     recorder.record()
        ...     model.zero_grad()
        >>> recorder.names, len(recorder.history)
        (['weight', 'bias'], 3)
    """

    def __init__(self, model: Any) -> None:
        self._named = _named(model)
        self.names = [n for n, _ in self._named]
        self._rows: list[Tensor] = []

    def record(self) -> None:
        """Record this step's gradient norms (0 for parameters without a gradient)."""
        norms = [
            torch.linalg.vector_norm(p.grad).double()
            if p.grad is not None
            else torch.zeros((), dtype=torch.float64, device=p.device)
            for _, p in self._named
        ]
        self._rows.append(torch.stack([n.to(norms[0].device) for n in norms]))

    @property
    def history(self) -> list[list[float]]:
        """One row per recorded step, one column per parameter (one host copy)."""
        if not self._rows:
            return []
        values: list[list[float]] = torch.stack(self._rows).cpu().tolist()
        return values
