import pytest

import clipopt
from clipopt import ClipResult, ClipStrategy, functional


def test_available_strategies_sorted_and_has_builtins():
    names = clipopt.available_strategies()
    assert names == sorted(names)
    assert {"norm", "value"} <= set(names)


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match=r"unknown strategy 'nrom'; available: .*norm"):
        clipopt.get_strategy("nrom")


def test_unknown_kwarg_names_accepted_ones():
    with pytest.raises(
        TypeError,
        match=r"strategy 'norm' got unexpected keyword argument\(s\) max_nrom; "
        r"it accepts: max_norm, norm_type, scope, foreach",
    ):
        clipopt.get_strategy("norm", max_nrom=1.0)


def test_missing_required_kwarg_is_typeerror():
    with pytest.raises(TypeError, match="clip_value"):
        clipopt.get_strategy("value")


def test_name_must_be_str():
    with pytest.raises(TypeError, match="strategy name must be a str, got 3"):
        clipopt.get_strategy(3)


class _Half(ClipStrategy):
    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = max_norm

    def measure(self, inputs):
        return functional.total_norm(inputs.grads)

    def clip_(self, inputs, norm):
        coef = functional.clip_coef(norm, self.max_norm / 2)
        functional.scale_(inputs.grads, coef)
        return ClipResult(norm.new_full((), self.max_norm / 2), coef, coef < 1)


def test_register_user_strategy_and_use_it_by_name():
    import torch

    clipopt.register_strategy("test-half")(_Half)
    assert "test-half" in clipopt.available_strategies()
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    opt = clipopt.ClippedOptimizer(torch.optim.SGD([p], lr=1.0), "test-half", max_norm=2.0)
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([-0.6, -0.8]))
    with pytest.raises(ValueError, match="already registered"):
        clipopt.register_strategy("test-half")


def test_register_rejects_non_strategies_and_bad_names():
    with pytest.raises(TypeError, match="needs a ClipStrategy subclass"):
        clipopt.register_strategy("test-not-a-strategy")(dict)
    with pytest.raises(ValueError, match="non-empty"):
        clipopt.register_strategy("")
    with pytest.raises(TypeError, match="name must be a str"):
        clipopt.register_strategy(None)


def test_strategy_must_implement_protocol():
    class Incomplete(ClipStrategy):
        def measure(self, inputs):
            return None

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()
