"""The framework recipes of examples/frameworks, run for real where they install."""

import pathlib

import pytest
import torch

import clipopt
from tests.conftest import load_script

FRAMEWORKS = pathlib.Path(__file__).parent.parent / "examples" / "frameworks"


def _load(name):
    return load_script(FRAMEWORKS / f"{name}.py")


def test_lightning_recipe():
    pytest.importorskip("lightning")
    opt = _load("lightning_recipe").main(steps=12)
    assert isinstance(opt, clipopt.ClippedOptimizer)
    assert opt.counts()["steps"] == 12
    assert opt.counts()["clipped_steps"] > 0


def test_hugging_face_trainer_recipe():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    clipping = _load("hf_trainer_recipe").main(steps=12)
    assert clipping.counts()["steps"] == 12
    assert clipping.counts()["clipped_steps"] > 0


@pytest.mark.slow
def test_compiled_training_step():
    """torch.compile the model's forward/backward; clipopt steps as usual."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    )
    eager = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    )
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model)
    opts = [
        clipopt.ClippedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), max_norm=0.5)
        for m in (model, eager)
    ]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(16, 8, generator=g), 10 * torch.randn(16, 1, generator=g)
        for net, opt in ((compiled, opts[0]), (eager, opts[1])):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            opt.step()
    for a, b in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert opts[0].counts()["clipped_steps"] > 0
