"""torch's own optimizer configurations (``optim_db``) under the wrapper: the contract.

``torch.testing._internal.common_optimizers.optim_db`` lists every ``torch.optim``
optimizer with the configurations torch tests it under. For each of them, each
implementation (for-loop, foreach, fused) and each built-in strategy set never to clip,
the wrapper must give the same parameters and optimizer state as the bare optimizer,
load state dicts both ways, deep-copy, and honour ``grad_scale``/``found_inf`` where the
bare optimizer does.

``"percentile"`` is not here: its threshold is a percentile of observed norms, never
infinite (the current norm, when it is the largest, is scaled by n / (n + 1e-6)). Its
numerics are tested against the paper's algorithm in ``test_adaptive.py``.
"""

import copy
import math
import warnings

import pytest
import torch
from torch.testing._internal.common_optimizers import optim_db

import clipopt

NEVER = {
    "norm": lambda: clipopt.NormClip(math.inf),
    "norm-group": lambda: clipopt.NormClip(math.inf, scope="group"),
    "norm-tensor": lambda: clipopt.NormClip(math.inf, 1.0, scope="tensor"),
    "value": lambda: clipopt.ValueClip(math.inf),
    "value-group": lambda: clipopt.ValueClip(math.inf, scope="group"),
    "zscore": lambda: clipopt.ZScoreClip(z_thresh=1e30, warmup_steps=2),
    "adagc": lambda: clipopt.AdaGC(clip_ratio=1e30, warmup_steps=1, max_norm=math.inf),
    "agc": lambda: clipopt.AGC(clipping=1e30),
    "relative": lambda: clipopt.RelativeClip(ratio=1e30, ramp=0),
}


def _configs():
    cases = []
    for info in optim_db:
        name = info.optim_cls.__name__
        impls = ["forloop"]
        if "foreach" in info.supported_impls:
            impls.append("foreach")
        if "fused" in info.supported_impls and "cpu" in info.supports_fused_on:
            impls.append("fused")
        for i, optim_input in enumerate(info.optim_inputs_func(device="cpu")):
            for impl in impls:
                cases.append(
                    pytest.param(info, optim_input.kwargs, impl, id=f"{name}-{i}-{impl}")
                )
    return cases


CONFIGS = _configs()


def _model(info):
    """Two parameter groups (one for closure optimizers); Muon takes 2-D tensors only."""
    torch.manual_seed(0)
    if info.only_supports_sparse_grads:
        return torch.nn.Embedding(7, 3, sparse=True), None
    if info.optim_cls is torch.optim.Muon:
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 5, bias=False), torch.nn.Linear(5, 2, bias=False)
        )
    else:
        model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
    return model, None


def _groups(info, model):
    params = list(model.parameters())
    if not info.supports_param_groups or len(params) < 2:
        return params
    return [{"params": params[:1]}, {"params": params[1:]}]


def _build(info, kwargs, impl, model):
    kwargs = copy.deepcopy(kwargs)
    if impl != "forloop":
        kwargs[impl] = True
    elif "foreach" in info.supported_impls:
        kwargs["foreach"] = False
    return info.optim_cls(_groups(info, model), **kwargs)


def _loss(info, model, step):
    g = torch.Generator().manual_seed(step)
    if info.only_supports_sparse_grads:
        return model(torch.tensor([1, 4, 4, step % 7])).square().sum()
    x = torch.randn(6, 4, generator=g)
    return (model(x) - torch.randn(6, 2, generator=g)).square().mean()


def _step(info, opt, model, step):
    def closure():
        opt.zero_grad()
        loss = _loss(info, model, step)
        loss.backward()
        return loss

    if info.step_requires_closure:
        opt.step(closure)
    else:
        closure()
        opt.step()


def _same(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    else:
        assert a == b


def _twins(info, kwargs, impl, strategy):
    model, _ = _model(info)
    bare_model = copy.deepcopy(model)
    wrapper = clipopt.ClippedOptimizer(_build(info, kwargs, impl, model), NEVER[strategy]())
    bare = _build(info, kwargs, impl, bare_model)
    return model, wrapper, bare_model, bare


def _assert_twins(model, wrapper, bare_model, bare):
    for a, b in zip(model.parameters(), bare_model.parameters(), strict=True):
        assert torch.equal(a, b)
    state = wrapper.state_dict()
    own = state.pop("clipopt")
    _same(state, bare.state_dict())
    return own


@pytest.mark.parametrize("strategy", list(NEVER))
@pytest.mark.parametrize(("info", "kwargs", "impl"), CONFIGS)
def test_never_clipping_is_the_bare_optimizer(info, kwargs, impl, strategy):
    if info.only_supports_sparse_grads and not NEVER[strategy]().sparse_gradients:
        model, _ = _model(info)
        opt = clipopt.ClippedOptimizer(_build(info, kwargs, impl, model), strategy)
        _loss(info, model, 0).backward()
        with pytest.raises(TypeError, match="does not support sparse gradients"):
            opt.step()
        return
    model, wrapper, bare_model, bare = _twins(info, kwargs, impl, strategy)
    for step in range(3):
        _step(info, wrapper, model, step)
        _step(info, bare, bare_model, step)
    own = _assert_twins(model, wrapper, bare_model, bare)
    assert wrapper.counts()["steps"] >= 3
    assert wrapper.counts()["clipped_steps"] == 0

    # state dicts both ways: the wrapper's into a bare optimizer, a bare one's into a
    # wrapper (with a warning: clipopt's own state starts fresh)
    into_bare = _build(info, kwargs, impl, copy.deepcopy(model))
    into_bare.load_state_dict(wrapper.state_dict())
    _same(into_bare.state_dict(), bare.state_dict())
    into_wrapper = clipopt.ClippedOptimizer(
        _build(info, kwargs, impl, copy.deepcopy(model)), NEVER[strategy]()
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        into_wrapper.load_state_dict(bare.state_dict())
    into_wrapper.load_state_dict(wrapper.state_dict())
    assert into_wrapper.clipper.state_dict()["calls"] == own["calls"]

    # a deep copy (with its model: they share the copied parameters) steps alike, where
    # a copy of the bare optimizer does (LBFGS loses its _params: torch's __getstate__)
    bare_twin_model, bare_twin = copy.deepcopy((bare_model, bare))
    try:
        _step(info, bare_twin, bare_twin_model, 3)
    except AttributeError:
        return
    twin_model, twin = copy.deepcopy((model, wrapper))
    _step(info, twin, twin_model, 3)
    _step(info, wrapper, model, 3)
    for a, b in zip(model.parameters(), twin_model.parameters(), strict=True):
        assert torch.equal(a, b)
    _same(twin.state_dict(), wrapper.state_dict())


FUSED = [c for c in CONFIGS if c.values[2] == "fused"]


@pytest.mark.parametrize("strategy", list(NEVER))
@pytest.mark.parametrize(("info", "kwargs", "impl"), FUSED)
def test_grad_scale_and_found_inf_as_on_the_bare_fused_optimizer(
    info, kwargs, impl, strategy
):
    model, wrapper, bare_model, bare = _twins(info, kwargs, impl, strategy)
    for step, found in enumerate((0.0, 1.0, 0.0)):
        for opt, m in ((wrapper, model), (bare, bare_model)):
            opt.zero_grad()
            (2.0 * _loss(info, m, step)).backward()
            opt.grad_scale = torch.tensor(2.0)
            opt.found_inf = torch.tensor(found)
            opt.step()
    _assert_twins(model, wrapper, bare_model, bare)
    assert wrapper.counts()["steps"] == 2
