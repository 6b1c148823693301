"""Names for strategies: ``"norm"`` and friends, aliases, and user-registered ones.

Names are case-insensitive (``"Norm"`` is ``"norm"``); an unknown name gets a "did you
mean" suggestion.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from ._protocol import ClipStrategy

__all__ = [
    "DEFAULT_STRATEGY",
    "available_strategies",
    "build_strategy",
    "get_strategy",
    "register_strategy",
    "resolve_name",
]

_S = TypeVar("_S", bound=type[ClipStrategy])
_REGISTRY: dict[str, type[ClipStrategy]] = {}
#: alias -> registered name
_ALIASES: dict[str, str] = {}


def _key(name: str) -> str:
    return name.strip().lower()


def register_strategy(
    name: str, *, aliases: Sequence[str] = (), override: bool = False
) -> Callable[[_S], _S]:
    """Class decorator that makes a :class:`ClipStrategy` subclass available by name.

    Args:
        name: A non-empty name (case-insensitive).
        aliases: Other names for the same strategy (e.g. ``"autoclip"``).
        override: Replace a strategy already registered under ``name`` (or an alias),
            e.g. when a notebook cell that registers it runs again.

    Returns:
        The decorator; it returns the class unchanged (with ``name`` set).

    Raises:
        TypeError: ``name`` is not a string, or the class is not a ``ClipStrategy``.
        ValueError: ``name`` is empty, or already registered without ``override``.

    Example:
        >>> import clipopt
        >>> @clipopt.register_strategy("doc-example-none", override=True)
        ... class NoClip(clipopt.ClipStrategy):
        ...     def measure(self, inputs):
        ...         return clipopt.functional.total_norm(inputs.grads)
        ...     def clip(self, inputs, measured, skip=None):
        ...         one = measured.norm.new_ones(())
        ...         return clipopt.ClipResult(one * float("inf"), one, one < 1)
        >>> "doc-example-none" in clipopt.available_strategies()
        True
    """
    keys = [name, *aliases]
    for key in keys:
        if not isinstance(key, str):
            raise TypeError(f"name must be a str, got {key!r}")
        if not key.strip():
            raise ValueError(f"name must be a non-empty str, got {key!r}")
    if isinstance(aliases, str):
        raise TypeError(f"aliases must be a sequence of names, got {aliases!r}")

    def check_free() -> None:
        for key in map(_key, keys):
            taken = _REGISTRY.get(key) or _REGISTRY.get(_ALIASES.get(key, ""))
            if taken is not None and not override:
                raise ValueError(
                    f"name {key!r} is already registered to {taken.__qualname__}; pass "
                    "override=True to replace it"
                )

    check_free()

    def decorator(cls: _S) -> _S:
        if not (isinstance(cls, type) and issubclass(cls, ClipStrategy)):
            raise TypeError(
                f"register_strategy({name!r}) needs a ClipStrategy subclass, got {cls!r}"
            )
        check_free()
        main = _key(name)
        for alias, target in list(_ALIASES.items()):
            if target == main or alias in map(_key, keys):
                del _ALIASES[alias]
        for key in map(_key, aliases):
            _REGISTRY.pop(key, None)
            _ALIASES[key] = main
        cls.name = main
        _REGISTRY[main] = cls
        return cls

    return decorator


def available_strategies() -> list[str]:
    """Return the registered strategy names, sorted (aliases not included).

    Example:
        >>> import clipopt
        >>> {"norm", "value"} <= set(clipopt.available_strategies())
        True
    """
    return sorted(_REGISTRY)


def resolve_name(name: str) -> str:
    """Return the registered name for ``name`` (any case, or an alias).

    Raises:
        TypeError: ``name`` is not a string.
        ValueError: Nothing is registered under ``name``; the message suggests close
            names and lists the available ones.
    """
    if not isinstance(name, str):
        raise TypeError(f"strategy name must be a str, got {name!r}")
    key = _key(name)
    key = _ALIASES.get(key, key)
    if key in _REGISTRY:
        return key
    close = difflib.get_close_matches(key, [*_REGISTRY, *_ALIASES], n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else "."
    raise ValueError(
        f"unknown strategy {name!r}{hint} Available: {', '.join(available_strategies())}"
        + (f" (aliases: {', '.join(sorted(_ALIASES))})" if _ALIASES else "")
    )


def _accepted_kwargs(cls: type[ClipStrategy]) -> list[str] | None:
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [
        p.name
        for p in params
        if p.name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]


def get_strategy(name: str, /, **kwargs: Any) -> ClipStrategy:
    """Build the strategy registered under ``name`` with ``kwargs``.

    Args:
        name: A name from :func:`available_strategies` or an alias, in any case.
        **kwargs: The strategy's hyperparameters.

    Returns:
        A new strategy instance.

    Raises:
        TypeError: ``name`` is not a string, or ``kwargs`` holds a name the strategy does
            not accept (the message lists the accepted ones).
        ValueError: No strategy is registered under ``name`` (the message suggests close
            names and lists the available ones).

    Example:
        >>> import clipopt
        >>> clipopt.get_strategy("Norm", max_norm=0.5)
        NormClip(max_norm=0.5, norm_type=2.0, scope='global', foreach=None)
    """
    cls = _REGISTRY[resolve_name(name)]
    accepted = _accepted_kwargs(cls)
    if accepted is not None:
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TypeError(
                f"strategy {name!r} got unexpected keyword argument(s) "
                f"{', '.join(unknown)}; it accepts: {', '.join(accepted) or 'none'}"
            )
    return cls(**kwargs)


#: The strategy of ``ClippedOptimizer(opt)`` and ``attach(opt)`` (see
#: ``docs/strategies/which.md`` for why).
DEFAULT_STRATEGY = "relative"


def build_strategy(
    strategy: str | ClipStrategy | None, kwargs: Mapping[str, Any]
) -> ClipStrategy:
    """A strategy from a registered name (with keyword arguments) or an object.

    ``None`` is the default strategy, :data:`DEFAULT_STRATEGY`.

    Raises:
        TypeError: Neither a name nor a strategy, keyword arguments with an object, or
            a threshold (such as ``max_norm``) with no strategy named.
        ValueError: An unknown name.
    """
    if strategy is None:
        default = get_strategy(DEFAULT_STRATEGY)
        accepted = set(default.hyperparameters())
        unknown = sorted(set(kwargs) - accepted)
        if unknown:
            given = ", ".join(f"{k}={kwargs[k]!r}" for k in unknown)
            raise TypeError(
                f"{given} given without a strategy: the default strategy "
                f"{DEFAULT_STRATEGY!r} sets its own threshold and takes only "
                f"{', '.join(sorted(accepted))}. Name the strategy the argument belongs "
                f"to, e.g. ClippedOptimizer(optimizer, 'norm', {given}) for "
                "torch's clip_grad_norm_ rule"
            )
        return get_strategy(DEFAULT_STRATEGY, **kwargs)
    if isinstance(strategy, str):
        return get_strategy(strategy, **kwargs)
    if not isinstance(strategy, ClipStrategy):
        raise TypeError(
            "strategy must be a registered name or a clipopt.ClipStrategy, "
            f"got {strategy!r}"
        )
    if kwargs:
        raise TypeError(
            f"strategy keyword arguments ({', '.join(sorted(kwargs))}) are only "
            f"accepted with a strategy name, got the strategy object {strategy!r}"
        )
    return strategy
