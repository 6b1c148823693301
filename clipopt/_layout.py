"""Which parameters the optimizer holds, where they sit, and which have gradients.

A :class:`Layout` is derived from ``param_groups`` and rebuilt when they change (a group
added, a group's parameter list replaced or resized, ``load_state_dict`` rebinding the
groups). A :class:`Selection` is the part of a layout whose parameters have gradients
at a step; while the same gradients are missing, the same selection (and the strategy's
plan for it) serves every step.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any, cast

import torch
from torch import Tensor

from ._norms import NormPlan
from ._protocol import ClipInputs, ClipResult, ClipStrategy, inputs_of

__all__ = ["Gradients", "Layout", "Selection"]

#: Where the step's own frames live (the no-gradient warning skips them).
_INSIDE = tuple(
    os.path.dirname(os.path.abspath(module.__file__ or "")) + os.sep
    for module in (sys.modules[__name__], torch.optim, torch.utils.hooks)
)
_GRAD = operator.attrgetter("grad")
_IS_NONE = functools.partial(operator.is_, None)


class Selection:
    """The parameters of a layout that have gradients at a step, and what they allow.

    Attributes:
        params, indices, group_index, names: As in :class:`clipopt.ClipInputs`.
        plan: The strategy's plan for this selection (set by the engine, once).
    """

    def __init__(self, layout: Layout, missing: tuple[int, ...]) -> None:
        self.layout = layout
        self.missing = missing
        if not missing:
            self.params: Sequence[Tensor] = layout.params
            self.indices: Sequence[int] = range(len(layout.params))
            self.group_index: Sequence[int] = layout.group_index
            self.names: Sequence[str] | None = layout.names
        else:
            gone = set(missing)
            keep = [i for i in range(len(layout.params)) if i not in gone]
            self.params = [layout.params[i] for i in keep]
            self.indices = keep
            self.group_index = [layout.group_index[i] for i in keep]
            names = layout.names
            self.names = None if names is None else [names[i] for i in keep]
        self.plan: Any = None
        self.planned = False
        #: Per ``exact``: the fields of the selection's ClipInputs but grads and step.
        self.fields: dict[bool, dict[str, Any]] = {}
        #: Positions of sparse gradients, found at the selection's first step.
        self.sparse: list[int] | None = None

    def norm_plan(self, exact: bool) -> NormPlan | None:
        """The layout's norm plan, when every parameter has a gradient."""
        return None if self.missing else self.layout.norm_plan(exact)


class Layout:
    """The parameters of all groups, in order, with their group and name.

    Args:
        groups: The optimizer's ``param_groups`` (the list object itself).
    """

    def __init__(self, groups: list[dict[str, Any]]) -> None:
        self.groups = groups
        self._lists = tuple((g["params"], len(g["params"])) for g in groups)
        params: list[Tensor] = []
        group_index: list[int] = []
        names: list[str | None] = []
        for g, group in enumerate(groups):
            group_names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                params.append(p)
                group_index.append(g)
                names.append(None if group_names is None else group_names[i])
        self.params = tuple(params)
        self.group_index = tuple(group_index)
        self.names = None if None in names else tuple(n for n in names if n is not None)
        #: One device and one dtype (a .grad always matches its parameter's).
        self.uniform = len({(p.device, p.dtype, type(p.data)) for p in params}) <= 1
        self._norm_plans: dict[bool, NormPlan | None] = {}
        self._selection: Selection | None = None

    def matches(self, groups: list[dict[str, Any]]) -> bool:
        """Whether ``groups`` still holds this layout's parameter lists, unresized.

        Checked by identity of the lists, as ``Optimizer.load_state_dict`` and
        ``add_param_group`` change them: a parameter replaced inside a list in place is
        not noticed (torch's optimizers key their state by the parameter objects, and do
        not support it either).
        """
        if groups is not self.groups or len(groups) != len(self._lists):
            return False
        for (lst, n), group in zip(self._lists, groups, strict=True):  # (every step)
            if group["params"] is not lst or len(lst) != n:
                return False
        return True

    def norm_plan(self, exact: bool) -> NormPlan | None:
        """A :class:`NormPlan` for this layout (made on first use), or None if useless."""
        if exact not in self._norm_plans:
            plan = (
                NormPlan(self.params, exact=exact) if self.uniform and self.params else None
            )
            self._norm_plans[exact] = plan if plan is not None and plan.active else None
        return self._norm_plans[exact]

    def select(self, missing: tuple[int, ...]) -> Selection:
        """The selection of parameters with gradients; the last one is kept."""
        kept = self._selection
        if kept is None or kept.missing != missing:
            kept = self._selection = Selection(self, missing)
        return kept


class Gradients:
    """Collects a step's gradients for a strategy, as :class:`ClipInputs`.

    Keeps the current :class:`Layout` (rebuilt when ``param_groups`` change) and, per
    selection of parameters with gradients, the strategy's plan.

    Args:
        strategy: The strategy the inputs are for (its plan, sparse support, group keys).
        process_group: The process group of plain-tensor shards, or None.
        apply: The engine's way to apply factors at once (``ClipInputs.apply``).
    """

    def __init__(
        self,
        strategy: ClipStrategy,
        process_group: Any,
        apply: Callable[[ClipInputs, ClipResult, Tensor], None],
    ) -> None:
        self.strategy = strategy
        self.process_group = process_group
        self.apply = apply
        self.layout: Layout | None = None
        self._steps_without = 0

    def current(self, groups: list[dict[str, Any]]) -> Layout:
        """The layout of ``groups``, rebuilt (and its group keys checked) on a change."""
        layout = self.layout
        if layout is None or not layout.matches(groups):
            layout = Layout(groups)
            self._check_group_keys(layout)
            self.layout = layout
        return layout

    def _check_group_keys(self, layout: Layout) -> None:
        """A ``clipopt_*`` group key the strategy does not read is a silent mistake.

        Raises:
            ValueError: Such a key, named with the fix.
        """
        known = set(self.strategy.group_keys)
        for g, group in enumerate(layout.groups):
            for key in group:
                if isinstance(key, str) and key.startswith("clipopt_") and key not in known:
                    hint = (
                        " (pass scope='group' to clip each group to its own threshold)"
                        if key in ("clipopt_max_norm", "clipopt_clip_value")
                        else ""
                    )
                    raise ValueError(
                        f"param_groups[{g}] has the key {key!r}, which "
                        f"{self.strategy!r} does not read{hint}; remove the key or "
                        f"use a strategy that reads it (it reads: "
                        f"{', '.join(known) or 'no group keys'})"
                    )

    def inputs(
        self, groups: list[dict[str, Any]], step: int, exact: bool
    ) -> ClipInputs | None:
        """This step's :class:`ClipInputs`; None if no parameter has a gradient.

        Args:
            groups: The optimizer's ``param_groups``.
            step: The step number (``ClipInputs.step``).
            exact: Whether the norms must keep torch's bits (see ``_norms``).

        Raises:
            TypeError: Sparse gradients the strategy does not support.
            ValueError: A group key the strategy does not read.
        """
        layout = self.layout
        if layout is None or not layout.matches(groups):
            layout = self.current(groups)
        # (map with C callables: this runs every step, and a comprehension's Python
        # loop over thousands of parameters is what a launch-bound step pays for)
        grads = list(map(_GRAD, layout.params))
        if not grads:  # groups without parameters
            return None
        missing: tuple[int, ...] = ()
        if any(map(_IS_NONE, grads)):
            missing = tuple(i for i, g in enumerate(grads) if g is None)
            if len(missing) == len(grads):
                return None
        selection = layout._selection
        if selection is None or selection.missing != missing:
            selection = layout.select(missing)
        present = cast(
            list[Tensor], grads if not missing else [grads[i] for i in selection.indices]
        )
        if selection.sparse is None:  # a gradient's layout comes from its module's op
            selection.sparse = [i for i, g in enumerate(present) if g.is_sparse]
        sparse = selection.sparse
        if sparse:
            present = self._sparse_values(selection, present, sparse)
        fields = selection.fields.get(exact)
        if fields is None:  # once per selection: all but the gradients and the step
            fields = {
                "params": selection.params,
                "indices": selection.indices,
                "num_params": len(grads),
                "group_index": selection.group_index,
                "groups": layout.groups,
                "names": selection.names,
                "uniform": layout.uniform,
                "process_group": self.process_group,
                "norm_plan": None if sparse else selection.norm_plan(exact),
                "apply": self.apply,
            }
            if not selection.planned:  # the strategy plans once per selection
                first = ClipInputs(grads=present, step=step, **fields)
                selection.plan = self.strategy.plan(dataclasses.replace(first, apply=None))
                selection.planned = True
            fields["plan"] = selection.plan
            selection.fields[exact] = fields
        return inputs_of(fields, present, step)

    def warn_none(self) -> None:
        """Warn at the 1st, 10th, 100th, ... step without gradients (rate-limited).

        The warning points at the user's line: the first frame outside clipopt and
        ``torch.optim`` (``attach()`` runs inside the optimizer's own ``step``).
        """
        self._steps_without += 1
        count = self._steps_without
        if not math.log10(count).is_integer():
            return
        level, frame = 1, cast("FrameType | None", sys._getframe(1))
        while frame is not None and frame.f_code.co_filename.startswith(_INSIDE):
            level, frame = level + 1, frame.f_back
        warnings.warn(
            f"step() found no gradients ({count} time(s) so far): call backward() "
            "before step(), or check that the parameters require gradients",
            UserWarning,
            stacklevel=level + 1,
        )

    def _sparse_values(
        self, selection: Selection, grads: list[Tensor], sparse: list[int]
    ) -> list[Tensor]:
        """Sparse COO gradients coalesced in place; their values stand for them.

        Raises:
            TypeError: The strategy does not support sparse gradients.
        """
        if not self.strategy.sparse_gradients:
            shape = tuple(selection.params[sparse[0]].shape)
            raise TypeError(
                f"{self.strategy!r} does not support sparse gradients (a parameter of "
                f"shape {shape} has one, e.g. from nn.Embedding(sparse=True)); use "
                "'norm', 'value', 'percentile', 'zscore' or 'adagc', or dense gradients"
            )
        out = list(grads)
        for i in sparse:
            param = selection.params[i]
            grad = grads[i]
            if not grad.is_coalesced():
                with torch.no_grad():
                    grad = param.grad = grad.coalesce()
            out[i] = grad._values()
        return out

    def __getstate__(self) -> dict[str, Any]:
        return {**vars(self), "layout": None}  # derived from the groups
