"""Spike skipping (``skip_spikes``): OLMo-core's rule on any optimizer and strategy."""

import copy
import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import clipopt
from clipopt import ClippedOptimizer, SpikeSkip
from tests import reference
from tests.conftest import batches, loss_of
from tests.sync import no_host_to_device
from tests.test_fused import _device_path
from tests.test_optimizer import _model


def _gate():
    return SpikeSkip(sigma=3.0, window=8, min_samples=4, patience=3)


def _drive(norms, losses=None, strategy=None):
    """Step a one-parameter SGD whose gradient is each norm in turn."""
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    opt = ClippedOptimizer(
        torch.optim.SGD([p], lr=0.1),
        strategy or clipopt.NormClip(math.inf),
        skip_spikes=_gate(),
    )
    skipped = []
    for i, n in enumerate(norms):
        p.grad = torch.tensor([n], dtype=torch.float64)
        before = opt.counts()["spike_steps"]
        opt.step(loss=None if losses is None else losses[i])
        skipped.append(opt.counts()["spike_steps"] > before)
    return skipped, opt, p


levels = st.floats(0.5, 2.0)
sequences = st.lists(
    st.one_of(levels, levels.map(lambda x: 50 * x), st.just(1.0)), min_size=1, max_size=40
)


@given(norms=sequences)
def test_skips_exactly_where_the_reference_rule_does(norms):
    skipped, _, _ = _drive(norms)
    ref = reference.SpikeSkipReference(sigma=3.0, window=8, min_samples=4, patience=3)
    assert skipped == [ref.step(n) for n in norms]


@given(norms=sequences, losses=sequences)
def test_the_loss_is_a_second_series(norms, losses):
    losses = (losses * len(norms))[: len(norms)]
    skipped, _, _ = _drive(norms, losses)
    ref = reference.SpikeSkipReference(sigma=3.0, window=8, min_samples=4, patience=3)
    assert skipped == [ref.step(n, loss) for n, loss in zip(norms, losses, strict=True)]


def test_a_sudden_drop_is_no_spike():
    """One-sided, as OLMo-core: a loss or norm that falls (an LR decay) still steps."""
    calm = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98]
    skipped, _, _ = _drive([*calm, 1e-3, 1e-3], losses=[*calm, 1e-4, 1e-4])
    assert not any(skipped)
    skipped, _, _ = _drive([*calm, 50.0])
    assert skipped[-1]  # while a rise of the same size is


def test_a_lasting_change_of_level_becomes_the_new_normal():
    norms = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0] + [10.0, 10.1, 9.9, 10.0] * 4
    skipped, _, _ = _drive(norms)
    assert skipped[6:8] == [True, True]  # the first outliers are skipped ...
    assert not any(skipped[-6:])  # ... and after a few in a row, 10 is normal


def test_a_skipped_spike_leaves_the_optimizer_and_the_strategy_alone():
    model = _model()
    strategy = clipopt.AdaGC(warmup_steps=2)
    opt = ClippedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=0.01),
        strategy,
        skip_spikes=SpikeSkip(window=8, min_samples=4),
    )
    data = batches(7)
    for batch in data[:6]:
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.optimizer.state_dict()["state"])
    strategy_state = copy.deepcopy(strategy.state_dict())
    opt.zero_grad()
    (1e4 * loss_of(model, data[6])).backward()  # a spike
    opt.step()
    assert opt.counts()["spike_steps"] == 1
    assert opt.counts()["skipped_steps"] == 0  # not a non-finite skip
    assert bool(opt.last_stats.skipped)
    assert not bool(opt.last_stats.nonfinite)
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters(), strict=True))
    after = opt.optimizer.state_dict()["state"]
    for key, entries in state.items():  # Adam's step counter and moments untouched
        for name, value in entries.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after[key][name]))
    for key, value in strategy_state.items():
        assert torch.equal(value, strategy.state_dict()[key])


def _spike_run(device_path, cls=torch.optim.Adam, kwargs=None):
    model = _model()
    opt = ClippedOptimizer(
        cls(model.parameters(), lr=0.01, fused=True, **(kwargs or {})),
        clipopt.NormClip(0.3),
        skip_spikes=SpikeSkip(window=8, min_samples=4),
    )
    with _device_path(device_path):
        for i, batch in enumerate(batches(12)):
            opt.zero_grad()
            loss = loss_of(model, batch) * (1e4 if i in (7, 10) else 1.0)
            loss.backward()
            opt.step(loss=loss)
    return model, opt


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [(torch.optim.Adam, {}), (torch.optim.SGD, {"momentum": 0.9})],
    ids=["Adam", "SGD"],
)
def test_the_kernel_skips_spikes_as_the_host_does(cls, kwargs):
    device_model, device_opt = _spike_run(True, cls, kwargs)
    host_model, host_opt = _spike_run(False, cls, kwargs)
    assert device_opt.counts() == host_opt.counts()
    assert device_opt.counts()["spike_steps"] >= 2  # the two spikes (batches vary too)
    for a, b in zip(device_model.parameters(), host_model.parameters(), strict=True):
        assert torch.equal(a, b)
    device_state = device_opt.state_dict()["clipopt"]["spikes"]
    for key, value in host_opt.state_dict()["clipopt"]["spikes"].items():
        assert torch.equal(value, device_state[key])


def test_spike_skipping_with_a_fused_kernel_reads_nothing_from_the_device():
    with FakeTensorMode():
        params = [torch.nn.Parameter(torch.empty(s, device="cuda")) for s in [(4, 3), (3,)]]
        opt = ClippedOptimizer(
            torch.optim.AdamW(params, lr=0.1, fused=True),
            "adagc",
            skip_spikes=SpikeSkip(window=4, min_samples=2),
        )
        for step in range(6):
            for p in params:
                p.grad = torch.empty_like(p)
            if step == 0:
                opt.step(loss=torch.empty((), device="cuda"))
                continue
            with no_host_to_device():  # and no host read: fake tensors would raise
                opt.step(loss=torch.empty((), device="cuda"))
        assert opt.last_stats.skipped.device.type == "cuda"


def test_the_gate_is_in_the_checkpoint_and_resumes_bitwise():
    norms = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 30.0, 1.02, 0.98, 40.0, 1.0]
    _, opt, p = _drive(norms)
    _, opt_b, p_b = _drive(norms[:6])
    buf = io.BytesIO()
    torch.save(opt_b.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    assert set(state["clipopt"]["spikes"]) == {"norm_values", "norm_count", "norm_run"}
    q = torch.nn.Parameter(p_b.detach().clone())
    resumed = ClippedOptimizer(
        torch.optim.SGD([q], lr=0.1), clipopt.NormClip(math.inf), skip_spikes=_gate()
    )
    resumed.load_state_dict(state)
    for n in norms[6:]:
        q.grad = torch.tensor([n], dtype=torch.float64)
        resumed.step()
    assert torch.equal(q, p)
    assert resumed.counts() == opt.counts()
    bad = copy.deepcopy(state)
    bad["clipopt"]["spikes"]["norm_values"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"shape \(3,\), expected \(8,\)"):
        resumed.load_state_dict(bad)


def test_losses_from_closures_gradscaler_and_attach_mode():
    # a closure's loss is the step's loss
    p = torch.nn.Parameter(torch.zeros(2))
    opt = ClippedOptimizer(torch.optim.SGD([p], lr=0.1), skip_spikes=_gate())

    def closure(value):
        opt.zero_grad()
        loss = (p - value).square().sum()
        loss.backward()
        return loss

    for value in [1.0, 1.1, 0.9, 1.05, 0.95]:
        opt.step(lambda value=value: closure(value))
    assert int(opt.state_dict()["clipopt"]["spikes"]["loss_count"]) == 5
    # GradScaler passes step's keyword arguments on
    model = _model()
    wrapped = ClippedOptimizer(
        torch.optim.AdamW(model.parameters(), fused=True), skip_spikes=True
    )
    scaler = torch.amp.GradScaler("cpu")
    loss = loss_of(model, batches(1)[0])
    scaler.scale(loss).backward()
    scaler.step(wrapped, loss=loss)
    assert int(wrapped.state_dict()["clipopt"]["spikes"]["loss_count"]) == 1
    # attach mode: observe_loss before step()
    sgd = torch.optim.SGD(_model().parameters(), lr=0.1)
    attached = clipopt.attach(sgd, skip_spikes=True)
    for q in sgd.param_groups[0]["params"]:
        q.grad = torch.ones_like(q)
    attached.observe_loss(torch.tensor(2.0))
    sgd.step()
    assert int(sgd.state_dict()["clipopt"]["spikes"]["loss_count"]) == 1


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="sigma must be > 0"):
        SpikeSkip(sigma=0)
    with pytest.raises(ValueError, match="min_samples must be <= window"):
        SpikeSkip(window=4, min_samples=8)
    with pytest.raises(TypeError, match="skip_spikes must be True, False or"):
        ClippedOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1), skip_spikes=3)
    opt = ClippedOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match="pass skip_spikes=True"):
        opt.step(loss=1.0)
