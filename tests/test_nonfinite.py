import copy
import math

import pytest
import torch

from clipopt import ClippedOptimizer
from tests.conftest import batches, loss_of
from tests.test_optimizer import Recording, _model, _train


def _poison(model, value=math.nan):
    with torch.no_grad():
        model[0].weight.grad[0, 0] = value


def _state_snapshot(opt):
    return copy.deepcopy(opt.optimizer.state_dict())


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def _assert_same_state(a, b):
    _assert_same(a, b)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_skip_leaves_everything_untouched(bad):
    model = _model()
    strategy = Recording(0.3)
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1), strategy)
    data = batches(3)
    _train(model, opt, data[:2])
    params = [p.detach().clone() for p in model.parameters()]
    inner = _state_snapshot(opt)
    own = copy.deepcopy(opt.state_dict()["clipopt"])
    opt.zero_grad()
    loss_of(model, data[2]).backward()
    _poison(model, bad)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    _assert_same_state(inner, _state_snapshot(opt))
    assert torch.equal(opt.strategy.seen, own["strategy"]["seen"])
    counts = opt.counts()
    assert counts["skipped_steps"] == 1
    assert counts["steps"] == 2
    assert bool(opt.last_stats.nonfinite)
    assert opt.last_stats.coef == 0
    assert math.isnan(opt.last_stats.threshold)


def test_skipped_step_is_as_if_it_never_happened():
    data = batches(5)
    model_a = _model()
    opt_a = ClippedOptimizer(
        torch.optim.AdamW(model_a.parameters(), lr=0.05), Recording(0.3)
    )
    model_b = copy.deepcopy(model_a)
    opt_b = ClippedOptimizer(
        torch.optim.AdamW(model_b.parameters(), lr=0.05), Recording(0.3)
    )
    for i, batch in enumerate(data):
        opt_a.zero_grad()
        loss_of(model_a, batch).backward()
        opt_a.step()
        if i == 2:  # b sees an extra poisoned step before this batch
            opt_b.zero_grad()
            loss_of(model_b, batch).backward()
            _poison(model_b)
            opt_b.step()
        opt_b.zero_grad()
        loss_of(model_b, batch).backward()
        opt_b.step()
    for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert torch.equal(opt_a.strategy.seen, opt_b.strategy.seen)


def test_error_raises_and_changes_nothing():
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="error")
    loss_of(model, batches(1)[0]).backward()
    _poison(model, math.inf)
    grads = [p.grad.clone() for p in model.parameters()]
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match=r"non-finite gradients.*nonfinite='error'"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    for g, p in zip(grads, model.parameters(), strict=True):
        assert torch.equal(g, p.grad)  # not even clipped
    assert opt.counts() == {
        "steps": 0,
        "skipped_steps": 0,
        "clipped_steps": 0,
        "nonfinite_steps": 0,
        "spike_steps": 0,
    }


def test_zero_policy_zeroes_then_clips():
    model = _model()
    ref_model = copy.deepcopy(model)
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "norm", max_norm=0.05, nonfinite="zero"
    )
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    batch = batches(1)[0]
    for m in (model, ref_model):
        loss_of(m, batch).backward()
        _poison(m, math.nan)
        m[2].bias.grad[1] = -math.inf
    for p in ref_model.parameters():
        torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.05)
    ref.step()
    opt.step()
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert bool(opt.last_stats.nonfinite)
    assert torch.isfinite(opt.last_stats.norm)
    assert opt.counts()["nonfinite_steps"] == 1
    assert opt.counts()["skipped_steps"] == 0


def test_propagate_matches_torch_and_keeps_strategy_state_clean():
    model = _model()
    ref_model = copy.deepcopy(model)
    strategy = Recording(0.05)
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), strategy, nonfinite="propagate"
    )
    ref = torch.optim.SGD(ref_model.parameters(), lr=0.1)
    batch = batches(1)[0]
    for m in (model, ref_model):
        loss_of(m, batch).backward()
        _poison(m, math.inf)
    torch.nn.utils.clip_grad_norm_(ref_model.parameters(), 0.05)
    ref.step()
    opt.step()
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert not torch.isfinite(model[0].weight).all()
    assert strategy.seen == 0  # the strategy saw the step but did not ingest it
    assert opt.counts()["nonfinite_steps"] == 1


def test_skip_with_closure_returns_loss_without_update():
    model = _model()
    opt = ClippedOptimizer(torch.optim.Adam(model.parameters(), lr=0.1))
    params = [p.detach().clone() for p in model.parameters()]
    batch = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        _poison(model)
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    assert len(opt.optimizer.state) == 0
    assert opt.counts()["skipped_steps"] == 1


def test_lbfgs_nonfinite_in_line_search_is_undone():
    model = _model()
    opt = ClippedOptimizer(
        torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=6), "norm", max_norm=10.0
    )
    batch = batches(1)[0]
    evaluations = []

    def closure(poison_at=None):
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        evaluations.append(1)
        if poison_at is not None and len(evaluations) == poison_at:
            _poison(model)
        return loss

    opt.step(closure)  # a clean step builds LBFGS history
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.optimizer.state_dict())
    counts = opt.counts()
    evaluations.clear()
    opt.step(lambda: closure(poison_at=3))
    assert len(evaluations) == 3
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    _assert_same_state(state, opt.optimizer.state_dict())
    assert opt.counts()["steps"] == counts["steps"]
    assert opt.counts()["skipped_steps"] == counts["skipped_steps"] + 1


def test_overflowing_norm_counts_as_nonfinite():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = ClippedOptimizer(torch.optim.SGD([p], lr=1.0))
    p.grad = torch.tensor([3e38, 3e38])  # finite entries, fp32 L2 norm overflows
    opt.step()
    assert opt.counts()["skipped_steps"] == 1
    assert torch.equal(p.detach(), torch.zeros(2))
