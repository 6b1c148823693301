"""clipopt's own norm machinery (``clipopt._norms``): batched small norms, dot norms."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from clipopt import _norms as N
from clipopt import functional as F

NORM_TYPES = [0.5, 1.0, 1.5, 2.0, 4.0, math.inf]


# -- NormPlan: batched norms of many small CPU tensors ------------------------------


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
    batches = N.NormPlan(tensors, min_count=4)
    got = N.tensor_norms(tensors, norm_type, plan=batches)
    want = F.tensor_norms(tensors, norm_type)
    assert torch.equal(got, want)
    if not math.isinf(norm_type) or all(t.numel() for t in tensors):
        ref = torch.nn.utils.get_total_norm(tensors, norm_type)
        assert torch.equal(N.total_norm(tensors, norm_type, plan=batches), ref)
    # a second step (buffers reused) with new values
    fresh = [2.5 * t for t in tensors]
    assert torch.equal(
        N.tensor_norms(fresh, norm_type, plan=batches), F.tensor_norms(fresh, norm_type)
    )


def test_norm_batches_batch_only_what_pays():
    repeated = [torch.randn(8, 8) for _ in range(10)]
    assert N.NormPlan(repeated, min_count=4).active
    assert not N.NormPlan(repeated).active  # 10 of a shape: not worth stacking
    assert N.NormPlan(repeated * 2).active  # 20 are
    assert not N.NormPlan(repeated[:3], min_count=4).active  # too few of one shape
    assert not N.NormPlan([torch.randn(4096) for _ in range(10)]).active  # too big
    assert not N.NormPlan([torch.randn(8, 8).t() for _ in range(10)]).active
    mixed = [*repeated, torch.randn(8, 8, dtype=torch.float64)]
    assert not N.NormPlan(mixed).active  # one dtype only
    meta = [torch.empty(8, 8, device="meta") for _ in range(10)]
    assert not N.NormPlan(meta).active


def test_norm_batches_ignored_where_they_do_not_apply():
    tensors = [torch.randn(8) for _ in range(10)]
    batches = N.NormPlan(tensors, min_count=4)
    assert batches.applies(tensors)
    assert not batches.applies(tensors[:9])  # another layout: the plain path
    assert torch.equal(N.total_norm(tensors[:9], plan=batches), F.total_norm(tensors[:9]))
    meta = [torch.empty(8, device="meta") for _ in range(10)]
    assert not batches.applies(meta)
    assert N.total_norm(meta, plan=batches).device.type == "meta"


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_norm_batches_keep_nonfinite_entries(norm_type):
    tensors = [torch.randn(8) for _ in range(10)]
    tensors[3][2] = math.nan
    tensors[7][0] = -math.inf
    norms = N.tensor_norms(tensors, norm_type, plan=N.NormPlan(tensors, min_count=4))
    assert math.isnan(norms[3])
    assert math.isinf(norms[7])
    assert torch.isfinite(norms[[0, 1, 2, 4, 5, 6, 8, 9]]).all()


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_norm_batches_of_complex_tensors_equal_torch(norm_type):
    tensors = [torch.randn(4, 4, dtype=torch.complex64) for _ in range(20)]
    copies = [t.clone() for t in tensors]
    got = N.tensor_norms(tensors, norm_type, plan=N.NormPlan(tensors, min_count=4))
    want = torch.stack([torch.linalg.vector_norm(t, norm_type) for t in tensors])
    assert torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip(tensors, copies, strict=True))


# -- NormPlan(exact=False): dot products for large tensors ---------------------------


DOT_INPUTS = {
    "normal": lambda n, g: torch.randn(n, generator=g),
    "offset": lambda n, g: torch.randn(n, generator=g) + 3.0,  # errors do not cancel
    "uniform": lambda n, g: torch.rand(n, generator=g),
    "constant": lambda n, g: torch.full((n,), 0.3),  # the worst found: no cancelling
    "tiny": lambda n, g: 1e-15 * torch.randn(n, generator=g),  # squares near 1e-36
}
#: The tested bound on float32 (relative to a float64 reference), on any thread count.
#: Found: 1.7e-5 on constant entries, 1e-8 on random ones; torch's own CPU norm is
#: 1.4e-3 off on 25M standard-normal entries. Entries whose squares underflow float32
#: (|x| < 1e-19) are lost, as in torch's norm.
DOT_RTOL = 3e-5


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("kind", list(DOT_INPUTS))
@pytest.mark.parametrize("numel", [1 << 16, 300_001, 2_000_000, 20_000_000])
def test_dot_norms_are_within_the_bound_of_the_exact_norm(threads, kind, numel):
    """The guarantee: float32 2-norms from dot products are within ``DOT_RTOL`` of a
    float64 reference, on one thread and on several, for any size."""
    g = torch.Generator().manual_seed(numel)
    tensors = [DOT_INPUTS[kind](numel, g) * s for s in (1e-3, 7.0)]
    tensors += [torch.randn(12, generator=g) for _ in range(5)]
    fast = N.NormPlan(tensors, exact=False)
    assert fast.dots == [0, 1]  # the large ones, and only them
    got = N.tensor_norms(tensors, plan=fast).double()
    truth = torch.stack([t.double().square().sum().sqrt() for t in tensors])
    torch.testing.assert_close(got, truth, rtol=DOT_RTOL, atol=0)
    total = N.total_norm(tensors, plan=fast).double()
    torch.testing.assert_close(total, truth.norm(), rtol=DOT_RTOL, atol=0)


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
def test_dot_norms_of_float64_are_exact_to_rounding(threads):
    g = torch.Generator().manual_seed(3)
    tensors = [torch.randn(2_000_000, generator=g, dtype=torch.float64) for _ in range(2)]
    got = N.tensor_norms(tensors, plan=N.NormPlan(tensors, exact=False))
    truth = torch.stack([t.square().sum().sqrt() for t in tensors])
    torch.testing.assert_close(got, truth, rtol=1e-13, atol=0)


def test_dot_norms_keep_nonfinite_and_overflow():
    tensors = [torch.randn(1 << 16) for _ in range(3)]
    tensors[0][5] = math.nan
    tensors[1][7] = -math.inf
    tensors[2][9] = 3e38  # its square overflows float32, as in torch's norm
    got = N.tensor_norms(tensors, plan=N.NormPlan(tensors, exact=False))
    assert math.isnan(got[0])
    assert math.isinf(got[1])
    assert math.isinf(got[2])
    assert math.isinf(F.tensor_norms(tensors)[2])


def test_dot_norms_only_for_p2_and_not_when_exact():
    tensors = [torch.randn(1 << 16) for _ in range(2)]
    assert not N.NormPlan(tensors, min_count=4).active  # exact: nothing to batch
    fast = N.NormPlan(tensors, exact=False)
    assert fast.active
    for p in (1.0, 3.0, math.inf):  # other norms keep torch's kernels and bits
        assert torch.equal(
            N.tensor_norms(tensors, p, plan=fast), F.tensor_norms(tensors, p)
        )
    half = [t.half() for t in tensors]  # no dot products below float32
    assert not N.NormPlan(half, exact=False).active


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
    got = N.stacked_norms(tensors, norm_type, None, False, scratch)
    assert torch.equal(got, whole)
    if len(shape) >= 2:  # AGC's unit norms: rows along dim 0 of each tensor
        dims = tuple(range(2, len(shape) + 1))
        rows = torch.linalg.vector_norm(
            torch.stack(tensors), norm_type, dim=dims, keepdim=True
        )
        assert torch.equal(N.stacked_norms(tensors, norm_type, dims, True, scratch), rows)


@pytest.mark.parametrize("poison", [None, math.nan, math.inf, -math.inf])
def test_inf_norms_of_large_tensors_equal_torch(poison):
    """Large tensors take their largest entry from aminmax: the same values as torch."""
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(70_000, generator=g), torch.randn(3), torch.empty(0)]
    tensors.append(-5.0 * torch.rand(100_000, generator=g))  # the largest is negative
    if poison is not None:
        tensors[0][123] = poison
    got = N.inf_norms(tensors, None)
    want = [torch.linalg.vector_norm(t, math.inf) if t.numel() else 0.0 for t in tensors]
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=0, equal_nan=True)
    total = N.total_norm(tensors, math.inf)
    torch.testing.assert_close(total, got.amax(), rtol=0, atol=0, equal_nan=True)


@st.composite
def uniform_layouts(draw):
    """Tensors of one dtype: small, empty, 0-dim, non-contiguous, a few above the
    aminmax size, maybe two entries poisoned; in any order."""
    seed = draw(st.integers(0, 2**31 - 1))
    dtype = draw(
        st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16])
    )
    g = torch.Generator().manual_seed(seed)
    sizes = draw(
        st.lists(
            st.sampled_from([(), (0,), (1,), (7,), (5, 3), (40, 3), (70_000,), (300, 300)]),
            min_size=1,
            max_size=8,
        )
    )
    tensors = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in sizes]
    tensors = [t.t() if t.dim() == 2 else t for t in tensors]  # strided views too
    for _ in range(draw(st.integers(0, 2))):  # NaN next to inf, in different tensors too
        poison = draw(st.sampled_from([math.nan, math.inf, -math.inf, -6e4]))
        t = tensors[draw(st.integers(0, len(tensors) - 1))]
        if t.numel():
            t[tuple(draw(st.integers(0, n - 1)) for n in t.shape)] = poison
    return tensors


@given(tensors=uniform_layouts())
def test_uniform_inf_total_equals_torch(tensors):
    """The uniform inf-norm total (aminmax of the large, of the small copied together)
    is torch's total inf-norm bit for bit, NaN and inf included; 0 with no entries."""
    got = N.total_norm(tensors, math.inf, uniform=True)
    entries = [t for t in tensors if t.numel()]
    want = (
        torch.nn.utils.get_total_norm(entries, math.inf)
        if entries
        else torch.zeros((), dtype=tensors[0].dtype)
    )
    assert got.dtype == want.dtype
    assert got.shape == ()
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got.isnan(), N.total_norm(tensors, math.inf).isnan())
    # the engine passes its norm plan too: a maximum needs none, and the result is the same
    planned = N.total_norm(tensors, math.inf, uniform=True, plan=N.NormPlan(tensors))
    torch.testing.assert_close(planned, want, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("count", [N._FEW, N._FEW + 1, 300])
@pytest.mark.parametrize("poison", [None, math.nan, -math.inf])
def test_inf_total_of_many_tensors_equals_torch(count, poison):
    """Past ``_FEW`` tensors the inf-norm total takes the plan or foreach path: the same
    bits as torch either way, with and without the engine's plan."""
    g = torch.Generator().manual_seed(count)
    tensors = [torch.randn((40, 48) if i % 2 else (80,), generator=g) for i in range(count)]
    tensors.append(-3.0 * torch.rand(70_000, generator=g))  # one large tensor
    if poison is not None:
        tensors[count // 2][0] = poison
    want = torch.nn.utils.get_total_norm(tensors, math.inf)
    for plan in (None, N.NormPlan(tensors)):
        got = N.total_norm(tensors, math.inf, uniform=True, plan=plan)
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
