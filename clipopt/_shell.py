"""An ``Optimizer`` that is a view of another: the shell of ``ClippedOptimizer``.

Frameworks, LR schedulers and GradScaler accept only ``torch.optim.Optimizer``
instances, and read or rebind ``param_groups``, ``state`` and ``defaults``. The shell
shares those containers with the wrapped optimizer and forwards hook registration to
it, so everything registered runs once per step, in the wrapped optimizer's ``step()``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

__all__ = ["DelegatingOptimizer"]


class DelegatingOptimizer(torch.optim.Optimizer):
    """The ``Optimizer`` interface of ``self.optimizer``, for a wrapper to extend.

    Subclasses set ``self.optimizer`` and then call
    ``clipopt._torch_private.finish_optimizer(self)`` instead of
    ``Optimizer.__init__``, which would rebuild the wrapped optimizer's groups.
    """

    optimizer: torch.optim.Optimizer

    # -- shared containers ---------------------------------------------------------------
    # Properties with setters, not aliases: Optimizer.load_state_dict rebinds these
    # attributes, and an alias would then point at stale objects (NVIDIA/apex#766).

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's ``param_groups`` (the same list object)."""
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        """The wrapped optimizer's ``state`` (the same dict object)."""
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        """The wrapped optimizer's ``defaults`` (the same dict object)."""
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    # -- forwarded ----------------------------------------------------------------------

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients, as the wrapped optimizer's ``zero_grad`` does."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group to the wrapped optimizer."""
        self.optimizer.add_param_group(param_group)

    def register_step_pre_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """Register a hook run before each step, on the wrapped optimizer.

        The hook runs once per step and receives the wrapped optimizer as its first
        argument. Without a closure it runs after clipping, so it sees clipped
        gradients; with a closure it runs before the closure is evaluated, as it would
        for the plain optimizer. A step skipped on the host does not run it.
        """
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """Register a hook run after each step, on the wrapped optimizer.

        The hook receives the wrapped optimizer as its first argument. A step skipped
        on the host does not run it; :meth:`clipopt.Clipper.add_stats_hook` sees every
        step.
        """
        return self.optimizer.register_step_post_hook(hook)

    def register_state_dict_pre_hook(
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> RemovableHandle:
        """Register a ``state_dict`` pre-hook on the wrapped optimizer."""
        return self.optimizer.register_state_dict_pre_hook(hook, prepend=prepend)

    def register_state_dict_post_hook(
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> RemovableHandle:
        """Register a ``state_dict`` post-hook on the wrapped optimizer.

        It sees the wrapped optimizer's state dict, before clipopt adds its own key.
        """
        return self.optimizer.register_state_dict_post_hook(hook, prepend=prepend)

    def register_load_state_dict_pre_hook(
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> RemovableHandle:
        """Register a ``load_state_dict`` pre-hook on the wrapped optimizer.

        It sees the state dict without clipopt's own key.
        """
        return self.optimizer.register_load_state_dict_pre_hook(hook, prepend=prepend)

    def register_load_state_dict_post_hook(
        self, hook: Callable[..., Any], prepend: bool = False
    ) -> RemovableHandle:
        """Register a ``load_state_dict`` post-hook on the wrapped optimizer."""
        return self.optimizer.register_load_state_dict_post_hook(hook, prepend=prepend)
