import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clipopt import functional as F

# numerics: bits and accuracy must hold on one thread and on several
pytestmark = [
    pytest.mark.usefixtures("threads"),
    pytest.mark.parametrize("threads", [1, 2], indirect=True),
]


NORM_TYPES = [0.5, 1.0, 1.5, 2.0, 4.0, math.inf]


def _grads(dtype, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (), (0,), (2, 3, 2)]
    return [scale * torch.randn(s, generator=g, dtype=dtype) for s in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("foreach", [None, False, True])
def test_total_norm_equals_torch(dtype, norm_type, foreach):
    grads = _grads(dtype)
    if math.isinf(norm_type):  # torch raises on the zero-size tensor, clipopt does not
        assert F.total_norm(grads, norm_type, foreach=foreach) == max(
            g.abs().max() for g in grads if g.numel()
        )
        grads = [g for g in grads if g.numel()]
    ours = F.total_norm(grads, norm_type, foreach=foreach)
    ref = torch.nn.utils.get_total_norm(grads, norm_type, foreach=foreach)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("max_norm", [0.3, 1e3])
@pytest.mark.parametrize("uniform", [False, True])
def test_norm_clip_pipeline_equals_clip_grad_norm(
    dtype, norm_type, foreach, max_norm, uniform
):
    shapes = _grads(dtype)
    if math.isinf(norm_type):  # torch raises on zero-size tensors
        shapes = [g for g in shapes if g.numel()]
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in shapes]
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in shapes]
    values = [3.0 * g for g in shapes]
    for p, r, g in zip(params, ref, values, strict=True):
        p.grad, r.grad = g.clone(), g.clone()
    grads = [p.grad for p in params]
    norm = F.total_norm(grads, norm_type, foreach=foreach)
    F.scale_(grads, F.clip_coef(norm, max_norm), foreach=foreach, uniform=uniform)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type, foreach=foreach)
    assert torch.equal(norm, ref_norm)
    for p, r in zip(params, ref, strict=True):
        assert torch.equal(p.grad, r.grad)


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("uniform", [False, True])
def test_clamp_equals_clip_grad_value(foreach, uniform):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in _grads(torch.float32)]
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in _grads(torch.float32)]
    for p, r, g in zip(params, ref, _grads(torch.float32, scale=2.0), strict=True):
        p.grad, r.grad = g.clone(), g.clone()
    F.clamp_([p.grad for p in params], 0.7, foreach=foreach, uniform=uniform)
    torch.nn.utils.clip_grad_value_(ref, 0.7, foreach=foreach)
    for p, r in zip(params, ref, strict=True):
        assert torch.equal(p.grad, r.grad)


def test_scale_and_clamp_group_mixed_dtypes_unless_told_uniform():
    """Without ``uniform`` each (device, dtype) group gets its own coefficient copy."""
    tensors = [torch.full((3,), 2.0), torch.full((2,), 2.0, dtype=torch.float64)]
    F.scale_(tensors, torch.tensor(0.5))
    assert [t.dtype for t in tensors] == [torch.float32, torch.float64]
    assert all(torch.equal(t, torch.ones_like(t)) for t in tensors)
    F.clamp_(tensors, 0.25)
    assert all(torch.equal(t, torch.full_like(t, 0.25)) for t in tensors)


def test_inf_norm_of_only_empty_tensors_is_zero():
    assert F.total_norm([torch.empty(0), torch.empty(2, 0)], math.inf) == 0


def test_total_norm_rejects_empty():
    with pytest.raises(ValueError, match="tensors must not be empty"):
        F.total_norm([])


def test_nonfinite_makes_norm_nonfinite_for_every_norm_type():
    for bad in (math.nan, math.inf, -math.inf):
        for p in NORM_TYPES:
            grads = [torch.tensor([1.0, bad]), torch.tensor([2.0])]
            assert not torch.isfinite(F.total_norm(grads, p)), (bad, p)


def test_nonfinite_to_zero():
    t = torch.tensor([1.0, math.nan, math.inf, -math.inf, -2.0])
    F.nonfinite_to_zero_([t])
    assert torch.equal(t, torch.tensor([1.0, 0.0, 0.0, 0.0, -2.0]))


def test_foreach_true_on_unsupported_device_raises():
    with pytest.raises(RuntimeError, match="foreach=True"):
        F.total_norm([torch.empty(2, device="meta")], foreach=True)


# -- properties ------------------------------------------------------------------------

shapes = st.lists(
    st.lists(st.integers(1, 5), min_size=0, max_size=3).map(tuple), min_size=1, max_size=5
)


@st.composite
def grad_lists(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-4, 1e-2, 1.0, 10.0, 1e3]))
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(s, generator=g, dtype=torch.float64) for s in draw(shapes)]


thresholds = st.floats(1e-3, 1e3)


@given(grads=grad_lists(), max_norm=thresholds)
def test_post_clip_norm_at_most_max_norm(grads, max_norm):
    norm = F.total_norm(grads)
    F.scale_(grads, F.clip_coef(norm, max_norm))
    assert F.total_norm(grads) <= max_norm * (1 + 1e-6)


@given(grads=grad_lists(), max_norm=thresholds)
def test_direction_preserved(grads, max_norm):
    before = torch.cat([g.flatten() for g in grads])
    norm = F.total_norm(grads)
    coef = F.clip_coef(norm, max_norm)
    F.scale_(grads, coef)
    after = torch.cat([g.flatten() for g in grads])
    assert 0 < coef <= 1
    torch.testing.assert_close(after, before * coef, rtol=0, atol=0)


@pytest.mark.parametrize("threshold", [1.0, 0.3, torch.tensor(0.3)])
def test_clip_coef_is_torchs_and_differentiable(threshold):
    """torch's coefficient, max_norm / (norm + 1e-6) clamped at 1, bit for bit; and
    autograd goes through it (the in-place form is only for norms without a graph)."""
    for value in (0.0, 0.2999999, 0.3, 5.0, 123.456):
        norm = torch.tensor(value)
        expected = torch.clamp(threshold / (norm + 1e-6), max=1.0)
        assert torch.equal(F.clip_coef(norm, threshold), expected)
    leaf = torch.tensor(5.0, requires_grad=True)
    coef = F.clip_coef(leaf * 1.0, 1.0)
    coef.backward()
    assert leaf.grad is not None
    assert torch.allclose(leaf.grad, torch.tensor(-1.0 / (5.0 + 1e-6) ** 2))


@given(
    values=st.lists(st.floats(0.0, 1e3), min_size=1, max_size=30),
    q=st.floats(0.0, 100.0),
    float_count=st.booleans(),
)
def test_percentile_sorted_is_numpys(values, q, float_count):
    """Linear interpolation as numpy.percentile, the count as an int or float tensor."""
    n = len(values)
    ordered = torch.tensor(sorted(values) + [math.inf] * 3, dtype=torch.float64)
    count = torch.tensor(float(n) if float_count else n)
    ours = F.percentile_sorted(ordered, count, q)
    assert ours.item() == pytest.approx(np.percentile(values, q), rel=1e-12, abs=1e-12)
    assert F.percentile_sorted(ordered, torch.tensor(0), q).item() == math.inf


@given(grads=grad_lists())
def test_noop_below_threshold(grads):
    before = [g.clone() for g in grads]
    norm = F.total_norm(grads)
    F.scale_(grads, F.clip_coef(norm, float(norm) * 2 + 1e-3))
    for a, b in zip(grads, before, strict=True):
        assert torch.equal(a, b)


@given(grads=grad_lists(), max_norm=thresholds)
def test_norm_clip_idempotent(grads, max_norm):
    F.scale_(grads, F.clip_coef(F.total_norm(grads), max_norm))
    once = [g.clone() for g in grads]
    F.scale_(grads, F.clip_coef(F.total_norm(grads), max_norm))
    # Not bitwise: the 1e-6 added to the norm (as torch does) lets a second clip shave
    # off at most about 1e-6 / max_norm more.
    for a, b in zip(grads, once, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-6 / max_norm + 1e-12, atol=0)


@given(grads=grad_lists(), clip_value=thresholds)
def test_value_clip_bounds_and_idempotent(grads, clip_value):
    F.clamp_(grads, clip_value)
    assert all(g.abs().max() <= clip_value for g in grads if g.numel())
    once = [g.clone() for g in grads]
    F.clamp_(grads, clip_value)
    for a, b in zip(grads, once, strict=True):
        assert torch.equal(a, b)


@given(shape=st.lists(st.integers(1, 4), max_size=3), max_norm=thresholds)
def test_zero_stays_zero(shape, max_norm):
    grads = [torch.zeros(shape), torch.zeros(3)]
    norm = F.total_norm(grads)
    F.scale_(grads, F.clip_coef(norm, max_norm))
    F.clamp_(grads, max_norm)
    assert norm == 0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)
