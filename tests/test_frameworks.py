"""The framework recipes of examples/frameworks, run for real where they install."""

import pathlib
import tempfile
import warnings

import pytest
import torch

import clipopt
from tests.conftest import load_script

FRAMEWORKS = pathlib.Path(__file__).parent.parent / "examples" / "frameworks"


def _load(name):
    return load_script(FRAMEWORKS / f"{name}.py")


def test_lightning_recipe_logs_statistics():
    pytest.importorskip("lightning")
    from lightning.pytorch.loggers import CSVLogger

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no double-clipping warning
        warnings.filterwarnings("ignore", message=".*(num_workers|LeafSpec).*")
        opt, trainer = _load("lightning_recipe").main(
            steps=12, logger=CSVLogger(tempfile.mkdtemp())
        )
    assert isinstance(opt, clipopt.ClippedOptimizer)
    assert opt.counts()["steps"] == 12
    assert opt.counts()["clipped_steps"] > 0
    assert {"clip/norm", "clip/clip_rate", "clip/skipped"} <= set(trainer.logged_metrics)


def test_lightning_clipping_too_is_reported_at_the_first_step():
    pytest.importorskip("lightning")
    with pytest.warns(
        UserWarning, match=r"gradient_clip_val=1.0\): set gradient_clip_val=None"
    ):
        _load("lightning_recipe").main(steps=2, clip_val=1.0)


class _Recorder:
    """A reporter after clipopt's callback: records what it is given to log."""

    def __init__(self):
        self.logs = []

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def test_hugging_face_trainer_recipe_logs_statistics():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    recipe = _load("hf_trainer_recipe")
    recorder = _Recorder()
    original = recipe.huggingface.install

    def install_and_record(trainer):
        callback = original(trainer)
        trainer.callback_handler.callbacks.append(recorder)
        return callback

    recipe.huggingface.install = install_and_record
    try:
        clipping, _ = recipe.main(steps=12)
    finally:
        recipe.huggingface.install = original
    assert clipping.counts()["steps"] == 12
    assert clipping.counts()["clipped_steps"] > 0
    logged = [log for log in recorder.logs if "clip/norm" in log]
    assert len(logged) >= 2  # every 5 steps, and at the end
    assert logged[-1]["clip/clip_rate"] > 0


def test_hugging_face_clipping_too_is_reported_also_for_subclasses():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    class MyArguments(transformers.TrainingArguments):
        pass

    with pytest.warns(UserWarning, match=r"max_grad_norm=1.0\): set max_grad_norm=0"):
        _load("hf_trainer_recipe").main(steps=2, max_grad_norm=1.0, args_class=MyArguments)
    assert clipopt.check_double_clipping(MyArguments("out", max_grad_norm=0.5))


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
        clipopt.ClippedOptimizer(
            torch.optim.SGD(m.parameters(), lr=0.1), "norm", max_norm=0.5
        )
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
