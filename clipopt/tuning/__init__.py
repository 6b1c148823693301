"""Tune the clipping strategy and its threshold with an Optuna study.

Install with ``pip install "clipopt[optuna]"``. The pieces:

- :func:`suggest_strategy` builds a strategy from a trial: the strategy first (when more
  than one is searched), then only its own parameters, each under its own prefixed name;
  :func:`strategy_from_params` rebuilds it from ``study.best_params``.
- :func:`probe_grad_norms` runs a few unclipped steps and measures the gradient norms;
  :func:`store_probe` writes them and a search range into the study once, so every
  worker searches the same range.
- :class:`TrialReporter` reports a training curve, prunes (after a warm-up share of the
  run) and records clipping statistics as JSON-safe user attributes.
- :func:`tune` runs the study: in memory, on SQLite, on a journal file or on any Optuna
  storage shared by many processes and machines, with a global trial budget, baselines
  enqueued once and a distinct sampler seed per worker and per resume.
- :func:`summarize` and :func:`save_plots` report the result.

Example:
    >>> import optuna, clipopt.tuning as ct
    >>> params = {"clip_strategy": "norm", "clip_norm_max_norm": 0.5}
    >>> ct.suggest_strategy(optuna.trial.FixedTrial(params), ("none", "norm"))
    NormClip(max_norm=0.5, norm_type=2.0, scope='global', foreach=None)
    >>> ct.strategy_from_params(params)
    NormClip(max_norm=0.5, norm_type=2.0, scope='global', foreach=None)
"""

from __future__ import annotations

try:
    import optuna  # noqa: F401  (imported first, so that a missing optuna names the extra)
except ImportError as error:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "clipopt.tuning needs optuna>=5.0; install it with: pip install 'clipopt[optuna]'"
    ) from error

from ._budget import count_finished
from .plots import save_plots
from .probe import (
    NORM_RANGE_ATTR,
    PERCENTILES_ATTR,
    GradNormProbe,
    norm_range,
    probe_grad_norms,
    store_probe,
)
from .reporting import Diverged, TrialReporter
from .reporting import NonfiniteObjective as NonfiniteObjective
from .space import (
    DEFAULT_SPACES,
    NONE,
    param_name,
    strategy_from_params,
    suggest_strategy,
)
from .space import Space as Space
from .study import Objective as Objective
from .study import (
    baseline_params,
    enqueue_baselines,
    make_storage,
    tune,
    worker_seed,
)
from .summary import TuningSummary, summarize

__all__ = [
    "DEFAULT_SPACES",
    "NONE",
    "NORM_RANGE_ATTR",
    "PERCENTILES_ATTR",
    "Diverged",
    "GradNormProbe",
    "TrialReporter",
    "TuningSummary",
    "baseline_params",
    "count_finished",
    "enqueue_baselines",
    "make_storage",
    "norm_range",
    "param_name",
    "probe_grad_norms",
    "save_plots",
    "store_probe",
    "strategy_from_params",
    "suggest_strategy",
    "summarize",
    "tune",
    "worker_seed",
]
