"""The wrapper against torch's clip + inner step, bit for bit, for every optimizer."""

import copy

import pytest
import torch

import clipopt
import clipopt._norms
from tests.conftest import batches, loss_of, make_model, optimizer_variants

# numerics: bits and accuracy must hold on one thread and on several
pytestmark = [
    pytest.mark.usefixtures("threads"),
    pytest.mark.parametrize("threads", [1, 2], indirect=True),
]


REFERENCE_CLIP = {
    "norm": lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5),
    "norm-inf": lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.2, float("inf")),
    "norm-p1.5": lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.4, 1.5),
    "value": lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.05),
}
STRATEGIES = {
    "norm": ("norm", {"max_norm": 0.5}),
    "norm-inf": ("norm", {"max_norm": 0.2, "norm_type": float("inf")}),
    "norm-p1.5": ("norm", {"max_norm": 0.4, "norm_type": 1.5}),
    "value": ("value", {"clip_value": 0.05}),
}


class _Branches(torch.nn.Module):
    """17 parallel same-shaped layers, summed: enough small tensors to stack."""

    def __init__(self, bias):
        super().__init__()
        self.inner = torch.nn.ModuleList(
            torch.nn.Linear(5, 5, bias=bias) for _ in range(17)
        )

    def forward(self, x):
        return sum(torch.tanh(layer(x)) for layer in self.inner)


def _deep_model(cls, dtype):
    """Many same-shaped small tensors: the wrapper batches their norms (NormPlan)."""
    bias = cls is not torch.optim.Muon
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 5, bias=bias),
        torch.nn.Tanh(),
        _Branches(bias),
        torch.nn.Linear(5, 3, bias=bias),
    ).to(dtype)


def _twin_run(cls, kwargs, strategy, dtype, steps=6, model=make_model):
    model_a = model(cls, dtype)
    model_b = copy.deepcopy(model_a)
    name, skw = STRATEGIES[strategy]
    opt_a = clipopt.ClippedOptimizer(cls(model_a.parameters(), **kwargs), name, **skw)
    opt_b = cls(model_b.parameters(), **kwargs)
    clip_b = REFERENCE_CLIP[strategy]
    for batch in batches(steps, dtype):
        if cls is torch.optim.LBFGS:

            def closure_a(batch=batch):
                opt_a.zero_grad()
                loss = loss_of(model_a, batch)
                loss.backward()
                return loss

            def closure_b(batch=batch):
                opt_b.zero_grad()
                loss = loss_of(model_b, batch)
                loss.backward()
                clip_b(list(model_b.parameters()))
                return loss

            loss_a, loss_b = opt_a.step(closure_a), opt_b.step(closure_b)
            assert torch.equal(loss_a, loss_b)
        else:
            opt_a.zero_grad()
            loss_of(model_a, batch).backward()
            opt_a.step()
            opt_b.zero_grad()
            loss_of(model_b, batch).backward()
            clip_b(list(model_b.parameters()))
            opt_b.step()
        for pa, pb in zip(model_a.parameters(), model_b.parameters(), strict=True):
            if opt_a.clipper.fused and opt_a.strategy.single_factor:
                # the fused kernel divides by 1 / coef where torch multiplies by coef
                torch.testing.assert_close(
                    pa, pb, rtol=1e-6, atol=1e-6 * float(pb.abs().max())
                )
            else:
                assert torch.equal(pa, pb)
    return opt_a


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize(("cls", "kwargs"), optimizer_variants())
def test_wrapper_equals_torch_clip_then_step(cls, kwargs, strategy, dtype):
    opt = _twin_run(cls, kwargs, strategy, dtype)
    counts = opt.counts()
    # the comparison means something only if clipping was active on some steps
    assert counts["clipped_steps"] >= 1
    assert counts["skipped_steps"] == 0


@pytest.mark.parametrize(
    "cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad]
)
def test_fused_path_takes_over_the_scaling_pass(cls):
    opt = _twin_run(cls, {"fused": True}, "norm", torch.float32)
    assert opt.clipper.fused
    assert opt.strategy.single_factor
    assert "grad_scale" not in vars(opt.optimizer)  # handed over for the step only


@pytest.mark.parametrize("strategy", ["norm", "norm-inf", "norm-p1.5", "value"])
@pytest.mark.parametrize(("cls", "kwargs"), optimizer_variants())
def test_batched_norms_stay_bit_identical(cls, kwargs, strategy):
    """With norms batched over same-shaped tensors, still torch's bits."""
    opt = _twin_run(cls, kwargs, strategy, torch.float32, model=_deep_model)
    plan = opt.clipper._gradients.layout.norm_plan(exact=True)
    assert plan is not None
    assert plan.active
    assert opt.counts()["clipped_steps"] >= 1


def test_matrix_covers_every_torch_optimizer():
    covered = {p.values[0].__name__ for p in optimizer_variants()}
    expected = {
        name
        for name in torch.optim.__all__
        if isinstance(getattr(torch.optim, name), type)
        and issubclass(getattr(torch.optim, name), torch.optim.Optimizer)
    } - {"Optimizer", "SparseAdam"}
    assert covered == expected
    ids = {p.id for p in optimizer_variants()}
    assert {"Adam-fused", "AdamW-fused", "SGD-fused", "Adagrad-fused"} <= ids
    assert {"Adam-foreach", "Adam-forloop", "LBFGS-forloop", "Muon-forloop"} <= ids


def _wide_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 300), torch.nn.Tanh(), torch.nn.Linear(300, 300),
        torch.nn.Tanh(), torch.nn.Linear(300, 3),
    )  # fmt: skip


def _one_step(opt, model):
    opt.zero_grad()
    x, y = batches(1)[0]
    torch.nn.functional.mse_loss(model(x), 30 * y).backward()
    ref = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    opt.step()
    return ref


def test_exact_path_keeps_torch_bits_with_large_tensors():
    model = _wide_model()  # a 90,000-element weight: a dot product would change bits
    opt = clipopt.ClippedOptimizer(torch.optim.AdamW(model.parameters()), "norm")
    ref = _one_step(opt, model)
    assert torch.equal(opt.last_stats.norm, ref)
    assert opt.clipper._gradients.layout.norm_plan(exact=False) is not None  # unused


@pytest.mark.parametrize(
    ("strategy", "fused"), [("norm", True), ("zscore", False), ("adagc", False)]
)
def test_fast_norms_where_bits_are_not_promised(strategy, fused):
    model = _wide_model()
    inner = torch.optim.AdamW(model.parameters(), fused=fused)
    opt = clipopt.ClippedOptimizer(inner, strategy)
    seen = []
    original = clipopt._norms.NormPlan.norms

    def spy(self, *args):
        seen.append(self.exact)
        return original(self, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(clipopt._norms.NormPlan, "norms", spy)
        ref = _one_step(opt, model)
    assert seen
    assert not any(seen)  # the dot-product plan
    torch.testing.assert_close(opt.last_stats.norm, ref, rtol=1e-6, atol=0)
