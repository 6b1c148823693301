"""``"agc"``: adaptive gradient clipping, each unit relative to its weight's norm."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _distributed as D
from .. import _norms
from .. import functional as F
from .._protocol import ClipInputs, ClipResult, ClipStrategy, Measurement, ScaleEach
from .._registry import register_strategy
from .._torch_private import is_dtensor
from .._validation import (
    Schedule,
    check_foreach,
    check_schedule,
    check_threshold,
    threshold_at,
)

__all__ = ["AGC"]

#: Gradients with more entries are not batched with same-shaped ones: their op overhead
#: is amortised, and stacking would copy them.
_BATCH_NUMEL = 1 << 16


@register_strategy("agc")
class AGC(ClipStrategy):
    r"""Adaptive gradient clipping: clip each unit relative to its weight's norm.

    For every unit :math:`i` (a row along dim 0 of a parameter with 2+ dims, or a whole
    parameter with fewer) with weight :math:`W_i` and gradient :math:`G_i`:

    .. math::

        G_i \leftarrow G_i \cdot
        \frac{\lambda \max(\lVert W_i\rVert, \epsilon)}{\max(\lVert G_i\rVert, 10^{-6})}
        \quad\text{if}\quad \lVert G_i\rVert \ge \lambda \max(\lVert W_i\rVert, \epsilon)

    Same results as timm's ``adaptive_clip_grad`` on the same tensors, computed with one
    batched norm per group of same-shaped tensors instead of a loop of small ops. The
    paper does not clip the final classifier's weight: exclude it by parameter or by
    name (names come from an optimizer built with ``model.named_parameters()``).
    Sparse gradients are not supported (their rows are not the weight's units).

    Args:
        clipping: :math:`\lambda`, > 0 (a number or a schedule). 0.01 is the paper's
            value for batch 4096 with SGD; larger batches want smaller values.
        eps: :math:`\epsilon`, the smallest weight norm considered, > 0. A zero-initialised
            bias thus gets a tiny threshold (:math:`\lambda\epsilon`).
        exclude: Parameters (tensors) or parameter names left unclipped.
        foreach: ``None`` uses the foreach kernels where the device supports them.

    Raises:
        TypeError: ``exclude`` holds something other than tensors and strings.

    References:
        Brock, De, Smith, Simonyan, "High-Performance Large-Scale Image Recognition
        Without Normalization", ICML 2021.

    Example:
        >>> import torch, clipopt
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
        >>> sgd = torch.optim.SGD(model.named_parameters(), lr=0.1)
        >>> opt = clipopt.ClippedOptimizer(sgd, "agc", clipping=0.01, exclude=["1.weight"])
    """

    exact_norms = False  # AGC matches timm to float rounding, not torch's clipping bits
    honours_skip = True  # no state

    def __init__(
        self,
        clipping: Schedule = 0.01,
        eps: float = 1e-3,
        *,
        exclude: Iterable[Tensor | str] = (),
        foreach: bool | None = None,
    ) -> None:
        self.clipping = check_schedule("clipping", clipping, allow_inf=False)
        self.eps = check_threshold("eps", eps, allow_inf=False)
        items = list(exclude) if not isinstance(exclude, (str, Tensor)) else [exclude]
        bad = [x for x in items if not isinstance(x, (str, Tensor))]
        if bad:
            raise TypeError(
                f"exclude must hold parameters (tensors) or names (str), got {bad[0]!r}"
            )
        self.exclude = items
        self.foreach = check_foreach(foreach)

    def hyperparameters(self) -> dict[str, Any]:
        """Return the constructor arguments (excluded parameters by name or shape)."""
        shown = [
            x if isinstance(x, str) else f"<tensor {tuple(x.shape)}>" for x in self.exclude
        ]
        return {
            "clipping": self.clipping,
            "eps": self.eps,
            "exclude": shown,
            "foreach": self.foreach,
        }

    def plan(self, inputs: ClipInputs) -> _Plan:
        """Which gradients are clipped, grouped by shape: all that the parameters decide.

        Raises:
            ValueError: Names to exclude that the optimizer does not have.
        """
        included = self._included(inputs)
        groups: dict[Any, list[int]] = {}
        for k, i in enumerate(included):
            p, g = inputs.params[i], inputs.grads[i]
            # Small same-shaped tensors are batched (one op instead of one per tensor).
            small = g.numel() <= _BATCH_NUMEL
            key = (tuple(g.shape), g.dtype, g.device, p.dtype) if small else k
            groups.setdefault(key, []).append(k)
        _check_placements(inputs)
        kept = set(included)
        excluded = [i for i in range(len(inputs.grads)) if i not in kept]
        return _Plan(inputs.params, included, list(groups.values()), excluded)

    def _included(self, inputs: ClipInputs) -> list[int]:
        names = {x for x in self.exclude if isinstance(x, str)}
        tensors = {id(x) for x in self.exclude if isinstance(x, Tensor)}
        if names:
            if inputs.names is None:
                raise ValueError(
                    "AGC excludes parameters by name, but the optimizer has no parameter "
                    "names: build it from model.named_parameters(), or exclude the "
                    "parameters themselves"
                )
            known = {n for g in inputs.groups for n in g.get("param_names", ())}
            unknown = sorted(names - known)
            if unknown:
                raise ValueError(
                    f"AGC exclude names not found among the parameters: {unknown}"
                )
        return [
            i
            for i, p in enumerate(inputs.params)
            if id(p) not in tensors
            and (inputs.names is None or inputs.names[i] not in names)
        ]

    @torch.no_grad()
    def measure(self, inputs: ClipInputs) -> Measurement:
        """Return the total L2 norm of the gradients, from their unit norms.

        The unit norms go to :meth:`clip` with the measurement: the gradients are read
        once.
        """
        plan: _Plan = inputs.plan if inputs.plan is not None else self.plan(inputs)
        dtype, device = inputs.grads[0].dtype, inputs.grads[0].device
        units = [plan.unit_norms(_gather(inputs.grads, at)) for at in plan.grad_at]
        device = units[0].device if units else device
        unit_sq = [u.square().sum().to(device, dtype) for u in units]
        excluded = _gather(inputs.grads, plan.excluded)
        excluded_sq = self._excluded_squares(excluded, inputs, device, dtype)
        squares = _with_excluded(unit_sq, plan.split, excluded_sq, inputs)
        return Measurement(torch.stack(squares).sum().sqrt(), (plan, units, excluded_sq))

    def _excluded_squares(
        self, excluded: list[Tensor], inputs: ClipInputs, device: torch.device, dtype: Any
    ) -> _Excluded:
        """The excluded gradients' sums of squares: (to reduce over the group, global).

        Without a process group everything is global already (one process, or
        DTensors' own collectives). With one, plain shards give this rank's own sum,
        zero if it holds none, so that every rank makes the same collective.
        """

        def sum_sq(tensors: list[Tensor]) -> Tensor:
            norms = _norms.tensor_norms(tensors, foreach=self.foreach)
            return norms.square().sum().to(device, dtype)

        if inputs.process_group is None:
            return None, sum_sq(excluded) if excluded else None
        plain = [t for t in excluded if not is_dtensor(t)]
        whole = [t for t in excluded if is_dtensor(t)]
        local = sum_sq(plain) if plain else torch.zeros((), device=device, dtype=dtype)
        return local, sum_sq(whole) if whole else None

    @torch.no_grad()
    def clip(
        self, inputs: ClipInputs, measured: Measurement, skip: Tensor | None = None
    ) -> ClipResult:
        """Clip each unit whose gradient norm reaches ``clipping`` x its weight norm."""
        clipping = threshold_at("clipping", self.clipping, inputs.step)
        norm = measured.norm
        plan, units, excluded_sq = measured.parts
        post_sq: list[Tensor] = []
        any_clipped: list[Tensor] = []
        group_coefs = []
        for n, grad_norms in enumerate(units):
            weight_norms = plan.unit_norms(plan.weights[n])
            limit = weight_norms.clamp(min=self.eps) * clipping
            coef = torch.where(
                grad_norms < limit,
                torch.ones_like(limit),
                limit / grad_norms.clamp(min=1e-6),
            )
            post_sq.append((grad_norms * coef).square().sum().to(norm.device, norm.dtype))
            any_clipped.append((coef < 1).any().to(norm.device))
            group_coefs.append(coef.to(inputs.grads[plan.grad_at[n][0]].dtype))
        grouped = inputs.process_group is not None
        local_any = (
            torch.stack(any_clipped).any()
            if any_clipped
            else torch.zeros_like(norm, dtype=torch.bool)
        )
        # with a process group every rank reduces, whatever gradients it holds
        if any_clipped or grouped:
            clipped = D.reduce_any(local_any, _reduction_group(inputs))
        else:
            clipped = local_any
        post_sq = _with_excluded(post_sq, plan.split, excluded_sq, inputs)
        post = torch.stack(post_sq).sum().sqrt() if post_sq else torch.zeros_like(norm)
        total_coef = torch.where(norm > 0, post / norm, torch.ones_like(norm))
        factors = (ScaleEach(plan.per_tensor(group_coefs), plan.included),)
        return ClipResult(torch.full_like(norm, clipping), total_coef, clipped, factors)


class _Plan:
    """What AGC derives from the parameter list alone, built once per layout.

    Gradients share their parameter's type, shape, dtype and device (torch enforces it
    on assignment), so everything here can be read off the parameters. The plan also
    keeps scratch buffers between steps: a cache-sized buffer to stack unit norms in,
    and the per-tensor coefficient views (making thousands of views each step would
    cost more than the clipping itself).
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        included: list[int],
        groups: list[list[int]],
        excluded: list[int],
    ) -> None:
        #: positions of the clipped gradients, and the excluded ones
        self.included = included
        self.excluded = excluded
        #: same-shaped groups, as positions into ``included``
        self.groups = groups
        #: per group: positions into the gradient list, and the parameters themselves
        self.grad_at = [[included[k] for k in positions] for positions in groups]
        self.weights = [[params[i] for i in at] for at in self.grad_at]
        #: per group: are its units split over ranks (their norms are then global)?
        self.split = [is_dtensor(w[0]) and w[0].dim() <= 1 for w in self.weights]
        self._scratch: Tensor | None = None
        self._views: tuple[list[Tensor], list[Tensor]] | None = None

    def unit_norms(self, tensors: list[Tensor]) -> Tensor:
        """Unit norms of same-shaped tensors, batched along a new dim 0."""
        if is_dtensor(tensors[0]) and tensors[0].dim() <= 1:
            # A whole-tensor unit sharded over ranks: reduce its norm (DTensor's own
            # collectives, one for the group); the coefficient then applies to shards.
            return _norms.tensor_norms(tensors)
        tensors = D.locals_of(tensors)  # rows of Shard(0) DTensors are whole locally
        if len(tensors) == 1:
            return F.unit_norms(tensors[0]).unsqueeze(0)
        rank = tensors[0].dim()
        dims = tuple(range(2, rank + 1)) if rank >= 2 else tuple(range(1, rank + 1))
        if tensors[0].device.type != "cpu" or torch.compiler.is_compiling():
            # The obvious stack: the cache-sized scratch below is a CPU optimisation
            # (an accelerator's allocator hands back the same block every step).
            stacked = torch.stack(tensors)
            result: Tensor = torch.linalg.vector_norm(stacked, dim=dims, keepdim=rank >= 2)
            return result
        self._scratch = _norms.scratch_for(self._scratch, tensors[0])
        return _norms.stacked_norms(tensors, 2.0, dims, rank >= 2, self._scratch)

    def per_tensor(self, group_coefs: list[Tensor]) -> list[Tensor]:
        """One coefficient tensor per included gradient, as views of the groups' ones."""
        count = len(self.included)
        if count == 0:  # nothing included (on this rank)
            return []
        if torch.compiler.is_compiling():
            coefs: list[Tensor] = [group_coefs[0]] * count
            for positions, coef in zip(self.groups, group_coefs, strict=True):
                for k, part in zip(positions, coef.unbind(0), strict=True):
                    coefs[k] = part
            return coefs
        kept = self._views
        if kept is None or any(
            b.shape != c.shape or b.dtype != c.dtype or b.device != c.device
            for b, c in zip(kept[0], group_coefs, strict=True)
        ):
            buffers = [torch.empty_like(c) for c in group_coefs]
            views: list[Tensor] = [group_coefs[0]] * count
            for positions, buffer in zip(self.groups, buffers, strict=True):
                for k, part in zip(positions, buffer.unbind(0), strict=True):
                    views[k] = part
            kept = self._views = (buffers, views)
        torch._foreach_copy_(kept[0], group_coefs)  # one call; fake CUDA runs it too
        return kept[1]


# The excluded gradients' sums of squares: (this rank's own, to reduce over the process
# group, or None without one; global, or None).
_Excluded = tuple[Tensor | None, Tensor | None]


def _gather(items: Sequence[Tensor], at: list[int]) -> list[Tensor]:
    """``[items[i] for i in at]``, in C outside torch.compile (thousands of gradients).

    ``at`` holds distinct positions in increasing order, so as many positions as items
    means all of them.
    """
    if len(at) == len(items):
        return list(items)
    if len(at) > 1 and not torch.compiler.is_compiling():
        return list(operator.itemgetter(*at)(items))
    return [items[i] for i in at]


def _reduction_group(inputs: ClipInputs) -> Any:
    """The group whose ranks hold shards: the process group, else a DTensor's mesh."""
    if inputs.process_group is not None:
        return inputs.process_group
    grad = inputs.grads[0]
    if is_dtensor(grad):
        return grad.device_mesh.get_group()  # type: ignore[attr-defined]
    return None


def _check_placements(inputs: ClipInputs) -> None:
    if not is_dtensor(inputs.grads[0]):
        return
    from torch.distributed.tensor import Shard

    meshes = {id(g.device_mesh) for g in inputs.grads}  # type: ignore[attr-defined]
    placements = {tuple(g.placements) for g in inputs.grads}  # type: ignore[attr-defined]
    if len(meshes) != 1 or placements != {(Shard(0),)}:
        raise NotImplementedError(
            "AGC supports DTensor gradients sharded on dim 0 over one 1-D mesh (FSDP2's "
            f"layout), where every unit is whole on its rank; got placements {placements}"
        )


def _sum_squares(
    squares: list[Tensor], split: list[bool], inputs: ClipInputs
) -> list[Tensor]:
    """Turn per-group sums of squares into global ones.

    Sums over local units are reduced over the ranks (one collective); sums over split
    units are global already and are added as they are.
    """
    local = [s for s, is_split in zip(squares, split, strict=True) if not is_split]
    whole = [s for s, is_split in zip(squares, split, strict=True) if is_split]
    group = _reduction_group(inputs)
    out = [D.reduce_sum(torch.stack(local).sum(), group)] if local else []
    return out + whole


def _with_excluded(
    squares: list[Tensor], split: list[bool], excluded: _Excluded, inputs: ClipInputs
) -> list[Tensor]:
    """Global sums of squares of the units and of the excluded gradients.

    A rank's own excluded sum joins the units' collective, so every rank makes it,
    whatever gradients it holds.
    """
    local, whole = excluded
    if local is None:
        out = _sum_squares(squares, split, inputs)
    else:
        out = _sum_squares([*squares, local], [*split, False], inputs)
    return out if whole is None else [*out, whole]
