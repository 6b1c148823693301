"""Candidate default clipping rules and the spike-skip gate, as standalone torch code.

Nothing here depends on clipopt: each rule is a small class built from the parameters,
with ``clip_()`` called after ``backward()`` and before ``optimizer.step()``. It clips
``p.grad`` in place with tensor operations only (no ``.item()``, no ``float(tensor)``,
no Python branch on a tensor), so it never reads the device, and its state is a fixed
number of tensors (one value per parameter tensor, or per run) that
:meth:`state_dict` returns.

Rules (``clip_`` of each):

* :class:`RelativeClip` - the family the recommended default comes from. Per tensor
  (``scope="tensor"``) or for the total norm (``scope="global"``): a reference level
  :math:`\\gamma` seeded from the first step's own norm, a threshold
  :math:`\\tau = c\\,\\gamma`, and an update of :math:`\\gamma` from the clipped norm with
  separate EMA factors for decreasing and increasing norms (``beta_down``, ``beta_up``),
  optionally a running minimum during the first ``min_steps`` steps.
* :class:`LogZClip` - mean and variance of the log norm (EMA), threshold
  :math:`\\exp(\\mu + k\\sigma)`: a z-score rule in log space, seeded from step 0.
* :class:`SpikeSkip` - OLMo-core's step-skipping rule (see its docstring).

The exact rule recommended as clipopt's default is :func:`recommended`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["LogZClip", "RelativeClip", "SpikeSkip", "recommended"]


def _grads(params: list[Tensor]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]


def _norms(grads: list[Tensor]) -> Tensor:
    """Per-tensor L2 norms as one float32 vector (one foreach kernel)."""
    return torch.stack(torch._foreach_norm(grads)).float()


def _scale(grads: list[Tensor], coefs: Tensor) -> None:
    """Multiply each gradient by its coefficient (a vector), in place."""
    torch._foreach_mul_(
        grads, [c.to(g.dtype) for c, g in zip(coefs.unbind(), grads, strict=True)]
    )


class RelativeClip:
    r"""Clip each tensor (or the total norm) to ``c`` times its own reference level.

    For tensor :math:`i` with gradient norm :math:`m_i` at step :math:`t` (counting only
    steps whose norm is finite and > 0):

    .. math::

        t = 0:&\quad \gamma_i \leftarrow m_i,\ \text{no clipping}\ (\text{or } g_i
        \text{ kept as is}) \\
        t \ge 1:&\quad \tau_i = c\,\gamma_i,\qquad g_i \leftarrow g_i \min(1,
        \tau_i / m_i),\qquad x_i = \min(m_i, \tau_i) \\
        &\quad \gamma_i \leftarrow
        \begin{cases}
          \min(\gamma_i, x_i) & t < \text{min\_steps} \\
          \gamma_i + (1-\beta_\downarrow)(x_i - \gamma_i) & x_i < \gamma_i \\
          \gamma_i + (1-\beta_\uparrow)(x_i - \gamma_i) & x_i \ge \gamma_i
        \end{cases}

    With ``log=True`` the EMA runs on :math:`\log\gamma` and :math:`\log x` (a geometric
    mean, less pulled by the largest norms). ``scope="global"`` applies the same rule to
    the total norm with one :math:`\gamma`.

    Since :math:`\tau` is a multiple of the run's own norm, the rule does not assume any
    natural scale; since :math:`x \le \tau = c\gamma`, the reference can grow by at most
    a factor :math:`1 + (c-1)(1-\beta_\uparrow)` per step, whatever the gradients do.

    State: ``gamma`` (one float per tensor, or one), ``count`` (an integer).
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        c: float = 2.0,
        beta_up: float = 0.99,
        beta_down: float | None = None,
        *,
        scope: str = "tensor",
        min_steps: int = 0,
        log: bool = False,
        clip_first: bool = False,
        ramp: int = 0,
        cap: float | None = None,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.c = float(c)
        self.beta_up = float(beta_up)
        self.beta_down = float(beta_up if beta_down is None else beta_down)
        if scope not in ("tensor", "global"):
            raise ValueError(f"scope must be 'tensor' or 'global', got {scope!r}")
        self.scope = scope
        self.min_steps = int(min_steps)
        self.log = bool(log)
        self.clip_first = bool(clip_first)
        self.ramp = int(ramp)
        self.cap = self.c if cap is None else float(cap)
        size = len(self.params) if scope == "tensor" else 1
        self.gamma = torch.zeros(size)
        self.count = torch.zeros((), dtype=torch.int64)

    def state_dict(self) -> dict[str, Tensor]:
        return {"gamma": self.gamma.clone(), "count": self.count.clone()}

    @torch.no_grad()
    def clip_(self) -> Tensor:
        """Clip the gradients in place; return the per-tensor (or global) coefficients."""
        grads = _grads(self.params)
        if len(grads) != len(self.params):
            raise RuntimeError("RelativeClip expects every parameter to have a gradient")
        per = _norms(grads)
        m = per if self.scope == "tensor" else per.square().sum().sqrt().reshape(1)
        usable = torch.isfinite(m) & (m > 0)
        first = self.count == 0
        gamma = torch.where(first, m, self.gamma)  # step 0 seeds the reference
        tau = self.c * gamma
        applied = tau
        if self.ramp:  # threshold warm-up: step t may pass (t+1)/ramp of c * gamma
            frac = ((self.count + 1).float() / self.ramp).clamp(max=1.0)
            applied = torch.where(first, gamma, tau) * frac
        coef = torch.where(usable & (m > applied), applied / m, torch.ones_like(m))
        if not self.clip_first and not self.ramp:
            coef = torch.where(first, torch.ones_like(coef), coef)
        x = torch.minimum(m, self.cap * gamma)  # what the reference sees: capped
        if self.log:
            lg, lx = gamma.clamp(min=1e-30).log(), x.clamp(min=1e-30).log()
            beta = torch.where(lx < lg, self.beta_down, self.beta_up)
            ema = (lg + (1 - beta) * (lx - lg)).exp()
        else:
            beta = torch.where(x < gamma, self.beta_down, self.beta_up)
            ema = gamma + (1 - beta) * (x - gamma)
        warming = self.count < self.min_steps
        new = torch.where(warming, torch.minimum(gamma, x), ema)
        new = torch.where(first, m, new)
        self.gamma = torch.where(usable, new, self.gamma)
        self.count = self.count + usable.all().to(self.count.dtype)
        if self.scope == "global":
            coef = coef.expand(len(grads))
        _scale(grads, coef)
        return coef


class LogZClip:
    r"""Z-score clipping in log space, seeded from step 0.

    :math:`\ell = \log m` (per tensor or global); EMAs :math:`\mu` and :math:`s^2` of
    :math:`\ell` and its squared deviation; threshold
    :math:`\tau = \exp(\mu + k \max(s, s_{min}))`. Step 0 seeds :math:`\mu = \ell_0`,
    :math:`s^2 = 0`; the clipped log norm :math:`\min(\ell, \log\tau)` enters the EMAs.
    ``s_min`` (in nats) keeps the first steps, where :math:`s = 0`, from clipping
    everything to the first norm: ``k * s_min = log 2`` allows a factor 2.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        k: float = 3.0,
        beta: float = 0.98,
        s_min: float = 0.25,
        *,
        scope: str = "tensor",
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.k, self.beta, self.s_min, self.scope = (
            float(k),
            float(beta),
            float(s_min),
            scope,
        )
        size = len(self.params) if scope == "tensor" else 1
        self.mu = torch.zeros(size)
        self.var = torch.zeros(size)
        self.count = torch.zeros((), dtype=torch.int64)

    def state_dict(self) -> dict[str, Tensor]:
        return {"mu": self.mu.clone(), "var": self.var.clone(), "count": self.count.clone()}

    @torch.no_grad()
    def clip_(self) -> Tensor:
        grads = _grads(self.params)
        per = _norms(grads)
        m = per if self.scope == "tensor" else per.square().sum().sqrt().reshape(1)
        usable = torch.isfinite(m) & (m > 0)
        lm = m.clamp(min=1e-30).log()
        first = self.count == 0
        mu = torch.where(first, lm, self.mu)
        var = torch.where(first, torch.zeros_like(self.var), self.var)
        log_tau = mu + self.k * var.sqrt().clamp(min=self.s_min)
        tau = log_tau.exp()
        coef = torch.where(usable & (m > tau) & ~first, tau / m, torch.ones_like(m))
        x = torch.minimum(lm, log_tau)
        new_mu = self.beta * mu + (1 - self.beta) * x
        new_var = self.beta * var + (1 - self.beta) * (x - mu).square()
        self.mu = torch.where(usable, torch.where(first, lm, new_mu), self.mu)
        self.var = torch.where(usable, torch.where(first, var, new_var), self.var)
        self.count = self.count + usable.all().to(self.count.dtype)
        if self.scope == "global":
            coef = coef.expand(len(grads))
        _scale(grads, coef)
        return coef


class SpikeSkip:
    r"""OLMo-core's spike-skipping rule, as a 0/1 decision made with tensor ops.

    Source: ``allenai/OLMo-core``, ``src/olmo_core/optim/skip_step_optimizer.py``
    (``SkipStepOptimizer.get_step_factor``), read at commit ``fa6c501``:

    * the optimizer keeps the last ``window + 1`` values of the loss and of the total
      gradient norm (the pre-clip norm that ``clip_grad_norm_`` returns), the current
      one included;
    * it steps normally until it holds ``max(2, window // 2)`` values, i.e. the current
      one and 63 earlier ones with the defaults (``window=128``);
    * then the statistics are ``torch.std_mean`` of the earlier values only (the current
      one excluded): the sample standard deviation (Bessel's correction, n - 1) and mean;
    * the step is skipped if ``value - mean > sigma * std`` for the loss, or for the
      gradient norm: a one-sided test, both must pass (``sigma = 6``);
    * a skipped step multiplies the whole AdamW update by 0, weight decay included, and
      does not advance the step counter (``step_increment_bugfix=True``).

    One documented difference: OLMo-core appends every value to its window, spikes
    included. The issue asks for outliers kept out of the window (``exclude_outliers``,
    default True), so that a spike does not widen the band that the next spike is
    tested against; ``exclude_outliers=False`` is OLMo-core's behaviour. ``use_loss``
    adds the loss test (OLMo-core always has it when a loss is set). The decision is a
    0-dim bool tensor (True: step); making the optimizer skip without reading it is the
    optimizer's business (clipopt can hand it to a fused kernel as ``found_inf``), the
    benchmark's harness reads it.

    State: two ring buffers of ``window`` floats, their fill counts and write positions.
    """

    def __init__(
        self,
        sigma: float = 6.0,
        window: int = 128,
        min_samples: int | None = None,
        *,
        use_loss: bool = False,
        exclude_outliers: bool = True,
    ) -> None:
        self.sigma = float(sigma)
        self.window = int(window)
        # OLMo-core: active once len(values) >= max(2, window // 2), current included
        self.min_history = (max(2, window // 2) if min_samples is None else min_samples) - 1
        self.use_loss = bool(use_loss)
        self.exclude_outliers = bool(exclude_outliers)
        self.buf = torch.zeros(2, self.window, dtype=torch.float64)
        self.filled = torch.zeros(2, dtype=torch.int64)
        self.pos = torch.zeros(2, dtype=torch.int64)
        self.slots = torch.arange(self.window)

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "buf": self.buf.clone(),
            "filled": self.filled.clone(),
            "pos": self.pos.clone(),
        }

    def _outlier(self, row: int, value: Tensor) -> Tensor:
        buf, n = self.buf[row], self.filled[row]
        valid = self.slots < n
        nf = n.to(buf.dtype)
        mean = torch.where(valid, buf, 0.0).sum() / nf.clamp(min=1)
        var = torch.where(valid, (buf - mean).square(), 0.0).sum() / (nf - 1).clamp(min=1)
        active = n >= self.min_history
        return active & (value - mean > self.sigma * var.sqrt())

    def _record(self, row: int, value: Tensor, keep: Tensor) -> None:
        write = (self.slots == self.pos[row]) & keep
        self.buf[row] = torch.where(write, value, self.buf[row])
        step = keep.to(torch.int64)
        self.pos[row] = (self.pos[row] + step) % self.window
        self.filled[row] = (self.filled[row] + step).clamp(max=self.window)

    @torch.no_grad()
    def update(self, grad_norm: Tensor, loss: Tensor | None = None) -> Tensor:
        """Test this step and record it; return True (step) or False (skip), a tensor."""
        g = grad_norm.detach().to(torch.float64)
        finite = torch.isfinite(g)
        bad = self._outlier(0, g) | ~finite
        if self.use_loss and loss is not None:
            lv = loss.detach().to(torch.float64)
            finite = finite & torch.isfinite(lv)
            bad = bad | self._outlier(1, lv) | ~torch.isfinite(lv)
        keep = finite & ~bad if self.exclude_outliers else finite
        self._record(0, g, keep)
        if self.use_loss and loss is not None:
            self._record(1, loss.detach().to(torch.float64), keep)
        return ~bad


def recommended(params: Iterable[Tensor]) -> Any:
    """The rule recommended as ``ClippedOptimizer(opt)``'s default (see README)."""
    return RelativeClip(params, c=2.0, beta_up=0.99, scope="tensor")


def describe(rule: Any) -> str:
    """A short description of a rule's constants, for reports."""
    if isinstance(rule, RelativeClip):
        parts = [f"c={rule.c:g}", f"beta_up={rule.beta_up:g}"]
        if rule.beta_down != rule.beta_up:
            parts.append(f"beta_down={rule.beta_down:g}")
        if rule.min_steps:
            parts.append(f"min_steps={rule.min_steps}")
        if rule.log:
            parts.append("log")
        return f"RelativeClip({rule.scope}, {', '.join(parts)})"
    return type(rule).__name__


_ = math  # kept for the docstrings' math
