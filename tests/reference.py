"""Slow, obvious reference implementations of the published rules, to test against.

Written here from the papers and the reference code's documented behaviour (see
../shared/research/anchors-clipping.md, section 4); none of them shares code with clipopt.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def global_norm(grads):
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads))


def scale(grads, factor):
    for g in grads:
        g.mul_(factor)


class AutoClipPaper:
    """Seetharaman et al. 2020, Algorithm 1: clip to the p-th percentile of past norms."""

    def __init__(self, percentile, window=None):
        self.p, self.window, self.history = percentile, window, []

    def step(self, grads):
        n = global_norm(grads)
        self.history.append(n)
        if self.window:
            self.history = self.history[-self.window :]
        threshold = float(np.percentile(self.history, self.p))
        scale(grads, min(1.0, threshold / (n + 1e-6)))
        return threshold


class AutoClipPackage:
    """`autoclip` 0.2.1 QuantileClip(global_threshold=True): past norms only."""

    def __init__(self, quantile, history_length=1000):
        self.q, self.length, self.history = quantile, history_length, []

    def step(self, grads):
        n = global_norm(grads)
        threshold = (
            math.inf if not self.history else float(np.quantile(self.history, self.q))
        )
        scale(grads, min(1.0, threshold / (n + 1e-6)))
        self.history = ([*self.history, n])[-self.length :]
        return threshold


class ZClipReference:
    """zclip 1.0.0 (`zclip/zclip.py`), with plain Python floats as in the original."""

    def __init__(
        self,
        alpha=0.97,
        z_thresh=2.5,
        max_grad_norm=None,
        eps=1e-6,
        warmup_steps=25,
        mode="zscore",
        clip_option="adaptive_scaling",
        clip_factor=1.0,
        skip_update_on_spike=False,
    ):
        self.__dict__.update(locals())
        del self.__dict__["self"]
        self.buffer, self.initialized, self.mean, self.var = [], False, None, None

    def _clip_to(self, grads, n, limit):
        if n > limit:
            scale(grads, limit / (n + 1e-6))

    def step(self, grads):
        n = global_norm(grads)
        if not self.initialized:
            self.buffer.append(n)
            if len(self.buffer) >= self.warmup_steps:
                self.mean = sum(self.buffer) / len(self.buffer)
                self.var = sum((x - self.mean) ** 2 for x in self.buffer) / len(self.buffer)
                self.initialized = True
            if self.max_grad_norm is not None:
                scale(grads, min(1.0, self.max_grad_norm / (n + 1e-6)))
            return n
        std = self.var**0.5
        clip = None
        if self.mode == "percentile":
            if n > self.mean + self.z_thresh * std:
                clip = self.mean + self.z_thresh * std
        else:
            z = (n - self.mean) / (std + self.eps)
            if z > self.z_thresh:
                if self.clip_option == "adaptive_scaling":
                    clip = (
                        self.mean + (self.z_thresh * std) / (z / self.z_thresh)
                    ) * self.clip_factor
                else:
                    clip = self.mean
        effective = clip if clip is not None else n
        if self.max_grad_norm is not None:
            effective = min(effective, self.max_grad_norm)
        self._clip_to(grads, n, effective)
        if clip is not None and self.skip_update_on_spike:
            return n
        x = clip if clip is not None else n
        self.mean = self.alpha * self.mean + (1 - self.alpha) * x
        self.var = self.alpha * self.var + (1 - self.alpha) * (x - self.mean) ** 2
        return n


def timm_adaptive_clip_grad(parameters, clip_factor=0.01, eps=1e-3):
    """timm.utils.agc.adaptive_clip_grad (timm 1.0), one parameter at a time.

    The same tensor operations as timm's, ``detach()`` calls included, outside
    ``torch.no_grad()`` as timm's training script calls it: ``make bench`` times it as the
    reference for AGC. (A benchmark copy without the detaches, under ``no_grad``, ran
    about 10% faster than timm's function on 2,000 tensors.)
    """

    def unitwise(x):
        if x.ndim <= 1:
            return x.norm(2.0)
        return x.norm(2.0, dim=tuple(range(1, x.ndim)), keepdim=True)

    for p in parameters:
        if p.grad is None:
            continue
        w, g = p.detach(), p.grad.detach()
        limit = unitwise(w).clamp_(min=eps).mul_(clip_factor)
        gn = unitwise(g)
        clipped = g * (limit / gn.clamp(min=1e-6))
        p.grad.detach().copy_(torch.where(gn < limit, g, clipped))


class AdaGCReference:
    """AdaGC's official Megatron semantics, one tensor at a time, with Python floats."""

    def __init__(
        self, clip_ratio=1.04, beta=0.99, warmup_steps=100, max_norm=1.0, eps=1e-6
    ):
        self.__dict__.update(locals())
        del self.__dict__["self"]
        self.steps, self.gamma = 0, {}

    def step(self, params):
        grads = [p.grad for p in params if p.grad is not None]
        n = global_norm(grads)
        self.steps += 1
        if self.steps <= self.warmup_steps:
            if self.max_norm / (n + self.eps) < 1:
                scale(grads, self.max_norm / (n + self.eps))
            for i, p in enumerate(params):
                if p.grad is None:
                    continue
                m = float(p.grad.double().norm())
                self.gamma[i] = m if i not in self.gamma else min(self.gamma[i], m)
            return n
        for i, p in enumerate(params):
            if p.grad is None:
                continue
            m = float(p.grad.double().norm())
            gamma = self.gamma.get(i, m)
            if m > self.clip_ratio * gamma:
                p.grad.mul_(self.clip_ratio * gamma / (m + self.eps))
                m = self.clip_ratio * gamma
            self.gamma[i] = self.beta * gamma + (1 - self.beta) * m
        return n


class SpikeSkipReference:
    """OLMo-core's step-skipping rule (``SkipStepOptimizer.get_step_factor``): a value
    more than ``sigma`` (sample) standard deviations above the mean of the previous
    window is an outlier (one-sided, as OLMo-core's ``(x - mean) <= sigma * std``),
    once ``min_samples`` values are known. With clipopt's two guards: outliers stay out
    of the window except the ``patience``-th in a row, and a window without spread calls
    nothing an outlier. Plain Python floats."""

    def __init__(self, sigma=6.0, window=128, min_samples=64, patience=3):
        self.sigma, self.window, self.min_samples = sigma, window, min_samples
        self.patience = patience
        self.values = {"norm": [], "loss": []}
        self.run = {"norm": 0, "loss": 0}

    def _outlier(self, name, x):
        seen = self.values[name][-self.window :]
        if len(seen) < self.min_samples or not math.isfinite(x):
            return False
        mean = sum(seen) / len(seen)
        std = math.sqrt(sum((v - mean) ** 2 for v in seen) / (len(seen) - 1))
        return std > 0 and (x - mean) / std > self.sigma

    def step(self, norm, loss=None, other_skip=False):
        """Return whether the step is skipped as a spike, and record the values."""
        series = [("norm", norm)] + ([] if loss is None else [("loss", loss)])
        outliers = {name: self._outlier(name, x) for name, x in series}
        if not other_skip:
            for name, x in series:
                run = self.run[name] + 1 if outliers[name] else 0
                admitted = not outliers[name] or run >= self.patience
                if admitted and math.isfinite(x):
                    self.values[name].append(x)
                self.run[name] = 0 if admitted else run
        return any(outliers.values())


class RelativeClipReference:
    """clipopt's default rule (docs/strategies/which.md), written from its equations with
    Python floats: clip the total norm to ``ratio`` times a reference seeded by the first
    recorded norm, ramped over the first ``ramp`` recorded steps, which then follows the
    norm capped at ``cap`` times itself with an asymmetric EMA. Non-finite and zero
    norms, and skipped steps, are not recorded."""

    def __init__(self, ratio=0.4, beta_up=0.99, beta_down=0.98, cap=2.0, ramp=20):
        self.ratio, self.beta_up, self.beta_down = ratio, beta_up, beta_down
        self.cap, self.ramp = cap, ramp
        self.gamma, self.count = None, 0

    def step(self, grads, skipped=False):
        """Clip ``grads`` in place; return (norm, threshold, coefficient)."""
        n = global_norm(grads)
        usable = math.isfinite(n) and n > 0 and not skipped
        reference = n if self.gamma is None else self.gamma
        warm = 1.0 if self.ramp == 0 else min(1.0, (self.count + 1) / self.ramp)
        threshold = self.ratio * reference * warm
        coef = threshold / n if n > threshold else 1.0
        if usable:
            if self.gamma is None:
                self.gamma = n
            else:
                x = min(n, self.cap * self.gamma)
                beta = self.beta_down if x < self.gamma else self.beta_up
                self.gamma += (1 - beta) * (x - self.gamma)
            self.count += 1
        if coef < 1:
            scale(grads, coef)
        return n, threshold, coef
