"""Adaptive strategies against golden values and the published rules, step for step."""

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import clipopt
from clipopt import (
    AGC,
    AdaGC,
    Chain,
    ClippedOptimizer,
    NormClip,
    PercentileClip,
    ValueClip,
    ZScoreClip,
)
from tests import reference


def drive(strategy, norms, dtype=torch.float64):
    """Feed a sequence of gradient norms (1-entry gradient) through the wrapper."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=dtype))
    opt = ClippedOptimizer(torch.optim.SGD([p], lr=0.0), strategy)
    outs, thresholds = [], []
    for n in norms:
        p.grad = torch.tensor([n], dtype=dtype)
        opt.step()
        outs.append(float(p.grad.abs()))
        thresholds.append(float(opt.last_stats.threshold))
    return outs, thresholds, opt


# -- AutoClip ------------------------------------------------------------------------------

A2_NORMS = [1, 2, 0.5, 4, 1.5, 10, 1]


def test_percentile_golden_a2():
    outs, thresholds, _ = drive(PercentileClip(percentile=10), A2_NORMS)
    np.testing.assert_allclose(
        thresholds, [1.0, 1.1, 0.6, 0.65, 0.7, 0.75, 0.8], rtol=1e-12
    )
    np.testing.assert_allclose(outs, [1.0, 1.1, 0.5, 0.65, 0.7, 0.75, 0.8], rtol=2e-6)


def test_percentile_exclude_current_golden_a3():
    outs, thresholds, _ = drive(PercentileClip(90, include_current=False), A2_NORMS)
    np.testing.assert_allclose(
        thresholds, [math.inf, 1.0, 1.9, 1.8, 3.4, 3.2, 7.0], rtol=1e-12
    )
    np.testing.assert_allclose(outs, [1, 1.0, 0.5, 1.8, 1.5, 3.2, 1.0], rtol=2e-6)


norm_sequences = st.lists(st.floats(1e-3, 1e3, allow_nan=False), min_size=1, max_size=40)


@given(norms=norm_sequences, p=st.floats(0, 100), window=st.sampled_from([3, 7, 1000]))
def test_percentile_matches_numpy_step_for_step(norms, p, window):
    _, thresholds, _ = drive(PercentileClip(percentile=p, window=window), norms)
    ref = reference.AutoClipPaper(p, window=window)
    for n, ours in zip(norms, thresholds, strict=True):
        expected = ref.step([torch.tensor([n], dtype=torch.float64)])
        assert ours == pytest.approx(expected, rel=1e-12, abs=1e-15)


@given(
    norms=st.lists(
        st.sampled_from([0.0, 0.5, 1.0, 2.0, math.inf, math.nan]) | st.floats(0.1, 3.0),
        max_size=40,
    ),
    window=st.integers(1, 6),
    float64=st.booleans(),
)
def test_percentile_sorted_window_is_the_history_sorted(norms, window, float64):
    # ties, empty slots, and norms that are not recorded (0, inf, nan): the window the
    # percentile reads is kept sorted by clamps in place and must equal a fresh sort
    dtype = torch.float64 if float64 else torch.float32
    strategy = PercentileClip(window=window)
    _, _, opt = drive(strategy, norms, dtype)
    state = opt.strategy.state_dict()
    if not state:  # every step was skipped as non-finite: the strategy never ran
        assert not any(math.isfinite(n) for n in norms)
        return
    history = state["history"]
    expected = torch.sort(history.nan_to_num(nan=math.inf)).values
    assert torch.equal(strategy._sorted.values, expected)
    recorded = [n for n in norms if math.isfinite(n) and n > 0][-window:]
    recorded = torch.tensor(sorted(recorded), dtype=dtype)
    assert torch.equal(recorded, expected[: len(recorded)])


@given(norms=norm_sequences, q=st.floats(0, 1))
def test_percentile_exclude_current_matches_autoclip_package(norms, q):
    _, thresholds, _ = drive(
        PercentileClip(percentile=100 * q, window=5, include_current=False), norms
    )
    ref = reference.AutoClipPackage(q, history_length=5)
    for n, ours in zip(norms, thresholds, strict=True):
        expected = ref.step([torch.tensor([n], dtype=torch.float64)])
        assert ours == pytest.approx(expected, rel=1e-9)


# -- ZClip ---------------------------------------------------------------------------------

WARMUP = [0.9, 1.0, 1.1] * 8 + [0.9]  # 25 norms: mean 0.996, var 0.006784


@pytest.mark.parametrize(
    ("kwargs", "out27", "mean27", "var27", "out29"),
    [
        ({}, 1.006393, 0.996428, 0.00638648, 1.015862),
        ({"clip_option": "mean"}, 0.996120, 0.996120, 0.0063835, 0.996236),
        ({"mode": "percentile"}, 1.198927, 1.002204, 0.0075445, 1.216005),
    ],
    ids=["adaptive_scaling", "mean", "percentile"],
)
def test_zscore_golden_a4(kwargs, out27, mean27, var27, out29):
    strategy = ZScoreClip(alpha=0.97, z_thresh=2.5, warmup_steps=25, **kwargs)
    outs, _, _ = drive(strategy, WARMUP)
    state = strategy.state_dict()
    assert float(state["mean"]) == pytest.approx(0.996, rel=1e-12)
    assert float(state["var"]) == pytest.approx(0.006784, rel=1e-9)
    outs, _, _ = drive_more(strategy, [1.0, 5.0])
    assert outs[0] == pytest.approx(1.0)
    assert outs[1] == pytest.approx(out27, abs=1e-6)
    state = strategy.state_dict()
    assert float(state["mean"]) == pytest.approx(mean27, abs=1e-6)
    assert float(state["var"]) == pytest.approx(var27, rel=1e-4)
    outs, _, _ = drive_more(strategy, [1.0, 3.0])
    assert outs[1] == pytest.approx(out29, abs=1e-6)


def drive_more(strategy, norms):
    """Continue a strategy's run in a fresh wrapper (the state lives in the strategy)."""
    return drive(strategy, norms)


zclip_options = st.fixed_dictionaries(
    {
        "alpha": st.sampled_from([0.9, 0.97]),
        "z_thresh": st.sampled_from([1.0, 2.5]),
        "warmup_steps": st.sampled_from([1, 3, 5]),
        "max_grad_norm": st.sampled_from([None, 0.8, 5.0]),
        "mode": st.sampled_from(["zscore", "percentile"]),
        "clip_option": st.sampled_from(["adaptive_scaling", "mean"]),
        "clip_factor": st.sampled_from([1.0, 0.7]),
        "skip_update_on_spike": st.booleans(),
    }
)


@given(options=zclip_options, norms=st.lists(st.floats(0.05, 50), min_size=1, max_size=30))
def test_zscore_matches_zclip_step_for_step(options, norms):
    ref = reference.ZClipReference(**options)
    ours = ZScoreClip(
        alpha=options["alpha"],
        z_thresh=options["z_thresh"],
        warmup_steps=options["warmup_steps"],
        max_norm=options["max_grad_norm"],
        mode=options["mode"],
        clip_option=options["clip_option"],
        clip_factor=options["clip_factor"],
        skip_update_on_spike=options["skip_update_on_spike"],
    )
    outs, _, _ = drive(ours, norms)
    for n, out in zip(norms, outs, strict=True):
        g = [torch.tensor([n], dtype=torch.float64)]
        ref.step(g)
        assert out == pytest.approx(float(g[0].abs()), rel=1e-9, abs=1e-12)


# -- AGC -----------------------------------------------------------------------------------


def test_agc_golden_a5():
    layer = torch.nn.Linear(4, 3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 2, 0, 0], [0, 0, 0, 0]]))
        layer.bias.zero_()
    layer.weight.grad = torch.tensor([[1.0, 1, 1, 1], [0.01, 0, 0, 0], [1, 0, 0, 0]])
    layer.bias.grad = torch.tensor([3.0, 4.0, 0.0])
    opt = ClippedOptimizer(torch.optim.SGD(layer.parameters(), lr=0.0), "agc")
    opt.step()
    torch.testing.assert_close(
        layer.weight.grad,
        torch.tensor([[0.005] * 4, [0.01, 0, 0, 0], [1e-5, 0, 0, 0]]),
        rtol=1e-6,
        atol=1e-9,
    )
    torch.testing.assert_close(
        layer.bias.grad, torch.tensor([6e-6, 8e-6, 0.0]), rtol=1e-5, atol=0
    )
    assert bool(opt.last_stats.clipped)


def _agc_model():
    torch.manual_seed(3)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 4 * 4, 8),
        torch.nn.Linear(8, 8),  # same shape as the next: stacked together
        torch.nn.Linear(8, 8),
        torch.nn.LayerNorm(8),
        torch.nn.Linear(8, 2),
    )


@pytest.mark.parametrize("clipping", [0.01, 0.1, 1.0])
def test_agc_matches_timm(clipping):
    model = _agc_model()
    twin = copy.deepcopy(model)
    x = 10 * torch.randn(5, 3, 6, 6)
    for m in (model, twin):
        m(x).pow(2).sum().backward()
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), "agc", clipping=clipping
    )
    opt.step()
    reference.timm_adaptive_clip_grad(twin.parameters(), clip_factor=clipping)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
    post = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    torch.testing.assert_close(
        opt.last_stats.coef * opt.last_stats.norm, post, rtol=1e-5, atol=0
    )


def test_agc_excludes_by_name_and_by_parameter():
    model = _agc_model()
    x = 10 * torch.randn(5, 3, 6, 6)
    model(x).pow(2).sum().backward()
    head, head_grad = model[7].weight, model[7].weight.grad.clone()
    bias_grad = model[7].bias.grad.clone()
    named = ClippedOptimizer(
        torch.optim.SGD(model.named_parameters(), lr=0.0), "agc", exclude=["7.weight"]
    )
    named.step()
    assert torch.equal(head.grad, head_grad)
    assert not torch.equal(model[7].bias.grad, bias_grad)  # only the weight is exempt

    model(x).pow(2).sum().backward()
    head_grad = head.grad.clone()
    by_param = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), AGC(exclude=[head])
    )
    by_param.step()
    assert torch.equal(head.grad, head_grad)


def test_agc_name_errors():
    model = _agc_model()
    model(torch.randn(2, 3, 6, 6)).sum().backward()
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "agc", exclude=["7.weight"]
    )
    with pytest.raises(ValueError, match="no parameter names"):
        opt.step()
    opt = ClippedOptimizer(
        torch.optim.SGD(model.named_parameters(), lr=0.1), "agc", exclude=["head.weight"]
    )
    with pytest.raises(ValueError, match=r"exclude names not found.*head.weight"):
        opt.step()
    with pytest.raises(TypeError, match="exclude must hold parameters"):
        AGC(exclude=[3])


# -- AdaGC ---------------------------------------------------------------------------------


def test_adagc_golden_a7():
    strategy = AdaGC(clip_ratio=1.04, beta=0.99, warmup_steps=2, max_norm=1.0)
    outs = []
    gammas = []
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = ClippedOptimizer(torch.optim.SGD([p], lr=0.0), strategy)
    for n in [2, 0.5, 0.6, 0.5, 5]:
        p.grad = torch.tensor([n], dtype=torch.float64)
        opt.step()
        outs.append(float(p.grad.abs()))
        gammas.append(float(strategy.state_dict()["gamma"][0]))
    np.testing.assert_allclose(outs, [0.9999995, 0.5, 0.5199991, 0.5, 0.5202058], atol=1e-7)
    np.testing.assert_allclose(
        gammas, [0.9999995, 0.5, 0.5002, 0.500198, 0.5003981], atol=1e-7
    )


def test_adagc_matches_reference_with_parameters_coming_and_going():
    torch.manual_seed(0)
    params = [
        torch.nn.Parameter(torch.zeros(s, dtype=torch.float64))
        for s in [(3, 2), (4,), (2,)]
    ]
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = ClippedOptimizer(
        torch.optim.SGD(params, lr=0.0), AdaGC(warmup_steps=3, max_norm=2.0)
    )
    ref = reference.AdaGCReference(warmup_steps=3, max_norm=2.0)
    g = torch.Generator().manual_seed(1)
    for step in range(12):
        for p, r in zip(params, ref_params, strict=True):
            grad = torch.randn(p.shape, generator=g, dtype=torch.float64) * (
                1 + 20 * (step % 5 == 4)
            )
            p.grad, r.grad = grad.clone(), grad.clone()
        if step in (5, 6):  # the middle parameter has no gradient for two steps
            params[1].grad = ref_params[1].grad = None
        opt.step()
        ref.step(ref_params)
        for p, r in zip(params, ref_params, strict=True):
            if p.grad is not None:
                torch.testing.assert_close(p.grad, r.grad, rtol=1e-9, atol=1e-12)


def test_adagc_grows_with_added_param_groups():
    a = torch.nn.Parameter(torch.zeros(2))
    b = torch.nn.Parameter(torch.zeros(3))
    strategy = AdaGC(warmup_steps=1)
    opt = ClippedOptimizer(torch.optim.SGD([a], lr=0.1), strategy)
    a.grad = torch.ones(2)
    opt.step()
    opt.add_param_group({"params": [b]})
    a.grad, b.grad = torch.ones(2), torch.ones(3)
    opt.step()
    assert strategy.state_dict()["gamma"].shape == (2,)
    assert bool(strategy.state_dict()["initialized"].all())


# -- Chain, scopes, schedules ----------------------------------------------------------


def _grads_pair(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    return model, copy.deepcopy(model)


def test_chain_value_then_norm_equals_torch():
    model, twin = _grads_pair()
    x = 5 * torch.randn(8, 5)
    for m in (model, twin):
        m(x).pow(2).sum().backward()
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), Chain(ValueClip(2.0), NormClip(1.0))
    )
    opt.step()
    torch.nn.utils.clip_grad_value_(twin.parameters(), 2.0)
    torch.nn.utils.clip_grad_norm_(twin.parameters(), 1.0)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    assert bool(opt.last_stats.clipped)


def test_chain_accepts_names_and_validates():
    assert isinstance(Chain("norm").strategies[0], NormClip)
    with pytest.raises(ValueError, match="at least one"):
        Chain()
    with pytest.raises(TypeError, match="Chain members must be"):
        Chain(1.0)
    chain = Chain(PercentileClip(), ZScoreClip())
    with pytest.raises(ValueError, match="Chain state needs keys"):
        chain.load_state_dict({"0": {}})


def test_group_scope_norm_uses_group_thresholds():
    model, twin = _grads_pair()
    x = 5 * torch.randn(8, 5)
    for m in (model, twin):
        m(x).pow(2).sum().backward()
    groups = [
        {"params": model[0].parameters()},
        {"params": model[1].parameters(), "clipopt_max_norm": 0.1},
    ]
    opt = ClippedOptimizer(
        torch.optim.SGD(groups, lr=0.1), "norm", max_norm=1.0, scope="group"
    )
    opt.step()
    torch.nn.utils.clip_grad_norm_(twin[0].parameters(), 1.0)
    torch.nn.utils.clip_grad_norm_(twin[1].parameters(), 0.1)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_tensor_scope_norm_clips_each_tensor():
    model, twin = _grads_pair()
    x = 5 * torch.randn(8, 5)
    for m in (model, twin):
        m(x).pow(2).sum().backward()
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "norm", max_norm=0.5, scope="tensor"
    )
    opt.step()
    for p in twin.parameters():
        torch.nn.utils.clip_grad_norm_([p], 0.5)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
    post = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    torch.testing.assert_close(
        opt.last_stats.coef * opt.last_stats.norm, post, rtol=1e-5, atol=0
    )


def test_group_scope_value_and_bad_override():
    model, twin = _grads_pair()
    x = 5 * torch.randn(8, 5)
    for m in (model, twin):
        m(x).pow(2).sum().backward()
    groups = [
        {"params": model[0].parameters(), "clipopt_clip_value": 0.01},
        {"params": model[1].parameters()},
    ]
    opt = ClippedOptimizer(
        torch.optim.SGD(groups, lr=0.1), "value", clip_value=1.0, scope="group"
    )
    opt.step()
    torch.nn.utils.clip_grad_value_(twin[0].parameters(), 0.01)
    torch.nn.utils.clip_grad_value_(twin[1].parameters(), 1.0)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    opt.param_groups[0]["clipopt_clip_value"] = -1
    model(x).sum().backward()
    with pytest.raises(
        ValueError, match=r"param_groups\[0\]\['clipopt_clip_value'\] must be > 0"
    ):
        opt.step()


def test_threshold_schedule_uses_the_step_count():
    seen = []

    def ramp(step):
        seen.append(step)
        return 0.1 * (step + 1)

    p = torch.nn.Parameter(torch.zeros(1))
    opt = ClippedOptimizer(torch.optim.SGD([p], lr=0.0), "norm", max_norm=ramp)
    for _ in range(3):
        p.grad = torch.tensor([10.0])
        opt.step()
    assert seen == [0, 1, 2]
    assert float(opt.last_stats.threshold) == pytest.approx(0.3)
    assert float(p.grad) == pytest.approx(0.3, rel=1e-5)


def test_bad_schedule_value_names_parameter_and_step():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = ClippedOptimizer(torch.optim.SGD([p], lr=0.0), "norm", max_norm=lambda s: -1.0)
    p.grad = torch.ones(1)
    with pytest.raises(ValueError, match=r"max_norm\(0\) must be > 0, got -1.0"):
        opt.step()
    assert torch.equal(p.grad, torch.ones(1))


def test_schedules_elsewhere():
    _outs, thresholds, _ = drive(
        ZScoreClip(warmup_steps=2, max_norm=lambda s: 0.5 + s), [3, 3]
    )
    assert thresholds == [0.5, 1.5]
    assert AGC(clipping=lambda s: 0.1).clipping(0) == 0.1
    assert callable(AdaGC(max_norm=lambda s: 1.0).max_norm)


# -- validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "error", "match"),
    [
        (
            lambda: PercentileClip(percentile=101),
            ValueError,
            r"percentile must be in \[0.0, 100.0\]",
        ),
        (lambda: PercentileClip(percentile=math.nan), ValueError, "percentile must be in"),
        (lambda: PercentileClip(window=0), ValueError, "window must be >= 1, got 0"),
        (lambda: PercentileClip(window=2.5), TypeError, "window must be an int, got 2.5"),
        (
            lambda: PercentileClip(include_current=1),
            TypeError,
            "include_current must be a bool",
        ),
        (lambda: ZScoreClip(alpha=1.0), ValueError, r"alpha must be in \(0.0, 1.0\)"),
        (lambda: ZScoreClip(z_thresh=0), ValueError, "z_thresh must be > 0, got 0"),
        (lambda: ZScoreClip(z_thresh=math.inf), ValueError, "z_thresh must be finite"),
        (lambda: ZScoreClip(warmup_steps=0), ValueError, "warmup_steps must be >= 1"),
        (lambda: ZScoreClip(max_norm=-2), ValueError, "max_norm must be > 0, got -2"),
        (lambda: ZScoreClip(mode="median"), ValueError, "mode must be one of 'zscore'"),
        (lambda: ZScoreClip(clip_option="max"), ValueError, "clip_option must be one of"),
        (
            lambda: ZScoreClip(clip_factor=True),
            TypeError,
            "clip_factor must be a real number",
        ),
        (lambda: AdaGC(clip_ratio=0), ValueError, "clip_ratio must be > 0, got 0"),
        (lambda: AdaGC(beta=1.0), ValueError, r"beta must be in \[0.0, 1.0\)"),
        (lambda: AdaGC(warmup_steps=-1), ValueError, "warmup_steps must be >= 0, got -1"),
        (
            lambda: AdaGC(max_norm=math.nan),
            ValueError,
            "max_norm must be a number > 0, got nan",
        ),
        (lambda: AGC(clipping=0), ValueError, "clipping must be > 0, got 0"),
        (lambda: AGC(clipping=math.inf), ValueError, "clipping must be finite"),
        (lambda: AGC(eps=-1), ValueError, "eps must be > 0, got -1"),
        (
            lambda: NormClip(scope="layer"),
            ValueError,
            "scope must be one of 'global', 'group'",
        ),
        (lambda: ValueClip(1.0, scope="tensor"), ValueError, "scope must be one of"),
        (lambda: clipopt.get_strategy("zscore", zthresh=2), TypeError, "z_thresh"),
    ],
)
def test_validation(factory, error, match):
    with pytest.raises(error, match=match):
        factory()


def test_state_validation_on_load():
    strategy = PercentileClip(window=4)
    with pytest.raises(ValueError, match=r"state needs keys \['count', 'history'\]"):
        strategy.load_state_dict({"history": torch.zeros(4)})
    with pytest.raises(
        ValueError, match=r"state\['history'\] has shape \(3,\), expected \(4,\)"
    ):
        strategy.load_state_dict({"history": torch.zeros(3), "count": torch.tensor(0)})
    with pytest.raises(ValueError, match=r"state\['count'\] must be a tensor"):
        strategy.load_state_dict({"history": torch.zeros(4), "count": 0})
    with pytest.raises(ValueError, match="must be 1-D"):
        AdaGC().load_state_dict(
            {
                "gamma": torch.zeros(2, 2),
                "initialized": torch.zeros(2),
                "steps": torch.tensor(0),
            }
        )


def test_agc_plan_is_built_once_while_the_same_gradient_is_missing():
    """The wrapper passes the same kept lists while the same gradients are missing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    agc = AGC(0.01)
    opt = clipopt.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), agc)
    plans = []
    for step in range(4):
        opt.zero_grad()
        model(torch.randn(2, 3)).sum().backward()
        if step >= 1:
            model[0].bias.grad = None
        opt.step()
        plans.append(opt.clipper._gradients.layout._selection.plan)
    assert plans[0] is not plans[1]  # a gradient went missing: a new selection
    assert plans[1] is plans[2] is plans[3]
    assert len(plans[0].included) == 4
    assert len(plans[1].included) == 3  # the missing bias is not planned
