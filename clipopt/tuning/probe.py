"""Measure unclipped gradient norms and store a ``max_norm`` range in the study."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import optuna
import torch

from .._optimizer import ClippedOptimizer
from .._ownership import borrowed
from .._validation import check_int
from ..strategies import NormClip

#: Study user attribute holding the ``[low, high]`` range for ``max_norm``.
NORM_RANGE_ATTR = "clipopt:norm_range"
#: Study user attribute holding the probed gradient-norm percentiles.
PERCENTILES_ATTR = "clipopt:grad_norm_percentiles"


@dataclass(frozen=True)
class GradNormProbe:
    """Total gradient norms measured over a few unclipped steps.

    Attributes:
        norms: The finite norms, in step order.
        n_nonfinite: How many steps had non-finite gradients (skipped, not recorded).
        norm_type: The p of the norms.
    """

    norms: tuple[float, ...]
    n_nonfinite: int = 0
    norm_type: float = 2.0

    def percentile(self, q: float) -> float:
        """Return the ``q``-th percentile (0-100) of the norms.

        Raises:
            ValueError: No finite norm was recorded.
        """
        if not self.norms:
            raise ValueError("the probe recorded no finite gradient norm")
        return float(np.percentile(self.norms, q))

    @property
    def percentiles(self) -> dict[float, float]:
        """Percentiles 1, 5, 10, 25, 50, 75, 90, 95 and 99 of the norms."""
        return {q: self.percentile(q) for q in (1, 5, 10, 25, 50, 75, 90, 95, 99)}

    def suggested_range(
        self,
        *,
        low_percentile: float = 5.0,
        high_percentile: float = 99.0,
        low_factor: float = 0.1,
        high_factor: float = 2.0,
    ) -> tuple[float, float]:
        """Return a ``max_norm`` search range: a decade below p5 to twice p99.

        The best ``max_norm`` is often *below* the 5th percentile of the unclipped norms
        (clipping nearly every step acts like normalised gradient descent), so the range
        reaches a decade below the low percentiles.
        """
        low = self.percentile(low_percentile) * low_factor
        high = self.percentile(high_percentile) * high_factor
        if not (0 < low < high):
            raise ValueError(f"degenerate norm range ({low}, {high}) from the probe")
        return low, high


def probe_grad_norms(
    train_step: Callable[[torch.optim.Optimizer], Any],
    optimizer: torch.optim.Optimizer,
    *,
    n_steps: int = 50,
    norm_type: float = 2.0,
) -> GradNormProbe:
    """Run ``n_steps`` unclipped training steps and record the total gradient norms.

    ``train_step(opt)`` runs one step of the user's training: ``opt.zero_grad()``, the
    forward and backward passes, and ``opt.step()``. It receives ``optimizer`` wrapped so
    that it records the norm and never clips; a step with non-finite gradients is skipped
    (and counted) rather than applied. The steps do train the model: probe a throwaway
    copy, or count them as the start of training. Measure at the learning rate you will
    train with, after any LR warmup: the norms change fast early on.

    Args:
        train_step: One training step, given the optimizer to step.
        optimizer: The optimizer to step (a ``ClippedOptimizer`` is unwrapped: the probe
            does not clip).
        n_steps: How many steps to run, >= 1.
        norm_type: p of the norm.

    Returns:
        The recorded norms.
    """
    n_steps = check_int("n_steps", n_steps, minimum=1)
    inner = optimizer.optimizer if isinstance(optimizer, ClippedOptimizer) else optimizer
    norms: list[torch.Tensor] = []
    with borrowed(inner):  # the recorder may wrap an optimizer another front-end owns
        recorder = ClippedOptimizer(inner, NormClip(max_norm=math.inf, norm_type=norm_type))
        for _ in range(n_steps):
            before = recorder.counts()
            train_step(recorder)
            after = recorder.counts()
            if after["steps"] > before["steps"] and recorder.last_stats is not None:
                norms.append(recorder.last_stats.norm.detach())
    values = torch.stack(norms).double().cpu().tolist() if norms else []
    return GradNormProbe(
        tuple(values), recorder.counts()["skipped_steps"], float(norm_type)
    )


def norm_range(study: optuna.Study) -> tuple[float, float] | None:
    """Return the study's calibrated ``max_norm`` range, or None."""
    stored = study.user_attrs.get(NORM_RANGE_ATTR)
    if stored is None:
        return None
    return float(stored[0]), float(stored[1])


def store_probe(
    study: optuna.Study,
    probe: GradNormProbe,
    *,
    overwrite: bool = False,
    **range_kwargs: Any,
) -> tuple[float, float]:
    """Store a probe's percentiles and ``max_norm`` range in the study, once.

    The first writer wins (unless ``overwrite``): a worker that probes again gets the
    stored range back, so every worker searches the same distribution (different ranges
    under one parameter name silently disable multivariate TPE). Values are stored as
    plain floats, which persistent storages need.

    Args:
        study: The study.
        probe: From :func:`probe_grad_norms`.
        overwrite: Replace a stored range.
        **range_kwargs: Passed to :meth:`GradNormProbe.suggested_range`.

    Returns:
        The range in force.
    """
    existing = norm_range(study)
    if existing is not None and not overwrite:
        return existing
    low, high = probe.suggested_range(**range_kwargs)
    study.set_user_attr(
        PERCENTILES_ATTR, {str(q): float(v) for q, v in probe.percentiles.items()}
    )
    study.set_user_attr("clipopt:probe_steps", len(probe.norms))
    study.set_user_attr("clipopt:probe_nonfinite", int(probe.n_nonfinite))
    study.set_user_attr(NORM_RANGE_ATTR, [float(low), float(high)])
    return low, high
