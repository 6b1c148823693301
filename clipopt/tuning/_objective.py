"""How :func:`clipopt.tuning.tune` calls an objective.

Two things sit between Optuna and the user's objective: the objective's signature
(``objective(trial, strategy)``, or an Optuna objective ``objective(trial)``), and the
configurations the study has already evaluated, which are not trained again.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import optuna
from optuna.trial import TrialState

from .._protocol import ClipStrategy

#: Trial user attribute set on a trial that reused a finished trial's value: its number.
DUPLICATE_ATTR = "clipopt:duplicate_of"
#: User attributes of the reused trial that are not copied to the duplicate.
_OWN_ATTRS = frozenset(
    {"clipopt:worker", "clipopt:sampler_seed", "clipopt:baseline", DUPLICATE_ATTR}
)

Caller = Callable[[optuna.Trial, ClipStrategy], Any]


def objective_caller(objective: Callable[..., Any]) -> Caller:
    """Return ``objective`` as a ``(trial, strategy)`` callable, decided by its signature.

    An objective that takes two positional arguments (or ``*args``) gets the trial and
    the strategy; one that takes one positional argument is an Optuna objective and gets
    the trial only (it calls :func:`suggest_strategy` itself).

    Raises:
        TypeError: ``objective`` is not callable, or takes neither form.
    """
    if not callable(objective):
        raise TypeError(
            f"objective must be a callable objective(trial, strategy) or "
            f"objective(trial), got {type(objective).__name__} {objective!r}"
        )
    try:
        signature = inspect.signature(objective)
    except (TypeError, ValueError):  # some builtins and C callables have none
        return objective
    params = list(signature.parameters.values())
    positional = [
        p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    required = [p for p in positional if p.default is p.empty]
    keyword_only = [p for p in params if p.kind == p.KEYWORD_ONLY and p.default is p.empty]
    varargs = any(p.kind == p.VAR_POSITIONAL for p in params)
    name = getattr(objective, "__qualname__", type(objective).__name__)
    if keyword_only or len(required) > 2 or not (positional or varargs):
        raise TypeError(
            f"objective must take (trial, strategy) or (trial), got {name}{signature}; "
            "write def objective(trial, strategy): ... (tune suggests the strategy) or "
            "an Optuna objective def objective(trial): ... that calls "
            "clipopt.tuning.suggest_strategy(trial, strategies) itself"
        )
    if len(positional) >= 2 or varargs:
        return objective

    def optuna_objective(trial: optuna.Trial, strategy: ClipStrategy) -> Any:
        return objective(trial)

    return optuna_objective


def evaluated_before(trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    """Return a COMPLETE trial of the study with exactly ``trial``'s parameters, or None.

    Trials of every worker count, as far as the storage has them when this is called; a
    trial with the same parameters still running elsewhere is not waited for.
    """
    params = trial.params
    for other in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if other.params == params and other.value is not None:
            return other
    return None


def reuse(trial: optuna.Trial, previous: optuna.trial.FrozenTrial) -> float:
    """Mark ``trial`` a duplicate of ``previous``, copy its statistics, return its value."""
    for key, value in previous.user_attrs.items():
        if key.startswith("clipopt:") and key not in _OWN_ATTRS:
            trial.set_user_attr(key, value)
    trial.set_user_attr(DUPLICATE_ATTR, previous.number)
    assert previous.value is not None  # evaluated_before returns finished values only
    return float(previous.value)
