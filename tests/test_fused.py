"""The fused path: the clipping factor goes to the optimizer kernel as grad_scale."""

import contextlib
import copy
import math
from unittest import mock

import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import clipopt
import clipopt._apply
from clipopt import ClippedOptimizer
from tests.conftest import batches, loss_of
from tests.test_optimizer import _model, _train

FUSED = [
    pytest.param(torch.optim.Adam, {}, id="Adam"),
    pytest.param(torch.optim.AdamW, {}, id="AdamW"),
    pytest.param(torch.optim.SGD, {"momentum": 0.9}, id="SGD"),
    pytest.param(torch.optim.Adagrad, {}, id="Adagrad"),
]
SCALAR = {
    "norm": lambda: clipopt.NormClip(0.3),
    "percentile": lambda: clipopt.PercentileClip(50, window=8),
    "zscore": lambda: clipopt.ZScoreClip(warmup_steps=2, z_thresh=1.0),
    "relative": lambda: clipopt.RelativeClip(ramp=2),
}


class _SeparatePass(clipopt.Clipper):
    """An engine that applies every factor itself: the kernel gets no grad_scale."""

    fused = False


def _force_separate_pass(opt):
    opt.clipper.__class__ = _SeparatePass


@pytest.mark.parametrize("strategy", list(SCALAR))
@pytest.mark.parametrize(("cls", "kwargs"), FUSED)
def test_fused_equals_clip_then_step(cls, kwargs, strategy):
    model_a = _model()
    model_b = copy.deepcopy(model_a)
    fused = ClippedOptimizer(
        cls(model_a.parameters(), lr=0.01, fused=True, **kwargs), SCALAR[strategy]()
    )
    # reference: the same strategy clipping in a separate pass, then the same kernel
    separate = ClippedOptimizer(
        cls(model_b.parameters(), lr=0.01, fused=True, **kwargs), SCALAR[strategy]()
    )
    _force_separate_pass(separate)
    assert fused.clipper.fused
    assert fused.strategy.single_factor
    for batch in batches(8):
        for model, opt in ((model_a, fused), (model_b, separate)):
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()
        torch.testing.assert_close(fused.last_stats.coef, separate.last_stats.coef)
        for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))
            torch.testing.assert_close(
                a.grad, b.grad, rtol=1e-6, atol=1e-6 * float(b.grad.abs().max())
            )  # clipped grads
    assert fused.counts() == separate.counts()
    assert fused.counts()["clipped_steps"] > 0


@pytest.mark.parametrize(("cls", "kwargs"), FUSED)
def test_fused_skip_leaves_params_moments_and_step_untouched(cls, kwargs):
    model = _model()
    opt = ClippedOptimizer(cls(model.parameters(), lr=0.01, fused=True, **kwargs))
    data = batches(3)
    _train(model, opt, data[:2])
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.optimizer.state_dict()["state"])
    opt.zero_grad()
    loss_of(model, data[2]).backward()
    with torch.no_grad():
        model[0].weight.grad[0, 0] = math.nan
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    after = opt.optimizer.state_dict()["state"]
    for key, entries in state.items():
        for name, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after[key][name])), (
                name
            )
    assert opt.counts()["skipped_steps"] == 1
    assert bool(opt.last_stats.nonfinite)
    assert opt.last_stats.coef == 0


def _scaler_run(fused_wrapper, n=6, inf_at=(2,)):
    """Train with GradScaler; return params, scale history and clip norms."""
    torch.manual_seed(0)
    model = _model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2)
    if fused_wrapper:
        opt = ClippedOptimizer(
            torch.optim.AdamW(model.parameters(), lr=0.01, fused=True), "norm", max_norm=0.2
        )
        assert opt._step_supports_amp_scaling
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.01, fused=True)
    scales, norms = [], []
    for i, batch in enumerate(batches(n)):
        opt.zero_grad()
        scaler.scale(loss_of(model, batch)).backward()
        if i in inf_at:
            with torch.no_grad():
                model[2].bias.grad[0] = math.inf
        if fused_wrapper:
            scaler.step(opt)
            norms.append(float(opt.last_stats.norm))
        else:  # the documented recipe: unscale_, clip, step
            scaler.unscale_(opt)
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)))
            scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return [p.detach().clone() for p in model.parameters()], scales, norms


def test_one_pass_amp_equals_unscale_clip_step():
    params, scales, norms = _scaler_run(fused_wrapper=True)
    ref_params, ref_scales, ref_norms = _scaler_run(fused_wrapper=False)
    assert scales == ref_scales  # inf steps skipped and the scale updated the same way
    assert scales[2] == scales[1] / 2
    for i, (a, b) in enumerate(zip(norms, ref_norms, strict=True)):
        if i == 2:
            assert math.isinf(a)
            assert math.isinf(b)
        else:
            assert a == pytest.approx(b, rel=1e-6)
    for a, b in zip(params, ref_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_cpu_shortcut_skips_the_pass_only_on_cpu():
    """A result that clipped nothing, with a finite statistic, changes nothing: the CPU
    reads that for free and skips the pass; elsewhere the pass runs (no host read)."""
    apply = clipopt._apply.Applier()

    def run(grads, coef, norm):
        inputs = clipopt.ClipInputs(grads, grads, 0)
        result = clipopt.ClipResult(coef, coef, coef < 1, (clipopt.Scale(coef),))
        with _Counter() as counter:
            apply(inputs, result, norm)
        return any("mul" in op for op in counter.ops)

    grads = [torch.ones(3), torch.ones(2)]
    assert not run(grads, torch.tensor(1.0), torch.tensor(2.0))
    assert run(grads, torch.tensor(0.5), torch.tensor(2.0))
    # a non-finite statistic (nonfinite="propagate") scales as torch would
    assert run(grads, torch.tensor(1.0), torch.tensor(math.inf))
    meta = [torch.empty(3, device="meta")]
    one = torch.ones((), device="meta")
    assert run(meta, one, one)


# Strategies that scale by more than one factor: they clip in place, and the kernel only
# receives found_inf, so that "skip" needs no host read with them either.
PER_TENSOR = {
    "adagc": lambda: clipopt.AdaGC(warmup_steps=2, clip_ratio=1.01),
    "agc": lambda: clipopt.AGC(0.01),
    "value": lambda: clipopt.ValueClip(0.05),
    "norm per tensor": lambda: clipopt.NormClip(0.1, scope="tensor"),
    "chain": lambda: clipopt.Chain(clipopt.ValueClip(0.05), clipopt.NormClip(0.1)),
}
ON_FAKE_CUDA = {**SCALAR, **PER_TENSOR}


@pytest.mark.parametrize("strategy", list(ON_FAKE_CUDA))
@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW])
def test_fused_skip_step_has_no_host_read_on_fake_cuda(cls, strategy):
    with FakeTensorMode():
        params = [torch.nn.Parameter(torch.empty(s, device="cuda")) for s in [(4, 3), (3,)]]
        opt = ClippedOptimizer(
            cls(params, lr=0.1, fused=True), ON_FAKE_CUDA[strategy](), nonfinite="skip"
        )
        # single-factor strategies hand the factor over; the others only found_inf
        assert opt.strategy.single_factor == (strategy in SCALAR)
        for _ in range(3):
            for p in params:
                p.grad = torch.empty_like(p)
            opt.step()
        assert all(t.device.type == "cuda" for t in opt.last_stats)


@contextlib.contextmanager
def _device_path(enabled):
    """Spy on what fused kernels are handed; with ``enabled``, as on an accelerator.

    On the CPU the wrapper reads the non-finite flag on the host; pretending it cannot
    exercises the accelerator path (the kernel skips) with real values.
    """
    patch = mock.patch.object(clipopt._engine, "host_readable", return_value=False)
    spy = mock.patch.object(
        clipopt._optimizer, "hand_over", wraps=clipopt._optimizer.hand_over
    )
    with patch if enabled else contextlib.nullcontext(), spy as handed:
        yield handed


def _handed(spy):
    """What each step handed the kernel: (grad_scale, found_inf) per call."""
    return [clipopt.Handover(*c.args[1:]) for c in spy.call_args_list]


def _skip_run(cls, kwargs, factory, device_path, nan_at, bad):
    """Train 5 steps with a ``bad`` entry at step ``nan_at``; return model, opt, plans."""
    model = _model()
    opt = ClippedOptimizer(
        cls(model.parameters(), lr=0.01, fused=True, **kwargs), factory()
    )
    before = {}

    def snapshot():
        before["params"] = [p.detach().clone() for p in model.parameters()]
        before["state"] = copy.deepcopy(opt.optimizer.state_dict()["state"])
        before["strategy"] = copy.deepcopy(opt.strategy.state_dict())

    def check():
        assert all(
            torch.equal(a, b)
            for a, b in zip(before["params"], model.parameters(), strict=True)
        )
        # At the first step a fused Adam creates its state (zero moments) before its
        # kernel skips, and a strategy its fresh state: equivalent to none, as the
        # final comparison with the host's skip shows. Later, state must stay as it was.
        if before["state"]:
            _assert_same_state(before["state"], opt.optimizer.state_dict()["state"])
        if _holds_tensors(before["strategy"]):
            _assert_same_state(before["strategy"], opt.strategy.state_dict())
        assert bool(opt.last_stats.nonfinite)
        assert opt.last_stats.coef == 0
        assert not bool(opt.last_stats.clipped)

    with _device_path(device_path) as handed:
        _train_with_bad(model, opt, 5, bad, at=nan_at, before=snapshot, after=check)
    return model, opt, _handed(handed)


def _holds_tensors(state):
    if isinstance(state, dict):
        return any(_holds_tensors(v) for v in state.values())
    return isinstance(state, torch.Tensor)


def _assert_same_state(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same_state(a[key], b[key])
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    else:
        assert a == b


# A chain whose second member keeps state: the first may turn inf into a number, which
# the second must not record (it is told the step is skipped).
SKIP_CASES = {
    **SCALAR,
    **PER_TENSOR,
    "value then adagc": lambda: clipopt.Chain(
        clipopt.ValueClip(0.05), clipopt.AdaGC(warmup_steps=2, clip_ratio=1.01)
    ),
}


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("nan_at", [0, 2])
@pytest.mark.parametrize("strategy", list(SKIP_CASES))
@pytest.mark.parametrize(("cls", "kwargs"), FUSED)
def test_kernel_skip_equals_the_host_skip(cls, kwargs, strategy, nan_at, bad):
    factory = SKIP_CASES[strategy]
    device_model, device_opt, plans = _skip_run(cls, kwargs, factory, True, nan_at, bad)
    host_model, host_opt, host_plans = _skip_run(cls, kwargs, factory, False, nan_at, bad)
    assert device_opt.counts() == host_opt.counts()
    assert device_opt.counts()["skipped_steps"] == 1
    assert device_opt.counts()["clipped_steps"] > 0  # the strategy did clip
    for a, b in zip(device_model.parameters(), host_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _assert_same_state(device_opt.strategy.state_dict(), host_opt.strategy.state_dict())
    # Which steps the kernel could skip: with fused SGD, only once its momentum buffers
    # exist (a real step made them). A chain whose later member keeps state skips in
    # the kernel too: every member is told the step is skipped.
    kernel_steps = 5 - (2 if nan_at == 0 else 1) if cls is torch.optim.SGD else 5
    assert sum(p.found_inf is not None for p in plans) == kernel_steps
    assert all(p.found_inf is None for p in host_plans)
    if strategy in PER_TENSOR and strategy != "chain":  # clipped in place: no factor
        assert all(p.grad_scale is None for p in plans)
    if strategy == "chain":  # the clamp in place, then the norm's factor to the kernel
        assert any(p.grad_scale is not None for p in plans)


def test_fake_cuda_catches_the_host_read_of_the_separate_path():
    with FakeTensorMode():
        params = [torch.nn.Parameter(torch.empty(4, 3, device="cuda"))]
        params[0].grad = torch.empty_like(params[0])
        opt = ClippedOptimizer(
            torch.optim.Adam(params, lr=0.1, foreach=False), nonfinite="skip"
        )
        with pytest.raises(DataDependentOutputException):
            opt.step()


def test_layout_follows_param_group_changes():
    model = _model()
    opt = ClippedOptimizer(
        torch.optim.SGD(model[0].parameters(), lr=0.1), "norm", max_norm=1e-3
    )
    loss_of(model, batches(1)[0]).backward()
    opt.step()
    first = opt.clipper._gradients.layout
    opt.step()
    assert opt.clipper._gradients.layout is first  # cached while the groups do not change
    opt.add_param_group({"params": model[2].parameters()})
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    opt.step()
    assert opt.clipper._gradients.layout is not first
    torch.testing.assert_close(opt.last_stats.norm, expected)  # the new group counts
    opt.optimizer.load_state_dict(opt.optimizer.state_dict())  # rebinds param_groups
    second = opt.clipper._gradients.layout
    model[2].weight.grad = None  # a gradient disappears
    opt.step()
    assert opt.clipper._gradients.layout is not second
    expected = torch.nn.utils.get_total_norm(
        [p.grad for p in model.parameters() if p.grad is not None]
    )
    torch.testing.assert_close(opt.last_stats.norm, expected)


def test_fused_path_with_a_closure_equals_without():
    model_a = _model()
    model_b = copy.deepcopy(model_a)
    with_closure = ClippedOptimizer(
        torch.optim.AdamW(model_a.parameters(), lr=0.01, fused=True), "norm", max_norm=0.05
    )
    plain = ClippedOptimizer(
        torch.optim.AdamW(model_b.parameters(), lr=0.01, fused=True), "norm", max_norm=0.05
    )
    for batch in batches(4):

        def closure(batch=batch):
            with_closure.zero_grad()
            loss = loss_of(model_a, batch)
            loss.backward()
            return loss

        with_closure.step(closure)
        plain.zero_grad()
        loss_of(model_b, batch).backward()
        plain.step()
        assert "grad_scale" not in vars(with_closure.optimizer)  # taken back
    assert with_closure.counts()["clipped_steps"] > 0
    for a, b in zip(model_a.parameters(), model_b.parameters(), strict=True):
        assert torch.equal(a, b)


def _train_with_bad(model, opt, steps, bad, at=2, before=None, after=None):
    """Train ``steps`` steps with a ``bad`` gradient entry at step ``at``.

    ``before`` and ``after`` run around that step.
    """
    for i, batch in enumerate(batches(steps)):
        if i == at and before is not None:
            before()
        opt.zero_grad()
        loss_of(model, batch).backward()
        if i == at:
            with torch.no_grad():
                model[0].weight.grad[0, 0] = bad
        opt.step()
        if i == at and after is not None:
            after()


def _reset_run(device_path, reset):
    """Fused SGD with momentum; the optimizer state is reset before a NaN step."""
    model = _model()
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True),
        "norm",
        max_norm=0.3,
    )
    initial = copy.deepcopy(opt.state_dict())
    with _device_path(device_path) as handed:
        _train_with_bad(model, opt, 5, math.nan, before=lambda: reset(opt, initial))
    return model, sum(p.found_inf is not None for p in _handed(handed))


@pytest.mark.parametrize(
    "reset",
    [
        lambda opt, state: opt.load_state_dict(state),
        lambda opt, state: opt.optimizer.state.clear(),
    ],
    ids=["load_state_dict", "state.clear"],
)
def test_fused_sgd_momentum_buffers_are_checked_again_after_a_reset(reset):
    """A reset state has no momentum buffers: the host decides again until they exist."""
    device_model, kernel_steps = _reset_run(True, reset)
    host_model, _ = _reset_run(False, reset)
    for a, b in zip(device_model.parameters(), host_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # step 0: no buffers yet; 1: kernel; 2 (reset, NaN) and 3: no buffers; 4: kernel
    assert kernel_steps == 2


class _UnguardedEma(clipopt.ClipStrategy):
    """A user's single-factor strategy that records every statistic it is given."""

    single_factor = True

    def __init__(self) -> None:
        self.ema = torch.zeros(())

    def measure(self, inputs):
        return clipopt.functional.total_norm(inputs.grads)

    def clip(self, inputs, measured, skip=None):
        norm = measured.norm
        self.ema = 0.9 * self.ema + 0.1 * norm  # no guard: its contract allows that
        coef = clipopt.functional.clip_coef(norm, 0.3)
        return clipopt.ClipResult(
            torch.full_like(norm, 0.3), coef, coef < 1, (clipopt.Scale(coef),)
        )


def test_user_strategies_get_finite_statistics_under_skip_with_a_fused_kernel():
    """Their contract promises finite statistics under "skip": the host decides."""
    model = _model()
    strategy = _UnguardedEma()
    opt = ClippedOptimizer(torch.optim.Adam(model.parameters(), fused=True), strategy)
    with _device_path(True) as handed:
        _train_with_bad(model, opt, 4, math.inf)
    assert torch.isfinite(strategy.ema)
    assert opt.counts()["skipped_steps"] == 1
    assert all(p.found_inf is None for p in _handed(handed))
    assert handed.call_count == 3  # the factor still goes to the kernel (grad_scale)
