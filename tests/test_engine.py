"""The engine's own promises: one definition of a step, checks without copies, cheap
snapshots, one measurement, mistakes reported, sparse gradients clipped."""

import copy
import dataclasses
import math
from unittest import mock

import pytest
import torch

import clipopt
from clipopt import ClippedOptimizer
from tests.conftest import batches, loss_of
from tests.test_fused import _device_path, _train_with_bad
from tests.test_optimizer import _model

# -- one definition of "step" ------------------------------------------------------------


def _schedule_run(device_path):
    """A fused Adam with a NaN at step 2; the threshold schedule records its steps."""
    seen = []

    def schedule(step):
        seen.append(step)
        return 0.3

    model = _model()
    opt = ClippedOptimizer(
        torch.optim.Adam(model.parameters(), lr=0.01, fused=True),
        clipopt.NormClip(schedule),
    )
    with _device_path(device_path):
        _train_with_bad(model, opt, 5, math.nan, at=2)
    return seen, opt


def test_schedules_see_the_same_steps_on_the_host_and_the_kernel_skip_path():
    """A skipped step counts, as an LR scheduler stepped every iteration counts it."""
    kernel_seen, kernel = _schedule_run(device_path=True)
    host_seen, host = _schedule_run(device_path=False)
    # the host path decides before clipping, so the skipped step's threshold is unasked
    assert host_seen == [0, 1, 3, 4]
    assert kernel_seen == [0, 1, 2, 3, 4]
    assert kernel.state_dict()["clipopt"]["calls"] == 5
    assert host.state_dict()["clipopt"]["calls"] == 5
    assert kernel.counts() == host.counts()


# -- grad mode -------------------------------------------------------------------------


@pytest.mark.parametrize("enabled", [True, False])
def test_the_step_runs_without_autograd_and_restores_the_grad_mode(enabled):
    """Gradients that require grad (create_graph=True) are clipped without a graph,
    and the grad mode is as it was after a step, also after one that raised."""
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    (p * p).sum().backward(create_graph=True)
    assert p.grad.requires_grad
    before = p.grad.grad_fn
    opt = ClippedOptimizer(torch.optim.SGD([p], lr=0.0), "norm", max_norm=1.0)
    with torch.set_grad_enabled(enabled):
        opt.step()
        assert torch.is_grad_enabled() is enabled
        assert p.grad.grad_fn is before  # the in-place scaling was not recorded
        expected = torch.tensor([6.0, 8.0]) / (10.0 + 1e-6)
        assert torch.allclose(p.grad.detach(), expected)
        bad = ClippedOptimizer(
            torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1),
            "norm",
            nonfinite="error",
        )
        bad.param_groups[0]["params"][0].grad = torch.tensor([math.nan])
        with pytest.raises(RuntimeError, match="non-finite"):
            bad.step()
        assert torch.is_grad_enabled() is enabled


def test_the_engines_inputs_are_what_the_constructor_makes():
    """ClipInputs built from kept fields (no __init__) hold every field, as
    ClipInputs(...) would fill them: a new field must not be missed there."""
    seen = []

    class Spy(clipopt.NormClip):
        def measure(self, inputs):
            seen.append(inputs)
            return super().measure(inputs)

    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), Spy(1.0))
    for batch in batches(2):
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    names = {f.name for f in dataclasses.fields(clipopt.ClipInputs)}
    for inputs in seen:
        assert set(vars(inputs)) == names
        assert dataclasses.replace(inputs) == inputs  # __init__ and __post_init__ agree
    assert [i.step for i in seen] == [0, 1]


# -- checks without copies, snapshots without deep copies --------------------------------


def test_loading_a_checkpoint_copies_no_strategy():
    """AGC(exclude=[head]) holds the head: a validating deep copy would copy it."""
    model = _model()
    head = model[2].weight
    strategy = clipopt.Chain(*(clipopt.AGC(0.01, exclude=[head]) for _ in range(5)))
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), strategy)
    for batch in batches(2):
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
    state = opt.state_dict()
    with mock.patch.object(copy, "deepcopy", side_effect=AssertionError("a copy")):
        opt.load_state_dict(state)
    bad = copy.deepcopy(state)
    bad["clipopt"]["strategy"] = {"0": {"x": torch.zeros(1)}}
    with pytest.raises(ValueError, match="Chain state needs keys"):
        opt.load_state_dict(bad)


def test_lbfgs_skip_snapshot_copies_no_history():
    """The snapshot clones parameters and top-level state tensors only."""
    model = _model()
    opt = ClippedOptimizer(
        torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=5), "norm"
    )
    batch = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    state = next(iter(opt.optimizer.state.values()))
    history = list(state["old_dirs"])
    assert history  # LBFGS built a history to (not) copy
    with mock.patch.object(copy, "deepcopy", side_effect=AssertionError("a deep copy")):
        opt.step(closure)
    assert all(a is b for a, b in zip(history, state["old_dirs"], strict=False))


# -- the "zero" policy measures once -------------------------------------------------------


class _Counting(clipopt.NormClip):
    def __init__(self):
        super().__init__(0.5)
        self.measured = 0

    def measure(self, inputs):
        self.measured += 1
        return super().measure(inputs)


def test_zero_policy_measures_once_on_a_finite_step(tmp_path):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    calls = []
    original = dist.all_reduce
    try:
        model = _model()
        strategy = _Counting()
        opt = ClippedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            strategy,
            nonfinite="zero",
            process_group=dist.group.WORLD,
        )
        dist.all_reduce = lambda *a, **k: calls.append(1) or original(*a, **k)
        for batch in batches(3):
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()
        assert strategy.measured == 3
        assert len(calls) == 3  # one collective per finite step
        opt.zero_grad()
        loss_of(model, batches(1)[0]).backward()
        model[0].weight.grad[0, 0] = math.nan
        opt.step()  # non-finite: clean the gradients, then measure them again
        assert strategy.measured == 5
        assert torch.isfinite(opt.last_stats.norm)
        assert bool(opt.last_stats.nonfinite)
    finally:
        dist.all_reduce = original
        dist.barrier()
        dist.destroy_process_group()


# -- mistakes reported -------------------------------------------------------------------


def test_a_group_key_the_strategy_does_not_read_is_reported():
    model = _model()
    sgd = torch.optim.SGD(
        [
            {"params": model[0].parameters()},
            {"params": model[2].parameters(), "clipopt_max_norm": 0.1},
        ],
        lr=0.1,
    )
    opt = ClippedOptimizer(sgd, "norm", max_norm=1.0)
    loss_of(model, batches(1)[0]).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param_groups\[1\].*pass scope='group'"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    del opt
    grouped = ClippedOptimizer(sgd, "norm", max_norm=1.0, scope="group")
    grouped.step()  # read by the group scope: fine
    assert grouped.last_stats is not None


def test_two_front_ends_on_one_optimizer_are_refused():
    sgd = torch.optim.SGD(_model().parameters(), lr=0.1)
    first = ClippedOptimizer(sgd)
    with pytest.raises(TypeError, match="already clipped by a ClippedOptimizer"):
        ClippedOptimizer(sgd)
    with pytest.raises(TypeError, match="already clipped by a ClippedOptimizer"):
        clipopt.attach(sgd)
    del first  # a wrapper that is gone no longer owns it
    clipopt.attach(sgd).detach()
    ClippedOptimizer(sgd)


def test_deepcopy_of_an_attached_optimizer_keeps_the_clipping():
    model = _model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    attachment = clipopt.attach(sgd, "norm", max_norm=1e-3)
    loss_of(model, batches(1)[0]).backward()
    sgd.step()
    clone = copy.deepcopy(sgd)
    assert clone.state_dict()["clipopt"]["calls"] == 1
    for p in clone.param_groups[0]["params"]:
        p.grad = torch.full_like(p, 10.0)
    before = [p.detach().clone() for p in clone.param_groups[0]["params"]]
    clone.step()  # clipped to 1e-3: a tiny step
    moved = math.sqrt(
        sum(
            float((a - p.detach()).square().sum())
            for a, p in zip(before, clone.param_groups[0]["params"], strict=True)
        )
    )
    assert moved == pytest.approx(0.1 * 1e-3, rel=1e-3)
    assert attachment.counts()["steps"] == 1  # the original's counts are its own


# -- sparse gradients ----------------------------------------------------------------------


def _sparse_run(inner, strategy, steps=3, clipped=True):
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    ref = copy.deepcopy(emb)
    opt = ClippedOptimizer(inner(emb.parameters()), strategy)
    ref_opt = inner(ref.parameters())
    for step in range(steps):
        index = torch.tensor([1, 3, 3, 7 - step])  # a repeated row: uncoalesced
        for module, optimizer in ((emb, opt), (ref, ref_opt)):
            optimizer.zero_grad()
            (100 * module(index)).sum().backward()
        opt.step()
        grad = ref.weight.grad.coalesce()
        values = grad.values()
        if clipped:  # the reference: clip the coalesced values by hand
            if isinstance(strategy, clipopt.ValueClip):
                values.clamp_(-strategy.clip_value, strategy.clip_value)
            else:
                values.mul_(torch.clamp(0.5 / (values.norm() + 1e-6), max=1.0))
        ref.weight.grad = grad
        ref_opt.step()
    return emb.weight.detach(), ref.weight.detach(), opt


@pytest.mark.parametrize(
    "inner",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1),
        lambda ps: torch.optim.Adagrad(ps, lr=0.1),
        lambda ps: torch.optim.SparseAdam(list(ps), lr=0.1),
    ],
    ids=["SGD", "Adagrad", "SparseAdam"],
)
@pytest.mark.parametrize("strategy", ["norm", "value"])
def test_sparse_gradients_are_clipped_by_their_coalesced_values(inner, strategy):
    made = clipopt.NormClip(0.5) if strategy == "norm" else clipopt.ValueClip(0.5)
    got, want, opt = _sparse_run(inner, made)
    assert torch.equal(got, want)
    assert opt.counts()["clipped_steps"] == 3
    assert opt.param_groups[0]["params"][0].grad.is_sparse  # still sparse for the step


@pytest.mark.parametrize("name", ["percentile", "zscore", "adagc"])
def test_adaptive_strategies_take_sparse_gradients(name):
    _, _, opt = _sparse_run(lambda ps: torch.optim.SGD(ps, lr=0.1), name, clipped=False)
    assert torch.isfinite(opt.last_stats.norm)
    assert opt.counts()["steps"] == 3
