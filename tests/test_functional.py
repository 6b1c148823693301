import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clipopt import functional as F

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
def test_norm_clip_pipeline_equals_clip_grad_norm(dtype, norm_type, foreach, max_norm):
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
    F.scale_(grads, F.clip_coef(norm, max_norm), foreach=foreach)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm, norm_type, foreach=foreach)
    assert torch.equal(norm, ref_norm)
    for p, r in zip(params, ref, strict=True):
        assert torch.equal(p.grad, r.grad)


@pytest.mark.parametrize("foreach", [None, False, True])
def test_clamp_equals_clip_grad_value(foreach):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in _grads(torch.float32)]
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in _grads(torch.float32)]
    for p, r, g in zip(params, ref, _grads(torch.float32, scale=2.0), strict=True):
        p.grad, r.grad = g.clone(), g.clone()
    F.clamp_([p.grad for p in params], 0.7, foreach=foreach)
    torch.nn.utils.clip_grad_value_(ref, 0.7, foreach=foreach)
    for p, r in zip(params, ref, strict=True):
        assert torch.equal(p.grad, r.grad)


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


# -- NormBatches: batched norms of many small CPU tensors ------------------------------


@st.composite
def small_layouts(draw):
    """Many tensors in a few repeated shapes (some big, empty or 0-dim), shuffled."""
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    kinds = draw(
        st.lists(
            st.lists(st.integers(0, 70), min_size=0, max_size=3).map(tuple),
            min_size=1,
            max_size=4,
        )
    )
    counts = draw(st.lists(st.integers(1, 12), min_size=len(kinds), max_size=len(kinds)))
    shapes = [s for s, n in zip(kinds, counts, strict=True) for _ in range(n)]
    shapes += [(3000,)] * draw(st.integers(0, 5))  # above max_numel: never batched
    order = draw(st.permutations(range(len(shapes))))
    g = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    return [
        (scale * torch.randn(shapes[i], generator=g, dtype=torch.float64)).to(dtype)
        for i in order
    ]


@given(tensors=small_layouts(), norm_type=st.sampled_from(NORM_TYPES))
def test_norm_batches_give_the_same_bits(tensors, norm_type):
    batches = F.NormBatches(tensors)
    got = F.tensor_norms(tensors, norm_type, batches=batches)
    want = F.tensor_norms(tensors, norm_type)
    assert torch.equal(got, want)
    if not math.isinf(norm_type) or all(t.numel() for t in tensors):
        ref = torch.nn.utils.get_total_norm(tensors, norm_type)
        assert torch.equal(F.total_norm(tensors, norm_type, batches=batches), ref)
    # a second step (buffers reused) with new values
    fresh = [2.5 * t for t in tensors]
    assert torch.equal(
        F.tensor_norms(fresh, norm_type, batches=batches), F.tensor_norms(fresh, norm_type)
    )


def test_norm_batches_batch_only_what_pays():
    repeated = [torch.randn(8, 8) for _ in range(10)]
    assert F.NormBatches(repeated).active
    assert not F.NormBatches(repeated[:3]).active  # too few of one shape
    assert not F.NormBatches([torch.randn(4096) for _ in range(10)]).active  # too big
    assert not F.NormBatches([torch.randn(8, 8).t() for _ in range(10)]).active
    mixed = [*repeated, torch.randn(8, 8, dtype=torch.float64)]
    assert not F.NormBatches(mixed).active  # one dtype only
    meta = [torch.empty(8, 8, device="meta") for _ in range(10)]
    assert not F.NormBatches(meta).active


def test_norm_batches_ignored_where_they_do_not_apply():
    tensors = [torch.randn(8) for _ in range(10)]
    batches = F.NormBatches(tensors)
    assert batches.applies(tensors)
    assert not batches.applies(tensors[:9])  # another layout: the plain path
    assert torch.equal(
        F.total_norm(tensors[:9], batches=batches), F.total_norm(tensors[:9])
    )
    meta = [torch.empty(8, device="meta") for _ in range(10)]
    assert not batches.applies(meta)
    assert F.total_norm(meta, batches=batches).device.type == "meta"


def test_norm_batches_keep_nonfinite_entries():
    tensors = [torch.randn(8) for _ in range(10)]
    tensors[3][2] = math.nan
    tensors[7][0] = math.inf
    norms = F.tensor_norms(tensors, batches=F.NormBatches(tensors))
    assert math.isnan(norms[3])
    assert math.isinf(norms[7])
    assert torch.isfinite(norms[[0, 1, 2, 4, 5, 6, 8, 9]]).all()


# -- NormBatches(exact=False): dot products for large tensors ---------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("numel", [1 << 16, 300_001, 2_000_000])
def test_dot_norms_are_accurate(dtype, numel):
    g = torch.Generator().manual_seed(numel)
    tensors = [torch.randn(numel, generator=g, dtype=dtype) * s for s in (1e-3, 1.0, 7.0)]
    tensors += [torch.randn(12, generator=g, dtype=dtype) for _ in range(5)]
    fast = F.NormBatches(tensors, exact=False)
    assert fast._dots == [0, 1, 2]  # the large ones, and only them
    got = F.tensor_norms(tensors, batches=fast)
    truth = torch.stack([t.double().square().sum().sqrt() for t in tensors])
    # float32: 1e-5 relative (BLAS splits the sum over lanes and threads); torch's own
    # one-accumulator CPU norm is further off on large tensors (0.4% on 50M entries)
    tol = 1e-5 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(got.double(), truth, rtol=tol, atol=0)
    torch_error = (F.tensor_norms(tensors).double() - truth).abs().max()
    assert (got.double() - truth).abs().max() <= torch_error + tol * truth.max()
    total = F.total_norm(tensors, batches=fast)
    torch.testing.assert_close(total.double(), truth.norm(), rtol=tol, atol=0)


def test_dot_norms_keep_nonfinite_and_overflow():
    tensors = [torch.randn(1 << 16) for _ in range(3)]
    tensors[0][5] = math.nan
    tensors[1][7] = -math.inf
    tensors[2][9] = 3e38  # its square overflows float32, as in torch's norm
    got = F.tensor_norms(tensors, batches=F.NormBatches(tensors, exact=False))
    assert math.isnan(got[0])
    assert math.isinf(got[1])
    assert math.isinf(got[2])
    assert math.isinf(F.tensor_norms(tensors)[2])


def test_dot_norms_only_for_p2_and_not_when_exact():
    tensors = [torch.randn(1 << 16) for _ in range(2)]
    assert not F.NormBatches(tensors).active  # exact: nothing to batch
    fast = F.NormBatches(tensors, exact=False)
    assert fast.active
    for p in (1.0, 3.0, math.inf):  # other norms keep torch's kernels and bits
        assert torch.equal(
            F.tensor_norms(tensors, p, batches=fast), F.tensor_norms(tensors, p)
        )
    half = [t.half() for t in tensors]  # no dot products below float32
    assert not F.NormBatches(half, exact=False).active


@given(
    count=st.integers(1, 40),
    shape=st.lists(st.integers(1, 9), min_size=0, max_size=3).map(tuple),
    scratch_numel=st.integers(1, 400),
    norm_type=st.sampled_from(NORM_TYPES),
)
def test_stacking_a_chunk_at_a_time_gives_the_same_bits(
    count, shape, scratch_numel, norm_type
):
    g = torch.Generator().manual_seed(count)
    tensors = [torch.randn(shape, generator=g) for _ in range(count)]
    numel = tensors[0].numel()
    scratch = torch.empty(max(scratch_numel, numel))  # forces several chunks
    whole = torch.linalg.vector_norm(torch.stack(tensors).view(count, -1), norm_type, dim=1)
    got = F._stacked_norms(tensors, norm_type, None, False, scratch)
    assert torch.equal(got, whole)
    if len(shape) >= 2:  # AGC's unit norms: rows along dim 0 of each tensor
        dims = tuple(range(2, len(shape) + 1))
        rows = torch.linalg.vector_norm(
            torch.stack(tensors), norm_type, dim=dims, keepdim=True
        )
        assert torch.equal(F._stacked_norms(tensors, norm_type, dims, True, scratch), rows)
