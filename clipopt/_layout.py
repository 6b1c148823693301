"""Which parameters the optimizer holds, where they sit, and which have gradients.

A :class:`Layout` is derived from ``param_groups`` and rebuilt when they change (a group
added, a group's parameter list replaced or resized, ``load_state_dict`` rebinding the
groups). A :class:`Selection` is the part of a layout whose parameters have gradients
at a step; while the same gradients are missing, the same selection (and the strategy's
plan for it) serves every step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ._norms import NormPlan

__all__ = ["Layout", "Selection"]


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
        return (
            groups is self.groups
            and len(groups) == len(self._lists)
            and all(
                g["params"] is lst and len(lst) == n
                for (lst, n), g in zip(self._lists, groups, strict=True)
            )
        )

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
