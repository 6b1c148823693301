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

import hashlib
import math
import os
import pathlib
import socket
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

try:
    import optuna
    from optuna.trial import TrialState
except ImportError as error:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "clipopt.tuning needs optuna>=5.0; install it with: pip install 'clipopt[optuna]'"
    ) from error

import numpy as np
import torch

from ._optimizer import ClippedOptimizer
from ._ownership import borrowed
from ._protocol import ClipStrategy
from ._registry import available_strategies, get_strategy
from ._validation import check_choice, check_int, check_range
from .strategies import NormClip

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

#: The pseudo-strategy "no clipping" (a ``NormClip(max_norm=inf)``, which still records
#: statistics).
NONE = "none"
#: Study user attribute holding the ``[low, high]`` range for ``max_norm``.
NORM_RANGE_ATTR = "clipopt:norm_range"
#: Study user attribute holding the probed gradient-norm percentiles.
PERCENTILES_ATTR = "clipopt:grad_norm_percentiles"
_BASELINES_ATTR = "clipopt:baselines_enqueued"
_BASELINE_TAG = "clipopt:baseline"

#: Search space per strategy: parameter -> (low, high, log). Thresholds are log-uniform.
#: ``max_norm`` spans four decades when no probe calibrated it (see :func:`store_probe`).
DEFAULT_SPACES: dict[str, dict[str, tuple[float, float, bool]]] = {
    NONE: {},
    "norm": {"max_norm": (1e-2, 1e2, True)},
    "value": {"clip_value": (1e-3, 1e1, True)},
    "percentile": {"percentile": (1.0, 99.0, False)},
    "zscore": {"z_thresh": (1.0, 5.0, False)},
    "adagc": {"clip_ratio": (1.01, 3.0, True)},
    "agc": {"clipping": (1e-3, 1.0, True)},
}

#: The baselines :func:`enqueue_baselines` adds, when their strategy is searched.
_BASELINES: dict[str, tuple[str, dict[str, float]]] = {
    "no clipping": (NONE, {}),
    "max_norm=1.0": ("norm", {"max_norm": 1.0}),
    "percentile=10": ("percentile", {"percentile": 10.0}),
}

Space = Mapping[str, tuple[float, float, bool]]
Objective = Callable[[optuna.Trial, ClipStrategy], float]
NonfiniteObjective = Literal["prune", "penalize", "raise"]


def param_name(strategy: str, param: str, prefix: str = "clip") -> str:
    """Return the trial parameter name of a strategy's parameter.

    Each strategy's parameters get their own names (Optuna rejects one name with two
    distributions), e.g. ``clip_norm_max_norm`` and ``clip_value_clip_value``.

    Example:
        >>> param_name("norm", "max_norm")
        'clip_norm_max_norm'
    """
    return f"{prefix}_{strategy}_{param}"


def _check_strategies(strategies: Sequence[str]) -> tuple[str, ...]:
    if isinstance(strategies, str) or not strategies:
        raise ValueError(
            f"strategies must be a non-empty sequence of names, got {strategies!r}"
        )
    known = {NONE, *available_strategies()}
    unknown = [s for s in strategies if s not in known]
    if unknown:
        raise ValueError(
            f"unknown strategies {unknown}; available: {', '.join(sorted(known))}"
        )
    if len(set(strategies)) != len(strategies):
        raise ValueError(f"strategies must not repeat, got {list(strategies)}")
    return tuple(strategies)


def _space(
    strategy: str,
    spaces: Mapping[str, Space] | None,
    trial: optuna.trial.BaseTrial,
) -> Space:
    if spaces is not None and strategy in spaces:
        return spaces[strategy]
    if strategy not in DEFAULT_SPACES:
        raise ValueError(
            f"no search space for strategy {strategy!r}; pass "
            f"spaces={{{strategy!r}: {{'<param>': (low, high, log)}}}}"
        )
    space = dict(DEFAULT_SPACES[strategy])
    study = getattr(trial, "study", None)
    if strategy == "norm" and study is not None:
        calibrated = norm_range(study)
        if calibrated is not None:
            space["max_norm"] = (calibrated[0], calibrated[1], True)
    return space


def _build(strategy: str, kwargs: Mapping[str, Any]) -> ClipStrategy:
    if strategy == NONE:
        return NormClip(max_norm=math.inf)
    return get_strategy(strategy, **kwargs)


def suggest_strategy(
    trial: optuna.trial.BaseTrial,
    strategies: Sequence[str] = ("norm",),
    *,
    spaces: Mapping[str, Space] | None = None,
    prefix: str = "clip",
) -> ClipStrategy:
    """Suggest a strategy and its parameters from a trial, and build it.

    With several strategies, ``<prefix>_strategy`` is suggested first, then only the
    chosen strategy's parameters, each named ``<prefix>_<strategy>_<param>``. Thresholds
    are log-uniform. ``max_norm`` searches the study's calibrated range (see
    :func:`store_probe`) when there is one, else ``DEFAULT_SPACES``.

    Works with ``optuna.Trial`` and with ``optuna.trial.FixedTrial(study.best_params)``,
    which rebuilds the best strategy exactly.

    Args:
        trial: The trial.
        strategies: Registered names, and ``"none"`` for no clipping.
        spaces: Overrides per strategy: ``{"norm": {"max_norm": (0.1, 10.0, True)}}``.
            Needed for strategies without a default space (user-registered ones).
        prefix: Prefix of every parameter name.

    Returns:
        A new strategy for :class:`clipopt.ClippedOptimizer`.

    Raises:
        ValueError: Unknown or repeated strategy names, or a strategy with no space.
    """
    names = _check_strategies(strategies)
    if len(names) == 1:
        strategy = names[0]
    else:
        strategy = str(trial.suggest_categorical(f"{prefix}_strategy", list(names)))
    kwargs = {
        param: trial.suggest_float(param_name(strategy, param, prefix), low, high, log=log)
        for param, (low, high, log) in _space(strategy, spaces, trial).items()
    }
    return _build(strategy, kwargs)


def strategy_from_params(
    params: Mapping[str, Any],
    *,
    strategies: Sequence[str] | None = None,
    prefix: str = "clip",
) -> ClipStrategy:
    """Rebuild a strategy from trial parameters, e.g. ``study.best_params``.

    Parameters without the prefix (the user's own, such as ``lr``) are ignored.

    Args:
        params: Trial parameters.
        strategies: The searched strategies; needed only when a single strategy without
            parameters (``("none",)``) was searched.
        prefix: Prefix of the parameter names.

    Raises:
        ValueError: The parameters do not name one strategy.
    """
    strategy = params.get(f"{prefix}_strategy")
    if strategy is None:
        known = {NONE, *available_strategies()}
        found = [s for s in known if any(k.startswith(f"{prefix}_{s}_") for k in params)]
        if len(found) == 1:
            strategy = found[0]
        elif not found and strategies is not None and len(strategies) == 1:
            strategy = strategies[0]
        else:
            raise ValueError(
                f"cannot tell the strategy from parameters {sorted(params)} "
                f"(prefix {prefix!r})"
            )
    lead = f"{prefix}_{strategy}_"
    kwargs = {k[len(lead) :]: v for k, v in params.items() if k.startswith(lead)}
    return _build(str(strategy), kwargs)


# -- probing ------------------------------------------------------------------------------


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
    with borrowed(inner):
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


# -- reporting ----------------------------------------------------------------------------


class Diverged(Exception):  # noqa: N818  (an outcome, not a bug)
    """A trial's value went non-finite under ``on_nonfinite="penalize"``.

    :func:`tune` turns it into a COMPLETE trial with value ``penalty``; with plain Optuna,
    catch it and ``return error.penalty``.
    """

    def __init__(self, penalty: float, step: int | None = None) -> None:
        super().__init__(f"non-finite value at step {step}; penalized with {penalty}")
        self.penalty = penalty
        self.step = step


def _handle_nonfinite(
    trial: optuna.trial.BaseTrial,
    policy: NonfiniteObjective,
    penalty: float | None,
    value: float,
    step: int | None,
) -> None:
    trial.set_user_attr("clipopt:diverged_at", -1 if step is None else int(step))
    if policy == "prune":
        raise optuna.TrialPruned(f"non-finite value {value} at step {step}")
    if policy == "penalize":
        assert penalty is not None  # checked by the callers' constructors
        raise Diverged(penalty, step)
    raise ValueError(f"the objective value is not finite: {value} (step {step})")


class TrialReporter:
    """Report a training curve to a trial, prune it, and record clipping statistics.

    ``report(value, step)`` calls ``trial.report``; a pruner's verdict counts only after
    ``warmup_fraction`` of ``total_steps`` (pruning early is biased against small
    thresholds, which start slower and often finish best). A non-finite value ends the
    trial: pruned (default), penalized (:class:`Diverged`) or raised.

    With an optimizer, the reporter records the pre-clip norm of every step and writes,
    when the trial ends (pruned, diverged, or :meth:`finish`), JSON-safe user attributes:
    ``clipopt:clip_rate``, ``clipopt:steps``, ``clipopt:skipped_steps`` and the norm
    percentiles ``clipopt:grad_norm_p50``/``p90``/``p99``.

    Args:
        trial: The trial.
        optimizer: The trial's :class:`clipopt.ClippedOptimizer`, or None.
        total_steps: The last step value that will be reported; enables the warm-up.
        warmup_fraction: Share of ``total_steps`` before pruning may happen, in [0, 1].
        on_nonfinite: ``"prune"``, ``"penalize"`` or ``"raise"``.
        penalty: The value of a penalized trial (required with ``"penalize"``).

    Example:
        >>> import optuna, torch, clipopt, clipopt.tuning as ct
        >>> def objective(trial):
        ...     p = torch.nn.Parameter(torch.ones(2))
        ...     opt = clipopt.ClippedOptimizer(torch.optim.SGD([p], lr=0.1),
        ...                                    ct.suggest_strategy(trial))
        ...     reporter = ct.TrialReporter(trial, opt, total_steps=9)
        ...     for step in range(10):
        ...         opt.zero_grad()
        ...         loss = (p ** 2).sum()
        ...         loss.backward()
        ...         opt.step()
        ...         reporter.report(loss.item(), step)
        ...     return reporter.finish(loss.item())
        >>> optuna.logging.set_verbosity(optuna.logging.WARNING)
        >>> study = optuna.create_study()
        >>> study.optimize(objective, n_trials=2)
        >>> "clipopt:clip_rate" in study.trials[0].user_attrs
        True
    """

    def __init__(
        self,
        trial: optuna.trial.BaseTrial,
        optimizer: ClippedOptimizer | None = None,
        *,
        total_steps: int | None = None,
        warmup_fraction: float = 0.4,
        on_nonfinite: NonfiniteObjective = "prune",
        penalty: float | None = None,
    ) -> None:
        if optimizer is not None and not isinstance(optimizer, ClippedOptimizer):
            raise TypeError(
                "optimizer must be a clipopt.ClippedOptimizer or None, "
                f"got {type(optimizer).__name__}"
            )
        self.trial = trial
        self.optimizer = optimizer
        self.total_steps = (
            None
            if total_steps is None
            else check_int("total_steps", total_steps, minimum=0)
        )
        self.warmup_fraction = check_range("warmup_fraction", warmup_fraction, 0.0, 1.0)
        self.on_nonfinite: NonfiniteObjective = check_choice(  # type: ignore[assignment]
            "on_nonfinite", on_nonfinite, ("prune", "penalize", "raise")
        )
        if self.on_nonfinite == "penalize" and (
            penalty is None or not math.isfinite(penalty)
        ):
            raise ValueError(
                f"on_nonfinite='penalize' needs a finite penalty, got {penalty!r}"
            )
        self.penalty = penalty
        self._norms: list[torch.Tensor] = []
        self._handle = (
            None
            if optimizer is None
            else optimizer.register_step_post_hook(self._record_norm)
        )

    def _record_norm(self, *_: Any) -> None:
        stats = self.optimizer.last_stats if self.optimizer is not None else None
        if stats is not None:
            self._norms.append(stats.norm.detach())

    def may_prune(self, step: int) -> bool:
        """Whether the pruner's verdict counts at ``step`` (after the warm-up share)."""
        if self.total_steps is None:
            return True
        return step >= self.warmup_fraction * self.total_steps

    def report(self, value: float, step: int) -> None:
        """Report ``value`` at ``step``; raise ``optuna.TrialPruned`` to stop the trial.

        Raises:
            optuna.TrialPruned: The pruner stopped the trial, or the value is not finite
                under ``"prune"``.
            Diverged: The value is not finite under ``"penalize"``.
            ValueError: The value is not finite under ``"raise"``.
        """
        value = float(value)
        if not math.isfinite(value):
            self.record()
            _handle_nonfinite(self.trial, self.on_nonfinite, self.penalty, value, step)
        self.trial.report(value, step)
        if self.may_prune(step) and self.trial.should_prune():
            self.record()
            raise optuna.TrialPruned(f"pruned at step {step}")

    def record(self) -> dict[str, float]:
        """Write the clipping statistics as user attributes and return them."""
        attrs: dict[str, float] = {}
        if self.optimizer is not None:
            counts = self.optimizer.counts()
            attrs["clipopt:steps"] = float(counts["steps"])
            attrs["clipopt:skipped_steps"] = float(counts["skipped_steps"])
            attrs["clipopt:clip_rate"] = float(
                counts["clipped_steps"] / counts["steps"] if counts["steps"] else 0.0
            )
        if self._norms:
            norms = torch.stack(self._norms).double().cpu().numpy()
            norms = norms[np.isfinite(norms)]
            if norms.size:
                for q in (50, 90, 99):
                    attrs[f"clipopt:grad_norm_p{q}"] = float(np.percentile(norms, q))
        for key, value in attrs.items():
            self.trial.set_user_attr(key, value)
        return attrs

    def finish(self, value: float) -> float:
        """Record the statistics, stop listening to the optimizer, and return ``value``.

        A non-finite ``value`` is handled by ``on_nonfinite``, as in :meth:`report`.
        """
        self.record()
        self.close()
        value = float(value)
        if not math.isfinite(value):
            _handle_nonfinite(self.trial, self.on_nonfinite, self.penalty, value, None)
        return value

    def close(self) -> None:
        """Remove the step hook from the optimizer."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


# -- studies ------------------------------------------------------------------------------


class _SQLiteStorage(optuna.storages.RDBStorage):
    """RDBStorage on SQLite whose transactions take the write lock when they begin.

    SQLite ignores ``SELECT ... FOR UPDATE`` and pysqlite opens a transaction only at the
    first write, so two processes can both read a trial as WAITING and both run it
    (seen here with enqueued baselines: "Cannot tell a COMPLETE trial"). ``BEGIN
    IMMEDIATE``, the recipe of SQLAlchemy's pysqlite documentation, serialises them.
    """

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self._begin_immediately()

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._begin_immediately()

    def _begin_immediately(self) -> None:
        from sqlalchemy import event

        @event.listens_for(self.engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None  # SQLAlchemy's BEGIN, below, rules

        @event.listens_for(self.engine, "begin")
        def _begin(connection: Any) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")

        self.engine.dispose()  # pooled connections predate the hooks


def make_storage(spec: str | optuna.storages.BaseStorage | None) -> Any:
    """Return an Optuna storage for a URL, a file path, or an existing storage.

    - None: in memory (one process).
    - ``"sqlite:///study.db"`` or a path ending in ``.db``: embedded SQLite, with a
      generous lock timeout and transactions that lock when they begin (so two
      processes never run the same enqueued trial); fine for a few processes on one
      machine.
    - A path ending in ``.log`` or ``.jsonl``: a journal file, for many processes on one
      machine (or on a shared file system).
    - ``"postgresql://..."``, ``"mysql+pymysql://..."``: a database server, for many
      machines.
    - An ``optuna.storages`` object: used as is.
    """
    if spec is None or not isinstance(spec, str):
        return spec
    if spec.endswith((".log", ".jsonl")) and "://" not in spec:
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(spec))
    url = f"sqlite:///{spec}" if spec.endswith(".db") and "://" not in spec else spec
    if url.startswith("sqlite"):
        return _SQLiteStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    return optuna.storages.RDBStorage(url)


def worker_seed(
    seed: int | None, *, worker_id: int | str | None = None, n_existing: int = 0
) -> int | None:
    """Derive a sampler seed distinct per worker and per resume.

    The same seed in two workers makes them suggest the same first configurations
    (optuna#4714), and resuming with the same seed repeats the startup configurations
    (optuna#3255). The seed is therefore hashed with the worker's identity (``worker_id``,
    or host and process id) and the number of trials the study already has.

    Returns:
        None if ``seed`` is None (fresh entropy everywhere), else a 32-bit seed.

    Example:
        >>> worker_seed(0, worker_id=1) != worker_seed(0, worker_id=2)
        True
        >>> worker_seed(0, worker_id=1) == worker_seed(0, worker_id=1)
        True
    """
    if seed is None:
        return None
    ident = worker_id if worker_id is not None else f"{socket.gethostname()}:{os.getpid()}"
    digest = hashlib.sha256(f"{seed}|{ident}|{n_existing}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def baseline_params(
    strategies: Sequence[str], prefix: str = "clip"
) -> dict[str, dict[str, Any]]:
    """Return the baseline trials' parameters that fit the searched strategies.

    The baselines are no clipping, ``max_norm=1.0`` and ``percentile=10`` (AutoClip's
    default), each included when its strategy is searched.
    """
    names = _check_strategies(strategies)
    baselines: dict[str, dict[str, Any]] = {}
    for label, (strategy, values) in _BASELINES.items():
        if strategy not in names:
            continue
        params: dict[str, Any] = {} if len(names) == 1 else {f"{prefix}_strategy": strategy}
        params.update({param_name(strategy, k, prefix): v for k, v in values.items()})
        baselines[label] = params
    return baselines


def enqueue_baselines(
    study: optuna.Study, strategies: Sequence[str], prefix: str = "clip"
) -> list[str]:
    """Enqueue the baseline trials once per study; return the labels enqueued now.

    A study attribute marks them as enqueued, so later workers and resumes skip them.
    (Workers that start at the same instant may both enqueue; ``skip_if_exists`` then
    catches most duplicates. Call it from one process first to be exact.)
    """
    if study.user_attrs.get(_BASELINES_ATTR):
        return []
    study.set_user_attr(_BASELINES_ATTR, True)
    labels = []
    for label, params in baseline_params(strategies, prefix).items():
        study.enqueue_trial(params, user_attrs={_BASELINE_TAG: label}, skip_if_exists=True)
        labels.append(label)
    return labels


_COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def count_finished(study: optuna.Study) -> int:
    """Return how many trials finished (complete, pruned or failed): the budget's count."""
    return len(study.get_trials(deepcopy=False, states=_COUNTED))


def tune(
    objective: Objective,
    *,
    n_trials: int,
    storage: str | optuna.storages.BaseStorage | None = None,
    study_name: str | None = None,
    sampler: optuna.samplers.BaseSampler | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    seed: int | None = None,
    strategies: Sequence[str] = (NONE, "norm", "percentile"),
    spaces: Mapping[str, Space] | None = None,
    prefix: str = "clip",
    direction: Literal["minimize", "maximize"] = "minimize",
    baselines: bool = True,
    on_nonfinite: NonfiniteObjective = "prune",
    penalty: float | None = None,
    timeout: float | None = None,
    worker_id: int | str | None = None,
    show_progress_bar: bool = True,
    catch: Iterable[type[Exception]] = (),
) -> optuna.Study:
    """Tune the clipping strategy and threshold: run (or join, or resume) a study.

    ``objective(trial, strategy)`` trains with the suggested ``strategy`` (build a
    :class:`clipopt.ClippedOptimizer` from it) and returns the value to optimise; it may
    use :class:`TrialReporter` to report and prune. Run the same call in several
    processes or machines with the same ``storage`` and ``study_name`` to share the
    study: the budget ``n_trials`` is global (finished trials of every worker count,
    running ones too; a worker may overshoot by the number of workers minus one), the
    sampler seed is distinct per worker and per resume, and re-running resumes.

    A non-finite objective value never makes a FAIL trial (samplers would ignore it and
    never learn the region): it is pruned, or penalized with ``penalty``, or raised.

    Args:
        objective: ``(trial, strategy) -> value``.
        n_trials: Global budget of finished trials, >= 1.
        storage: None (in memory), a URL or path (see :func:`make_storage`) or a storage.
        study_name: Name of the study in the storage (required to share or resume one).
        sampler: Default: ``TPESampler(seed=worker_seed(seed, ...))``.
        pruner: Default: ``MedianPruner(n_startup_trials=5)``; use
            :class:`TrialReporter` ``total_steps`` for its warm-up share.
        seed: Base seed of the default sampler (None: fresh entropy).
        strategies: Searched strategies; ``"none"`` is no clipping.
        spaces: Search-space overrides (see :func:`suggest_strategy`).
        prefix: Prefix of the parameter names.
        direction: ``"minimize"`` or ``"maximize"``.
        baselines: Enqueue the baselines (no clipping, ``max_norm=1.0``,
            ``percentile=10``) that fit ``strategies``, once per study.
        on_nonfinite: For a non-finite objective value: ``"prune"``, ``"penalize"``,
            ``"raise"``.
        penalty: Value of a penalized trial (required with ``"penalize"``).
        timeout: Stop this worker after so many seconds.
        worker_id: This worker's identity for its seed (default: host and process id;
            pass one for a reproducible single-process study).
        show_progress_bar: Show Optuna's progress bar.
        catch: Exception types that fail a trial without stopping the study.

    Returns:
        The study.

    Raises:
        ValueError: Invalid arguments.
    """
    n_trials = check_int("n_trials", n_trials, minimum=1)
    names = _check_strategies(strategies)
    check_choice("direction", direction, ("minimize", "maximize"))
    check_choice("on_nonfinite", on_nonfinite, ("prune", "penalize", "raise"))
    if on_nonfinite == "penalize" and (penalty is None or not math.isfinite(penalty)):
        raise ValueError(f"on_nonfinite='penalize' needs a finite penalty, got {penalty!r}")
    study = optuna.create_study(
        storage=make_storage(storage),
        study_name=study_name,
        direction=direction,
        pruner=pruner
        if pruner is not None
        else optuna.pruners.MedianPruner(n_startup_trials=5),
        load_if_exists=True,
    )
    existing = count_finished(study)
    effective_seed = worker_seed(seed, worker_id=worker_id, n_existing=existing)
    study.sampler = (
        sampler if sampler is not None else optuna.samplers.TPESampler(seed=effective_seed)
    )
    if baselines:
        enqueue_baselines(study, names, prefix)
    remaining = n_trials - existing
    if remaining <= 0:
        return study
    worker = (
        str(worker_id) if worker_id is not None else f"{socket.gethostname()}:{os.getpid()}"
    )

    def run(trial: optuna.Trial) -> float:
        trial.set_user_attr("clipopt:worker", worker)
        if effective_seed is not None:
            trial.set_user_attr("clipopt:sampler_seed", effective_seed)
        strategy = suggest_strategy(trial, names, spaces=spaces, prefix=prefix)
        try:
            value = float(objective(trial, strategy))
            if not math.isfinite(value):
                _handle_nonfinite(trial, on_nonfinite, penalty, value, None)
        except Diverged as diverged:  # from the reporter, or from the line above
            trial.set_user_attr("clipopt:penalized", True)
            return diverged.penalty
        return value

    budget = optuna.study.MaxTrialsCallback(
        n_trials, states=(*_COUNTED, TrialState.RUNNING)
    )
    study.optimize(
        run,
        n_trials=remaining,
        timeout=timeout,
        callbacks=[budget],
        catch=tuple(catch),
        gc_after_trial=True,
        show_progress_bar=show_progress_bar,
    )
    return study


# -- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Row:
    label: str
    strategy: str
    params: dict[str, float]
    value: float | None
    state: str
    number: int = -1


@dataclass(frozen=True)
class TuningSummary:
    """The outcome of a study: the best strategy, and how it compares with baselines.

    ``str(summary)`` is a markdown table. Improvements are relative to the baseline's
    value, positive when the best trial is better (lower when minimising).

    Attributes:
        best: The best trial as a row (label, strategy, params, value, state).
        baselines: The baseline trials (no clipping, max_norm=1.0, ...) found.
        per_strategy: The best finished trial of each strategy.
        direction: ``"minimize"`` or ``"maximize"``.
        counts: Number of trials per state.
    """

    best: _Row
    baselines: list[_Row] = field(default_factory=list)
    per_strategy: list[_Row] = field(default_factory=list)
    direction: str = "minimize"
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def best_strategy(self) -> str:
        """The best trial's strategy name."""
        return self.best.strategy

    @property
    def best_params(self) -> dict[str, float]:
        """The best trial's strategy parameters (unprefixed)."""
        return dict(self.best.params)

    def improvement_over(self, label: str) -> float | None:
        """Relative improvement of the best value over a baseline, or None."""
        for row in self.baselines:
            if (
                row.label == label
                and row.value is not None
                and self.best.value is not None
                and row.value != 0
            ):
                gain = row.value - self.best.value
                if self.direction == "maximize":
                    gain = -gain
                return gain / abs(row.value)
        return None

    def to_markdown(self) -> str:
        """Return the summary as a markdown table."""

        def fmt_params(params: Mapping[str, float]) -> str:
            return ", ".join(f"{k}={v:.4g}" for k, v in params.items()) or "-"

        def fmt_value(row: _Row) -> str:
            return "-" if row.value is None else f"{row.value:.4g}"

        better = "lower" if self.direction == "minimize" else "higher"
        lines = [
            f"| trial | strategy | parameters | value | best is {better} by |",
            "| --- | --- | --- | --- | --- |",
        ]
        sign = 1 if self.direction == "minimize" else -1
        for row in [self.best, *self.per_strategy, *self.baselines]:
            if row is self.best:
                versus = "(best)"
            elif row.value is None:
                versus = row.state.lower()
            elif self.best.value is not None and row.value != 0:
                versus = f"{sign * (row.value - self.best.value) / abs(row.value):.1%}"
            else:
                versus = "-"
            lines.append(
                f"| {row.label} | {row.strategy} | {fmt_params(row.params)} | "
                f"{fmt_value(row)} | {versus} |"
            )
        notes = []
        for label in ("no clipping", "max_norm=1.0"):
            gain = self.improvement_over(label)
            if gain is not None:
                notes.append(f"improvement over {label}: {gain:.1%}")
        counts = ", ".join(f"{v} {k.lower()}" for k, v in self.counts.items())
        return "\n".join([*lines, "", f"trials: {counts}", *notes])

    def __str__(self) -> str:
        return self.to_markdown()


def _row(
    trial: optuna.trial.FrozenTrial,
    label: str,
    strategies: Sequence[str] | None,
    prefix: str,
) -> _Row:
    strategy = strategy_from_params(trial.params, strategies=strategies, prefix=prefix)
    name = trial.params.get(f"{prefix}_strategy")
    if name is None:
        name = strategy.name if not _is_none(strategy) else NONE
    lead = f"{prefix}_{name}_"
    params = {
        k[len(lead) :]: float(v) for k, v in trial.params.items() if k.startswith(lead)
    }
    value = trial.value if trial.state == TrialState.COMPLETE else None
    return _Row(label, str(name), params, value, trial.state.name, trial.number)


def _is_none(strategy: ClipStrategy) -> bool:
    return isinstance(strategy, NormClip) and strategy.max_norm == math.inf


def summarize(
    study: optuna.Study, *, strategies: Sequence[str] | None = None, prefix: str = "clip"
) -> TuningSummary:
    """Summarise a study: best trial, best per strategy, baselines and improvements.

    Raises:
        ValueError: The study has no completed trial.
    """
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ValueError("the study has no completed trial yet")
    best = study.best_trial
    best_row = _row(best, f"#{best.number}", strategies, prefix)
    baselines = [
        _row(t, str(t.user_attrs[_BASELINE_TAG]), strategies, prefix)
        for t in study.get_trials(deepcopy=False)
        if _BASELINE_TAG in t.user_attrs and t.state != TrialState.WAITING
    ]
    shown = {best.number} | {b.number for b in baselines}
    per_strategy: dict[str, _Row] = {}
    sign = 1 if study.direction == optuna.study.StudyDirection.MINIMIZE else -1
    for trial in sorted(complete, key=lambda t: sign * float(t.value or 0.0)):
        row = _row(
            trial, f"best {trial.params.get(f'{prefix}_strategy', '')}", strategies, prefix
        )
        if row.strategy != best_row.strategy and row.strategy not in per_strategy:
            per_strategy[row.strategy] = row
    per_strategy = {k: r for k, r in per_strategy.items() if r.number not in shown}
    counts: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    return TuningSummary(
        best_row,
        baselines,
        list(per_strategy.values()),
        "minimize" if sign == 1 else "maximize",
        counts,
    )


def save_plots(
    study: optuna.Study,
    directory: str | os.PathLike[str],
    *,
    strategies: Sequence[str] | None = None,
    prefix: str = "clip",
) -> list[pathlib.Path]:
    """Save PNG plots of a study: objective against threshold, and training curves.

    Writes ``objective_vs_threshold.png`` (one panel per strategy with a parameter, log
    axes for log-uniform thresholds, no clipping as a line) and
    ``intermediate_values.png`` (every trial's reported curve, pruned ones dashed).
    Needs matplotlib (in ``clipopt[optuna]``).

    Returns:
        The written files.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def subplots(*args: Any, **kwargs: Any) -> Any:
        """Like pyplot.subplots, on the object API: no global backend switched."""
        figsize, dpi = kwargs.pop("figsize"), kwargs.pop("dpi")
        fig = Figure(figsize=figsize, dpi=dpi)
        FigureCanvasAgg(fig)
        return fig, fig.subplots(*args, **kwargs)

    out = pathlib.Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    rows = [_row(t, f"#{t.number}", strategies, prefix) for t in trials]
    by_strategy: dict[str, list[_Row]] = {}
    for row in rows:
        by_strategy.setdefault(row.strategy, []).append(row)
    panels = [s for s, rs in by_strategy.items() if any(r.params for r in rs)]
    written = []

    fig, axes = subplots(
        1,
        max(len(panels), 1),
        figsize=(4.2 * max(len(panels), 1), 3.4),
        dpi=110,
        squeeze=False,
    )
    none_values = [r.value for r in by_strategy.get(NONE, []) if r.value is not None]
    minimize = study.direction == optuna.study.StudyDirection.MINIMIZE
    for ax, strategy in zip(axes[0], panels, strict=False):
        param = next(iter(by_strategy[strategy][0].params))
        points = [
            (r.params[param], r.value) for r in by_strategy[strategy] if r.value is not None
        ]
        xs = [x for x, _ in points]
        ys = [y for _, y in points]
        ax.scatter(xs, ys, s=18, color="tab:blue", label="trials")
        best_x, best_y = (min if minimize else max)(points, key=lambda p: p[1])
        ax.scatter([best_x], [best_y], s=60, color="tab:red", marker="*", label="best")
        low_high = DEFAULT_SPACES.get(strategy, {}).get(param)
        if low_high is not None and low_high[2]:
            ax.set_xscale("log")
        if none_values:
            ax.axhline(min(none_values), color="0.4", ls="--", lw=1, label="no clipping")
        ax.set_yscale("log")
        ax.set_xlabel(param)
        ax.set_ylabel("objective")
        ax.set_title(strategy, fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "objective_vs_threshold.png"
    fig.savefig(path)
    written.append(path)

    fig, ax = subplots(figsize=(7, 3.6), dpi=110)
    colors = {s: f"C{i}" for i, s in enumerate(sorted(by_strategy) or [NONE])}
    for trial in study.get_trials(
        deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)
    ):
        values = trial.intermediate_values
        if not values:
            continue
        steps = sorted(values)
        name = str(trial.params.get(f"{prefix}_strategy", next(iter(colors))))
        ax.plot(
            steps,
            [values[s] for s in steps],
            color=colors.get(name, "0.5"),
            ls="-" if trial.state == TrialState.COMPLETE else ":",
            lw=1,
            alpha=0.8,
        )
    for name, color in colors.items():
        ax.plot([], [], color=color, label=name)
    ax.plot([], [], color="0.3", ls=":", label="pruned")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("reported value")
    ax.set_title("Intermediate values per trial", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out / "intermediate_values.png"
    fig.savefig(path)
    written.append(path)
    return written
