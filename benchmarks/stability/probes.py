"""Two probes behind the README's limits section (3 seeds each, about 4 minutes).

A. Does clipping replace a warm-up under AdamW? The transformer task without its
   corrupted batches, at its LR (1e-2) and at 4x (4e-2): no clipping, no clipping with a
   10% linear LR warm-up, torch clipping at three thresholds, the recommended default.
B. Is an SGD threshold a learning rate? The RNN/SGD task at its LR (8e-4) and at the best
   unclipped LR (2e-4): no clipping, four torch thresholds, the recommended default.

Run: python -m benchmarks.stability.probes   (writes results/probes.md and .json)
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import statistics
from collections.abc import Iterator
from typing import Any

import torch

from . import candidates as C
from . import methods as M
from .run import train
from .tasks import TASKS, Task, TaskRun

RESULTS = pathlib.Path(__file__).parent / "results"
SEEDS = [0, 1, 2]


@contextlib.contextmanager
def patched(task: Task, **info: Any) -> Iterator[Task]:
    """The task with some of its settings changed, restored afterwards."""
    saved = dict(task.info)
    task.info.update(info)
    try:
        yield task
    finally:
        task.info.clear()
        task.info.update(saved)


def warmed(inner: M.Method, steps: int) -> M.Method:
    """``inner`` with a linear LR warm-up over ``steps`` steps."""

    def make(run: TaskRun) -> M.Stepper:
        sched = torch.optim.lr_scheduler.LambdaLR(
            run.optimizer, lambda s: min(1.0, (s + 1) / steps)
        )
        stepper = inner.prepare(run)

        def step(loss: torch.Tensor) -> None:
            stepper.step(loss)
            sched.step()

        return M.Stepper(step)

    return M.Method(f"{inner.name}, {steps}-step LR warm-up", inner.kind, make)


def probe(task: Task, methods: list[M.Method], **info: Any) -> list[dict[str, Any]]:
    rows = []
    with patched(task, **info):
        for m in methods:
            runs = [train(task, m, s, record_norms=False) for s in SEEDS]
            rows.append(
                {
                    "task": task.name,
                    "setting": info,
                    "method": m.name,
                    "scores": [r["score"] for r in runs],
                    "diverged": sum(r["diverged"] for r in runs),
                }
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    torch.set_num_threads(1)
    default = M.candidate("recommended default", C.recommended)
    rows: list[dict[str, Any]] = []
    tr = TASKS["transformer_adamw"]
    for lr in (1e-2, 4e-2):
        methods = [
            M.no_clip(),
            warmed(M.no_clip(), tr.steps // 10),
            *(M.torch_norm(v) for v in (0.01, 0.1, 1.0)),
            default,
        ]
        rows += probe(tr, methods, lr=lr, corrupt=0)
    rnn = TASKS["rnn_sgd_sum"]
    for lr in (2e-4, 8e-4):
        methods = [M.no_clip(), *(M.torch_norm(v) for v in (30.0, 100.0, 300.0, 1000.0))]
        rows += probe(rnn, [*methods, default], lr=lr)
    lines = [
        "# Probes (seeds 0-2; mean final held-out loss, diverged runs at the trivial "
        "baseline)\n",
        "| task | setting | method | mean loss | per seed | diverged |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        setting = ", ".join(f"{k}={v:g}" for k, v in r["setting"].items())
        per = " ".join(f"{s:.4g}" for s in r["scores"])
        lines.append(
            f"| {r['task']} | {setting} | {r['method']} "
            f"| {statistics.fmean(r['scores']):.4g} | {per} | {r['diverged']} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "probes.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "probes.json").write_text(json.dumps(rows))
    print("wrote", RESULTS / "probes.md")


if __name__ == "__main__":
    main()
