import math
import warnings

import pytest
import torch

import clipopt
import clipopt.plots
from clipopt import ClippedOptimizer
from tests.conftest import batches, loss_of
from tests.test_optimizer import _model, _train


def test_history_records_every_step_and_matches_last_stats():
    model = _model()
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "norm", max_norm=1.0
    )
    history = clipopt.StatsHistory(opt)
    seen = []
    for batch in batches(5):
        opt.zero_grad()
        loss_of(model, batch).backward()
        opt.step()
        seen.append(opt.last_stats.to_dict())
    data = history.to_dict()
    assert len(history) == 5
    for i, stats in enumerate(seen):
        for key, value in stats.items():
            assert data[key][i] == pytest.approx(value)
    history.close()
    _train(model, opt, batches(2))
    assert len(history) == 5


def _bad_steps(opt, model, bad_at, steps=5):
    for i, batch in enumerate(batches(steps)):
        opt.zero_grad()
        loss_of(model, batch).backward()
        if i in bad_at:
            with torch.no_grad():
                model[0].weight.grad[0, 0] = math.nan
        opt.step()


@pytest.mark.parametrize("attached", [False, True], ids=["wrapper", "attach"])
def test_history_and_logs_keep_skipped_steps_with_the_engine_step_numbers(attached):
    model = _model()
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = inner
    front = clipopt.attach(inner, "norm", max_norm=1.0) if attached else None
    if not attached:
        opt = front = ClippedOptimizer(inner, "norm", max_norm=1.0)
    history = clipopt.StatsHistory(front)
    logged = []
    clipopt.log_stats(front, lambda stats, step: logged.append((step, stats)), every=1)
    _bad_steps(opt, model, bad_at=(1, 3))
    data = history.to_dict()
    assert history.steps == [0, 1, 2, 3, 4]  # every step, skipped ones too
    assert data["nonfinite"] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert data["skipped"] == [0.0, 1.0, 0.0, 1.0, 0.0]
    assert [step for step, _ in logged] == [1, 2, 3, 4, 5]
    assert [stats["clip/skipped"] for _, stats in logged] == data["skipped"]
    assert logged[-1][1]["clip/skipped_steps"] == 2.0


def test_history_memory_is_bounded():
    model = _model()
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "norm", max_norm=1.0
    )
    history = clipopt.StatsHistory(opt, window=4, block=3)
    _train(model, opt, batches(3))
    assert history._pending == []  # a full block went to the host in one copy
    _train(model, opt, batches(7))
    assert len(history._pending) == 1  # 10 steps: 3 blocks moved, 1 row waiting
    assert len(history) == 4
    assert history.steps == [6, 7, 8, 9]  # the last window
    with pytest.raises(ValueError, match="window must be >= 1"):
        clipopt.StatsHistory(opt, window=0)


def test_recording_and_non_logging_steps_do_not_read_the_device():
    params = [torch.nn.Parameter(torch.empty(3, device="meta"))]
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.1), nonfinite="propagate")
    clipopt.StatsHistory(opt)
    clipopt.log_stats(opt, lambda s, step: None, every=1000)
    for _ in range(3):
        params[0].grad = torch.empty_like(params[0])
        opt.step()  # any host read would raise on meta tensors


def test_log_stats_to_a_callable_every_n_steps():
    model = _model()
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "norm", max_norm=0.01
    )
    logged = []
    logger = clipopt.log_stats(
        opt, lambda stats, step: logged.append((step, stats)), every=2
    )
    _train(model, opt, batches(6))
    assert [step for step, _ in logged] == [2, 4, 6]
    _, stats = logged[-1]
    assert set(stats) == {
        f"clip/{k}"
        for k in (
            "norm",
            "post_clip_norm",
            "threshold",
            "coef",
            "clipped",
            "skipped",
            "clip_rate",
            "skipped_steps",
            "spike_steps",
            "nonfinite_steps",
        )
    }
    assert stats["clip/post_clip_norm"] == pytest.approx(
        stats["clip/norm"] * stats["clip/coef"]
    )
    assert stats["clip/clip_rate"] == 1.0
    logger.close()
    _train(model, opt, batches(2))
    assert len(logged) == 3


def test_log_stats_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = _model()
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "norm", max_norm=1.0
    )
    writer = SummaryWriter(str(tmp_path))
    clipopt.log_stats(opt, writer, every=1)
    _train(model, opt, batches(3))
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert "clip/norm" in events.Tags()["scalars"]
    assert [e.step for e in events.Scalars("clip/norm")] == [1, 2, 3]


def test_log_stats_rejects_bad_targets():
    opt = ClippedOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1))
    with pytest.raises(TypeError, match="SummaryWriter"):
        clipopt.log_stats(opt, 3)
    with pytest.raises(ValueError, match="every must be >= 1"):
        clipopt.log_stats(opt, print, every=0)
    with pytest.raises(
        TypeError, match=r"clipopt\.ClippedOptimizer or a clipopt\.Attachment"
    ):
        clipopt.log_stats(torch.optim.SGD(_model().parameters(), lr=0.1), print)


def test_warns_when_clipping_always_or_never_fires():
    model = _model()
    always = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), "norm", max_norm=1e-9
    )
    clipopt.log_stats(always, lambda s, step: None, every=1, warn_after=3)
    with pytest.warns(UserWarning, match="fired on every one of the last"):
        _train(model, always, batches(6))
    model = _model()
    never = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.0), "norm", max_norm=1e9
    )
    clipopt.log_stats(never, lambda s, step: None, every=1, warn_after=3)
    with pytest.warns(UserWarning, match="has not fired in the last"):
        _train(model, never, batches(6))


@pytest.mark.parametrize("chained", [False, True])
def test_the_default_clips_every_step_by_design_so_no_warning(chained):
    """The default's threshold sits below the typical norm: no "threshold too low"."""
    p = torch.nn.Parameter(torch.zeros(3))
    strategy = clipopt.RelativeClip()
    if chained:
        strategy = clipopt.Chain(strategy, clipopt.NormClip(1e9))
    opt = ClippedOptimizer(torch.optim.SGD([p], lr=0.0), strategy)
    clipopt.log_stats(opt, lambda s, step: None, every=1, warn_after=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            p.grad = torch.tensor([1.0, 2.0, 2.0])
            opt.step()
    assert opt.counts()["clipped_steps"] == 6  # it did clip every step
    assert not [w for w in caught if "fired on every one" in str(w.message)]
    assert not clipopt.RelativeClip(ratio=3.0).clips_most_steps  # not by design there


def test_no_gradient_warning_is_rate_limited():
    opt = ClippedOptimizer(torch.optim.SGD(_model().parameters(), lr=0.1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(12):
            opt.step()
    messages = [str(w.message) for w in caught if "found no gradients" in str(w.message)]
    assert len(messages) == 2  # the 1st and the 10th
    assert "10 time(s) so far" in messages[1]


@pytest.mark.parametrize("front", ["wrapper", "attach"])
def test_the_no_gradient_warning_points_at_the_callers_line(front):
    """Not at clipopt's or torch.optim's frames (attach runs inside torch's step)."""
    sgd = torch.optim.SGD(_model().parameters(), lr=0.1)
    opt = ClippedOptimizer(sgd) if front == "wrapper" else sgd
    if front == "attach":
        clipopt.attach(sgd)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    [warning] = [w for w in caught if "found no gradients" in str(w.message)]
    assert warning.filename == __file__


def test_an_optimizer_without_parameters_warns_and_steps_nothing():
    """torch accepts a group without parameters; the step has no gradients."""
    opt = ClippedOptimizer(torch.optim.SGD([{"params": []}], lr=0.1), "norm")
    with pytest.warns(UserWarning, match="found no gradients"):
        opt.step()
    assert opt.counts()["steps"] == 0


def test_grad_report_norms_and_statuses():
    model = _model()
    loss_of(model, batches(1)[0]).backward()
    with torch.no_grad():
        model[0].weight.grad.mul_(1e5)  # exploding
        model[2].bias.grad.mul_(1e-7)  # vanishing
    report = clipopt.grad_report(model)
    names = [r.name for r in report.rows]
    assert names == [n for n, _ in model.named_parameters()]
    for row, (_, p) in zip(report.rows, model.named_parameters(), strict=True):
        assert row.grad_norm == pytest.approx(float(torch.norm(p.grad)), rel=1e-6)
        assert row.param_norm == pytest.approx(float(torch.norm(p)), rel=1e-6)
        assert row.ratio == pytest.approx(row.grad_norm / row.param_norm)
    status = {r.name: r.status for r in report.rows}
    assert status["0.weight"] == "exploding"
    assert status["2.bias"] == "vanishing"
    assert status["0.bias"] == "ok"
    assert report.counts == {"ok": 2, "vanishing": 1, "exploding": 1}
    text = str(report)
    assert "0.weight" in text
    assert "exploding" in text
    assert "1 exploding, 1 vanishing" in text


def test_grad_report_nonfinite_and_empty():
    model = _model()
    loss_of(model, batches(1)[0]).backward()
    model[2].weight.grad[0, 0] = math.nan
    report = clipopt.grad_report(model)
    assert {r.name for r in report.exploding} == {"2.weight"}
    assert math.isinf(report.total_norm)
    model.zero_grad()
    assert clipopt.grad_report(model).rows == []


def test_recorder_and_plots(tmp_path):
    model = _model()
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), "norm", max_norm=0.5
    )
    history = clipopt.StatsHistory(opt)
    recorder = clipopt.GradRecorder(model)
    for batch in batches(8):
        opt.zero_grad()
        loss_of(model, batch).backward()
        recorder.record()
        opt.step()
    assert len(recorder.history) == 8
    assert recorder.history[0][0] > 0
    stats_png = clipopt.plots.plot_stats(history, tmp_path / "stats.png")
    heat_png = clipopt.plots.plot_layer_heatmap(recorder, tmp_path / "heat.png")
    for png in (stats_png, heat_png):
        assert png.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no recorded step"):
        clipopt.plots.plot_layer_heatmap(clipopt.GradRecorder(model), tmp_path / "x.png")


def test_check_double_clipping():
    class LightningLike:
        gradient_clip_val = 1.0

    with pytest.warns(UserWarning, match="gradient_clip_val=None"):
        assert clipopt.check_double_clipping(LightningLike())

    class Quiet:
        gradient_clip_val = None

    assert clipopt.check_double_clipping(Quiet()) == []
    transformers = pytest.importorskip("transformers")
    args = transformers.TrainingArguments(
        output_dir="unused", max_grad_norm=1.0, report_to=[]
    )
    with pytest.warns(UserWarning, match="max_grad_norm=0"):
        assert clipopt.check_double_clipping(args)
