"""What every strategy promises: sync-free steps, exact resume, state that ignores zero and
non-finite steps, and torch.compile(fullgraph=True)."""

import copy
import io
import math

import pytest
import torch

import clipopt
from clipopt import (
    AGC,
    AdaGC,
    Chain,
    ClipInputs,
    ClippedOptimizer,
    NormClip,
    PercentileClip,
    RelativeClip,
    ValueClip,
    ZScoreClip,
)
from clipopt.strategies import clip_gradients
from tests.conftest import batches, loss_of
from tests.test_optimizer import _model

FACTORIES = {
    "norm": lambda: NormClip(0.5),
    "norm-group": lambda: NormClip(0.5, scope="group"),
    "norm-tensor": lambda: NormClip(0.3, scope="tensor"),
    "norm-schedule": lambda: NormClip(lambda step: 0.2 + 0.1 * step),
    "value": lambda: ValueClip(0.05),
    "value-group": lambda: ValueClip(0.05, scope="group"),
    "percentile": lambda: PercentileClip(50, window=4),
    "percentile-past": lambda: PercentileClip(50, window=4, include_current=False),
    "zscore": lambda: ZScoreClip(warmup_steps=3, z_thresh=1.0),
    "zscore-capped": lambda: ZScoreClip(warmup_steps=3, max_norm=0.5, mode="percentile"),
    "adagc": lambda: AdaGC(warmup_steps=2, max_norm=0.5),
    "agc": lambda: AGC(0.05),
    "relative": lambda: RelativeClip(ramp=3),
    "relative-now": lambda: RelativeClip(ratio=0.9, ramp=0),
    "chain": lambda: Chain(ValueClip(0.5), PercentileClip(50, window=4)),
}
BUILTIN_NAMES = {"norm", "value", "percentile", "zscore", "adagc", "agc", "relative"}


def test_every_builtin_strategy_is_covered():
    assert set(clipopt.available_strategies()) >= BUILTIN_NAMES
    covered = {type(f()).name for f in FACTORIES.values()}
    assert covered >= BUILTIN_NAMES


def _wrap(factory, model, nonfinite="skip"):
    return ClippedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=0.01), factory(), nonfinite=nonfinite
    )


def _step(model, opt, batch, poison=None):
    opt.zero_grad()
    loss_of(model, batch).backward()
    if poison is not None:
        with torch.no_grad():
            model[0].weight.grad[0, 0] = poison
    opt.step()


def _same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _same_state(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]) or (
                a[k].is_floating_point()
                and torch.equal(a[k].isnan(), b[k].isnan())
                and torch.equal(a[k].nan_to_num(), b[k].nan_to_num())
            ), k
        else:
            assert a[k] == b[k], k


@pytest.mark.parametrize("nonfinite", ["zero", "propagate"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_step_is_sync_free_on_meta(name, nonfinite):
    params = [
        torch.nn.Parameter(torch.empty(s, device="meta")) for s in [(4, 3), (3,), (4, 3)]
    ]
    opt = ClippedOptimizer(
        torch.optim.AdamW(params, lr=0.1, foreach=True),
        FACTORIES[name](),
        nonfinite=nonfinite,
    )
    for _ in range(3):
        for p in params:
            p.grad = torch.empty_like(p)
        opt.step()
    assert all(t.device.type == "meta" for t in opt.last_stats)
    for value in _tensors(opt.strategy.state_dict()):
        assert value.device.type == "meta"


def _tensors(state):
    for v in state.values():
        if isinstance(v, dict):
            yield from _tensors(v)
        elif isinstance(v, torch.Tensor):
            yield v


@pytest.mark.parametrize("name", list(FACTORIES))
def test_resume_is_bitwise_identical(name):
    data = batches(10)
    model_a = _model()
    opt_a = _wrap(FACTORIES[name], model_a)
    for batch in data:
        _step(model_a, opt_a, batch)

    model_b = _model()
    opt_b = _wrap(FACTORIES[name], model_b)
    for batch in data[:5]:
        _step(model_b, opt_b, batch)
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    model_c = _model()
    model_c.load_state_dict(ckpt["model"])
    opt_c = _wrap(FACTORIES[name], model_c)
    opt_c.load_state_dict(ckpt["opt"])
    for batch in data[5:]:
        _step(model_c, opt_c, batch)
    for a, c in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert torch.equal(a, c)
    _same_state(opt_a.strategy.state_dict(), opt_c.strategy.state_dict())
    assert opt_a.counts() == opt_c.counts()


@pytest.mark.parametrize("name", list(FACTORIES))
def test_all_zero_gradients_leave_state_unchanged(name):
    model = _model()
    opt = _wrap(FACTORIES[name], model)
    for batch in batches(4):
        _step(model, opt, batch)
    before = copy.deepcopy(opt.strategy.state_dict())
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    _same_state(before, opt.strategy.state_dict())


@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("name", list(FACTORIES))
def test_nonfinite_step_leaves_state_as_if_it_never_happened(name, nonfinite):
    data = batches(6)
    model_a, model_b = _model(), _model()
    opt_a = _wrap(FACTORIES[name], model_a, nonfinite)
    opt_b = _wrap(FACTORIES[name], model_b, nonfinite)
    for i, batch in enumerate(data):
        if i == 3:
            state = copy.deepcopy(opt_b.strategy.state_dict())
            _step(model_b, opt_b, batch, poison=math.nan)
            _same_state(state, opt_b.strategy.state_dict())
            if nonfinite == "propagate":
                return  # the parameters are NaN now, by request
        _step(model_a, opt_a, batch)
        _step(model_b, opt_b, batch)
    if name != "norm-schedule":  # a schedule counts the skipped step, as LR schedulers
        for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
            assert torch.equal(a, b)
    _same_state(opt_a.strategy.state_dict(), opt_b.strategy.state_dict())


@pytest.mark.parametrize("name", list(FACTORIES))
def test_clipping_is_active_and_stats_are_sane(name):
    model = _model()
    opt = _wrap(FACTORIES[name], model)
    clipped = 0
    for batch in batches(12):
        _step(model, opt, batch)
        stats = opt.last_stats.to_dict()
        assert 0.0 <= stats["coef"] <= 1.0 + 1e-6
        assert stats["norm"] > 0
        clipped += stats["clipped"]
    assert clipped > 0
    assert opt.counts()["clipped_steps"] == clipped


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    ["norm", "value", "percentile", "zscore", "adagc", "agc", "relative", "chain"],
)
def test_compiles_fullgraph(name):
    torch._dynamo.reset()
    strategy = FACTORIES[name]()
    reference_strategy = FACTORIES[name]()
    params = [torch.randn(4, 3), torch.randn(3), torch.randn(4, 3)]

    def apply(grads, step):
        measured, result = clip_gradients(strategy, ClipInputs(params, grads, step))
        return measured.norm, result.coef

    compiled = torch.compile(apply, fullgraph=True)
    g = torch.Generator().manual_seed(0)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=g) * (1 + 5 * step) for p in params]
        expected = [t.clone() for t in grads]
        norm, coef = compiled(grads, 0)
        ref_measured, ref = clip_gradients(
            reference_strategy, ClipInputs(params, expected, 0)
        )
        torch.testing.assert_close(norm, ref_measured.norm)
        torch.testing.assert_close(coef, ref.coef)
        for a, b in zip(grads, expected, strict=True):
            torch.testing.assert_close(a, b)


def test_only_torch_twins_demand_exact_norms():
    assert clipopt.NormClip().exact_norms
    assert clipopt.ValueClip(1.0).exact_norms
    for name in ("percentile", "zscore", "adagc", "agc"):
        assert not clipopt.get_strategy(name).exact_norms
    assert not clipopt.Chain("zscore", "agc").exact_norms
    assert clipopt.Chain("zscore", "norm").exact_norms


def test_capabilities_are_attributes_the_engine_reads():
    """single_factor decides GradScaler's one pass; honours_skip the kernel skip."""
    assert clipopt.NormClip().single_factor
    assert not clipopt.NormClip(scope="tensor").single_factor
    assert clipopt.PercentileClip().single_factor
    assert clipopt.ZScoreClip().single_factor
    for name in ("value", "adagc", "agc"):
        assert not clipopt.get_strategy(name, **_ARGS.get(name, {})).single_factor
    assert not Chain(ValueClip(1.0), "norm").single_factor  # norm sees clamped grads
    assert Chain("norm").single_factor
    for name in BUILTIN_NAMES:
        assert clipopt.get_strategy(name, **_ARGS.get(name, {})).honours_skip
    assert not clipopt.ClipStrategy.honours_skip  # a user's strategy: the host decides
    assert clipopt.NormClip(scope="group").group_keys == ("clipopt_max_norm",)
    assert Chain(ValueClip(1.0, scope="group"), "norm").group_keys == (
        "clipopt_clip_value",
    )


_ARGS = {"value": {"clip_value": 1.0}}
