"""What several strategies share: norms of the step's inputs, group options, state."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .. import _distributed as D
from .. import _norms
from .. import functional as F
from .._protocol import ClipInputs, ClipStrategy
from .._torch_private import is_dtensor
from .._validation import check_threshold

__all__ = [
    "PerTensorNorms",
    "TensorState",
    "below",
    "group_members",
    "group_spans",
    "group_threshold",
    "per_tensor_norms",
    "recordable",
    "total_norm_of",
]


def total_norm_of(inputs: ClipInputs, norm_type: float, foreach: bool | None) -> Tensor:
    """The total norm of ``inputs.grads``, with all the engine knows about them.

    Global over ranks: a ``process_group`` reduces the ranks' totals (one scalar
    collective); DTensors are global already.
    """
    return _norms.total_norm(
        inputs.grads,
        norm_type,
        foreach=foreach,
        uniform=inputs.uniform,
        group=inputs.process_group,
        plan=inputs.norm_plan,
    )


class PerTensorNorms(NamedTuple):
    """Per-tensor norms of a step, global over ranks.

    Attributes:
        norms: One norm per gradient, in ``inputs.grads`` order.
        everywhere: Under a process group, one norm per parameter position
            (``inputs.num_params`` entries, zero for parameters without a gradient on
            any rank): it covers the gradients other ranks hold too, so statistics
            computed from it agree across ranks. None without a process group.
        total: The total norm of all gradients (of every rank).
    """

    norms: Tensor
    everywhere: Tensor | None
    total: Tensor


def per_tensor_norms(
    inputs: ClipInputs, norm_type: float, foreach: bool | None
) -> PerTensorNorms:
    """Measure each gradient's norm, reduced by parameter position under a group.

    With a ``process_group`` the ranks' norms are reduced by position (one
    ``all_reduce`` of ``num_params`` entries, zero where a rank has no gradient), so a
    parameter whose gradient is None on some ranks, as FSDP1 with
    ``use_orig_params=True`` leaves those outside a rank's shard, still lines up.
    DTensor gradients are global already and are kept out of the reduction.
    """
    norms = _norms.tensor_norms(
        inputs.grads, norm_type, foreach=foreach, plan=inputs.norm_plan
    )
    group = inputs.process_group
    if group is None:
        return PerTensorNorms(norms, None, _norms.reduce_norms(norms, norm_type))
    if D.mixed(inputs.grads):  # reduce the plain ones, add the DTensors back
        zero = norms.new_zeros(())
        parts = norms.unbind()
        kinds = [is_dtensor(g) for g in inputs.grads]
        plain = torch.stack([zero if k else n for k, n in zip(kinds, parts, strict=True)])
        whole = torch.stack([n if k else zero for k, n in zip(kinds, parts, strict=True)])
        reduced = D.all_reduce_norms(
            D.by_position(plain, inputs.indices, inputs.num_params), norm_type, group
        )
        everywhere = reduced + D.by_position(whole, inputs.indices, inputs.num_params)
    else:
        everywhere = D.all_reduce_norms(
            D.by_position(norms, inputs.indices, inputs.num_params), norm_type, group
        )
    norms = D.from_positions(everywhere, inputs.indices)
    return PerTensorNorms(norms, everywhere, _norms.reduce_norms(everywhere, norm_type))


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


def group_members(inputs: ClipInputs) -> dict[int, list[int]]:
    """For each parameter group with gradients, the positions of its gradients."""
    members: dict[int, list[int]] = {}
    for position, group in enumerate(inputs.group_index):
        members.setdefault(group, []).append(position)
    return members


def group_spans(inputs: ClipInputs) -> list[int]:
    """Where each parameter group's positions start (and end): ``spans[g]:spans[g+1]``.

    Raises:
        ValueError: The groups do not list their parameters.
    """
    if not all("params" in g for g in inputs.groups):
        raise ValueError(
            "with a process_group, ClipInputs.groups must be the optimizer's parameter "
            "groups (with their 'params'): per-tensor norms are placed by position"
        )
    spans = [0]
    for group in inputs.groups:
        spans.append(spans[-1] + len(group["params"]))
    return spans


def below(norms: Tensor, limit: float) -> Tensor:
    """The factors that bring ``norms`` to at most ``limit`` (ones for an inf limit)."""
    if math.isinf(limit):  # "never clip" must not compute inf / inf = NaN
        return torch.ones_like(norms)
    return F.clip_coef(norms, limit)


def recordable(norm: Tensor, skip: Tensor | None) -> Tensor:
    """Whether a statistic may enter a strategy's state: finite, > 0, step not skipped.

    A zero statistic is the all-zero step ``torch.distributed.checkpoint`` issues to
    initialise optimizer state; it must not count.
    """
    usable = F.finite(norm) & (norm > 0)
    return usable if skip is None else usable & torch.logical_not(skip.to(usable.device))


def state_dtype(norm: Tensor) -> torch.dtype:
    """The dtype of a strategy's statistics: at least float32."""
    return torch.promote_types(norm.dtype, torch.float32)


class TensorState(ClipStrategy):
    """A strategy whose state is a dict of fixed-size tensors, made on first use.

    Subclasses define :meth:`_fresh_state` and, for shape checks, :meth:`_check_state`.
    Loading checks keys, types and shapes before anything changes, without copying the
    strategy.
    """

    exact_norms = False  # adaptive thresholds want accurate norms, not torch's bits
    honours_skip = True
    sparse_gradients = True
    _state: dict[str, Tensor] | None = None

    def _fresh_state(self, norm: Tensor, num_params: int) -> dict[str, Tensor]:
        raise NotImplementedError

    def _check_state(self, state: Mapping[str, Tensor]) -> None:
        """Raise ValueError if ``state`` (keys and types already checked) does not fit."""

    def _state_on(self, norm: Tensor, num_params: int = 0) -> dict[str, Tensor]:
        if self._state is None:
            self._state = self._fresh_state(norm, num_params)
        elif next(iter(self._state.values())).device != norm.device:
            self._state = {k: v.to(norm.device) for k, v in self._state.items()}
        return self._state

    def state_dict(self) -> dict[str, Any]:
        """Return copies of the state tensors (empty before the first step)."""
        if self._state is None:
            return {}
        return {k: v.detach().clone() for k, v in self._state.items()}

    def check_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` if the keys, types or shapes do not fit this strategy."""
        if not state_dict:
            return
        expected = set(self._fresh_state(torch.zeros(()), 1))
        if set(state_dict) != expected:
            raise ValueError(
                f"{type(self).__name__} state needs keys {sorted(expected)}, "
                f"got {sorted(state_dict)}"
            )
        for key, value in state_dict.items():
            if not isinstance(value, Tensor):
                raise ValueError(
                    f"{type(self).__name__} state[{key!r}] must be a tensor, "
                    f"got {type(value).__name__}"
                )
        self._check_state(state_dict)

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore state saved by :meth:`state_dict`; ``{}`` resets.

        Raises:
            ValueError: Keys, shapes or types do not fit this strategy; nothing changes.
        """
        self.check_state_dict(state_dict)
        if not state_dict:
            self.reset()
            return
        self._state = {k: v.detach().clone() for k, v in state_dict.items()}

    def reset(self) -> None:
        """Forget all state."""
        self._state = None


def check_shape(owner: str, key: str, value: Tensor, shape: tuple[int, ...]) -> None:
    """Raise ValueError if a state tensor has the wrong shape."""
    if tuple(value.shape) != shape:
        raise ValueError(
            f"{owner} state[{key!r}] has shape {tuple(value.shape)}, expected {shape}"
        )
