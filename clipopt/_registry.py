"""Names for strategies: ``"norm"`` and friends, plus user-registered ones."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from ._base import ClipStrategy

__all__ = ["available_strategies", "get_strategy", "register_strategy"]

_S = TypeVar("_S", bound=type[ClipStrategy])
_REGISTRY: dict[str, type[ClipStrategy]] = {}


def register_strategy(name: str) -> Callable[[_S], _S]:
    """Class decorator that makes a :class:`ClipStrategy` subclass available by name.

    Args:
        name: A non-empty name not registered yet.

    Returns:
        The decorator; it returns the class unchanged (with ``name`` set).

    Raises:
        TypeError: ``name`` is not a string, or the class is not a ``ClipStrategy``.
        ValueError: ``name`` is empty or already registered.

    Example:
        >>> import clipopt
        >>> @clipopt.register_strategy("doc-example-none")
        ... class NoClip(clipopt.ClipStrategy):
        ...     def measure(self, inputs):
        ...         return clipopt.functional.total_norm(inputs.grads)
        ...     def clip_(self, inputs, norm):
        ...         one = norm.new_ones(())
        ...         return clipopt.ClipResult(norm.new_full((), float("inf")), one, one < 1)
        >>> "doc-example-none" in clipopt.available_strategies()
        True
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str, got {name!r}")
    if not name:
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(
            f"name {name!r} is already registered to {_REGISTRY[name].__qualname__}"
        )

    def decorator(cls: _S) -> _S:
        if not (isinstance(cls, type) and issubclass(cls, ClipStrategy)):
            raise TypeError(
                f"register_strategy({name!r}) needs a ClipStrategy subclass, got {cls!r}"
            )
        if name in _REGISTRY:
            raise ValueError(
                f"name {name!r} is already registered to {_REGISTRY[name].__qualname__}"
            )
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_strategies() -> list[str]:
    """Return the registered strategy names, sorted.

    Example:
        >>> import clipopt
        >>> {"norm", "value"} <= set(clipopt.available_strategies())
        True
    """
    return sorted(_REGISTRY)


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
        name: A name from :func:`available_strategies`.
        **kwargs: The strategy's hyperparameters.

    Returns:
        A new strategy instance.

    Raises:
        TypeError: ``name`` is not a string, or ``kwargs`` holds a name the strategy does
            not accept (the message lists the accepted ones).
        ValueError: No strategy is registered under ``name`` (the message lists them).

    Example:
        >>> import clipopt
        >>> clipopt.get_strategy("norm", max_norm=0.5)
        NormClip(max_norm=0.5, norm_type=2.0, scope='global', foreach=None)
    """
    if not isinstance(name, str):
        raise TypeError(f"strategy name must be a str, got {name!r}")
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {name!r}; available: {', '.join(available_strategies())}"
        ) from None
    accepted = _accepted_kwargs(cls)
    if accepted is not None:
        unknown = sorted(set(kwargs) - set(accepted))
        if unknown:
            raise TypeError(
                f"strategy {name!r} got unexpected keyword argument(s) "
                f"{', '.join(unknown)}; it accepts: {', '.join(accepted) or 'none'}"
            )
    return cls(**kwargs)
