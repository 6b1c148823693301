import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import clipopt
from clipopt import ClipInputs, NormClip, ValueClip
from clipopt.strategies import clip_gradients
from tests.sync import no_host_to_device, no_tensors_from_host_data

BAD_THRESHOLDS = [
    (0, ValueError, "must be > 0, got 0"),
    (-1.0, ValueError, "must be > 0, got -1.0"),
    (math.nan, ValueError, "must be a number > 0, got nan"),
    (-math.inf, ValueError, "must be > 0, got -inf"),
    (True, TypeError, "must be a real number, got True"),
    ("1.0", TypeError, "must be a real number, got '1.0'"),
    (None, TypeError, "must be a real number, got None"),
    (torch.tensor(1.0), TypeError, "must be a real number"),
]


@pytest.mark.parametrize(("value", "error", "message"), BAD_THRESHOLDS)
def test_norm_rejects_bad_max_norm(value, error, message):
    with pytest.raises(error, match=f"max_norm {message}"):
        NormClip(max_norm=value)


@pytest.mark.parametrize(("value", "error", "message"), BAD_THRESHOLDS)
def test_value_rejects_bad_clip_value(value, error, message):
    with pytest.raises(error, match=f"clip_value {message}"):
        ValueClip(clip_value=value)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0, ValueError),
        (-2, ValueError),
        (math.nan, ValueError),
        (False, TypeError),
        ("two", TypeError),
    ],
)
def test_norm_rejects_bad_norm_type(value, error):
    with pytest.raises(error, match="norm_type"):
        NormClip(norm_type=value)


@pytest.mark.parametrize("foreach", [1, "yes"])
def test_foreach_must_be_bool_or_none(foreach):
    with pytest.raises(TypeError, match="foreach must be None or a bool"):
        NormClip(foreach=foreach)


def test_valid_values_accepted():
    assert NormClip(max_norm=math.inf).max_norm == math.inf
    assert NormClip(norm_type="inf").norm_type == math.inf
    assert NormClip(max_norm=2, norm_type=1).max_norm == 2.0
    assert ValueClip(clip_value=math.inf).clip_value == math.inf


def _inputs(*grads):
    params = [torch.zeros_like(g) for g in grads]
    return ClipInputs(params, list(grads), 0)


def test_three_regimes_norm():
    # all clipped, none clipped, and the exact coefficient in between
    strategy = NormClip(max_norm=1.0)
    inputs = _inputs(torch.tensor([3.0, 4.0]))
    measured, result = clip_gradients(strategy, inputs)
    assert measured.norm == 5.0
    assert result.clipped
    assert torch.allclose(result.coef, torch.tensor(1.0 / (5.0 + 1e-6)))
    assert result.threshold == 1.0
    inputs = _inputs(torch.tensor([0.3, 0.4]))
    _, result = clip_gradients(strategy, inputs)
    assert not result.clipped
    assert result.coef == 1.0
    assert torch.equal(inputs.grads[0], torch.tensor([0.3, 0.4]))


@pytest.mark.parametrize("big", [3e30, 3e3])  # 3e30: the fp32 norm overflows to inf
def test_inf_threshold_never_clips(big):
    for strategy in (NormClip(max_norm=math.inf), ValueClip(clip_value=math.inf)):
        inputs = _inputs(torch.tensor([big, -big]))
        _, result = clip_gradients(strategy, inputs)
        assert not result.clipped
        assert result.coef == 1.0
        assert torch.equal(inputs.grads[0], torch.tensor([big, -big]))


def test_value_stats():
    strategy = ValueClip(clip_value=0.5)
    inputs = _inputs(torch.tensor([-2.0, 0.25]), torch.tensor([1.0]))
    measured, result = clip_gradients(strategy, inputs)
    assert measured.norm == 2.0  # largest absolute entry
    assert result.clipped
    assert result.coef == 0.25
    assert torch.equal(inputs.grads[0], torch.tensor([-0.5, 0.25]))


def test_stateless_strategies_have_empty_state():
    for strategy in (NormClip(), ValueClip(1.0)):
        assert strategy.state_dict() == {}
        strategy.load_state_dict({})
        with pytest.raises(ValueError, match="has no state"):
            strategy.load_state_dict({"history": torch.zeros(3)})


def test_repr_shows_hyperparameters():
    assert (
        repr(NormClip(0.5, 1.0))
        == "NormClip(max_norm=0.5, norm_type=1.0, scope='global', foreach=None)"
    )
    assert repr(ValueClip(2)) == "ValueClip(clip_value=2.0, scope='global', foreach=None)"


def test_registry_names():
    assert NormClip.name == "norm"
    assert ValueClip.name == "value"
    assert isinstance(clipopt.get_strategy("value", clip_value=1.0), ValueClip)


PER_TENSOR = {
    "adagc": lambda: clipopt.AdaGC(warmup_steps=1),
    "norm-tensor": lambda: NormClip(0.1, scope="tensor"),
    "norm-group": lambda: NormClip(0.1, scope="group"),
    "agc": lambda: clipopt.AGC(0.01),
    "value-group": lambda: ValueClip(0.01, scope="group"),
}


def _moe_grads(params, step):
    """A different set of gradients each step, as a mixture of experts has."""
    for i, p in enumerate(params):
        p.grad = None if (i + step) % 3 == 0 else torch.empty_like(p).normal_()


@pytest.mark.parametrize("name", list(PER_TENSOR))
def test_missing_gradients_copy_nothing_from_the_host(name):
    """A gradient set that changes every step builds no index on the host (each one
    would be a host-to-device copy, which synchronises a GPU)."""
    with FakeTensorMode():
        params = [
            torch.nn.Parameter(torch.empty(s, device="cuda"))
            for s in [(4, 3), (3,), (4, 3), (3,), (2, 2), (5,)]
        ]
        opt = clipopt.ClippedOptimizer(
            torch.optim.Adam(params, lr=0.1, fused=True), PER_TENSOR[name]()
        )
        for step in range(6):
            _moe_grads(params, step)
            if step == 0:
                opt.step()  # the first step may make state and counters
                continue
            with no_host_to_device():
                opt.step()
        assert opt.last_stats.norm.device.type == "cuda"


@pytest.mark.parametrize("name", list(PER_TENSOR))
def test_process_group_with_missing_gradients_builds_no_index(tmp_path, name):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
        opt = clipopt.ClippedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            PER_TENSOR[name](),
            process_group=dist.group.WORLD,
        )
        params = list(model.parameters())
        for step in range(5):
            _moe_grads(params, step)
            expected = torch.stack([p.grad.norm() for p in params if p.grad is not None])
            if step == 0:
                opt.step()
                continue
            with no_tensors_from_host_data():
                opt.step()
            if name != "value-group":
                torch.testing.assert_close(opt.last_stats.norm, expected.norm())
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_group_scope_under_a_process_group_with_an_empty_param_group(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        results = []
        for group in (None, dist.group.WORLD):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
            sgd = torch.optim.SGD(model[0].parameters(), lr=0.1)
            sgd.add_param_group({"params": []})
            sgd.add_param_group({"params": list(model[1].parameters())})
            strategy = NormClip(0.1, float("inf"), scope="group")
            opt = clipopt.ClippedOptimizer(sgd, strategy, process_group=group)
            model(
                torch.randn(4, 3, generator=torch.Generator().manual_seed(1))
            ).sum().backward()
            opt.step()
            results.append(
                (opt.last_stats.to_dict(), [p.detach().clone() for p in model.parameters()])
            )
    finally:
        dist.destroy_process_group()
    (stats, params), (group_stats, group_params) = results
    assert stats == group_stats
    assert stats["clipped"] == 1.0
    assert all(torch.equal(a, b) for a, b in zip(params, group_params, strict=True))


@pytest.mark.parametrize(
    "make",
    [
        lambda: clipopt.AdaGC(warmup_steps=0),
        lambda: NormClip(0.1, scope="tensor"),
        lambda: clipopt.AGC(0.01),
        lambda: clipopt.PercentileClip(50, window=4),
    ],
    ids=["adagc", "norm-tensor", "agc", "percentile"],
)
def test_strategies_hold_no_parameters_or_gradients(make):
    """Per-layout plans live in the engine: a strategy's copy or pickle stays small."""
    import copy
    import pickle

    model = torch.nn.Linear(300, 100)
    strategy = make()
    opt = clipopt.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), strategy)
    for _ in range(2):
        model(torch.randn(2, 300)).sum().backward()
        opt.step()
    assert len(pickle.dumps(strategy)) < 20_000  # the weight alone is 120 kB
    copied = copy.deepcopy(strategy)
    assert copied.state_dict().keys() == strategy.state_dict().keys()
    copied_opt = clipopt.ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), copied
    )
    del opt
    model(torch.randn(2, 300)).sum().backward()
    copied_opt.step()
    assert torch.isfinite(copied_opt.last_stats.norm)
