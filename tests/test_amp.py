"""GradScaler drives the wrapper: clipping sees unscaled gradients; inf steps skip."""

import copy
import math

import pytest
import torch

from clipopt import ClippedOptimizer
from tests.conftest import batches, loss_of
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
    opt = ClippedOptimizer(cls(model.parameters(), lr=0.01, **kwargs), max_norm=max_norm)
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


def test_flag_is_not_advertised_for_multi_factor_strategies():
    sgd = torch.optim.SGD(_model().parameters(), lr=0.1, fused=True)
    for strategy in ("value", "agc", "adagc"):
        kwargs = {"clip_value": 1.0} if strategy == "value" else {}
        assert not ClippedOptimizer(sgd, strategy, **kwargs)._step_supports_amp_scaling
    assert not ClippedOptimizer(sgd, "norm", scope="tensor")._step_supports_amp_scaling
    assert ClippedOptimizer(sgd, "percentile")._step_supports_amp_scaling
    plain = torch.optim.SGD(_model().parameters(), lr=0.1)
    assert not ClippedOptimizer(plain, "norm")._step_supports_amp_scaling


def test_gradscaler_skips_inf_steps():
    model = _model()
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01, fused=True))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batch = batches(1)[0]
    scaler.scale(loss_of(model, batch)).backward()
    with torch.no_grad():
        model[0].weight.grad[0, 0] = math.inf
    params = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    # one-pass AMP: the fused kernel skipped the update on the scaler's found_inf
    assert bool(opt.last_stats.nonfinite)
    assert opt.counts()["skipped_steps"] == 1
    assert scaler.get_scale() == 2.0**9
    for state in opt.optimizer.state.values():  # created, but never advanced
        assert state["step"] == 0
        assert torch.equal(state["exp_avg"], torch.zeros_like(state["exp_avg"]))


def test_explicit_unscale_on_the_wrapper_is_not_doubled():
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01), max_norm=1e3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batch = batches(1)[0]
    scaler.scale(loss_of(model, batch)).backward()
    scaler.unscale_(opt)
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    scaler.step(opt)
    torch.testing.assert_close(opt.last_stats.norm, expected)
