"""The search space: parameter names, default ranges, and strategies from trials."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import optuna

from .._protocol import ClipStrategy
from .._registry import available_strategies, get_strategy
from ..strategies import NormClip
from .probe import norm_range

#: The pseudo-strategy "no clipping" (a ``NormClip(max_norm=inf)``, which still records
#: statistics).
NONE = "none"

#: Search space per strategy: parameter -> (low, high, log). Thresholds are log-uniform.
#: ``max_norm`` spans four decades when no probe calibrated it (see :func:`store_probe`).
DEFAULT_SPACES: dict[str, dict[str, tuple[float, float, bool]]] = {
    NONE: {},
    # The default's ratio to its running reference: 0.4 untuned (docs/strategies/which.md).
    "relative": {"ratio": (0.05, 2.0, True)},
    "norm": {"max_norm": (1e-2, 1e2, True)},
    "value": {"clip_value": (1e-3, 1e1, True)},
    "percentile": {"percentile": (1.0, 99.0, False)},
    "zscore": {"z_thresh": (1.0, 5.0, False)},
    "adagc": {"clip_ratio": (1.01, 3.0, True)},
    "agc": {"clipping": (1e-3, 1.0, True)},
}

Space = Mapping[str, tuple[float, float, bool]]


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
