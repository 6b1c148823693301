import pathlib

import torch

from tests.conftest import load_script

EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"


def _load(name):
    return load_script(EXAMPLES / f"{name}.py")


def test_quickstart_resumes_bitwise_and_clips():
    result = _load("quickstart").main(steps=24, verbose=False)
    assert result["resume_identical"] == 1.0
    assert 0 < result["clip_rate"] <= 1
    assert result["skipped_steps"] == 0


def test_adaptive_strategies_all_beat_no_clipping():
    results = _load("adaptive_strategies").main(steps=150, verbose=False)
    baseline, rate = results.pop("none")
    assert rate == 0.0
    for name, (loss, clip_rate) in results.items():
        assert loss < baseline / 5, name
        assert clip_rate > 0, name


def test_tune_max_norm_demo_runs_and_resumes(tmp_path):
    threads = torch.get_num_threads()
    demo = _load("tune_max_norm")
    kwargs = dict(
        steps=30,
        storage=f"sqlite:///{tmp_path / 'demo.db'}",
        plots=str(tmp_path / "plots"),
        probe_steps=10,
        verbose=False,
    )
    first = demo.main(trials=4, **kwargs)
    assert sum(first.counts.values()) == 4
    assert {b.label for b in first.baselines} == {
        "no clipping",
        "max_norm=1.0",
        "percentile=10",
    }
    again = demo.main(trials=2, **kwargs)  # the same study, resumed
    assert sum(again.counts.values()) == 6
    assert (tmp_path / "plots" / "objective_vs_threshold.png").exists()
    assert torch.get_num_threads() == threads  # main() leaves global state alone
