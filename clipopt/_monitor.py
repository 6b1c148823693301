"""See what clipping does: statistics history and logging, gradient health, warnings.

Everything here stays off the hot path: recording keeps device tensors (no host read), and
the device is read only on logging steps or when a report is asked for.
"""

from __future__ import annotations

import math
import statistics
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from . import functional as F
from ._optimizer import ClippedOptimizer
from ._validation import check_int

__all__ = [
    "GradRecorder",
    "GradReport",
    "GradReportRow",
    "StatsHistory",
    "StatsLogger",
    "check_double_clipping",
    "grad_report",
    "log_stats",
]

Status = Literal["ok", "vanishing", "exploding"]


def _require_wrapper(optimizer: Any) -> ClippedOptimizer:
    if not isinstance(optimizer, ClippedOptimizer):
        raise TypeError(
            f"optimizer must be a clipopt.ClippedOptimizer, got {type(optimizer).__name__}"
        )
    return optimizer


class StatsHistory:
    """Record the clipping statistics of every step, without reading the device.

    Each step appends the 0-dim tensors of ``last_stats``; :meth:`to_dict` copies them to
    the host once. Use it for plots (:func:`clipopt.plots.plot_stats`) or offline
    analysis; call :meth:`close` to stop recording.

    Args:
        optimizer: The :class:`clipopt.ClippedOptimizer` to record.

    Example:
        >>> import torch, clipopt
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> opt = clipopt.ClippedOptimizer(torch.optim.SGD([p], lr=0.1), max_norm=1.0)
        >>> history = clipopt.StatsHistory(opt)
        >>> for g in ([3.0, 4.0], [0.3, 0.4]):
        ...     p.grad = torch.tensor(g)
        ...     opt.step()
        >>> history.to_dict()["norm"] == [5.0, 0.5]
        True
    """

    def __init__(self, optimizer: ClippedOptimizer) -> None:
        self.optimizer = _require_wrapper(optimizer)
        self._rows: list[Tensor] = []
        self._handle: Any = optimizer.register_step_post_hook(self._record)
        self._seen: Any = None

    def _record(self, *_: Any) -> None:
        stats = self.optimizer.last_stats
        if stats is not None and stats is not self._seen:
            self._seen = stats
            self._rows.append(torch.stack([t.detach().to(torch.float64) for t in stats]))

    def __len__(self) -> int:
        return len(self._rows)

    def to_dict(self) -> dict[str, list[float]]:
        """Return every recorded statistic as a list of floats (one host copy)."""
        if not self._rows:
            return {name: [] for name in _STAT_FIELDS}
        table = torch.stack(self._rows).cpu().tolist()
        return {name: [row[i] for row in table] for i, name in enumerate(_STAT_FIELDS)}

    def close(self) -> None:
        """Stop recording."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


_STAT_FIELDS = ("norm", "threshold", "coef", "clipped", "nonfinite")


class StatsLogger:
    """Log clipping statistics every ``every`` steps; made by :func:`log_stats`."""

    def __init__(
        self,
        optimizer: ClippedOptimizer,
        target: Any,
        *,
        every: int,
        prefix: str,
        warn_after: int,
    ) -> None:
        self.optimizer = _require_wrapper(optimizer)
        if not (callable(target) or hasattr(target, "add_scalar")):
            raise TypeError(
                "target must be a SummaryWriter (with add_scalar) or a callable "
                f"(stats, step), got {type(target).__name__}"
            )
        self.target = target
        self.every = check_int("every", every, minimum=1)
        self.warn_after = check_int("warn_after", warn_after, minimum=1)
        self.prefix = prefix
        self.calls = 0
        self._warned: set[str] = set()
        self._last_counts: dict[str, int] | None = None
        self._streak: dict[str, int] = {"always": 0, "never": 0}
        self._handle: Any = optimizer.register_step_post_hook(self._on_step)

    def _on_step(self, *_: Any) -> None:
        self.calls += 1
        if self.calls % self.every == 0:
            self.log(self.calls)

    def log(self, step: int) -> dict[str, float]:
        """Read the statistics and counts (two host copies) and hand them to the target."""
        stats = self.optimizer.last_stats
        counts = self.optimizer.counts()
        values: dict[str, float] = {}
        if stats is not None:
            d = stats.to_dict()
            values.update(
                norm=d["norm"],
                post_clip_norm=d["norm"] * d["coef"],
                threshold=d["threshold"],
                coef=d["coef"],
                clipped=d["clipped"],
            )
        steps = max(counts["steps"], 1)
        values["clip_rate"] = counts["clipped_steps"] / steps
        values["skipped_steps"] = float(counts["skipped_steps"])
        values["nonfinite_steps"] = float(counts["nonfinite_steps"])
        self._check_rates(counts)
        if hasattr(self.target, "add_scalar"):
            for key, value in values.items():
                self.target.add_scalar(f"{self.prefix}{key}", value, step)
        else:
            self.target({f"{self.prefix}{k}": v for k, v in values.items()}, step)
        return values

    def _check_rates(self, counts: dict[str, int]) -> None:
        """Warn (once each) when clipping fired on every step, or never, for long."""
        last, self._last_counts = self._last_counts, counts
        if last is None:
            return
        steps = counts["steps"] - last["steps"]
        clipped = counts["clipped_steps"] - last["clipped_steps"]
        if steps <= 0:
            return
        self._streak["always"] = self._streak["always"] + steps if clipped == steps else 0
        self._streak["never"] = self._streak["never"] + steps if clipped == 0 else 0
        if self._streak["always"] >= self.warn_after:
            self._warn_once(
                "always",
                f"clipping fired on every one of the last {self._streak['always']} steps: "
                "the update is then the gradient's direction at a fixed length "
                "(normalised SGD); raise the threshold if that is not intended",
            )
        if self._streak["never"] >= self.warn_after:
            self._warn_once(
                "never",
                f"clipping has not fired in the last {self._streak['never']} steps: the "
                "threshold may be too high to catch spikes (see clipopt.tuning)",
            )

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=4)

    def close(self) -> None:
        """Stop logging."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


def log_stats(
    optimizer: ClippedOptimizer,
    target: Any,
    *,
    every: int = 100,
    prefix: str = "clip/",
    warn_after: int = 1000,
) -> StatsLogger:
    """Log clipping statistics every ``every`` steps to TensorBoard or any callable.

    On logging steps only, the statistics are read from the device (one copy) and
    written: the pre- and post-clip norm, the threshold, the coefficient, whether the
    step clipped, the clip rate so far and the skipped and non-finite step counts. The
    same checks warn, once each, when clipping fired on every step or on none for
    ``warn_after`` steps.

    Args:
        optimizer: The :class:`clipopt.ClippedOptimizer`.
        target: A ``torch.utils.tensorboard.SummaryWriter`` (anything with
            ``add_scalar(tag, value, step)``), or a callable ``(stats, step)`` receiving a
            dict of floats (e.g. ``wandb.log`` with a lambda, or ``print``).
        every: Log every so many steps, >= 1.
        prefix: Prefix of the tags.
        warn_after: Steps of always (or never) clipping before a warning.

    Returns:
        The logger; ``close()`` stops it, ``log(step)`` logs at once.

    Example:
        >>> import torch, clipopt
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> opt = clipopt.ClippedOptimizer(torch.optim.SGD([p], lr=0.1), max_norm=1.0)
        >>> logged = []
        >>> logger = clipopt.log_stats(opt, lambda stats, _: logged.append(stats), every=2)
        >>> for _ in range(4):
        ...     p.grad = torch.tensor([3.0, 4.0])
        ...     opt.step()
        >>> last = logged.pop()
        >>> len(logged) + 1, last["clip/norm"], last["clip/clip_rate"]
        (2, 5.0, 1.0)
    """
    return StatsLogger(optimizer, target, every=every, prefix=prefix, warn_after=warn_after)


# -- gradient health --------------------------------------------------------------------


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


def check_double_clipping(trainer: Any) -> list[str]:
    """Warn when a training framework clips as well as clipopt, and say what to change.

    Recognises a PyTorch Lightning ``Trainer`` (``gradient_clip_val``) and a Hugging Face
    ``Trainer`` or ``TrainingArguments`` (``max_grad_norm``). Clipping twice makes the
    statistics misleading (the second clipper sees clipped gradients) and the threshold
    that matters unclear.

    Args:
        trainer: The framework's trainer (or training arguments).

    Returns:
        The problems found (empty when none); each is also warned.
    """
    problems = []
    clip_val = getattr(trainer, "gradient_clip_val", None)
    if clip_val:
        problems.append(
            f"Lightning's Trainer clips too (gradient_clip_val={clip_val}): set "
            "gradient_clip_val=None when the optimizer is a clipopt.ClippedOptimizer"
        )
    args = getattr(trainer, "args", trainer)
    max_grad_norm = getattr(args, "max_grad_norm", None)
    if max_grad_norm and max_grad_norm > 0 and type(args).__name__ == "TrainingArguments":
        problems.append(
            f"Hugging Face's Trainer clips too (max_grad_norm={max_grad_norm}): set "
            "max_grad_norm=0 when clipopt clips"
        )
    for problem in problems:
        warnings.warn(problem, UserWarning, stacklevel=2)
    return problems
