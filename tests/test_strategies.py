import math
from unittest import mock

import pytest
import torch

import clipopt
from clipopt import ClipInputs, NormClip, ValueClip

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
    norm = strategy.measure(inputs)
    result = strategy.clip_(inputs, norm)
    assert norm == 5.0
    assert result.clipped
    assert torch.allclose(result.coef, torch.tensor(1.0 / (5.0 + 1e-6)))
    assert result.threshold == 1.0
    inputs = _inputs(torch.tensor([0.3, 0.4]))
    result = strategy.clip_(inputs, strategy.measure(inputs))
    assert not result.clipped
    assert result.coef == 1.0
    assert torch.equal(inputs.grads[0], torch.tensor([0.3, 0.4]))


@pytest.mark.parametrize("big", [3e30, 3e3])  # 3e30: the fp32 norm overflows to inf
def test_inf_threshold_never_clips(big):
    for strategy in (NormClip(max_norm=math.inf), ValueClip(clip_value=math.inf)):
        inputs = _inputs(torch.tensor([big, -big]))
        result = strategy.clip_(inputs, strategy.measure(inputs))
        assert not result.clipped
        assert result.coef == 1.0
        assert torch.equal(inputs.grads[0], torch.tensor([big, -big]))


def test_value_stats():
    strategy = ValueClip(clip_value=0.5)
    inputs = _inputs(torch.tensor([-2.0, 0.25]), torch.tensor([1.0]))
    norm = strategy.measure(inputs)
    result = strategy.clip_(inputs, norm)
    assert norm == 2.0  # largest absolute entry
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


def _positions_built(opt, model):
    """Step 4 times (a gradient missing in the last 2); return the positions built."""
    built = []
    original = torch.tensor

    def counting(*args, **kwargs):
        if kwargs.get("dtype") is torch.int64 and isinstance(args[0], tuple):
            built.append(args[0])
        return original(*args, **kwargs)

    x = torch.randn(4, 3)
    with mock.patch.object(torch, "tensor", counting):
        for step in range(4):
            opt.zero_grad()
            model(x).sum().backward()
            if step >= 2:  # a gradient goes missing: a new list of positions each step
                model[0].bias.grad = None
            expected = torch.stack(
                [p.grad.norm() for p in model.parameters() if p.grad is not None]
            )
            opt.step()
            assert torch.allclose(opt.last_stats.norm, expected.norm())
    return built


def test_positions_tensor_is_built_once_per_layout():
    """A new positions tensor (a host-to-device copy on a GPU) only when they change."""
    from clipopt._strategies import _Positions

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
    strategy = clipopt.AdaGC(warmup_steps=0)
    opt = clipopt.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), strategy)
    assert _positions_built(opt, model) == [(0, 1, 2, 3), (0, 2, 3)]
    positions = _Positions()
    inputs = clipopt.ClipInputs([torch.ones(1)] * 2, [torch.ones(1)] * 2, 0, [0, 2])
    first = positions.get(inputs, torch.device("cpu"))
    again = clipopt.ClipInputs([torch.ones(1)] * 2, [torch.ones(1)] * 2, 0, [0, 2])
    assert positions.get(again, torch.device("cpu")) is first  # equal positions: kept
    other = clipopt.ClipInputs([torch.ones(1)] * 2, [torch.ones(1)] * 2, 0, [1, 2])
    assert positions.get(other, torch.device("cpu")).tolist() == [1, 2]


def test_per_tensor_norms_under_a_process_group_build_positions_once(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Linear(2, 2))
        opt = clipopt.ClippedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            NormClip(0.1, scope="tensor"),
            process_group=dist.group.WORLD,
        )
        built = _positions_built(opt, model)
    finally:
        dist.destroy_process_group()
    assert built == [(0, 1, 2, 3), (0, 2, 3)]


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
def test_copies_of_strategies_carry_no_parameters_or_gradients(make):
    import copy
    import pickle

    model = torch.nn.Linear(300, 100)
    strategy = make()
    opt = clipopt.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), strategy)
    for _ in range(2):
        model(torch.randn(2, 300)).sum().backward()
        opt.step()
    # a measure without its clip_ (a skipped step) leaves the gradients in the caches
    grads = [p.grad for p in model.parameters()]
    strategy.measure(ClipInputs(list(model.parameters()), grads, 2))
    assert len(pickle.dumps(strategy)) < 20_000  # the weight alone is 120 kB
    copied = copy.deepcopy(strategy)
    assert not [k for k in vars(copied) if k.startswith("_cache")]
    assert copied.state_dict().keys() == strategy.state_dict().keys()
    opt.strategy = copied  # and the copy still clips: its caches are rebuilt
    model(torch.randn(2, 300)).sum().backward()
    opt.step()
    assert torch.isfinite(opt.last_stats.norm)
