"""The built-in fixed-threshold strategies: ``"value"`` and ``"norm"``."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from . import functional as F
from ._base import ClipInputs, ClipResult, ClipStrategy
from ._registry import register_strategy
from ._validation import (
    Schedule,
    check_choice,
    check_foreach,
    check_norm_type,
    check_schedule,
    check_threshold,
    threshold_at,
)

__all__ = ["NormClip", "ValueClip", "group_threshold"]

Scope = Literal["global", "group", "tensor"]


def group_threshold(inputs: ClipInputs, group: int, name: str, default: float) -> float:
    """Return a parameter group's override of threshold ``name``, or ``default``.

    A group overrides it under the key ``"clipopt_<name>"``, e.g.
    ``{"params": head.parameters(), "clipopt_max_norm": 0.5}``.

    Raises:
        TypeError, ValueError: The override is not a valid threshold.
    """
    key = f"clipopt_{name}"
    options = inputs.groups[group]
    if key not in options:
        return default
    return check_threshold(f"param_groups[{group}][{key!r}]", options[key])


def _group_members(inputs: ClipInputs) -> dict[int, list[int]]:
    members: dict[int, list[int]] = {}
    for position, group in enumerate(inputs.group_index):
        members.setdefault(group, []).append(position)
    return members


def _total_norm(inputs: ClipInputs, norm_type: float, foreach: bool | None) -> Tensor:
    """The total norm of ``inputs.grads``, with all the wrapper knows about them."""
    return F.total_norm(
        inputs.grads,
        norm_type,
        foreach=foreach,
        uniform=inputs.uniform,
        group=inputs.process_group,
        batches=inputs.batches,
    )


class _Positions:
    """``inputs.indices`` as a device tensor, rebuilt only when the layout changes.

    While the wrapper passes the same parameter layout the positions are the same, so
    the cache is checked by identity before any per-step tuple is built; a new tensor
    (a host-to-device copy, which synchronises a GPU) is made only when they change.
    """

    def __init__(self) -> None:
        self._cached: tuple[Any, tuple[int, ...], Tensor] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_cached": None}  # copies and pickles start empty: no parameters in them

    def get(self, inputs: ClipInputs, device: torch.device) -> Tensor:
        cached = self._cached
        if cached is not None and cached[0] is inputs.params and cached[2].device == device:
            return cached[2]
        indices = tuple(inputs.indices)
        if cached is None or cached[1] != indices or cached[2].device != device:
            tensor = torch.tensor(indices, dtype=torch.int64, device=device)
        else:
            tensor = cached[2]
        self._cached = (inputs.params, indices, tensor)
        return tensor


class _PerTensorNorms:
    """Caches the per-tensor norms ``measure`` computed for ``clip_`` to reuse.

    With a ``process_group`` the ranks' norms are reduced by parameter position (one
    ``all_reduce`` of ``num_params`` entries, zero where a rank has no gradient), so a
    parameter whose gradient is None on some ranks, as FSDP1 with
    ``use_orig_params=True`` leaves those outside a rank's shard, still lines up; the
    total comes from all positions, the same on every rank.
    """

    def __init__(self) -> None:
        self._inputs: ClipInputs | None = None
        self._norms: Tensor | None = None
        self._total: Tensor | None = None
        self._everywhere = torch.zeros(0)
        self._positions = _Positions()

    def __getstate__(self) -> dict[str, Any]:
        # copies and pickles start empty: no gradients in them
        return _PerTensorNorms().__dict__

    def compute(self, inputs: ClipInputs, norm_type: float, foreach: bool | None) -> Tensor:
        self._inputs = inputs
        norms = F.tensor_norms(
            inputs.grads, norm_type, foreach=foreach, batches=inputs.batches
        )
        everywhere = norms
        if inputs.process_group is not None:
            index = self._positions.get(inputs, norms.device)
            full = norms.new_zeros(inputs.num_params).index_copy_(0, index, norms)
            reduced = F._all_reduce_norms(full, norm_type, inputs.process_group)
            dtensors = [i for i, g in enumerate(inputs.grads) if F._is_dtensor(g)]
            if dtensors:  # global already: keep them out of the reduction
                at = index[dtensors]
                reduced[at] = norms[dtensors]
            everywhere, norms = reduced, reduced.index_select(0, index)
        self._norms = norms
        self._everywhere = everywhere
        self._total = torch.linalg.vector_norm(everywhere, norm_type)
        return norms

    def total(self) -> Tensor:
        """The norm of all per-tensor norms of the last ``compute`` (of all ranks)."""
        assert self._total is not None
        return self._total

    def positions(self, inputs: ClipInputs, device: torch.device) -> Tensor:
        """``inputs.indices`` as a device tensor (see :class:`_Positions`)."""
        return self._positions.get(inputs, device)

    def by_position(self) -> Tensor:
        """The last ``compute``'s norms of all ``num_params`` positions (process group)."""
        return self._everywhere

    def take(self, inputs: ClipInputs, norm_type: float, foreach: bool | None) -> Tensor:
        """The norms ``compute`` kept for these inputs (computed now if none)."""
        norms = self._norms if self._inputs is inputs else None
        if norms is None:
            norms = self.compute(inputs, norm_type, foreach)
        self._inputs = self._norms = None
        return norms


@register_strategy("norm")
class NormClip(ClipStrategy):
    r"""Scale the gradients by one factor so that their norm is at most ``max_norm``.

    .. math::

        g \leftarrow g \cdot \min\left(1, \frac{\text{max\_norm}}{\lVert g \rVert_p
        + 10^{-6}}\right)

    With ``scope="global"`` (the default) the norm is taken over all gradients of all
    parameter groups as one vector, bit-identical to
    ``torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, foreach=foreach)``.
    With ``scope="group"`` each parameter group is clipped on its own, to its own
    ``"clipopt_max_norm"`` if it has one; with ``scope="tensor"`` each gradient tensor
    is.

    Args:
        max_norm: Largest norm allowed, > 0; ``math.inf`` never clips. A callable of the
            step count (0, 1, ...) is a schedule, e.g. a warmup ramp. The default, 1.0,
            is the common choice for transformers (Hugging Face ``max_grad_norm``, most
            LLM recipes); tune it with an Optuna study for anything else.
        norm_type: p of the p-norm: any p > 0, or ``math.inf`` for the largest absolute
            entry.
        scope: ``"global"``, ``"group"`` or ``"tensor"``.
        foreach: ``None`` uses the foreach kernels where the device supports them.

    Raises:
        TypeError: A parameter has the wrong type.
        ValueError: ``max_norm`` or ``norm_type`` is NaN or <= 0, or ``scope`` is
            unknown.

    References:
        Pascanu, Mikolov, Bengio, "On the difficulty of training recurrent neural
        networks", ICML 2013.

    Example:
        >>> import torch, clipopt
        >>> p = torch.nn.Parameter(torch.zeros(2))
        >>> p.grad = torch.tensor([3.0, 4.0])
        >>> sgd = torch.optim.SGD([p], lr=1.0)
        >>> opt = clipopt.ClippedOptimizer(sgd, "norm", max_norm=1.0)
        >>> opt.step()
        >>> p
        Parameter containing:
        tensor([-0.6000, -0.8000], requires_grad=True)

        A warmup ramp from 0.1 to 1.0 over 100 steps:

        >>> ramp = clipopt.NormClip(max_norm=lambda step: min(1.0, 0.1 + step * 0.009))
    """

    def __init__(
        self,
        max_norm: Schedule = 1.0,
        norm_type: float = 2.0,
        *,
        scope: Scope = "global",
        foreach: bool | None = None,
    ) -> None:
        self.max_norm = check_schedule("max_norm", max_norm)
        self.norm_type = check_norm_type(norm_type)
        self.scope = check_choice("scope", scope, ("global", "group", "tensor"))
        self.foreach = check_foreach(foreach)
        self._norms = _PerTensorNorms()

    def measure(self, inputs: ClipInputs) -> Tensor:
        """Return the total ``norm_type``-norm of the gradients."""
        if self.scope == "global":
            return _total_norm(inputs, self.norm_type, self.foreach)
        self._norms.compute(inputs, self.norm_type, self.foreach)
        return self._norms.total()

    def supports_coefficient(self) -> bool:
        """True for the global scope: one factor for all gradients."""
        return self.scope == "global"

    def clip_coefficient(self, inputs: ClipInputs, norm: Tensor) -> ClipResult:
        """Return ``min(1, max_norm / (norm + 1e-6))`` (global scope)."""
        return self._global(threshold_at("max_norm", self.max_norm, inputs.step), norm)

    @staticmethod
    def _global(max_norm: float, norm: Tensor) -> ClipResult:
        threshold = torch.full_like(norm, max_norm)
        # "never clip" must not compute inf / inf = NaN for an overflowing norm.
        coef = (
            torch.ones_like(norm) if math.isinf(max_norm) else F.clip_coef(norm, max_norm)
        )
        return ClipResult(threshold, coef, coef < 1.0)

    def clip_(self, inputs: ClipInputs, norm: Tensor) -> ClipResult:
        """Scale the gradients by ``min(1, max_norm / (norm + 1e-6))`` per scope."""
        max_norm = threshold_at("max_norm", self.max_norm, inputs.step)
        if self.scope == "global":
            result = self._global(max_norm, norm)
            if not math.isinf(max_norm):  # "never clip" skips the pass
                F.scale_(inputs.grads, result.coef, foreach=self.foreach)
            return result
        threshold = torch.full_like(norm, max_norm)
        norms = self._norms.take(inputs, self.norm_type, self.foreach)
        # Under a process group the statistics come from every parameter position, so
        # they are the same on every rank whatever gradients it holds.
        spans = _group_spans(inputs)
        if self.scope == "tensor":
            coefs = _coefs(norms, max_norm)
            if spans is None:
                post = torch.linalg.vector_norm(norms * coefs, self.norm_type)
                clipped = (coefs < 1.0).any()
            else:
                everywhere = self._norms.by_position()
                all_coefs = _coefs(everywhere, max_norm)
                post = torch.linalg.vector_norm(everywhere * all_coefs, self.norm_type)
                clipped = (all_coefs < 1.0).any()
        else:
            parts = norms.unbind()
            per_tensor: list[Tensor] = list(parts)
            members = _group_members(inputs)
            groups = members if spans is None else range(len(spans) - 1)
            group_post, group_coefs = [], []
            for group in groups:
                if spans is not None and spans[group] == spans[group + 1]:
                    continue  # a parameter group without parameters
                limit = group_threshold(inputs, group, "max_norm", max_norm)
                if spans is None:
                    held = torch.stack([parts[i] for i in members[group]])
                else:  # all the group's positions, also those other ranks hold
                    held = self._norms.by_position()[spans[group] : spans[group + 1]]
                group_norm = torch.linalg.vector_norm(held, self.norm_type)
                group_coef = _coefs(group_norm, limit)
                for i in members.get(group, ()):
                    per_tensor[i] = group_coef
                group_post.append(group_norm * group_coef)
                group_coefs.append(group_coef)
            coefs = torch.stack(per_tensor)
            if spans is None:
                post = torch.linalg.vector_norm(norms * coefs, self.norm_type)
                clipped = (coefs < 1.0).any()
            else:
                post = torch.linalg.vector_norm(torch.stack(group_post), self.norm_type)
                clipped = (torch.stack(group_coefs) < 1.0).any()
        F.scale_each_(inputs.grads, coefs.unbind(), foreach=self.foreach)
        total_coef = torch.where(norm > 0, post / norm, torch.ones_like(norm))
        return ClipResult(threshold, total_coef, clipped)


def _group_spans(inputs: ClipInputs) -> list[int] | None:
    """Under a process group, where each parameter group's positions start (and end).

    Positions count the parameters of the groups in order, so group ``g`` holds
    positions ``spans[g]`` to ``spans[g + 1]``. None without a process group.

    Raises:
        ValueError: The groups do not list their parameters.
    """
    if inputs.process_group is None:
        return None
    if not all("params" in g for g in inputs.groups):
        raise ValueError(
            "with a process_group, ClipInputs.groups must be the optimizer's parameter "
            "groups (with their 'params'): per-tensor norms are placed by position"
        )
    spans = [0]
    for group in inputs.groups:
        spans.append(spans[-1] + len(group["params"]))
    return spans


def _coefs(norms: Tensor, limit: float) -> Tensor:
    if math.isinf(limit):
        return torch.ones_like(norms)
    return F.clip_coef(norms, limit)


@register_strategy("value")
class ValueClip(ClipStrategy):
    r"""Clamp every gradient entry to ``[-clip_value, clip_value]``.

    .. math::

        g_i \leftarrow \max(-c, \min(c, g_i))

    Bit-identical to ``torch.nn.utils.clip_grad_value_(params, clip_value,
    foreach=foreach)``. Clamping changes the gradient's direction; prefer ``"norm"``
    unless a few entries are known to spike. The statistic reported as ``norm`` is the
    largest absolute entry (the inf-norm), and ``coef`` is the factor applied to that
    entry. With ``scope="group"``, a parameter group's ``"clipopt_clip_value"``
    overrides ``clip_value`` for its gradients.

    Args:
        clip_value: Largest absolute entry allowed, > 0; ``math.inf`` never clips. A
            callable of the step count is a schedule.
        scope: ``"global"`` or ``"group"``.
        foreach: ``None`` uses the foreach kernels where the device supports them.

    Raises:
        TypeError: A parameter has the wrong type.
        ValueError: ``clip_value`` is NaN or <= 0, or ``scope`` is unknown.

    Example:
        >>> import torch, clipopt
        >>> p = torch.nn.Parameter(torch.zeros(3))
        >>> p.grad = torch.tensor([-2.0, 0.1, 5.0])
        >>> sgd = torch.optim.SGD([p], lr=1.0)
        >>> opt = clipopt.ClippedOptimizer(sgd, "value", clip_value=0.5)
        >>> opt.step()
        >>> p.grad
        tensor([-0.5000,  0.1000,  0.5000])
    """

    def __init__(
        self,
        clip_value: Schedule,
        *,
        scope: Literal["global", "group"] = "global",
        foreach: bool | None = None,
    ) -> None:
        self.clip_value = check_schedule("clip_value", clip_value)
        self.scope = check_choice("scope", scope, ("global", "group"))
        self.foreach = check_foreach(foreach)

    def measure(self, inputs: ClipInputs) -> Tensor:
        """Return the largest absolute gradient entry."""
        return _total_norm(inputs, math.inf, self.foreach)

    def clip_(self, inputs: ClipInputs, norm: Tensor) -> ClipResult:
        """Clamp the gradients to ``[-clip_value, clip_value]``."""
        clip_value = threshold_at("clip_value", self.clip_value, inputs.step)
        threshold = torch.full_like(norm, clip_value)
        if self.scope == "global":
            limits: Sequence[tuple[float, list[Tensor]]] = [
                (clip_value, list(inputs.grads))
            ]
        else:
            limits = [
                (
                    group_threshold(inputs, group, "clip_value", clip_value),
                    [inputs.grads[i] for i in positions],
                )
                for group, positions in _group_members(inputs).items()
            ]
        # On the CPU, nothing to clamp is known without a device sync: skip the pass.
        if not (self.scope == "global" and F.is_cpu_false(norm > clip_value)):
            for limit, grads in limits:
                if not math.isinf(limit):
                    F.clamp_(grads, limit, foreach=self.foreach)
        if self.scope == "global":
            coef = (
                torch.ones_like(norm)
                if math.isinf(clip_value)
                else torch.clamp(clip_value / norm, max=1.0)
            )
        else:  # the largest entry left, over the largest entry before
            post = F.total_norm(
                inputs.grads,
                math.inf,
                foreach=self.foreach,
                uniform=inputs.uniform,
                group=inputs.process_group,
            )
            coef = torch.where(norm > 0, post / norm, torch.ones_like(norm))
        return ClipResult(threshold, coef, coef < 1.0)
