"""``ClippedOptimizer``: any ``torch.optim`` optimizer, clipping gradients in ``step()``."""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast, overload

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from . import functional as F
from ._adaptive import _skips_in_kernel
from ._base import ClipInputs, ClipStats, ClipStrategy
from ._registry import get_strategy

__all__ = ["ClippedOptimizer", "NonfinitePolicy"]

NonfinitePolicy = Literal["skip", "error", "zero", "propagate"]
_POLICIES: tuple[str, ...] = ("skip", "error", "zero", "propagate")

#: Top-level key of ``state_dict()`` that holds clipopt's own state.
STATE_KEY = "clipopt"
_STATE_VERSION = 1
_COUNTERS = ("calls", "schedule_step", "skipped_steps", "clipped_steps", "nonfinite_steps")
_MISSING = object()
_H = TypeVar("_H", bound=Callable[..., Any])


@dataclass(frozen=True)
class _Layout:
    """The parameters of all groups, in order, with their group and name."""

    groups: list[dict[str, Any]]
    lists: tuple[tuple[list[Tensor], int], ...]
    params: tuple[Tensor, ...]
    group_index: tuple[int, ...]
    names: tuple[str, ...] | None
    uniform: bool  # one device and one dtype (a .grad always matches its parameter's)
    batches: F.NormBatches | None  # batched norms of small CPU gradients, if any
    fast: F.NormBatches | None  # plus dot products: fused path, non-exact strategies


@dataclass(frozen=True)
class _FusedPlan:
    """What a fused optimizer kernel receives instead of a separate scaling pass."""

    grad_scale: Tensor | None
    found_inf: Tensor | None


class _Shared:
    """Holds an object copies must share (a process group), which pickle cannot carry."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def __deepcopy__(self, memo: dict[int, Any]) -> _Shared:
        return self

    def __reduce__(self) -> tuple[Any, ...]:
        if self.value is not None:
            raise TypeError(
                "a ClippedOptimizer with a process_group cannot be pickled (process "
                "groups cannot); pickle its state_dict() instead"
            )
        return (_Shared, (None,))


def _as_group(value: Any) -> Any:
    """A process group, from a group or a 1-D DeviceMesh (or None)."""
    if value is None or not hasattr(value, "get_group"):
        return value
    if getattr(value, "ndim", 1) != 1:
        raise ValueError(
            "process_group must be a process group or a 1-D DeviceMesh, got a mesh with "
            f"{value.ndim} dimensions; pass the mesh dimension that shards, e.g. mesh['tp']"
        )
    return value.get_group()


def _warn_if_fsdp1_without_group(optimizer: torch.optim.Optimizer, group: Any) -> None:
    """FSDP1 flat parameters hold shards: without a group the norm would be local."""
    if group is not None:
        return
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    flat = any(
        type(p).__name__ == "FlatParameter"
        for g in optimizer.param_groups
        for p in g["params"]
    )
    if flat:
        warnings.warn(
            "the optimizer holds FSDP1 FlatParameters, which are shards: pass "
            "process_group=fsdp_model.process_group so that clipping uses the global norm",
            UserWarning,
            stacklevel=3,
        )


_HANDED = ("grad_scale", "found_inf")


def hand_over(optimizer: torch.optim.Optimizer, plan: _FusedPlan) -> dict[str, Any]:
    """Give a fused optimizer's kernel the plan; return what it replaced."""
    saved = {k: optimizer.__dict__.get(k, _MISSING) for k in _HANDED}
    optimizer.__dict__.update(grad_scale=plan.grad_scale, found_inf=plan.found_inf)
    return saved


def take_back(optimizer: torch.optim.Optimizer, saved: Mapping[str, Any]) -> None:
    """Undo :func:`hand_over`: restore (or remove) what the plan replaced."""
    for key, value in saved.items():
        if value is _MISSING:
            optimizer.__dict__.pop(key, None)
        else:
            optimizer.__dict__[key] = value


class _Skip:
    """The step must be skipped (decided on the host)."""


_SKIP = _Skip()
_Plan = _FusedPlan | _Skip | None


class _SkipStep(Exception):  # noqa: N818  (control flow, never escapes step())
    """Raised inside a wrapped closure to abandon the inner step before it updates."""

    def __init__(self, loss: Any) -> None:
        super().__init__()
        self.loss = loss


def _closure_required(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` takes a closure with no default (LBFGS does)."""
    try:
        signature = inspect.signature(type(optimizer).step)
    except (TypeError, ValueError):
        return False
    closure = signature.parameters.get("closure")
    return closure is not None and closure.default is inspect.Parameter.empty


class ClippedOptimizer(torch.optim.Optimizer):
    """Wrap a ``torch.optim`` optimizer so that ``step()`` clips the gradients first.

    The wrapper *is* a ``torch.optim.Optimizer``: LR schedulers, ``GradScaler``,
    checkpointing and frameworks that check ``isinstance`` accept it. Its
    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's very objects,
    also after ``load_state_dict`` on either of them.

    ``step()`` collects the gradients of every parameter group, lets the strategy measure
    them (e.g. their total norm), applies the non-finite policy, clips in place, and
    calls the wrapped optimizer's ``step()``. With a closure, clipping happens after
    every evaluation of the closure, so closure-driven optimizers such as LBFGS see
    clipped gradients.

    Non-finite gradients (a NaN or infinite entry, or a norm that overflows) are handled
    by ``nonfinite``:

    - ``"skip"`` (default): the parameters, the wrapped optimizer's state and the
      strategy's state stay untouched and the step counts as skipped. Deciding this
      needs one host read of a 0-dim tensor per step.
    - ``"error"``: raise ``RuntimeError`` and change nothing (also one host read).
    - ``"zero"``: set the non-finite entries to 0, then clip and step. No host read.
    - ``"propagate"``: torch's behaviour (non-finite values reach the update). No host
      read; the strategy's state still never ingests a non-finite statistic.

    Args:
        optimizer: The optimizer to wrap, an instance of ``torch.optim.Optimizer``.
        strategy: A registered strategy name (see :func:`clipopt.available_strategies`)
            or a :class:`clipopt.ClipStrategy` instance.
        nonfinite: The policy for non-finite gradients, one of ``"skip"``, ``"error"``,
            ``"zero"`` and ``"propagate"``.
        process_group: For plain-tensor gradients sharded over ranks (hand-made model
            parallelism, FSDP1's flat parameters): the ``torch.distributed`` group whose
            ranks hold the shards, or a 1-D ``DeviceMesh`` over them; norms are then
            global, with one ``all_reduce`` per step: of the ranks' total norms, or, for
            per-tensor strategies, of one norm per parameter position (the ranks'
            optimizers must then hold the same parameters in the same order; a rank
            may lack some gradients, as with FSDP1's ``use_orig_params=True``).
            Not needed for DDP (gradients are already all-reduced) nor for FSDP2/DTensor
            (DTensor's collectives apply).
        **strategy_kwargs: The strategy's parameters, when ``strategy`` is a name.

    Attributes:
        optimizer: The wrapped optimizer.
        strategy: The clipping strategy.
        nonfinite: The non-finite policy.
        last_stats: :class:`clipopt.ClipStats` of the last step that had gradients, or
            None before that.

    Raises:
        TypeError: ``optimizer`` is not an optimizer or is already a
            ``ClippedOptimizer``; ``strategy`` is neither a name nor a strategy; keyword
            arguments the strategy does not accept.
        ValueError: Unknown strategy name, unknown ``nonfinite`` policy, or an invalid
            strategy parameter.

    Example:
        >>> import torch, clipopt
        >>> model = torch.nn.Linear(4, 1)
        >>> opt = clipopt.ClippedOptimizer(
        ...     torch.optim.AdamW(model.parameters(), lr=1e-3), "norm", max_norm=1.0)
        >>> loss = model(torch.randn(8, 4)).pow(2).mean()
        >>> loss.backward()
        >>> opt.step()
        >>> opt.last_stats.norm > 0
        tensor(True)
        >>> opt.param_groups is opt.optimizer.param_groups
        True
    """

    optimizer: torch.optim.Optimizer
    strategy: ClipStrategy
    nonfinite: NonfinitePolicy
    last_stats: ClipStats | None
    _calls: int
    _host_skips: int
    _counts: Tensor
    _layout: _Layout | None

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        strategy: str | ClipStrategy = "norm",
        *,
        nonfinite: NonfinitePolicy = "skip",
        process_group: Any = None,
        **strategy_kwargs: Any,
    ) -> None:
        if isinstance(optimizer, ClippedOptimizer):
            raise TypeError(
                "optimizer is already a ClippedOptimizer; wrap the inner optimizer once "
                "(use clipopt.Chain to combine strategies)"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if isinstance(strategy, str):
            strategy = get_strategy(strategy, **strategy_kwargs)
        elif isinstance(strategy, ClipStrategy):
            if strategy_kwargs:
                raise TypeError(
                    "strategy keyword arguments "
                    f"({', '.join(sorted(strategy_kwargs))}) are only accepted with a "
                    f"strategy name, got the strategy object {strategy!r}"
                )
        else:
            raise TypeError(
                "strategy must be a registered name or a clipopt.ClipStrategy, "
                f"got {strategy!r}"
            )
        if not isinstance(nonfinite, str) or nonfinite not in _POLICIES:
            raise ValueError(
                f"nonfinite must be one of {', '.join(map(repr, _POLICIES))}, "
                f"got {nonfinite!r}"
            )
        self.optimizer = optimizer
        self.strategy = strategy
        self.nonfinite = nonfinite
        self._group = _Shared(_as_group(process_group))
        _warn_if_fsdp1_without_group(optimizer, process_group)
        self.last_stats = None
        self._closure_required = _closure_required(optimizer)
        self._layout = None
        self._reset_counters()
        # Optimizer.__init__ would rebuild param_groups and state through the properties
        # below and wipe the wrapped optimizer's state. __setstate__ is torch's own way
        # to finish an optimizer restored from a pickle: it creates the hook registries
        # and patches step() (ours is marked hooked, so hooks are not run twice).
        super().__setstate__({})

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

    # -- stepping ------------------------------------------------------------------------

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Clip the gradients, then step the wrapped optimizer.

        Args:
            closure: Re-evaluates the model and returns the loss; clipping runs after
                every evaluation.

        Returns:
            The closure's loss, or None without a closure.
        """
        if closure is None:
            plan = self._clip()
            if plan is not _SKIP:
                with self._fused(plan):
                    self.optimizer.step()
            return None
        return self._step_with_closure(closure)

    # Step hooks registered on the wrapper are forwarded to the wrapped optimizer, whose
    # patched step() runs them (and the global hooks) exactly once per step.
    step.hooked = True  # type: ignore[attr-defined]

    @property
    def process_group(self) -> Any:
        """The process group over which plain-tensor gradients are sharded, or None."""
        return self._group.value

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """Whether GradScaler may hand us scaled gradients (fused path only).

        Only with a fused wrapped optimizer and a single-factor strategy: the norm of the
        scaled gradients is divided by the scale, and the kernel receives one combined
        ``grad_scale`` and the scaler's ``found_inf``. Otherwise the scaler unscales
        first, as for any optimizer.
        """
        return self._fused_capable()

    def _fused_capable(self) -> bool:
        """A fused kernel and a single-factor strategy: the kernel applies the factor."""
        return self._fused_kernel() and self.strategy.supports_coefficient()

    def _fused_kernel(self) -> bool:
        """Whether the wrapped optimizer's kernel takes ``grad_scale`` and ``found_inf``."""
        return bool(getattr(self.optimizer, "_step_supports_amp_scaling", False))

    @contextlib.contextmanager
    def _fused(self, plan: _Plan) -> Iterator[None]:
        """Hand the clipping factor (and found_inf) to a fused optimizer's kernel."""
        if not isinstance(plan, _FusedPlan):
            yield
            return
        saved = hand_over(self.optimizer, plan)
        try:
            yield
        finally:
            take_back(self.optimizer, saved)

    def _step_with_closure(self, closure: Callable[[], float]) -> float:
        evaluations = 0
        snapshot = (
            self._snapshot()
            if self._closure_required and self.nonfinite == "skip"
            else None
        )
        saved: list[dict[str, Any]] = []

        def clipped_closure() -> float:
            nonlocal evaluations
            with torch.enable_grad():
                loss = closure()
            evaluations += 1
            plan = self._clip()
            if plan is _SKIP:
                raise _SkipStep(loss)
            if isinstance(plan, _FusedPlan):
                # The optimizer reads grad_scale/found_inf after calling the closure; the
                # latest evaluation's plan counts, the first hand-over saved the original.
                original = hand_over(self.optimizer, plan)
                if not saved:
                    saved.append(original)
            return loss

        try:
            return self.optimizer.step(clipped_closure)
        except _SkipStep as skip:
            # torch.optim optimizers evaluate the closure before changing anything, so
            # abandoning at the first evaluation loses nothing; later evaluations (LBFGS
            # line search) follow updates, which the snapshot undoes.
            if evaluations > 1:
                if snapshot is None:
                    raise RuntimeError(
                        f"non-finite gradients at closure evaluation {evaluations} of "
                        f"{type(self.optimizer).__name__}.step(), after it had already "
                        "updated the parameters; use nonfinite='zero' or 'propagate' "
                        "with this optimizer"
                    ) from None
                self._restore(snapshot)
            return cast(float, skip.loss)
        finally:
            if saved:
                take_back(self.optimizer, saved[0])

    def _snapshot(self) -> dict[str, Any]:
        return {
            "params": [p.detach().clone() for g in self.param_groups for p in g["params"]],
            "state": {p: copy.deepcopy(s) for p, s in self.optimizer.state.items()},
            "strategy": copy.deepcopy(self.strategy.state_dict()),
            "counters": self._counter_state(),
            "last_stats": self.last_stats,
        }

    @torch.no_grad()
    def _restore(self, snapshot: dict[str, Any]) -> None:
        params = [p for g in self.param_groups for p in g["params"]]
        for p, saved in zip(params, snapshot["params"], strict=True):
            p.copy_(saved)
        self.optimizer.state.clear()
        self.optimizer.state.update(snapshot["state"])
        self.strategy.load_state_dict(snapshot["strategy"])
        self._load_counters(snapshot["counters"])
        self._calls += 1
        self._host_skips += 1
        self._counts = self._counts + torch.tensor([1, 0, 1], device=self._counts.device)
        self.last_stats = snapshot["last_stats"]

    def _layout_for(self) -> _Layout:
        """The parameters and where they sit, rebuilt only when the groups change."""
        groups = self.optimizer.param_groups
        layout = self._layout
        if (
            layout is not None
            and layout.groups is groups
            and len(layout.lists) == len(groups)
            and all(
                lst is g["params"] and len(lst) == n
                for (lst, n), g in zip(layout.lists, groups, strict=True)
            )
        ):
            return layout
        params: list[Tensor] = []
        group_index: list[int] = []
        names: list[str | None] = []
        for g, group in enumerate(groups):
            group_names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                params.append(p)
                group_index.append(g)
                names.append(None if group_names is None else group_names[i])
        uniform = len({(p.device, p.dtype, type(p.data)) for p in params}) <= 1
        batches = F.NormBatches(params) if uniform and params else None
        fast = F.NormBatches(params, exact=False) if uniform and params else None
        layout = _Layout(
            groups=groups,
            lists=tuple((g["params"], len(g["params"])) for g in groups),
            params=tuple(params),
            group_index=tuple(group_index),
            names=None if None in names else tuple(cast(list[str], names)),
            uniform=uniform,
            batches=batches if batches is not None and batches.active else None,
            fast=fast if fast is not None and fast.active else None,
        )
        self._layout = layout
        self._sparse_checked = False
        return layout

    def _inputs(self, fast: bool = False) -> ClipInputs | None:
        """Collect the parameters with a gradient and where they sit; None if none.

        ``fast``: norms may come from faster and more accurate dot products
        (``NormBatches(exact=False)``): the step goes through a fused kernel, whose
        results differ from clip-then-step in the last bits anyway, or the strategy does
        not promise torch's bits.
        """
        layout = self._layout_for()
        grads = [p.grad for p in layout.params]
        step = self._calls - self._host_skips
        missing = [i for i, g in enumerate(grads) if g is None]
        # which parameters step: see _clip, on when a fused kernel may skip steps
        self._stepping = (layout, tuple(missing))
        if not missing and self._sparse_checked:
            return ClipInputs(
                layout.params,
                cast(list[Tensor], grads),
                step,
                range(len(grads)),
                len(grads),
                layout.group_index,
                layout.groups,
                layout.names,
                layout.uniform,
                self._group.value,
                layout.fast if fast else layout.batches,
            )
        keep = [i for i, g in enumerate(grads) if g is not None]
        if not keep:
            return None
        for i in keep:
            if cast(Tensor, grads[i]).is_sparse:
                raise RuntimeError(
                    "clipopt does not support sparse gradients (a parameter of shape "
                    f"{tuple(layout.params[i].shape)} has one); clip them before a "
                    "sparse optimizer"
                )
        self._sparse_checked = not missing
        # While the same gradients are missing, the kept lists are the same objects from
        # step to step, so strategies' caches keyed on them (AGC's plan) stay valid.
        kept = self.__dict__.get("_kept")
        if kept is None or kept[0] is not layout or kept[1] != self._stepping[1]:
            names = layout.names
            kept = self._kept = (
                layout,
                self._stepping[1],
                [layout.params[i] for i in keep],
                keep,
                [layout.group_index[i] for i in keep],
                None if names is None else [names[i] for i in keep],
            )
        _, _, params, positions, group_index, kept_names = kept
        return ClipInputs(
            params,
            [cast(Tensor, grads[i]) for i in positions],
            step,
            positions,
            len(grads),
            group_index,
            layout.groups,
            kept_names,
            layout.uniform,
            self._group.value,
            None if missing else layout.fast if fast else layout.batches,
        )

    @torch.no_grad()
    def _clip(self) -> _Plan:
        """Clip (or plan a fused clip); return _SKIP when the step must be skipped."""
        fused = self._fused_capable()
        inputs = self._inputs(fused or not self.strategy.exact_norms())
        if inputs is None:
            self._warn_no_gradients()
            return None
        grads = inputs.grads
        amp_scale: Tensor | None = self.__dict__.get("grad_scale")  # set by GradScaler
        amp_found: Tensor | None = self.__dict__.get("found_inf")
        if self.nonfinite == "zero":
            nonfinite = torch.logical_not(F.finite(self.strategy.measure(inputs)))
            F.nonfinite_to_zero_(grads)
            norm = self.strategy.measure(inputs)
        else:
            norm = self.strategy.measure(inputs)
            nonfinite = torch.logical_not(F.finite(norm))
        if amp_scale is not None:  # the gradients are scaled: so is their norm
            norm = norm / amp_scale.to(norm.device, norm.dtype)
        if amp_found is not None:
            nonfinite = nonfinite | (amp_found.to(nonfinite.device) > 0)
        # The one host read of "skip" (unless a fused kernel skips for us: built-in
        # strategies, once the optimizer's state is sound, see _skips_in_kernel and
        # _state_ready; on the CPU the read is free, and cheaper than the kernel's
        # found_inf bookkeeping) and "error": whether to step at all is then a Python
        # decision.
        kernel_skips = (
            self.nonfinite == "skip"
            and self._fused_kernel()
            and not F.is_host_readable(nonfinite)
            and _skips_in_kernel(self.strategy)
            and self._state_ready(inputs)
        )
        host_decides = self.nonfinite == "error" or (
            self.nonfinite == "skip" and not kernel_skips
        )
        if host_decides and bool(nonfinite):
            if self.nonfinite == "error":
                raise RuntimeError(
                    f"non-finite gradients: the pre-clip statistic of "
                    f"{self.strategy!r} is {float(norm)}; nothing was changed "
                    "(nonfinite='error')"
                )
            self._calls += 1
            self._host_skips += 1
            self._count(
                norm, torch.ones_like(nonfinite), torch.zeros_like(nonfinite), nonfinite
            )
            self.last_stats = ClipStats(
                norm,
                torch.full_like(norm, math.nan),
                torch.zeros_like(norm),
                torch.zeros_like(nonfinite),
                nonfinite,
            )
            return _SKIP
        self._calls += 1
        if fused:
            result = self.strategy.clip_coefficient(inputs, norm)
            skipped = nonfinite if self.nonfinite == "skip" and not host_decides else None
            if amp_found is not None and not host_decides:
                found = amp_found.to(nonfinite.device) > 0
                skipped = found if skipped is None else skipped | found
            device = grads[0].device
            grad_scale: Tensor | None = None
            # On the CPU a factor of exactly 1 needs no grad_scale: without one, the
            # kernel does not write the gradients back (no device sync to know it).
            if not F.is_cpu_one(result.coef):
                grad_scale = (1.0 / result.coef).to(device, torch.float32)
            if amp_scale is not None:
                amp = amp_scale.to(device, torch.float32)
                grad_scale = amp if grad_scale is None else grad_scale * amp
            plan: _Plan = _FusedPlan(
                grad_scale,
                None if skipped is None else skipped.to(device, torch.float32),
            )
        else:
            # The kernel skips a non-finite step after the strategy clipped in place (it
            # leaves its state alone then: the same contract as under "propagate").
            result = self.strategy.clip_(inputs, norm)
            skipped = nonfinite if kernel_skips else None
            plan = (
                None
                if skipped is None
                else _FusedPlan(None, skipped.to(grads[0].device, torch.float32))
            )
        threshold, coef, clipped = result
        if skipped is not None:
            threshold = torch.where(
                skipped, torch.full_like(threshold, math.nan), threshold
            )
            coef = torch.where(skipped, torch.zeros_like(coef), coef)
            clipped = clipped & torch.logical_not(skipped)
        self._count(
            norm,
            torch.zeros_like(nonfinite) if skipped is None else skipped,
            clipped,
            nonfinite,
        )
        self.last_stats = ClipStats(norm, threshold, coef, clipped, nonfinite)
        return plan

    def _state_ready(self, inputs: ClipInputs) -> bool:
        """Whether a fused kernel may skip this step and leave a sound optimizer state.

        Fused SGD with momentum creates a parameter's momentum buffer with
        ``torch.empty_like`` and fills it in the kernel at the first step: a kernel that
        skips that step leaves the buffer uninitialised, and later steps use it (torch's
        GradScaler has the same hazard). Until every stepping parameter has a buffer
        the host decides, with one read. A host-side check, cached per set of stepping
        parameters and the optimizer's state (the object and its size: loading or
        clearing it starts over) and momenta; the other fused optimizers start from
        zeros.
        """
        optimizer = self.optimizer
        if not isinstance(optimizer, torch.optim.SGD):
            return True
        layout, missing = self._stepping
        state = optimizer.state
        key = (
            missing,
            id(state),
            len(state),
            tuple(g.get("momentum", 0) for g in inputs.groups),
        )
        ready = self.__dict__.get("_kernel_ready")
        if ready is not None and ready[0] is layout and ready[1] == key:
            return True
        for param, group in zip(inputs.params, inputs.group_index, strict=True):
            momentum = inputs.groups[group].get("momentum", 0)
            if momentum and state.get(param, {}).get("momentum_buffer") is None:
                return False
        self._kernel_ready = (layout, key)
        return True

    def _warn_no_gradients(self) -> None:
        """Warn at the 1st, 10th, 100th, ... step without gradients (rate-limited)."""
        count = self.__dict__.get("_no_grad_steps", 0) + 1
        self._no_grad_steps = count
        if math.log10(count).is_integer():
            warnings.warn(
                f"step() found no gradients ({count} time(s) so far): call backward() "
                "before step(), or check that the parameters require gradients",
                UserWarning,
                stacklevel=4,
            )

    # -- counters ------------------------------------------------------------------------
    # Calls are counted on the host; skipped, clipped and non-finite steps in one small
    # device tensor, so counting never reads the device.

    def _count(
        self, norm: Tensor, skipped: Tensor, clipped: Tensor, nonfinite: Tensor
    ) -> None:
        if self._counts.device != norm.device:
            self._counts = self._counts.to(norm.device)
        flags = torch.stack(
            [skipped, clipped.to(skipped.device), nonfinite.to(skipped.device)]
        )
        self._counts = self._counts + flags.to(self._counts.device, torch.int64)

    def _reset_counters(self) -> None:
        self._calls = 0
        self._host_skips = 0
        self._counts = torch.zeros(3, dtype=torch.int64)

    def _counter_state(self) -> dict[str, int | Tensor]:
        skipped, clipped, nonfinite = self._counts.clone().unbind()
        return {
            "calls": self._calls,
            "schedule_step": self._calls - self._host_skips,
            "skipped_steps": skipped,
            "clipped_steps": clipped,
            "nonfinite_steps": nonfinite,
        }

    def _load_counters(self, counters: Mapping[str, Any]) -> None:
        self._calls = int(counters["calls"])
        self._host_skips = self._calls - int(counters["schedule_step"])
        self._counts = torch.stack(
            [torch.as_tensor(counters[k]).to(torch.int64) for k in _COUNTERS[2:]]
        ).clone()

    def counts(self) -> dict[str, int]:
        """Return the running counts as plain ints (reads the device once).

        ``steps`` counts the steps that clipped and stepped, ``skipped_steps`` those
        skipped for non-finite gradients, ``clipped_steps`` those where clipping changed
        the gradients and ``nonfinite_steps`` those whose gradients were non-finite
        (skipped or not). The clip rate is ``clipped_steps / steps``. The counts are
        saved in ``state_dict()``, so they survive a resume.
        """
        skipped, clipped, nonfinite = (int(v) for v in self._counts.tolist())
        return {
            "steps": self._calls - skipped,
            "skipped_steps": skipped,
            "clipped_steps": clipped,
            "nonfinite_steps": nonfinite,
        }

    # -- delegation ----------------------------------------------------------------------

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
        for the plain optimizer.
        """
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook: Callable[..., Any]) -> RemovableHandle:
        """Register a hook run after each step, on the wrapped optimizer.

        The hook receives the wrapped optimizer as its first argument.
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

    # -- checkpoints ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Return the wrapped optimizer's state dict plus clipopt's own key.

        The extra top-level key ``"clipopt"`` holds the strategy's state and the running
        counts, as tensors and plain numbers only, so
        ``torch.load(path, weights_only=True)`` reads the checkpoint. A plain optimizer
        of the wrapped class can load the result (it ignores the extra key).
        """
        state_dict = self.optimizer.state_dict()
        state_dict[STATE_KEY] = self.clipopt_state_dict()
        return state_dict

    def clipopt_state_dict(self) -> dict[str, Any]:
        """Return clipopt's own state: the strategy's state and the running counts.

        This is ``state_dict()["clipopt"]``. Save it next to the optimizer's state where
        the optimizer's state dict is rebuilt by other code, as
        ``torch.distributed.checkpoint`` does (it keeps only ``state`` and
        ``param_groups``); restore it with :meth:`load_clipopt_state_dict`.
        """
        return {
            "version": _STATE_VERSION,
            "strategy": self.strategy.state_dict(),
            **self._counter_state(),
        }

    def load_clipopt_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore what :meth:`clipopt_state_dict` returned; check it all first.

        Raises:
            ValueError: The state does not fit this wrapper's strategy.
        """
        self._check_own_state(state_dict)
        self.strategy.load_state_dict(state_dict["strategy"])
        self._load_counters(state_dict)
        self.last_stats = None

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict`.

        Everything is checked before anything changes. A plain state dict of the wrapped
        optimizer (no ``"clipopt"`` key) loads too, with a warning, and the strategy's
        state and the counts start fresh.

        Raises:
            TypeError: ``state_dict`` is not a mapping.
            ValueError: clipopt's part does not fit this wrapper's strategy.
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"state_dict must be a mapping, got {type(state_dict).__name__}"
            )
        inner = dict(state_dict)
        own = inner.pop(STATE_KEY, None)
        if own is None:
            self.optimizer.load_state_dict(inner)
            self.strategy.reset()
            self._reset_counters()
            self.last_stats = None
            warnings.warn(
                f"the state dict has no {STATE_KEY!r} entry (a plain "
                f"{type(self.optimizer).__name__} state dict?); the clipping strategy "
                "and the step counts start fresh",
                UserWarning,
                stacklevel=2,
            )
            return
        self._check_own_state(own)
        self.optimizer.load_state_dict(inner)
        self.load_clipopt_state_dict(own)

    def _check_own_state(self, own: Any) -> None:
        if not isinstance(own, Mapping):
            raise ValueError(
                f"state_dict[{STATE_KEY!r}] must be a mapping, got {type(own).__name__}"
            )
        if own.get("version") != _STATE_VERSION:
            raise ValueError(
                f"state_dict[{STATE_KEY!r}] has version {own.get('version')!r}; this "
                f"clipopt reads version {_STATE_VERSION}"
            )
        missing = [k for k in ("strategy", *_COUNTERS) if k not in own]
        if missing:
            raise ValueError(f"state_dict[{STATE_KEY!r}] lacks {', '.join(missing)}")
        # Load into a copy first: a strategy that rejects the state then leaves this
        # wrapper, and the wrapped optimizer, untouched.
        copy.deepcopy(self.strategy).load_state_dict(own["strategy"])

    # -- copying and printing ------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        keep = (
            "optimizer",
            "strategy",
            "nonfinite",
            "last_stats",
            "_closure_required",
            "_group",
            "_calls",
            "_host_skips",
            "_counts",
        )
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._layout = None
        super().__setstate__({})

    def __repr__(self) -> str:
        inner = repr(self.optimizer).replace("\n", "\n    ")
        return (
            f"ClippedOptimizer(\n    strategy={self.strategy!r},\n"
            f"    nonfinite={self.nonfinite!r},\n    optimizer={inner}\n)"
        )
