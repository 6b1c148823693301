"""How clipopt takes norms: torch's arithmetic, plus a per-layout plan for the CPU.

:func:`total_norm` and :func:`tensor_norms` are the implementations behind
``clipopt.functional`` and the strategies: torch's grouping and foreach kernels, in
torch's order, so that ``"norm"`` keeps ``clip_grad_norm_``'s bits. A :class:`NormPlan`,
built once per parameter layout by the engine, changes how some tensors are reduced on
the CPU:

- many small same-shaped tensors are stacked a chunk at a time into a cache-sized buffer
  and reduced row by row: the same bits (the CPU kernel reduces a contiguous row exactly
  as a whole contiguous tensor), two ops per chunk instead of one per tensor;
- with ``exact=False``, the 2-norm of each large float32/float64 tensor is taken from dot
  products of 256 Ki-entry chunks (BLAS: every core, several accumulators) summed in
  float64. Each chunk's float32 error is bounded by its own size, so the result's error
  does not grow with the tensor or depend on the thread count: tested within 3e-5 of a
  float64 reference on 1 and 2 threads (found: 1.7e-5 on constant entries, about 1e-8
  on random ones), where torch's CPU norm, one accumulator per lane over the whole
  tensor, is 1.4e-3 off on 25M standard-normal entries. Not torch's bits: the engine
  uses it on the fused path and for strategies that do not promise torch's bits.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import Tensor

from . import _distributed as D
from ._torch_private import group_by_device_and_dtype, is_dtensor, use_foreach

__all__ = ["NormPlan", "stacked_norms", "tensor_norms", "total_norm"]

#: Scratch for stacking small tensors a chunk at a time: small enough to stay in cache.
_SCRATCH_BYTES = 1 << 19
#: Entries per dot product of the chunked 2-norm: each chunk's float32 partial sum stays
#: accurate (its error grows with the chunk, not the tensor), and chunks are few.
_DOT_CHUNK = 1 << 18
_PLAIN = frozenset((Tensor, torch.nn.Parameter))


def scratch_for(kept: Tensor | None, like: Tensor) -> Tensor:
    """A cache-sized flat buffer of ``like``'s dtype and device (``kept`` if it fits)."""
    if (
        kept is not None
        and kept.dtype == like.dtype
        and kept.device == like.device
        and kept.numel() >= like.numel()
    ):
        return kept
    return torch.empty(
        max(_SCRATCH_BYTES // like.element_size(), like.numel()),
        dtype=like.dtype,
        device=like.device,
    )


def stacked_norms(
    tensors: Sequence[Tensor],
    norm_type: float,
    dim: tuple[int, ...] | None,
    keepdim: bool,
    scratch: Tensor,
) -> Tensor:
    """Norms along ``dim`` of same-shaped tensors stacked along a new dim 0.

    ``dim=None``: the norm of each whole tensor (a 1-D result).

    The tensors are stacked a chunk at a time into ``scratch`` (see :func:`scratch_for`),
    which stays in cache: stacking thousands of them into one big buffer would first
    have to fetch that buffer from memory. Each chunk's norms are the same bits as the
    whole stack's (rows are reduced independently).
    """
    count, shape, numel = len(tensors), tuple(tensors[0].shape), tensors[0].numel()
    chunk = min(count, max(1, scratch.numel() // max(numel, 1)))
    full = scratch[: chunk * numel].view(chunk, *shape)  # made once, not per chunk
    rows = full.view(chunk, -1) if dim is None else full
    parts = []
    for start in range(0, count, chunk):
        members = list(tensors[start : start + chunk])
        size = len(members)
        if size == chunk:
            torch.stack(members, out=full)
            batch = rows
        else:  # the last, shorter chunk
            batch = torch.stack(members, out=full[:size])
            batch = batch.view(size, -1) if dim is None else batch
        dims, keep = (1, False) if dim is None else (dim, keepdim)
        if norm_type == math.inf and not batch.is_complex():  # our scratch: abs in place
            parts.append(batch.abs_().amax(dim=dims, keepdim=keep))
        else:
            parts.append(torch.linalg.vector_norm(batch, norm_type, dim=dims, keepdim=keep))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def dot_norm(tensor: Tensor) -> Tensor:
    """The 2-norm of a contiguous float tensor from chunked dot products (see above)."""
    flat = tensor.view(-1)
    whole = flat.numel() - flat.numel() % _DOT_CHUNK
    chunks = list(flat[:whole].view(-1, _DOT_CHUNK).unbind()) if whole else []
    if whole < flat.numel():
        chunks.append(flat[whole:])
    partial = torch.stack([torch.dot(c, c) for c in chunks])
    return partial.sum(dtype=torch.float64).sqrt().to(tensor.dtype)


class NormPlan:
    """A plan to take the norms of one layout's CPU tensors in fewer, faster ops.

    Build it once for a layout (the shapes, dtypes and devices of the tensors to come),
    then pass it to :func:`total_norm` / :func:`tensor_norms` every step with tensors of
    that layout. It only applies to real, contiguous CPU tensors of one dtype; for
    anything else (accelerators, fake or meta tensors, ``torch.compile``, DTensors, a
    list of another length) the functions ignore it.

    Args:
        tensors: Tensors of the layout (parameters will do: a ``.grad`` has its
            parameter's shape, dtype, device and, by torch's layout contract, strides).
        max_numel: Tensors with more elements are not batched (their per-tensor overhead
            is amortised, and stacking would copy them).
        min_count: Fewer same-shaped tensors than this are not worth a batch (stacking
            costs about as much as a dozen norms of small tensors, measured on one
            thread).
        exact: Keep torch's bits (True), or allow dot products for large tensors.
        dot_min_numel: With ``exact=False``, the size from which dot products are used.
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        *,
        max_numel: int = 2048,
        min_count: int = 16,
        exact: bool = True,
        dot_min_numel: int = 1 << 16,
    ) -> None:
        self.count = len(tensors)
        self.exact = exact
        kinds = {(t.device, t.dtype) for t in tensors}
        shapes: dict[tuple[int, ...], list[int]] = {}
        dots: list[int] = []
        if len(kinds) == 1 and next(iter(kinds))[0].type == "cpu":
            for i, t in enumerate(tensors):
                if type(t) not in _PLAIN or not t.is_contiguous():
                    continue
                if 0 < t.numel() <= max_numel:
                    shapes.setdefault(tuple(t.shape), []).append(i)
                elif (
                    not exact
                    and t.numel() >= dot_min_numel
                    and t.dtype in (torch.float32, torch.float64)
                ):
                    dots.append(i)
        groups = [at for at in shapes.values() if len(at) >= min_count]
        taken = {i for at in groups for i in at} | set(dots)
        self._rest = [i for i in range(self.count) if i not in taken]
        self._groups = [operator.itemgetter(*at) for at in groups]
        self.dots = dots
        order = [i for at in groups for i in at] + dots + self._rest
        inverse = [0] * self.count
        for k, i in enumerate(order):
            inverse[i] = k
        self._order = torch.tensor(inverse, dtype=torch.int64)  # a CPU plan: no copy
        self._buffer: Tensor | None = None  # scratch for stacking, shared by the groups
        #: Whether the plan changes anything (else the functions need not use it).
        self.active = bool(groups or dots)

    def applies(self, tensors: Sequence[Tensor]) -> bool:
        """Whether ``tensors`` can use this plan now (see the class docs)."""
        return (
            self.active
            and len(tensors) == self.count
            and type(tensors[0]) in _PLAIN
            and tensors[0].device.type == "cpu"
            and not torch.compiler.is_compiling()
        )

    def norms(
        self, tensors: Sequence[Tensor], norm_type: float, foreach: bool | None
    ) -> Tensor:
        """The norm of each tensor, in input order, as one 1-D tensor."""
        parts = []
        for get in self._groups:
            members: tuple[Tensor, ...] = get(tensors)
            self._buffer = scratch_for(self._buffer, members[0])
            parts.append(stacked_norms(members, norm_type, None, False, self._buffer))
        if self.dots:
            big = [tensors[i] for i in self.dots]
            if norm_type == 2.0 and all(t.is_contiguous() for t in big):
                parts.append(torch.stack([dot_norm(t) for t in big]))
            else:
                parts.append(_uniform_norms(big, norm_type, foreach))
        if self._rest:
            rest = [tensors[i] for i in self._rest]
            parts.append(_uniform_norms(rest, norm_type, foreach))
        return torch.cat(parts).index_select(0, self._order)


def _uniform_norms(tensors: list[Tensor], norm_type: float, foreach: bool | None) -> Tensor:
    """The norms of tensors of one device and dtype (a plan's): no grouping needed."""
    if math.isinf(norm_type):
        return inf_norms(tensors, foreach, uniform=True)
    if use_foreach(tensors[:1], tensors[0].device, foreach):
        return torch.stack(torch._foreach_norm(tensors, norm_type))
    return torch.stack([torch.linalg.vector_norm(t, norm_type) for t in tensors])


def reduce_norms(norms: Tensor, norm_type: float) -> Tensor:
    """The total norm from per-tensor norms (the norm of the norms)."""
    result: Tensor = torch.linalg.vector_norm(norms, norm_type)
    return result


def total_norm(
    tensors: Sequence[Tensor],
    norm_type: float = 2.0,
    *,
    foreach: bool | None = None,
    uniform: bool = False,
    group: Any = None,
    plan: NormPlan | None = None,
) -> Tensor:
    """The p-norm of all tensors as one vector (``clipopt.functional.total_norm``).

    ``uniform``: the caller knows all tensors share one device and dtype (no grouping).
    ``plan``: a :class:`NormPlan` of this layout, ignored where it does not apply.
    ``group``: plain tensors are shards over this process group; the ranks' local
    totals are reduced as one scalar (DTensors are global already).
    """
    if len(tensors) == 0:
        raise ValueError("tensors must not be empty")
    if uniform and group is None and plan is None and norm_type != math.inf:
        # the common step: plain tensors of one device and dtype, as clip_grad_norm_
        # takes them (the ops of _uniform_norms and reduce_norms, inlined: a small
        # model's step pays for every call here)
        head = tensors[0]
        if type(head) is Tensor and use_foreach([head], head.device, foreach):
            norms = torch.stack(torch._foreach_norm(list(tensors), norm_type))
            result: Tensor = torch.linalg.vector_norm(norms, norm_type)
            return result
    if uniform and group is None and math.isinf(norm_type) and len(tensors) <= _FEW:
        head = tensors[0]
        if set(map(type, tensors)) <= _PLAIN and not head.is_complex():
            return _uniform_inf_total(tensors)
    if group is not None:
        # One scalar collective over the local totals: it holds whatever tensors each rank
        # has (shards of the same parameters, or different ones), where an element-wise
        # reduction of per-tensor norms would need the same list on every rank.
        if not uniform and D.mixed(tensors):
            return _mixed_total(tensors, norm_type, foreach, group)
        if is_dtensor(tensors[0]):
            return total_norm(tensors, norm_type, foreach=foreach)
        local = total_norm(tensors, norm_type, foreach=foreach, uniform=uniform, plan=plan)
        return D.all_reduce_norms(local, norm_type, group)
    if plan is not None and plan.applies(tensors):
        return reduce_norms(plan.norms(tensors, norm_type, foreach), norm_type)
    if not uniform and D.mixed(tensors):
        return _mixed_total(tensors, norm_type, foreach, None)
    first = tensors[0].device
    if math.isinf(norm_type):
        norms = inf_norms(tensors, foreach, uniform)
        return D.global_value(reduce_norms(norms, norm_type))
    if uniform:  # one device and dtype: torch's arithmetic without the grouping
        norms = _uniform_norms(list(tensors), norm_type, foreach)
        return D.global_value(reduce_norms(norms, norm_type))
    parts: list[Tensor] = []
    devices = set()
    for device, members, _ in group_by_device_and_dtype(tensors):
        devices.add(device)
        if use_foreach(members, device, foreach):
            parts.extend(torch._foreach_norm(members, norm_type))
        else:
            parts.extend(torch.linalg.vector_norm(t, norm_type) for t in members)
    if devices != {first}:  # .to(first) is a no-op otherwise, but costs per tensor
        parts = [n.to(first) for n in parts]
    return D.global_value(reduce_norms(torch.stack(parts), norm_type))


#: From this size on a tensor's largest absolute entry comes from ``aminmax`` (no copy);
#: smaller ones from ``_foreach_max`` of ``_foreach_abs`` (per tensor) or one ``aminmax``
#: of them copied together (a total, ``_uniform_inf_total``). torch's CPU inf-norm
#: (``vector_norm``, ``_foreach_norm``) is not vectorised: 35 ms against 6.6 ms on 25M
#: float32 entries, 70 against 24 us on twelve 64 x 64 tensors (one thread, measured).
#: The maximum is exact, so the results are the same.
_AMINMAX_NUMEL = 1 << 16
#: Up to this many tensors, an inf-norm total copies the small ones together for one
#: ``aminmax`` (``_uniform_inf_total``); beyond, a plan's batches of same-shaped tensors
#: (kept buffers, no reshape per tensor) or foreach ops cost less: 1.2 against 3.3 ms on
#: 1,000 (40, 48) and 1,000 (80,) float32 tensors, 101 against 168 us on 100 (40, 48);
#: 11 against 16 us on 20 (256,), 32 against 34 on twelve 64 x 64 (measured, 2 threads).
_FEW = 64


def inf_norms(
    tensors: Sequence[Tensor], foreach: bool | None, uniform: bool = False
) -> Tensor:
    """The largest absolute entry of each tensor (0 for an empty one), in order.

    torch has no inf-norm of an empty tensor (a max has no identity); NaN propagates.
    ``uniform``: one device and dtype, known to the caller.
    """
    first = tensors[0].device
    plain = set(map(type, tensors)) <= _PLAIN and not torch.compiler.is_compiling()
    if uniform and plain and use_foreach(list(tensors[:1]), first, foreach):
        sizes = [t.numel() for t in tensors]
        if min(sizes) > 0 and max(sizes) < _AMINMAX_NUMEL:  # the common small case
            return torch.stack(torch._foreach_max(torch._foreach_abs(list(tensors))))
    out: list[Tensor | None] = [None] * len(tensors)
    small: list[int] = []
    for i, t in enumerate(tensors):
        if t.numel() == 0:
            out[i] = t.new_zeros((), device=first) if type(t) in _PLAIN else None
        elif t.numel() >= _AMINMAX_NUMEL and type(t) in _PLAIN:
            low, high = torch.aminmax(t)
            out[i] = torch.maximum(high, low.neg())
        else:
            small.append(i)
    if small:
        members = [tensors[i] for i in small]
        for device, group, positions in group_by_device_and_dtype(members):
            fast = type(group[0]) in _PLAIN and not torch.compiler.is_compiling()
            if use_foreach(group, device, foreach) and fast:  # (dynamo lacks _foreach_max)
                norms = list(torch._foreach_max(torch._foreach_abs(group)))
            elif use_foreach(group, device, foreach):
                norms = list(torch._foreach_norm(group, math.inf))
            else:
                norms = [torch.linalg.vector_norm(t, math.inf) for t in group]
            for k, n in zip(positions, norms, strict=True):
                out[small[k]] = n
    kept = [n if n is not None else torch.zeros((), device=first) for n in out]
    if not uniform:
        kept = [D.global_value(n).to(first) for n in kept]
    return torch.stack(kept)


def _uniform_inf_total(tensors: Sequence[Tensor]) -> Tensor:
    """The largest absolute entry of real tensors of one device and dtype (0 if empty).

    One ``aminmax`` per large tensor, one over the small ones copied together (a copy of
    fewer than ``_AMINMAX_NUMEL`` entries each costs less than a foreach ``abs`` and
    ``max`` over them), then the largest magnitude of those extremes: 1.74 against
    1.96 ms on three 4M and twenty 256-entry float32 tensors (two threads), 26 against
    37 us on twelve 64 x 64 (one thread), both measured with ``abs`` and ``amax`` as the
    last step. NaN propagates through every op.

    Few distinct ops on purpose: in a training loop each distinct op after the first
    costs 10-20 us where a repeated one costs 2 (its code is out of the caches after the
    optimizer step; measured on the CPU), so the extremes are combined by one
    ``vector_norm`` rather than ``abs`` and ``amax``.
    """
    extremes: list[Tensor] = []
    small: list[Tensor] = []
    for t in tensors:
        numel = t.numel()
        if numel >= _AMINMAX_NUMEL:
            extremes.extend(torch.aminmax(t))
        elif numel:
            small.append(t if t.dim() == 1 else t.reshape(-1))  # a reshape costs
    if small:
        extremes.extend(torch.aminmax(small[0] if len(small) == 1 else torch.cat(small)))
    if not extremes:
        return tensors[0].new_zeros(())
    result: Tensor = torch.linalg.vector_norm(torch.stack(extremes), math.inf)
    return result


def _mixed_total(
    tensors: Sequence[Tensor], norm_type: float, foreach: bool | None, group: Any
) -> Tensor:
    """The norm of DTensors next to plain tensors, each kind on its own.

    DTensor ops refuse plain tensors. Only the plain ones are reduced over ``group``.
    """
    parts = [
        total_norm(
            [t for t in tensors if is_dtensor(t) == kind],
            norm_type,
            foreach=foreach,
            group=None if kind else group,
        )
        for kind in (True, False)
    ]
    return reduce_norms(torch.stack([p.to(parts[0].device) for p in parts]), norm_type)


def tensor_norms(
    tensors: Sequence[Tensor],
    norm_type: float = 2.0,
    *,
    foreach: bool | None = None,
    plan: NormPlan | None = None,
) -> Tensor:
    """The p-norm of each tensor, stacked in input order (local to this rank).

    DTensors give global norms (their own collectives); plain shards give their local
    norms (reduce them by position: ``_distributed``).
    """
    if len(tensors) == 0:
        raise ValueError("tensors must not be empty")
    if plan is not None and plan.applies(tensors):  # plain CPU tensors only
        return plan.norms(tensors, norm_type, foreach)
    if D.mixed(tensors):
        # each kind on its own, put back in order with Python lists (no index tensor)
        kinds = [is_dtensor(t) for t in tensors]
        parts = {
            kind: tensor_norms(
                [t for t, k in zip(tensors, kinds, strict=True) if k == kind],
                norm_type,
                foreach=foreach,
            ).unbind()
            for kind in (True, False)
        }
        device = parts[False][0].device
        taken = {True: 0, False: 0}
        ordered = []
        for kind in kinds:
            ordered.append(parts[kind][taken[kind]].to(device))
            taken[kind] += 1
        return torch.stack(ordered)
    first = tensors[0].device
    out: list[Tensor | None] = [None] * len(tensors)
    if math.isinf(norm_type):
        return inf_norms(tensors, foreach)
    for device, members, positions in group_by_device_and_dtype(tensors):
        if use_foreach(members, device, foreach):
            norms = list(torch._foreach_norm(members, norm_type))
        else:
            norms = [torch.linalg.vector_norm(t, norm_type) for t in members]
        for i, n in zip(positions, norms, strict=True):
            out[i] = n
    return D.global_value(torch.stack([cast(Tensor, n).to(first) for n in out]))
