"""The torch.optim.Optimizer contract, item by item (see docs/design.md)."""

import copy
import io
import pickle
import warnings

import pytest
import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

import clipopt
from clipopt import ClippedOptimizer, ClipResult, ClipStrategy, functional
from tests.conftest import batches, loss_of


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)
    )


def _wrapped(model=None, inner=torch.optim.SGD, strategy="norm", **kwargs):
    model = model or _model()
    inner_kwargs = {"lr": 0.1, "momentum": 0.9} if inner is torch.optim.SGD else {}
    return model, ClippedOptimizer(
        inner(model.parameters(), **inner_kwargs), strategy, **kwargs
    )


def _train(model, opt, data):
    for batch in data:
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()


class Recording(ClipStrategy):
    """Norm clipping that records its calls and keeps a step count as state."""

    def __init__(self, max_norm: float = 0.5) -> None:
        self.max_norm = max_norm
        self.calls = 0
        self.seen = torch.zeros((), dtype=torch.int64)

    def measure(self, inputs):
        return functional.total_norm(inputs.grads)

    def clip(self, inputs, measured, skip=None):
        norm = measured.norm
        self.calls += 1
        self.seen = self.seen + torch.isfinite(norm)
        coef = functional.clip_coef(norm, self.max_norm)
        threshold = torch.full_like(norm, self.max_norm)
        return ClipResult(threshold, coef, coef < 1, (clipopt.Scale(coef),))

    def state_dict(self):
        return {"seen": self.seen.clone()}

    def load_state_dict(self, state_dict):
        if set(state_dict) != {"seen"}:
            raise ValueError(f"Recording needs key 'seen', got {sorted(state_dict)}")
        self.seen = state_dict["seen"].clone()

    def reset(self):
        self.seen = torch.zeros((), dtype=torch.int64)


# -- construction ------------------------------------------------------------------------


def test_is_an_optimizer_sharing_containers():
    _, opt = _wrapped()
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state
    assert opt.defaults is opt.optimizer.defaults
    assert isinstance(opt.strategy, clipopt.NormClip)
    assert opt.last_stats is None


@pytest.mark.parametrize("loader", ["wrapper", "inner"])
def test_containers_stay_shared_after_load_state_dict(loader):
    model, opt = _wrapped()
    _train(model, opt, batches(2))
    saved = copy.deepcopy(opt.state_dict())
    target = opt if loader == "wrapper" else opt.optimizer
    target.load_state_dict(saved)
    assert opt.param_groups is opt.optimizer.param_groups
    assert opt.state is opt.optimizer.state
    assert opt.defaults is opt.optimizer.defaults
    opt.param_groups[0]["lr"] = 0.123
    assert opt.optimizer.param_groups[0]["lr"] == 0.123


@pytest.mark.parametrize(
    ("optimizer", "match"),
    [
        (torch.nn.Linear(2, 2), "optimizer must be a torch.optim.Optimizer, got Linear"),
        ([torch.zeros(1)], "optimizer must be a torch.optim.Optimizer, got list"),
    ],
)
def test_rejects_non_optimizers(optimizer, match):
    with pytest.raises(TypeError, match=match):
        ClippedOptimizer(optimizer)


def test_rejects_double_wrapping():
    _, opt = _wrapped()
    with pytest.raises(TypeError, match="already a ClippedOptimizer"):
        ClippedOptimizer(opt)


def test_rejects_bad_strategy_and_policy():
    sgd = torch.optim.SGD(_model().parameters(), lr=0.1)
    with pytest.raises(TypeError, match="strategy must be a registered name or a clipopt"):
        ClippedOptimizer(sgd, 1.0)
    with pytest.raises(TypeError, match=r"only accepted with a strategy name"):
        ClippedOptimizer(sgd, clipopt.NormClip(), max_norm=2.0)
    with pytest.raises(
        ValueError, match="nonfinite must be one of 'skip', 'error', 'zero'"
    ):
        ClippedOptimizer(sgd, nonfinite="ignore")
    with pytest.raises(ValueError, match="unknown strategy 'nrom'"):
        ClippedOptimizer(sgd, "nrom")
    with pytest.raises(ValueError, match="max_norm must be > 0, got -1"):
        ClippedOptimizer(sgd, "norm", max_norm=-1)


def test_construction_forms():
    sgd = torch.optim.SGD(_model().parameters(), lr=0.1)
    strategy = clipopt.get_strategy("norm", max_norm=1.0, norm_type=float("inf"))
    assert ClippedOptimizer(sgd, strategy).strategy is strategy
    assert ClippedOptimizer(sgd, "value", clip_value=0.5).strategy.clip_value == 0.5
    assert isinstance(ClippedOptimizer(sgd).strategy, clipopt.RelativeClip)
    other = torch.optim.SGD(_model().parameters(), lr=0.1)
    assert clipopt.attach(other).strategy.hyperparameters() == (
        clipopt.RelativeClip().hyperparameters()
    )


def test_a_threshold_without_a_strategy_name_says_which_name_to_add():
    """``max_norm`` belonged to the old default ("norm"): say how to keep that rule."""
    sgd = torch.optim.SGD(_model().parameters(), lr=0.1)
    fix = r"ClippedOptimizer\(optimizer, 'norm', max_norm=0.5\)"
    with pytest.raises(TypeError, match=fix):
        ClippedOptimizer(sgd, max_norm=0.5)
    with pytest.raises(TypeError, match=r"max_norm=0\.5 given without a strategy"):
        clipopt.attach(sgd, max_norm=0.5)
    assert not sgd._optimizer_step_pre_hooks  # the failed attach left nothing behind
    # the default's own parameters are accepted by name
    assert ClippedOptimizer(sgd, ratio=0.5).strategy.ratio == 0.5


def test_inner_errors_propagate():
    with pytest.raises(ValueError, match="empty parameter list"):
        ClippedOptimizer(torch.optim.SGD([], lr=0.1))


# -- stepping ----------------------------------------------------------------------------


def test_step_returns_none_and_closure_loss():
    model, opt = _wrapped(max_norm=0.01)
    batch = batches(1)[0]
    loss_of(model, batch).backward()
    assert opt.step() is None

    def closure():
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor)
    assert loss.requires_grad
    assert not torch.equal(loss.detach(), loss_of(model, batch).detach())  # it stepped


def test_closure_sees_gradients_clipped_after_evaluation():
    model, opt = _wrapped(max_norm=1e-3)
    batch = batches(1)[0]
    seen = []
    opt.register_step_post_hook(
        lambda o, a, k: seen.append(
            functional.total_norm([p.grad for p in model.parameters()])
        )
    )

    def closure():
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        return loss

    opt.step(closure)
    assert opt.last_stats.norm > 1e-3
    assert seen[0] <= 1e-3 * (1 + 1e-5)


def test_lbfgs_clips_every_closure_evaluation():
    model = _model()
    opt = ClippedOptimizer(
        torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=5), "norm", max_norm=0.1
    )
    evaluations = []
    batch = batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = loss_of(model, batch)
        loss.backward()
        evaluations.append(1)
        return loss

    opt.step(closure)
    assert len(evaluations) > 1
    assert opt.counts()["steps"] == len(evaluations)


def test_step_without_gradients_leaves_strategy_untouched():
    model = _model()
    strategy = Recording()
    opt = ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), strategy)
    before = [p.detach().clone() for p in model.parameters()]
    assert opt.step() is None
    assert opt.step(lambda: 7.0) == 7.0
    assert strategy.calls == 0
    assert strategy.state_dict()["seen"] == 0
    assert opt.counts() == {
        "steps": 0,
        "skipped_steps": 0,
        "clipped_steps": 0,
        "nonfinite_steps": 0,
        "spike_steps": 0,
    }
    assert opt.last_stats is None
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_frozen_parameters_are_left_out():
    model = _model()
    model[0].weight.requires_grad_(False)
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "norm", max_norm=0.01
    )
    loss_of(model, batches(1)[0]).backward()
    opt.step()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert opt.last_stats.norm == torch.nn.utils.get_total_norm(grads) / opt.last_stats.coef


def test_global_norm_spans_all_param_groups():
    model = _model()
    groups = [
        {"params": model[0].parameters(), "lr": 0.1},
        {"params": model[2].parameters(), "lr": 0.01},
    ]
    opt = ClippedOptimizer(torch.optim.SGD(groups), "norm", max_norm=0.05)
    loss_of(model, batches(1)[0]).backward()
    expected = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    opt.step()
    assert torch.equal(opt.last_stats.norm, expected)


def test_add_param_group_and_zero_grad_delegate():
    model = _model()
    opt = ClippedOptimizer(torch.optim.SGD(model[0].parameters(), lr=0.1))
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.5})
    assert len(opt.optimizer.param_groups) == 2
    assert opt.optimizer.param_groups[1]["lr"] == 0.5
    loss_of(model, batches(1)[0]).backward()
    before = model[2].weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model[2].weight)
    opt.zero_grad(set_to_none=False)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# -- LR schedulers -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["StepLR", "OneCycleLR", "ReduceLROnPlateau"])
def test_lr_schedulers_drive_the_inner_optimizer(kind):
    model, opt = _wrapped()
    if kind == "StepLR":
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    elif kind == "OneCycleLR":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    else:
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for batch in batches(4):
            opt.zero_grad()
            loss = loss_of(model, batch)
            loss.backward()
            opt.step()
            sched.step(1.0) if kind == "ReduceLROnPlateau" else sched.step()
            lrs.append(opt.optimizer.param_groups[0]["lr"])
    assert len(set(lrs)) > 1
    assert opt.param_groups[0]["lr"] == opt.optimizer.param_groups[0]["lr"] == lrs[-1]


# -- hooks -------------------------------------------------------------------------------


def test_step_hooks_fire_once_per_step():
    model, opt = _wrapped()
    calls = []
    h1 = opt.register_step_pre_hook(lambda o, a, k: calls.append(("pre", o)))
    h2 = opt.register_step_post_hook(lambda o, a, k: calls.append(("post", o)))
    g1 = register_optimizer_step_pre_hook(lambda o, a, k: calls.append(("gpre", o)))
    g2 = register_optimizer_step_post_hook(lambda o, a, k: calls.append(("gpost", o)))
    try:
        _train(model, opt, batches(2))
    finally:
        for h in (h1, h2, g1, g2):
            h.remove()
    assert [c[0] for c in calls] == ["gpre", "pre", "post", "gpost"] * 2
    assert all(c[1] is opt.optimizer for c in calls)
    _train(model, opt, batches(1))
    assert len(calls) == 8  # removed handles stay removed


def test_state_dict_hooks_fire():
    model, opt = _wrapped()
    _train(model, opt, batches(1))
    fired = []
    opt.register_state_dict_pre_hook(lambda o: fired.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: fired.append("sd-post"))
    opt.register_load_state_dict_pre_hook(lambda o, sd: fired.append("load-pre"))
    opt.register_load_state_dict_post_hook(lambda o: fired.append("load-post"))
    opt.load_state_dict(opt.state_dict())
    assert fired == ["sd-pre", "sd-post", "load-pre", "load-post"]


# -- state dict ----------------------------------------------------------------------------


def test_state_dict_layout_and_weights_only_load():
    model, opt = _wrapped(strategy=Recording())
    _train(model, opt, batches(3))
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups", "clipopt"}
    assert set(sd["clipopt"]) == {
        "version",
        "strategy",
        "calls",
        "skipped_steps",
        "clipped_steps",
        "nonfinite_steps",
        "spike_steps",
        "overflow_steps",
    }
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert loaded["clipopt"]["calls"] == 3
    assert torch.equal(loaded["clipopt"]["strategy"]["seen"], torch.tensor(3))


@pytest.mark.parametrize("inner", [torch.optim.SGD, torch.optim.AdamW])
def test_resume_is_bitwise_identical(inner):
    data = batches(8)
    model_a, opt_a = _wrapped(inner=inner, strategy=Recording(0.3))
    sched_a = torch.optim.lr_scheduler.StepLR(opt_a, step_size=2, gamma=0.7)
    for batch in data:
        opt_a.zero_grad()
        loss_of(model_a, batch).backward()
        opt_a.step()
        sched_a.step()

    model_b, opt_b = _wrapped(inner=inner, strategy=Recording(0.3))
    sched_b = torch.optim.lr_scheduler.StepLR(opt_b, step_size=2, gamma=0.7)
    for batch in data[:4]:
        opt_b.zero_grad()
        loss_of(model_b, batch).backward()
        opt_b.step()
        sched_b.step()
    buf = io.BytesIO()
    torch.save(
        {
            "model": model_b.state_dict(),
            "opt": opt_b.state_dict(),
            "sched": sched_b.state_dict(),
        },
        buf,
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    model_c = _model()
    model_c.load_state_dict(ckpt["model"])
    strategy_c = Recording(0.3)
    opt_c = ClippedOptimizer(
        inner(
            model_c.parameters(),
            **({"lr": 0.1, "momentum": 0.9} if inner is torch.optim.SGD else {}),
        ),
        strategy_c,
    )
    sched_c = torch.optim.lr_scheduler.StepLR(opt_c, step_size=2, gamma=0.7)
    opt_c.load_state_dict(ckpt["opt"])
    sched_c.load_state_dict(ckpt["sched"])
    for batch in data[4:]:
        opt_c.zero_grad()
        loss_of(model_c, batch).backward()
        opt_c.step()
        sched_c.step()
    for pa, pc in zip(model_a.parameters(), model_c.parameters(), strict=True):
        assert torch.equal(pa, pc)
    assert opt_c.counts() == opt_a.counts()
    assert torch.equal(strategy_c.seen, opt_a.strategy.seen)


def test_plain_inner_state_dict_loads_with_warning_and_fresh_state():
    model, opt = _wrapped(strategy=Recording())
    _train(model, opt, batches(2))
    plain = copy.deepcopy(opt.optimizer.state_dict())
    opt.param_groups[0]["lr"] = 5.0
    with pytest.warns(UserWarning, match="has no 'clipopt' entry"):
        opt.load_state_dict(plain)
    assert opt.param_groups[0]["lr"] == 0.1
    assert opt.counts()["steps"] == 0
    assert opt.strategy.seen == 0


def test_wrapper_state_dict_loads_into_plain_optimizer():
    model, opt = _wrapped()
    _train(model, opt, batches(2))
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    plain.load_state_dict(opt.state_dict())
    assert plain.state_dict()["state"].keys() == opt.optimizer.state_dict()["state"].keys()


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda own: own.update(version=99), "has version 99"),
        (lambda own: own.pop("calls"), "lacks calls"),
        (lambda own: own.update(strategy={"bogus": 1}), "Recording needs key 'seen'"),
    ],
)
def test_bad_clipopt_state_changes_nothing(mutate, match):
    model, opt = _wrapped(strategy=Recording())
    _train(model, opt, batches(2))
    sd = copy.deepcopy(opt.state_dict())
    mutate(sd["clipopt"])
    sd["param_groups"][0]["lr"] = 42.0
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    assert after["clipopt"]["calls"] == before["clipopt"]["calls"]
    assert torch.equal(
        after["clipopt"]["strategy"]["seen"], before["clipopt"]["strategy"]["seen"]
    )


def test_load_state_dict_rejects_non_mapping():
    _, opt = _wrapped()
    with pytest.raises(TypeError, match="state_dict must be a mapping, got list"):
        opt.load_state_dict([])


def test_load_does_not_mutate_the_callers_dict():
    model, opt = _wrapped()
    _train(model, opt, batches(1))
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert "clipopt" in sd


# -- copying and printing ---------------------------------------------------------------


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o))])
def test_deepcopy_and_pickle_keep_everything(copier):
    model, opt = _wrapped(strategy=Recording(0.2))
    _train(model, opt, batches(2))
    clone = copier(opt)
    assert isinstance(clone.optimizer, torch.optim.SGD)
    assert isinstance(clone.strategy, Recording)
    assert clone.strategy.max_norm == 0.2
    assert clone.param_groups is clone.optimizer.param_groups
    assert clone.state is clone.optimizer.state
    assert clone.counts() == opt.counts()
    public = {k for k in vars(opt) if not k.startswith("_")}
    assert public <= set(vars(clone))
    hooked = []
    clone.register_step_post_hook(lambda o, a, k: hooked.append(1))
    params = [p for g in clone.param_groups for p in g["params"]]
    for p in params:
        p.grad = torch.ones_like(p)
    clone.step()
    assert hooked == [1]


def test_repr_names_strategy_and_inner():
    _, opt = _wrapped(max_norm=0.5)
    text = repr(opt)
    assert "NormClip(max_norm=0.5" in text
    assert "SGD (" in text
    assert "nonfinite='skip'" in text


def test_sparse_gradients_where_unsupported_raise_clearly():
    emb = torch.nn.Embedding(5, 3, sparse=True)
    opt = ClippedOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1), "agc")
    emb(torch.tensor([1, 2])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(TypeError, match="does not support sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight, before)


# -- statistics ----------------------------------------------------------------------------


def test_last_stats_are_device_tensors_and_to_dict_floats():
    model, opt = _wrapped(max_norm=1e-3)
    _train(model, opt, batches(1))
    stats = opt.last_stats
    for t in stats:
        assert isinstance(t, torch.Tensor)
        assert t.dim() == 0
    assert stats.clipped.dtype == torch.bool
    d = stats.to_dict()
    assert set(d) == {"norm", "threshold", "coef", "clipped", "nonfinite", "skipped"}
    assert all(type(v) is float for v in d.values())
    assert d["threshold"] == pytest.approx(1e-3)
    assert d["clipped"] == 1.0
    assert d["coef"] == pytest.approx(1e-3 / (d["norm"] + 1e-6))


def test_counts_track_clip_rate():
    model, opt = _wrapped(max_norm=1.0)
    _train(model, opt, batches(7))
    counts = opt.counts()
    assert counts["steps"] == 7
    # batches() alternate large and small targets: some clip, some do not
    assert 0 < counts["clipped_steps"] < 7
