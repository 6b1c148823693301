"""The benchmark script runs end to end (speed is measured by make bench, not here)."""

import json
import pathlib

from tests.conftest import load_script

BENCH = pathlib.Path(__file__).parent.parent / "benchmarks" / "bench_step.py"


def test_benchmark_quick_mode_writes_results(tmp_path):
    bench = load_script(BENCH)
    results = bench.main(["--quick", "--layouts", "B", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "quick.json").read_text())
    assert data["results"]["cpu"].keys() == results["cpu"].keys() == {"B 2M/2000"}
    entry = data["results"]["cpu"]["B 2M/2000"]
    assert set(entry["inners"]) == {"AdamW fused", "AdamW foreach", "SGD momentum"}
    for inner in entry["inners"].values():
        ratios = inner["ratio_to_torch"]
        assert ratios["torch clip_grad_norm_ + step"] == 1.0
        assert {f"clipopt {s}" for s in bench.STRATEGIES} <= set(ratios)
        assert all(r > 0 for r in ratios.values())
        assert inner["ratio_to_floor"][bench.FLOOR] == 1.0
        assert inner["window_100k_over_100"] > 0
        rates = inner["clip_rate"]
        assert set(rates) == {f"clipopt {s}" for s in bench.STRATEGIES} | {bench.IDLE}
        assert rates[bench.IDLE] == 0.0  # bookkeeping only: it never writes gradients
        assert all(0.0 <= r <= 1.0 for r in rates.values())
        assert 0.0 < rates["clipopt norm"] < 0.1  # only the spike clips at max_norm=1
        assert rates["clipopt adagc"] > rates["clipopt norm"]
        # full windows: the strategy has a history and clips some steps from the start
        assert rates["clipopt percentile w=100000"] > 0.0
    report = (tmp_path / "quick.md").read_text()
    assert "| target | layout | measured | met |" in report
    assert "(restated) adagc <= 1.10x norm + pass" in report
    assert "(restated) adagc bookkeeping <= 1.10x norm" in report


def test_every_case_sees_the_same_gradient_sequence():
    bench = load_script(BENCH)
    grads = bench.Gradients([(3, 4), (5,)])
    seen: dict[str, list[float]] = {"a": [], "b": [], "c": []}

    def record(name):
        return lambda: seen[name].append(float(grads.params[0].grad.norm()))

    bench.measure({n: record(n) for n in seen}, grads, rounds=2, reps=12, sync=lambda: None)
    assert seen["a"] == seen["b"] == seen["c"]
    assert len(seen["a"]) == 2 + 2 * 12  # warm-up steps included
    assert max(seen["a"]) > 10 * min(seen["a"])  # the 20th step's spike is in it
