"""Plots of what clipping did (PNG files, with matplotlib: ``pip install matplotlib``).

- :func:`plot_stats`: the pre-clip norm over steps, the threshold, and the clipped and
  skipped steps marked, from a :class:`clipopt.StatsHistory`.
- :func:`plot_layer_heatmap`: per-parameter gradient norms over steps, from a
  :class:`clipopt.GradRecorder`.
"""

from __future__ import annotations

import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

from ._monitor import GradRecorder, StatsHistory

__all__ = ["plot_layer_heatmap", "plot_stats"]


def _figure(**kwargs: Any) -> Any:
    """A matplotlib ``Figure`` on an Agg canvas: no pyplot, no global backend switch."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:  # pragma: no cover - matplotlib is a dev dependency
        raise ImportError(
            "clipopt.plots needs matplotlib: pip install matplotlib "
            "(or pip install 'clipopt[optuna]')"
        ) from error
    fig = Figure(**kwargs)
    FigureCanvasAgg(fig)
    return fig


def plot_stats(
    history: StatsHistory | Mapping[str, Sequence[float]],
    path: str | os.PathLike[str],
    *,
    title: str = "Gradient norm and clipping threshold",
) -> pathlib.Path:
    """Plot the pre-clip norm, the threshold, and the clipped and skipped steps.

    Args:
        history: A :class:`clipopt.StatsHistory`, or its ``to_dict()``.
        path: The PNG file to write.
        title: The figure's title.

    Returns:
        The written file.

    Example:
        >>> import torch, clipopt, clipopt.plots, tempfile, pathlib
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> opt = clipopt.ClippedOptimizer(torch.optim.SGD([p], lr=0.1), max_norm=1.0)
        >>> history = clipopt.StatsHistory(opt)
        >>> for scale in (0.5, 5.0, 0.7):
        ...     p.grad = torch.full((2,), scale)
        ...     opt.step()
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> clipopt.plots.plot_stats(history, folder / "s.png").stat().st_size > 0
        True
    """
    data = history.to_dict() if isinstance(history, StatsHistory) else history
    steps = list(range(len(data["norm"])))
    fig = _figure(figsize=(8, 3.4), dpi=110)
    ax = fig.subplots()
    ax.plot(steps, data["norm"], color="0.45", lw=1, label="pre-clip norm")
    post = [n * c for n, c in zip(data["norm"], data["coef"], strict=True)]
    ax.plot(steps, post, color="tab:blue", lw=1, label="after clipping")
    ax.plot(steps, data["threshold"], color="tab:red", ls="--", lw=1, label="threshold")
    clipped = [i for i in steps if data["clipped"][i] > 0]
    skipped = [i for i in steps if data["nonfinite"][i] > 0]
    ax.scatter(
        clipped,
        [data["norm"][i] for i in clipped],
        s=10,
        color="tab:red",
        zorder=3,
        label=f"clipped ({len(clipped)})",
    )
    finite = [n for n in data["norm"] if math.isfinite(n)]
    top = max(finite) if finite else 1.0
    ax.scatter(
        skipped,
        [top] * len(skipped),
        marker="x",
        color="black",
        zorder=3,
        label=f"non-finite ({len(skipped)})",
    )
    if finite and min(finite) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def plot_layer_heatmap(
    recorder: GradRecorder,
    path: str | os.PathLike[str],
    *,
    title: str = "Gradient norm per parameter (log10)",
    max_params: int = 80,
) -> pathlib.Path:
    """Plot per-parameter gradient norms over steps as a heatmap (log10 colour scale).

    Exploding layers show as bright bands, vanishing ones as dark bands.

    Args:
        recorder: A :class:`clipopt.GradRecorder` with recorded steps.
        path: The PNG file to write.
        title: The figure's title.
        max_params: Show at most this many parameters (the first ones).

    Returns:
        The written file.

    Raises:
        ValueError: Nothing was recorded.
    """
    rows = recorder.history
    if not rows:
        raise ValueError("the recorder has no recorded step")
    names = recorder.names[:max_params]
    grid = [
        [
            math.log10(v) if v > 0 and math.isfinite(v) else math.nan
            for v in row[: len(names)]
        ]
        for row in rows
    ]
    columns = list(map(list, zip(*grid, strict=True)))
    fig = _figure(figsize=(8, max(2.5, 0.18 * len(names) + 1.2)), dpi=110)
    ax = fig.subplots()
    image = ax.imshow(columns, aspect="auto", interpolation="nearest", cmap="magma")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=6)
    ax.set_xlabel("recorded step")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="log10 gradient norm")
    return _save(fig, path)


def _save(fig: Any, path: str | os.PathLike[str]) -> pathlib.Path:
    fig.tight_layout()
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
