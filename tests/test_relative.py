"""The default strategy, ``"relative"`` (:class:`clipopt.RelativeClip`)."""

import io
import itertools
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import clipopt
from clipopt import ClippedOptimizer, RelativeClip
from tests import reference
from tests.conftest import batches, loss_of
from tests.test_optimizer import _model

# Norm sequences with calm stretches, spikes, zeros and non-finite values.
norm_values = st.one_of(
    st.floats(0.5, 2.0),
    st.floats(20.0, 1e4),
    st.just(0.0),
    st.sampled_from([math.inf, math.nan]),
)


def _drive(strategy, norms, scale=1.0):
    """A two-tensor model whose gradient has each norm in turn; the per-step records."""
    params = [torch.nn.Parameter(torch.zeros(3, dtype=torch.float64)) for _ in range(2)]
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.0), strategy, nonfinite="zero")
    direction = torch.tensor([1.0, -2.0, 2.0, 0.5, 0.5, -1.0], dtype=torch.float64)
    direction /= direction.norm()
    rows = []
    for n in norms:
        g = direction * n * scale
        for p, part in zip(params, g.split(3), strict=True):
            p.grad = part.clone()
        opt.step()
        after = torch.cat([p.grad for p in params])
        rows.append((opt.last_stats, after))
    return rows, opt


@given(norms=st.lists(norm_values, min_size=1, max_size=60), ramp=st.sampled_from([0, 3]))
def test_matches_the_reference_step_for_step(norms, ramp):
    rows, _ = _drive(RelativeClip(ramp=ramp), norms)
    ref = reference.RelativeClipReference(ramp=ramp)
    for (stats, after), n in zip(rows, norms, strict=True):
        grads = [torch.tensor([n], dtype=torch.float64)]
        _, threshold, coef = ref.step(grads)
        if not math.isfinite(n):
            continue  # "zero" clears the step; the reference only checks it is not recorded
        assert float(stats.threshold) == pytest.approx(threshold, rel=1e-6)
        assert float(stats.coef) == pytest.approx(coef, rel=1e-6)
        assert float(after.norm()) == pytest.approx(n * coef, rel=1e-6, abs=1e-300)


@given(
    norms=st.lists(st.floats(0.5, 50.0), min_size=1, max_size=40),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_scale_free_any_natural_norm_gets_the_same_coefficients(norms, scale):
    """The point of a relative rule: a loss 1000 times larger clips exactly alike."""
    base, _ = _drive(RelativeClip(), norms)
    scaled, _ = _drive(RelativeClip(), norms, scale=scale)
    for (a, _), (b, _) in zip(base, scaled, strict=True):
        assert float(b.coef) == pytest.approx(float(a.coef), rel=1e-5)
        assert float(b.threshold) == pytest.approx(float(a.threshold) * scale, rel=1e-5)


def test_protects_from_the_first_step():
    """No history at step 0: the update is ratio / ramp of the step's own norm."""
    rows, _ = _drive(RelativeClip(ratio=0.4, ramp=20), [1e6, 1e6, 1e6])
    for t, (stats, after) in enumerate(rows):
        assert float(after.norm()) == pytest.approx(1e6 * 0.4 * (t + 1) / 20, rel=1e-6)
        assert bool(stats.clipped)


def test_an_explosion_cannot_drag_its_threshold_up():
    """Norms growing 10x a step: the reference grows at most (cap - 1)(1 - beta_up)."""
    strategy = RelativeClip(ramp=0)
    norms = [1.0] * 5 + [10.0**k for k in range(1, 8)]
    rows, _ = _drive(strategy, norms)
    thresholds = [float(s.threshold) for s, _ in rows]
    for a, b in itertools.pairwise(thresholds[4:]):
        assert b <= a * (1 + (2.0 - 1) * (1 - 0.99)) * (1 + 1e-6)
    assert float(rows[-1][1].norm()) < 0.5  # the update stays at the calm level


def test_follows_a_decaying_norm():
    """Converging runs: the norm falls 1% a step, 150x in all; the threshold follows.

    For norms ``q**t`` the reference settles at ``(1 - beta_down) / (q - beta_down)``
    times the norm: 2 for q = 0.99, so the threshold ends at 0.8 times the norm.
    """
    norms = [10.0 * 0.99**t for t in range(500)]
    rows, _ = _drive(RelativeClip(ramp=0), norms)
    last = float(rows[-1][0].threshold)
    assert last == pytest.approx(0.4 * (1 - 0.98) / (0.99 - 0.98) * norms[-1], rel=0.02)


def test_state_is_three_scalars_and_resumes_exactly():
    model, resumed_model = _model(), _model()
    resumed_model.load_state_dict(model.state_dict())
    opt = ClippedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01))
    data = batches(8)
    for batch in data[:4]:
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    saved = io.BytesIO()
    torch.save(opt.state_dict(), saved)
    state = opt.state_dict()["clipopt"]["strategy"]
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "gamma": (),
        "seen": (),
        "count": (),
    }
    assert int(state["count"]) == 4
    resumed_model.load_state_dict(model.state_dict())
    resumed = ClippedOptimizer(torch.optim.AdamW(resumed_model.parameters(), lr=0.01))
    saved.seek(0)
    resumed.load_state_dict(torch.load(saved, weights_only=True))
    for batch in data[4:]:
        for m, o in ((model, opt), (resumed_model, resumed)):
            o.zero_grad()
            loss_of(m, batch).backward()
            o.step()
        assert torch.equal(opt.last_stats.threshold, resumed.last_stats.threshold)
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bad_state_is_refused_before_anything_changes():
    strategy = RelativeClip()
    _drive(strategy, [1.0, 2.0])
    before = strategy.state_dict()
    bad = {**before, "gamma": torch.zeros(3)}
    with pytest.raises(ValueError, match=r"state\['gamma'\] has shape \(3,\)"):
        strategy.load_state_dict(bad)
    assert all(torch.equal(v, strategy.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"ratio": 0.0}, ValueError, "ratio must be > 0"),
        ({"ratio": "big"}, TypeError, "ratio"),
        ({"beta_up": 1.0}, ValueError, "beta_up"),
        ({"beta_down": -0.1}, ValueError, "beta_down"),
        ({"cap": 0.5}, ValueError, "cap must be >= 1, got 0.5"),
        ({"ramp": -1}, ValueError, "ramp"),
        ({"ramp": 2.5}, TypeError, "ramp"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, error, message):
    with pytest.raises(error, match=message):
        RelativeClip(**kwargs)


def test_is_the_default_under_its_names():
    assert type(clipopt.get_strategy("relative")) is RelativeClip
    assert type(clipopt.get_strategy("default")) is RelativeClip
    assert type(clipopt.get_strategy("Auto")) is RelativeClip
    sgd = torch.optim.SGD(_model().parameters(), lr=0.1)
    assert type(ClippedOptimizer(sgd).strategy) is RelativeClip
