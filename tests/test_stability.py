"""The stability benchmark (``benchmarks/stability``): what it measured is what ships.

The full benchmark is ``make stability`` (about 35 minutes); here run its self-checks,
the shipped default against the rule the benchmark chose, step for step on real tasks,
and the CI subset: every task, two seeds, the default against no clipping.
"""

import math

import pytest
import torch

import clipopt
from benchmarks.stability import candidates, methods, run, selfcheck
from benchmarks.stability.tasks import TASKS


@pytest.fixture
def one_thread():
    """The benchmark's setting, one torch thread; the count is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_benchmark_self_checks_pass(capsys):
    selfcheck.main()  # the candidate is scale-free, 3 scalars; the gate is OLMo-core's
    assert "selfcheck passed" in capsys.readouterr().out


@pytest.mark.parametrize("task", ["cnn_momentum", "transformer_adamw", "rnn_sgd_sum"])
def test_shipped_default_is_the_rule_the_benchmark_chose(task, one_thread):
    """``ClippedOptimizer(opt)`` clips as ``candidates.recommended`` for 25 real steps.

    The two differ only in rounding (clipopt's norm sums in float64): the coefficients
    agree to 1e-5 at every step. Under SGD the parameters agree too; Adam divides by
    the root of tiny second moments, which turns rounding-level differences of the
    gradients into visible ones of the parameters within a few steps, so there the
    coefficients are the comparison.
    """
    spec = TASKS[task]
    ours, theirs = spec.make(0), spec.make(0)
    wrapped = clipopt.ClippedOptimizer(ours.optimizer)
    rule = candidates.recommended([p for p in theirs.model.parameters() if p.requires_grad])
    for step in range(25):
        for r in (ours, theirs):
            r.optimizer.zero_grad(set_to_none=True)
            r.train_loss(step).backward()
        wrapped.step()
        coef = rule.clip_()
        theirs.optimizer.step()
        assert float(wrapped.last_stats.coef) == pytest.approx(float(coef[0]), rel=1e-5)
    if isinstance(ours.optimizer, torch.optim.SGD):
        for a, b in zip(ours.model.parameters(), theirs.model.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_ci_subset_the_default_never_diverges(one_thread):
    """Every task, seeds 0-1: the default survives where no clipping diverges."""
    rows = {}
    for spec in TASKS.values():
        for seed in (0, 1):
            for method in (methods.CLIPOPT_DEFAULT, methods.no_clip()):
                rows[spec.name, method.name, seed] = run.train(spec, method, seed, False)
    for (task, name, seed), row in rows.items():
        if name == methods.CLIPOPT_DEFAULT.name:
            assert not row["diverged"], (task, seed, row)
            assert math.isfinite(row["loss"])
    unclipped = [r for (_, n, _), r in rows.items() if n == "no clipping"]
    assert sum(r["diverged"] for r in unclipped) >= 6  # the tasks do explode
