import pytest

import clipopt
from clipopt import ClipResult, ClipStrategy, functional


def test_available_strategies_sorted_and_has_builtins():
    names = clipopt.available_strategies()
    assert names == sorted(names)
    assert {"norm", "value"} <= set(names)


def test_unknown_name_suggests_and_lists_available():
    with pytest.raises(
        ValueError,
        match=r"unknown strategy 'nrom'; did you mean 'norm'\? Available: .*norm",
    ):
        clipopt.get_strategy("nrom")
    with pytest.raises(ValueError, match=r"unknown strategy 'xyz'\. Available: adagc"):
        clipopt.get_strategy("xyz")


def test_names_are_case_insensitive_and_have_the_papers_aliases():
    assert isinstance(clipopt.get_strategy("Norm"), clipopt.NormClip)
    assert isinstance(clipopt.get_strategy(" NORM "), clipopt.NormClip)
    assert isinstance(clipopt.get_strategy("autoclip"), clipopt.PercentileClip)
    assert isinstance(clipopt.get_strategy("ZClip"), clipopt.ZScoreClip)
    assert "autoclip" not in clipopt.available_strategies()  # names, not aliases
    with pytest.raises(ValueError, match="did you mean 'zclip'"):
        clipopt.get_strategy("zclp")


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

    def clip(self, inputs, measured, skip=None):
        norm = measured.norm
        coef = functional.clip_coef(norm, self.max_norm / 2)
        threshold = norm.new_full((), self.max_norm / 2)
        return ClipResult(threshold, coef, coef < 1, (clipopt.Scale(coef),))


def test_register_user_strategy_and_use_it_by_name():
    import torch

    clipopt.register_strategy("test-half")(_Half)
    assert "test-half" in clipopt.available_strategies()
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    opt = clipopt.ClippedOptimizer(torch.optim.SGD([p], lr=1.0), "test-half", max_norm=2.0)
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([-0.6, -0.8]))
    with pytest.raises(ValueError, match=r"already registered.*override=True"):
        clipopt.register_strategy("test-half")
    with pytest.raises(ValueError, match="already registered"):
        clipopt.register_strategy("TEST-HALF")  # case-insensitive
    with pytest.raises(ValueError, match="already registered"):
        clipopt.register_strategy("other", aliases=("autoclip",))


def test_registering_again_with_override_replaces():
    """A notebook cell that registers a strategy can run again."""

    class _Third(_Half):
        pass

    clipopt.register_strategy("test-override")(_Half)
    clipopt.register_strategy("test-override", override=True)(_Third)
    assert type(clipopt.get_strategy("test-override")) is _Third
    clipopt.register_strategy("test-override", aliases=("test-alias",), override=True)(
        _Half
    )
    assert type(clipopt.get_strategy("Test-Alias")) is _Half


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
