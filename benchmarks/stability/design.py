"""The design study of the default rule: candidates on the design seeds (1000-1004).

The benchmark's own seeds (0-9) were never used to choose a rule. This script reruns, with
the current code, the candidates of the sweep that chose the recommended default (README,
"Candidates"), on the seven tasks the choice was made on (the two validation tasks were
added after it was frozen), against the torch grid-best on the same seeds.

Run: python -m benchmarks.stability.design      (about 20 minutes on one core)
Writes results/design.md and results/design.json.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import time
from typing import Any

import torch

from . import candidates as C
from . import methods as M
from .report import TIE, gap
from .run import train
from .tasks import TASKS

RESULTS = pathlib.Path(__file__).parent / "results"
SEEDS = [1000, 1001, 1002, 1003, 1004]
DESIGN_TASKS = [
    "rnn_sgd_sum",
    "deep_mlp_momentum",
    "cnn_momentum",
    "tiny_regression_spikes",
    "classifier_corrupt_adamw",
    "rnn_adam_glitch",
    "transformer_adamw",
]

# (label, RelativeClip keyword arguments), in the order they were tried
G = {"scope": "global"}
SPECS: list[tuple[str, dict[str, Any]]] = [
    ("naive: tensor, c=2 (EMA of clipped norms)", {"c": 2.0}),
    ("AdaGC-relative: tensor, c=1.04, running min 20", {"c": 1.04, "min_steps": 20}),
    ("tensor, c=2, ramp 20", {"c": 2.0, "ramp": 20}),
    ("AdaGC-relative + ramp 20", {"c": 1.04, "min_steps": 20, "ramp": 20}),
    (
        "tensor, c=1, never up, bd .99, ramp 20",
        {"c": 1.0, "beta_up": 1.0, "beta_down": 0.99, "ramp": 20},
    ),
    (
        "tensor, c=1, K=2, bd .9, ramp 20",
        {"c": 1.0, "cap": 2.0, "beta_down": 0.9, "ramp": 20},
    ),
    (
        "tensor, c=0.75, K=2, bd .9, ramp 20",
        {"c": 0.75, "cap": 2.0, "beta_down": 0.9, "ramp": 20},
    ),
    (
        "tensor, c=0.5, K=2, bd .9, ramp 20",
        {"c": 0.5, "cap": 2.0, "beta_down": 0.9, "ramp": 20},
    ),
    (
        "tensor, c=0.5, K=1 (never up), bd .9, ramp 20",
        {"c": 0.5, "cap": 1.0, "beta_down": 0.9, "ramp": 20},
    ),
    (
        "global, c=2, K=2, bd .9, ramp 20",
        {**G, "c": 2.0, "cap": 2.0, "beta_down": 0.9, "ramp": 20},
    ),
    (
        "global, c=0.75, K=2, bd .9, ramp 20",
        {**G, "c": 0.75, "cap": 2.0, "beta_down": 0.9, "ramp": 20},
    ),
    (
        "global, c=0.6, K=2, bd .9, ramp 20",
        {**G, "c": 0.6, "cap": 2.0, "beta_down": 0.9, "ramp": 20},
    ),
    (
        "global, c=0.5, K=2, bd .9, ramp 20",
        {**G, "c": 0.5, "cap": 2.0, "beta_down": 0.9, "ramp": 20},
    ),
    (
        "global, c=0.4, K=2, bd .9, ramp 20",
        {**G, "c": 0.4, "cap": 2.0, "beta_down": 0.9, "ramp": 20},
    ),
    (
        "global, c=0.5, K=2, bd .9, ramp 50",
        {**G, "c": 0.5, "cap": 2.0, "beta_down": 0.9, "ramp": 50},
    ),
    (
        "global, c=0.5, K=2, bd .9, ramp 20, log",
        {**G, "c": 0.5, "cap": 2.0, "beta_down": 0.9, "ramp": 20, "log": True},
    ),
    (
        "global, c=0.5, K=1.5, bd .9, ramp 20",
        {**G, "c": 0.5, "cap": 1.5, "beta_down": 0.9, "ramp": 20},
    ),
    (
        "global, c=0.5, K=2, bd .95, ramp 20",
        {**G, "c": 0.5, "cap": 2.0, "beta_down": 0.95, "ramp": 20},
    ),
    (
        "global, c=0.5, K=2, bu=bd=.95, ramp 20",
        {**G, "c": 0.5, "cap": 2.0, "beta_up": 0.95, "beta_down": 0.95, "ramp": 20},
    ),
    (
        "global, c=0.5, K=2, bd .98, ramp 20",
        {**G, "c": 0.5, "cap": 2.0, "beta_down": 0.98, "ramp": 20},
    ),
    (
        "global, c=0.5, K=2, bd .99, ramp 20",
        {**G, "c": 0.5, "cap": 2.0, "beta_down": 0.99, "ramp": 20},
    ),
    (
        "tensor, c=0.5, K=2, bd .98, ramp 20",
        {"c": 0.5, "cap": 2.0, "beta_down": 0.98, "ramp": 20},
    ),
    ("RECOMMENDED: global, c=0.4, K=2, bd .98, ramp 20", dict(C.RECOMMENDED)),
    ("recommended without ramp", {**C.RECOMMENDED, "ramp": 0}),
]


def main() -> None:
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    scores: dict[str, dict[str, list[tuple[float, bool]]]] = {}
    best: dict[str, list[float]] = {}
    grid_best: dict[str, float] = {}
    for name in DESIGN_TASKS:
        task = TASKS[name]
        grid: dict[float, list[float]] = {}
        for v in M.torch_grid(*task.grid):
            grid[v] = [train(task, M.torch_norm(v), s, False)["score"] for s in SEEDS]
        means = {v: statistics.fmean(s) for v, s in grid.items()}
        low = min(means.values())
        grid_best[name] = max(v for v, m in means.items() if m <= low * (1 + TIE))
        best[name] = grid[grid_best[name]]
        for label, kw in SPECS:
            method = M.candidate(label, lambda p, kw=kw: C.RelativeClip(p, **kw))
            runs = [train(task, method, s, False) for s in SEEDS]
            scores.setdefault(label, {})[name] = [(r["score"], r["diverged"]) for r in runs]
        print(f"{name} done at {time.perf_counter() - t0:.0f} s", flush=True)
    lines = [
        "# Design study: candidate rules on the design seeds 1000-1004\n",
        "Gap (%) of the mean final held-out loss to the torch grid-best on the same seeds, "
        "± paired SE, (n div) = diverged runs. `worst` = largest gap over the tasks "
        "(div if any run diverged). Generated by `benchmarks/stability/design.py` in "
        f"{(time.perf_counter() - t0) / 60:.0f} min.\n",
        "grid-best max_norm: "
        + ", ".join(f"{t} {v:g}" for t, v in grid_best.items())
        + "\n",
        "| rule | " + " | ".join(DESIGN_TASKS) + " | worst |",
        "| --- |" + " --- |" * (len(DESIGN_TASKS) + 1),
    ]
    for label, _ in SPECS:
        cells, worst = [], -1e9
        for name in DESIGN_TASKS:
            runs = scores[label][name]
            g, se = gap([r[0] for r in runs], best[name])
            div = sum(r[1] for r in runs)
            cells.append(f"{g:+.1f} ± {se:.1f}" + (f" ({div} div)" if div else ""))
            worst = max(worst, 1e9 if div else g)
        w = "div" if worst >= 1e9 else f"{worst:+.0f}"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {w} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "design.md").write_text("\n".join(lines) + "\n")
    payload = {"grid_best": grid_best, "best": best, "scores": scores, "specs": SPECS}
    (RESULTS / "design.json").write_text(json.dumps(payload))
    print("wrote", RESULTS / "design.md")


if __name__ == "__main__":
    main()
