import copy
import math

import pytest
import torch

import clipopt
from clipopt import ClippedOptimizer
from tests.conftest import batches, loss_of
from tests.test_optimizer import _model, _train

CASES = [
    pytest.param(
        lambda ps: torch.optim.AdamW(ps, lr=0.01, foreach=True),
        lambda: clipopt.NormClip(0.3),
        id="AdamW-norm",
    ),
    pytest.param(
        lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=True),
        lambda: clipopt.NormClip(0.3),
        id="AdamW-fused-norm",
    ),
    pytest.param(
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
        lambda: clipopt.PercentileClip(50, window=4),
        id="SGD-percentile",
    ),
    pytest.param(
        lambda ps: torch.optim.SGD(ps, lr=0.1), lambda: clipopt.AGC(0.05), id="SGD-agc"
    ),
]


@pytest.mark.parametrize(("inner", "strategy"), CASES)
def test_attach_equals_the_wrapper(inner, strategy):
    model_a = _model()
    model_b = copy.deepcopy(model_a)
    wrapper = ClippedOptimizer(inner(model_a.parameters()), strategy())
    plain = inner(model_b.parameters())
    attached = clipopt.attach(plain, strategy())
    for batch in batches(6):
        for model, opt in ((model_a, wrapper), (model_b, plain)):
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()
        assert attached.last_stats.to_dict() == wrapper.last_stats.to_dict()
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)
    assert attached.counts() == wrapper.counts()


def test_attachment_and_wrapper_show_their_engine_alike():
    model = _model()
    strategy = clipopt.NormClip(0.5)
    wrapper = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="zero"
    )
    attached = clipopt.attach(
        torch.optim.SGD(model.parameters(), lr=0.1), strategy, nonfinite="error"
    )
    for front, expected in ((wrapper, "zero"), (attached, "error")):
        assert front.nonfinite == front.clipper.nonfinite == expected
        assert front.strategy is front.clipper.strategy
        assert front.process_group is None
        assert front.last_stats is None
    assert attached.strategy is strategy
    loss_of(model, batches(1)[0]).backward()
    attached.optimizer.step()
    assert attached.last_stats is attached.clipper.last_stats is not None
    assert attached.counts() == attached.clipper.counts()
    assert attached.counts()["steps"] == 1


def test_attach_skips_nonfinite_steps_and_keeps_state_in_the_state_dict():
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    attached = clipopt.attach(opt, clipopt.PercentileClip(50, window=4))
    data = batches(4)
    _train(model, opt, data[:2])
    params = [p.detach().clone() for p in model.parameters()]
    steps = {k: v["step"].clone() for k, v in opt.state_dict()["state"].items()}
    opt.zero_grad()
    loss_of(model, data[2]).backward()
    model[0].weight.grad[0, 0] = math.nan
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert all(opt.state_dict()["state"][k]["step"] == v for k, v in steps.items())
    assert attached.counts()["skipped_steps"] == 1
    sd = opt.state_dict()
    assert set(sd["clipopt"]["strategy"]) == {"history", "count"}

    other = _model()
    opt2 = torch.optim.AdamW(other.parameters(), lr=0.01)
    attached2 = clipopt.attach(opt2, clipopt.PercentileClip(50, window=4))
    opt2.load_state_dict(copy.deepcopy(sd))
    assert attached2.counts() == attached.counts()
    assert torch.equal(
        attached2.strategy.state_dict()["count"], attached.strategy.state_dict()["count"]
    )
    bad = copy.deepcopy(sd)
    bad["clipopt"]["version"] = 99
    with pytest.raises(ValueError, match="has version 99"):
        opt2.load_state_dict(bad)


def test_attach_refusals_and_detach():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attached = clipopt.attach(opt, "norm", max_norm=1e-3)
    with pytest.raises(TypeError, match=r"already clipped by a Attachment.*detach"):
        clipopt.attach(opt)
    with pytest.raises(TypeError, match="already clipped by a Attachment"):
        ClippedOptimizer(opt)  # a wrapper on an attached optimizer: clipping twice
    with pytest.raises(TypeError, match="attach to a plain optimizer"):
        clipopt.attach(ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1)))
    loss_of(model, batches(1)[0]).backward()
    with pytest.raises(RuntimeError, match="cannot clip the gradients a closure computes"):
        opt.step(lambda: 0.0)
    attached.detach()
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    opt.step()
    after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    assert torch.equal(norm, after)  # no longer clipped
    assert "clipopt" not in opt.state_dict()
    assert "NormClip" in repr(attached)


def test_attach_with_gradscaler_and_a_fused_optimizer():
    model_a = _model()
    model_b = copy.deepcopy(model_a)
    model_w = copy.deepcopy(model_a)
    fused = torch.optim.AdamW(model_a.parameters(), lr=0.01, fused=True)
    clipopt.attach(fused, "norm", max_norm=0.2)
    ref = torch.optim.AdamW(model_b.parameters(), lr=0.01, fused=True)
    wrapper = clipopt.ClippedOptimizer(
        torch.optim.AdamW(model_w.parameters(), lr=0.01, fused=True), "norm", max_norm=0.2
    )
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in range(3)]
    for batch in batches(4):
        wrapper.zero_grad()
        scalers[2].scale(loss_of(model_w, batch)).backward()
        scalers[2].step(wrapper)
        scalers[2].update()
        fused.zero_grad()
        scalers[0].scale(loss_of(model_a, batch)).backward()
        scalers[0].step(fused)
        scalers[0].update()
        ref.zero_grad()
        scalers[1].scale(loss_of(model_b, batch)).backward()
        scalers[1].unscale_(ref)
        torch.nn.utils.clip_grad_norm_(model_b.parameters(), 0.2)
        scalers[1].step(ref)
        scalers[1].update()
    for a, b, w in zip(
        model_a.parameters(), model_b.parameters(), model_w.parameters(), strict=True
    ):
        assert torch.equal(a, w)  # attach mode and the wrapper: the same bits
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
    # a multi-factor strategy: the engine unscales the gradients itself
    results = []
    for attached in (True, False):
        model_c = _model()
        agc = torch.optim.AdamW(model_c.parameters(), lr=0.01, fused=True)
        opt = agc if attached else clipopt.ClippedOptimizer(agc, "agc", clipping=0.01)
        if attached:
            clipopt.attach(agc, "agc", clipping=0.01)
        scaler = torch.amp.GradScaler("cpu")
        for batch in batches(3):
            opt.zero_grad()
            scaler.scale(loss_of(model_c, batch)).backward()
            scaler.step(opt)
            scaler.update()
        results.append([p.detach() for p in model_c.parameters()])
    for a, w in zip(*results, strict=True):
        assert torch.equal(a, w)
