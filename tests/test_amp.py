"""GradScaler drives the wrapper: clipping sees unscaled gradients; inf steps skip."""

import copy
import math

import pytest
import torch

import clipopt
from clipopt import ClippedOptimizer
from tests.conftest import batches, loss_of
from tests.test_fused import _device_path
from tests.test_optimizer import _model

FUSED = [
    pytest.param(torch.optim.Adam, {"fused": True}, id="Adam-fused"),
    pytest.param(torch.optim.AdamW, {"fused": True}, id="AdamW-fused"),
    pytest.param(torch.optim.SGD, {"fused": True, "momentum": 0.9}, id="SGD-fused"),
    pytest.param(torch.optim.Adagrad, {"fused": True}, id="Adagrad-fused"),
    pytest.param(torch.optim.AdamW, {"foreach": True}, id="AdamW-foreach"),
]


@pytest.mark.parametrize("max_norm", [0.05, 1e3], ids=["clipping", "below-threshold"])
@pytest.mark.parametrize(("cls", "kwargs"), FUSED)
def test_gradscaler_unscales_before_clipping(cls, kwargs, max_norm):
    model = _model()
    ref_model = copy.deepcopy(model)
    opt = ClippedOptimizer(
        cls(model.parameters(), lr=0.01, **kwargs), "norm", max_norm=max_norm
    )
    ref = cls(
        ref_model.parameters(), lr=0.01, **{k: v for k, v in kwargs.items() if k != "fused"}
    )
    # advertised exactly when the one-pass fused path applies (fused kernel, one factor)
    assert getattr(opt, "_step_supports_amp_scaling", False) == kwargs.get("fused", False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    norms, ref_norms = [], []
    for batch in batches(4):
        opt.zero_grad()
        scaler.scale(loss_of(model, batch)).backward()
        scaler.step(opt)
        scaler.update()
        norms.append(opt.last_stats.norm)
        ref.zero_grad()
        loss_of(ref_model, batch).backward()
        ref_norms.append(torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm))
        ref.step()
    torch.testing.assert_close(torch.stack(norms), torch.stack(ref_norms))
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_flag_is_advertised_for_every_strategy_on_a_fused_optimizer():
    sgd = torch.optim.SGD(_model().parameters(), lr=0.1, fused=True)
    for strategy, kwargs in MULTI_FACTOR.items():
        opt = ClippedOptimizer(sgd, strategy(), **kwargs)
        assert opt._step_supports_amp_scaling  # the engine unscales them itself
        del opt
    plain = torch.optim.SGD(_model().parameters(), lr=0.1)
    assert not ClippedOptimizer(plain, "norm")._step_supports_amp_scaling


MULTI_FACTOR = {
    lambda: clipopt.ValueClip(0.02): {},
    lambda: clipopt.AGC(0.01): {},
    lambda: clipopt.AdaGC(warmup_steps=1, clip_ratio=1.01): {},
    lambda: clipopt.NormClip(0.05, scope="tensor"): {},
    lambda: clipopt.Chain(clipopt.ValueClip(0.05), clipopt.NormClip(0.1)): {},
}


def _amp_run(factory, one_pass, inf_at=(2,)):
    """GradScaler with a fused AdamW; one pass (the engine unscales) or unscale_ first."""
    torch.manual_seed(0)
    model = _model()
    opt = ClippedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=0.01, fused=True), factory()
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    scales = []
    for i, batch in enumerate(batches(6)):
        opt.zero_grad()
        scaler.scale(loss_of(model, batch)).backward()
        if i in inf_at:
            with torch.no_grad():
                model[2].bias.grad[0] = math.inf
        if not one_pass:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return [p.detach().clone() for p in model.parameters()], scales, opt.counts()


@pytest.mark.parametrize("factory", list(MULTI_FACTOR))
def test_one_pass_amp_with_multi_factor_strategies_equals_unscale_first(factory):
    params, scales, counts = _amp_run(factory, one_pass=True)
    ref_params, ref_scales, ref_counts = _amp_run(factory, one_pass=False)
    assert scales == ref_scales
    assert counts == ref_counts
    assert counts["clipped_steps"] > 0
    for a, b in zip(params, ref_params, strict=True):
        assert torch.equal(a, b)


def test_explicit_unscale_on_the_wrapper_is_not_doubled():
    model = _model()
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01), "norm", max_norm=1e3
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batch = batches(1)[0]
    scaler.scale(loss_of(model, batch)).backward()
    scaler.unscale_(opt)
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    scaler.step(opt)
    torch.testing.assert_close(opt.last_stats.norm, expected)


def _overflow_run(fused, nonfinite):
    model = _model()
    inner = torch.optim.AdamW(model.parameters(), lr=0.01, fused=fused)
    opt = ClippedOptimizer(inner, "norm", max_norm=0.1, nonfinite=nonfinite)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i, batch in enumerate(batches(4)):
        opt.zero_grad()
        scaler.scale(loss_of(model, batch)).backward()
        if i == 1:  # a routine fp16 overflow
            with torch.no_grad():
                model[0].weight.grad[0, 0] = math.inf
        scaler.step(opt)
        scaler.update()
    return opt.counts(), scaler.get_scale(), [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("nonfinite", ["skip", "error", "zero", "propagate"])
def test_a_gradscaler_overflow_is_never_an_error_and_counts_alike(nonfinite):
    """The scaler's business: no error, counted as without a fused kernel."""
    counts, scale, params = _overflow_run(True, nonfinite)
    plain_counts, plain_scale, plain_params = _overflow_run(False, nonfinite)
    assert counts == plain_counts
    assert counts["steps"] == 3
    assert counts["skipped_steps"] == counts["nonfinite_steps"] == 0
    assert scale == plain_scale == 2.0**9
    for a, b in zip(params, plain_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _by_hand(
    strategy, grad_scale=None, found_inf=None, bare=False, steps=3, nonfinite="skip"
):
    """Set grad_scale/found_inf on the optimizer by hand, as torch's own tests do."""
    torch.manual_seed(0)
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    opt = inner if bare else ClippedOptimizer(inner, strategy, nonfinite=nonfinite)
    for batch in batches(steps):
        opt.zero_grad()
        (4.0 * loss_of(model, batch)).backward()
        if grad_scale is not None:
            opt.grad_scale = grad_scale.clone()
        if found_inf is not None:
            opt.found_inf = found_inf.clone()
        opt.step()
    return [p.detach().clone() for p in model.parameters()], opt


NEVER = {
    "value": lambda: clipopt.ValueClip(math.inf),
    "norm": lambda: clipopt.NormClip(math.inf),
    "adagc": lambda: clipopt.AdaGC(warmup_steps=0, clip_ratio=1e30),
    "agc": lambda: clipopt.AGC(1e30),
    "norm-tensor": lambda: clipopt.NormClip(math.inf, scope="tensor"),
}


@pytest.mark.parametrize("device_path", [False, True], ids=["host", "kernel"])
@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("shape", [(), (1,)], ids=["0-dim", "shape-1"])
@pytest.mark.parametrize("name", list(NEVER))
def test_grad_scale_and_found_inf_set_by_hand_act_as_on_the_bare_kernel(
    name, shape, nonfinite, device_path
):
    """A wrapper that never clips behaves exactly as the bare fused optimizer."""
    scale = torch.full(shape, 4.0)
    for found in (torch.zeros(shape), torch.ones(shape)):
        with _device_path(device_path):
            got, opt = _by_hand(NEVER[name](), scale, found, nonfinite=nonfinite)
        want, _ = _by_hand(None, scale, found, bare=True)
        for a, b in zip(got, want, strict=True):
            assert torch.equal(a, b), (name, float(found))
        stats = opt.last_stats
        assert stats.norm.shape == ()  # a (1,) grad_scale is accepted, as torch does
        assert bool(stats.skipped) == bool(found)


def test_clipping_a_hand_set_grad_scale_equals_unscaling_first():
    """With a scale set by hand the engine clips the unscaled gradients."""
    scaled, _ = _by_hand(clipopt.ValueClip(0.01), torch.tensor(4.0))
    torch.manual_seed(0)
    model = _model()
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True),
        clipopt.ValueClip(0.01),
    )
    for batch in batches(3):
        opt.zero_grad()
        loss_of(model, batch).backward()  # the unscaled gradients
        opt.step()
    for a, b in zip(scaled, model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_unscaling_the_wrapped_optimizer_is_reported(fused):
    """scaler.unscale_(opt.optimizer), then scaler.step(opt), unscales twice."""
    model = _model()
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), fused=fused))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    scaler.scale(loss_of(model, batches(1)[0])).backward()
    scaler.unscale_(opt.optimizer)  # the wrong object
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"Call scaler.unscale_\(opt\) on the"):
        scaler.step(opt)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    # the right object: no error
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt.zero_grad()
    scaler.scale(loss_of(model, batches(1)[0])).backward()
    scaler.unscale_(opt)
    scaler.step(opt)
    assert opt.counts()["steps"] == 1
