"""Candidate default clipping rules and the spike-skip gate, as standalone torch code.

Nothing here depends on clipopt: each rule is a small class built from the parameters,
with ``clip_()`` called after ``backward()`` and before ``optimizer.step()``. It clips
``p.grad`` in place with tensor operations only (no ``.item()``, no ``float(tensor)``,
no Python branch on a tensor), so it never reads the device, and its state is a fixed
number of tensors (one value per parameter tensor, or per run) that
:meth:`state_dict` returns.

Rules:

* :class:`RelativeClip` - the family every candidate default comes from: a reference
  level seeded from the run's first step, an asymmetric EMA of the (capped) norm, a
  threshold ``c`` times the reference, a clipping warm-up over the first ``ramp``
  steps; per tensor or for the total norm. The recommended default is
  :func:`recommended` (constants in :data:`RECOMMENDED`).
* :class:`SpikeSkip` - OLMo-core's step-skipping rule (see its docstring), composable
  with any clipping rule.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["RECOMMENDED", "RelativeClip", "SpikeSkip", "recommended"]


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
    r"""Clip the total norm (or each tensor's norm) to ``c`` times its own reference level.

    With :math:`m_t` the gradient norm at step :math:`t` (the total norm with
    ``scope="global"``, else each tensor's, element-wise), :math:`t` counting the steps
    whose norm was finite and > 0:

    .. math::

        \gamma_0 &= m_0 \quad\text{(the first usable step seeds the reference)} \\
        r_t &= \min\left(1, \frac{t+1}{R}\right) \quad (r_t = 1 \text{ if } R = 0) \\
        \tau_t &= c\, r_t\, \gamma_t, \qquad
        g \leftarrow g \cdot \min\left(1, \frac{\tau_t}{m_t}\right) \\
        x_t &= \min(m_t, K \gamma_t) \\
        \gamma_{t+1} &= \gamma_t + (1-\beta)(x_t - \gamma_t), \qquad
        \beta = \begin{cases} \beta_\downarrow & x_t < \gamma_t \\
        \beta_\uparrow & x_t \ge \gamma_t \end{cases}

    * :math:`\gamma` follows the run's own (unclipped, capped) norm, so no scale is
      assumed: multiplying the loss by any constant multiplies every threshold by it.
    * The cap :math:`K` bounds how fast the reference can grow, whatever the gradients do:
      by at most :math:`1 + (K-1)(1-\beta_\uparrow)` per step (1% for K=2,
      :math:`\beta_\uparrow=0.99`), so an explosion cannot drag the threshold up with
      it. A reference fed the *clipped* norm instead (``cap=c``, as AdaGC) cannot use
      ``c < 1``: it would shrink to zero.
    * :math:`R` is the safe rule for the first steps: step :math:`t < R` passes at most
      :math:`(t+1)/R` of the threshold, a clipping warm-up that bounds the first updates
      by a growing fraction of step 0's own norm (no history is needed).
    * ``min_steps`` (tried, not recommended): :math:`\gamma \leftarrow \min(\gamma, x)`
      for the first ``min_steps`` steps, AdaGC's running-minimum warm-up without its
      absolute ``max_norm``. ``log=True`` (tried): the EMA runs on :math:`\log\gamma`.

    Per tensor, a tensor is seeded on its own first usable step (a zero-initialised
    layer's gradient may be zero at first). State: ``gamma`` (one float, or one per
    tensor), ``seen`` (bools, same shape) and ``count`` (an integer): fixed size.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        c: float = 2.0,
        beta_up: float = 0.99,
        beta_down: float | None = None,
        *,
        scope: str = "tensor",
        cap: float | None = None,
        ramp: int = 0,
        min_steps: int = 0,
        log: bool = False,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.c = float(c)
        self.beta_up = float(beta_up)
        self.beta_down = float(beta_up if beta_down is None else beta_down)
        if scope not in ("tensor", "global"):
            raise ValueError(f"scope must be 'tensor' or 'global', got {scope!r}")
        self.scope = scope
        self.cap = self.c if cap is None else float(cap)
        if self.cap < 1:
            raise ValueError("cap must be >= 1, or the reference shrinks to zero")
        self.ramp = int(ramp)
        self.min_steps = int(min_steps)
        self.log = bool(log)
        size = len(self.params) if scope == "tensor" else 1
        self.gamma = torch.zeros(size)
        self.seen = torch.zeros(size, dtype=torch.bool)
        self.count = torch.zeros((), dtype=torch.int64)

    def state_dict(self) -> dict[str, Tensor]:
        return {
            "gamma": self.gamma.clone(),
            "seen": self.seen.clone(),
            "count": self.count.clone(),
        }

    @torch.no_grad()
    def clip_(self) -> Tensor:
        """Clip the gradients in place; return the per-tensor (or global) coefficients."""
        grads = _grads(self.params)
        if len(grads) != len(self.params):
            raise RuntimeError("RelativeClip expects every parameter to have a gradient")
        per = _norms(grads)
        m = per if self.scope == "tensor" else per.square().sum().sqrt().reshape(1)
        usable = torch.isfinite(m) & (m > 0)
        gamma = torch.where(self.seen, self.gamma, m)  # a first usable step seeds it
        tau = self.c * gamma
        if self.ramp:  # the first steps pass a growing fraction of the threshold
            tau = tau * ((self.count + 1).float() / self.ramp).clamp(max=1.0)
        coef = torch.where(usable & (m > tau), tau / m, torch.ones_like(m))
        x = torch.minimum(m, self.cap * gamma)  # what the reference sees: capped
        if self.log:
            lg, lx = gamma.clamp(min=1e-30).log(), x.clamp(min=1e-30).log()
            beta = torch.where(lx < lg, self.beta_down, self.beta_up)
            ema = (lg + (1 - beta) * (lx - lg)).exp()
        else:
            beta = torch.where(x < gamma, self.beta_down, self.beta_up)
            ema = gamma + (1 - beta) * (x - gamma)
        new = torch.where(self.count < self.min_steps, torch.minimum(gamma, x), ema)
        new = torch.where(self.seen, new, m)
        self.gamma = torch.where(usable, new, self.gamma)
        self.seen = self.seen | usable
        self.count = self.count + usable.any().to(self.count.dtype)
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


#: The recommended default's constants (README, "The recommended default").
RECOMMENDED: dict[str, Any] = {
    "c": 0.4,
    "cap": 2.0,
    "beta_up": 0.99,
    "beta_down": 0.98,
    "ramp": 20,
    "scope": "global",
}


def recommended(params: Iterable[Tensor]) -> RelativeClip:
    """The rule recommended as ``ClippedOptimizer(opt)``'s default (see README)."""
    return RelativeClip(params, **RECOMMENDED)


def describe(rule: Any) -> str:
    """A short description of a rule's constants, for reports."""
    if isinstance(rule, RelativeClip):
        parts = [f"c={rule.c:g}", f"beta_up={rule.beta_up:g}"]
        if rule.beta_down != rule.beta_up:
            parts.append(f"beta_down={rule.beta_down:g}")
        if rule.cap != rule.c:
            parts.append(f"cap={rule.cap:g}")
        if rule.ramp:
            parts.append(f"ramp={rule.ramp}")
        if rule.min_steps:
            parts.append(f"min_steps={rule.min_steps}")
        if rule.log:
            parts.append("log")
        return f"RelativeClip({rule.scope}, {', '.join(parts)})"
    return type(rule).__name__


#: Adaptive-ratio candidates (name -> factory), filled below.
ADAPTIVE_SPECS: dict[str, Any] = {}


class AdaptiveClip:
    r"""RelativeClip (global) with an adaptive ratio ``c_t`` instead of a fixed ``c``.

    Same reference as the recommended default: :math:`\gamma` an asymmetric EMA
    (``beta_up``, ``beta_down``) of the capped norm :math:`x_t = \min(m_t, K\gamma_t)`,
    seeded by step 0, and the ramp :math:`r_t = \min(1, (t+1)/R)`. On top, a short EMA
    :math:`s_t` of the capped norm (``beta_s``) and the ratio :math:`c_t`:

    * ``mode="aimd"``: instability signal :math:`b_t = [m_t > k_b \gamma_t]` (``sig="m"``)
      or :math:`[s_t > k_b \gamma_t]` (``sig="s"``);
      :math:`c_{t} = \max(c_{min}, d\,c_{t-1})` if :math:`b_t` else
      :math:`\min(c_{max}, c_{t-1} + a)`; :math:`c_{-1} = c_0`.
    * ``mode="ratio"``: :math:`\rho_t = s_t/\gamma_t`,
      :math:`c_t = \mathrm{clamp}(c_{max} / (1 + k\max(0, \rho_t - 1)), c_{min}, c_{max})`.

    Threshold :math:`\tau_t = c_t r_t \gamma_t`, clip
    :math:`g \leftarrow g\min(1, \tau_t/m_t)`.
    Tensor ops only, sync-free; state: gamma, s, c, count, seen (5 scalars). Scale-free:
    every signal is a ratio of norms.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        *,
        mode: str = "aimd",
        c0: float = 0.4,
        c_min: float = 0.15,
        c_max: float = 2.0,
        a: float = 0.01,
        d: float = 0.9,
        k_b: float = 1.5,
        sig: str = "m",
        k: float = 4.0,
        beta_s: float = 0.8,
        beta_up: float = 0.99,
        beta_down: float = 0.98,
        cap: float = 2.0,
        ramp: int = 20,
        hold: int = 0,
        p: float = 0.5,
        q: float = 1.0,
        t_switch: int = 150,
        beta_v: float = 0.95,
        sig_lo: float = 0.35,
        sig_hi: float = 0.7,
        d_cap: float = 2.0,
        v_steps: int = 0,
        rise: float = 0.0,
        v_spike: float = 0.0,
        v_debias: bool = False,
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.mode, self.sig = mode, sig
        self.c0, self.c_min, self.c_max = float(c0), float(c_min), float(c_max)
        self.a, self.d, self.k_b, self.k = float(a), float(d), float(k_b), float(k)
        self.beta_s, self.beta_up, self.beta_down = (
            float(beta_s),
            float(beta_up),
            float(beta_down),
        )
        self.cap, self.ramp, self.hold = float(cap), int(ramp), int(hold)
        self.p, self.q, self.t_switch = float(p), float(q), int(t_switch)
        self.gamma0 = torch.zeros(1)
        self.beta_v, self.sig_lo, self.sig_hi = float(beta_v), float(sig_lo), float(sig_hi)
        self.d_cap = math.log(float(d_cap))
        self.v_steps, self.rise, self.v_spike = int(v_steps), float(rise), float(v_spike)
        self.v_debias = bool(v_debias)
        self.nv = torch.zeros(1)  # number of v updates (for the bias correction)
        self.m_prev = torch.zeros(1)
        self.v = torch.zeros(1)
        self.gamma = torch.zeros(1)
        self.s = torch.zeros(1)
        self.c = torch.full((1,), self.c0)
        self.seen = torch.zeros(1, dtype=torch.bool)
        self.count = torch.zeros((), dtype=torch.int64)

    def state_dict(self) -> dict[str, Tensor]:
        keys = ("gamma", "gamma0", "s", "c", "m_prev", "v", "seen", "count")
        return {k: getattr(self, k).clone() for k in keys}

    @torch.no_grad()
    def clip_(self) -> Tensor:
        grads = _grads(self.params)
        m = _norms(grads).square().sum().sqrt().reshape(1)
        usable = torch.isfinite(m) & (m > 0)
        gamma = torch.where(self.seen, self.gamma, m)
        s = torch.where(self.seen, self.s, m)
        x = torch.minimum(m, self.cap * gamma)
        s_new = s + (1 - self.beta_s) * (x - s)
        if self.mode == "aimd":
            probe = m if self.sig == "m" else s_new
            bad = probe > self.k_b * gamma
            c = torch.where(
                bad,
                (self.c * self.d).clamp(min=self.c_min),
                (self.c + self.a).clamp(max=self.c_max),
            )
            if self.hold:  # no increase during the first `hold` steps
                c = torch.where(self.count < self.hold, torch.minimum(c, self.c), c)
        elif self.mode == "progress":  # c grows as the reference falls below its start
            g0 = torch.where(self.seen, self.gamma0, m)
            c = self.c0 * (g0 / (self.q * gamma)).clamp(min=1.0) ** self.p
            c = c.clamp(max=self.c_max)
        elif self.mode == "vol":  # c from the volatility of the norm before this step
            sig = self.v.sqrt()
            if self.v_debias:  # Adam-style bias correction of the EMA seeded at 0
                sig = (self.v / (1 - self.beta_v**self.nv).clamp(min=1e-12)).sqrt()
            frac = ((sig - self.sig_lo) / (self.sig_hi - self.sig_lo)).clamp(0.0, 1.0)
            c = self.c_min + (self.c_max - self.c_min) * frac
            if self.rise:  # c falls at once, rises by at most `rise` a step
                c = torch.minimum(c, torch.where(self.seen, self.c, c) + self.rise)
        elif self.mode == "sched":  # diagnostic only: c0, then c_max from step t_switch
            c = torch.where(self.count < self.t_switch, self.c0, self.c_max) * torch.ones(1)
        else:
            rho = s_new / gamma
            c = (self.c_max / (1 + self.k * (rho - 1).clamp(min=0))).clamp(
                self.c_min, self.c_max
            )
        tau = c * gamma
        if self.ramp:
            tau = tau * ((self.count + 1).float() / self.ramp).clamp(max=1.0)
        coef = torch.where(usable & (m > tau), tau / m, torch.ones_like(m))
        beta = torch.where(x < gamma, self.beta_down, self.beta_up)
        new = torch.where(self.seen, gamma + (1 - beta) * (x - gamma), m)
        self.gamma = torch.where(usable, new, self.gamma)
        self.s = torch.where(usable, s_new, self.s)
        self.gamma0 = torch.where(self.seen, self.gamma0, m)
        d = (
            (m / torch.where(self.seen, self.m_prev, m))
            .log()
            .clamp(-self.d_cap, self.d_cap)
        )
        d = torch.where(self.seen, d, torch.zeros_like(d))  # step 0 has no previous norm
        v_new = self.v + (1 - self.beta_v) * (d.square() - self.v)
        # The volatility is measured over the first v_steps steps only (0: all steps).
        usable_v = usable & (self.count < self.v_steps) if self.v_steps else usable
        # A norm above v_spike * gamma (a spike) is kept out of v and m_prev.
        if self.v_spike:
            calm = m <= self.v_spike * gamma
            usable_v = usable_v & (calm | ~self.seen)
            self.m_prev = torch.where(usable & (calm | ~self.seen), m, self.m_prev)
        else:
            self.m_prev = torch.where(usable, m, self.m_prev)
        self.v = torch.where(usable_v, v_new, self.v)
        self.nv = self.nv + (usable_v & self.seen).float()
        self.c = torch.where(usable, c, self.c)
        self.seen = self.seen | usable
        self.count = self.count + usable.any().to(self.count.dtype)
        _scale(grads, coef.expand(len(grads)))
        return coef


def _ad(**kw: Any) -> Any:
    return lambda params: AdaptiveClip(params, **kw)


ADAPTIVE_SPECS.update(
    {
        "A1": _ad(mode="aimd", c0=0.4, c_min=0.15, c_max=2.0, a=0.01, d=0.9, k_b=1.5),
        "A2": _ad(
            mode="aimd", c0=0.4, c_min=0.15, c_max=2.0, a=0.005, d=0.8, k_b=1.2, sig="s"
        ),
        "R1": _ad(mode="ratio", c_min=0.15, c_max=2.0, k=4.0, beta_s=0.8),
        "R2": _ad(mode="ratio", c_min=0.15, c_max=2.0, k=10.0, beta_s=0.9),
        "S1": _ad(mode="sched", c0=0.4, c_max=2.0, t_switch=150),
        "S2": _ad(mode="sched", c0=0.4, c_max=1.0, t_switch=150),
        "V1": _ad(mode="vol", c_min=0.4, c_max=1.0),
        "V2": _ad(mode="vol", c_min=0.4, c_max=2.0),
        "V3": _ad(mode="vol", c_min=0.4, c_max=1.5, sig_lo=0.3, sig_hi=0.6),
        "V4": _ad(mode="vol", c_min=0.4, c_max=2.0, sig_lo=0.45, sig_hi=0.8),
        "V5": _ad(mode="vol", c_min=0.4, c_max=1.5, sig_lo=0.45, sig_hi=0.8),
        "V6": _ad(mode="vol", c_min=0.4, c_max=2.0, sig_lo=0.45, sig_hi=0.8, beta_v=0.98),
        "V7": _ad(mode="vol", c_min=0.2, c_max=2.0, sig_lo=0.45, sig_hi=0.8),
        "V8": _ad(mode="vol", c_min=0.27, c_max=2.0, sig_lo=0.45, sig_hi=0.8),
        "C27": lambda params: RelativeClip(params, **{**RECOMMENDED, "c": 0.27}),
        "C20": lambda params: RelativeClip(params, **{**RECOMMENDED, "c": 0.2}),
        "V9": _ad(mode="vol", c_min=0.2, c_max=2.0, sig_lo=0.45, sig_hi=0.8, v_steps=100),
        "V10": _ad(mode="vol", c_min=0.2, c_max=2.0, sig_lo=0.45, sig_hi=0.8, rise=0.02),
        "V11": _ad(mode="vol", c_min=0.2, c_max=2.0, sig_lo=0.45, sig_hi=0.8, v_spike=2.0),
        "V12": _ad(mode="vol", c_min=0.2, c_max=2.0, sig_lo=0.45, sig_hi=0.8, v_spike=3.0),
        "V13": _ad(
            mode="vol",
            c_min=0.2,
            c_max=2.0,
            sig_lo=0.45,
            sig_hi=0.8,
            v_spike=3.0,
            v_debias=True,
        ),
        "P1": _ad(mode="progress", c0=0.4, c_max=2.0, p=0.5, q=1.0),
        "P2": _ad(mode="progress", c0=0.4, c_max=2.0, p=1.0, q=3.0),
    }
)
