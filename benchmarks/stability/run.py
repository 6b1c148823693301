"""Run the stability benchmark: every task x method x seed, one process, one thread.

Usage (from the repository root)::

    python -m benchmarks.stability.run                 # full run (10 seeds), ~40 min
    python -m benchmarks.stability.run --quick         # CI subset, a few minutes
    python -m benchmarks.stability.run --tasks rnn_sgd_sum --seeds 3 --methods grid,none
    python -m benchmarks.stability.run --methods candidates --seeds 1000-1004 \\
        --out /tmp/design --append                     # add methods to an earlier run

Writes ``<out>.json`` (every run's numbers) and ``<out>.md`` (the report of
``report.py``). ``--append`` merges into an existing ``<out>.json``, replacing the
(task, method, seed) entries it re-runs.

A run trains for the task's number of steps and scores the final held-out loss. It is
diverged when its training loss becomes non-finite (training stops there), when its
parameters or final held-out loss are not finite, or when the final held-out loss
exceeds the task's trivial baseline; a diverged run is scored at the trivial baseline.

Method selectors for ``--methods`` (comma-separated): ``none``, ``grid`` (the torch
max_norm grid of each task), ``builtins``, ``default`` (``ClippedOptimizer(opt)`` and
the recommended candidate it ports), ``clipopt`` (the default, and clipopt's
``skip_spikes`` with and without it), ``candidates`` (all candidate rules), ``gates``
(spike-skip gate variants, and the gate in front of the task's torch grid-best, chosen
from this run's grid results), ``all``, or an exact method name.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import sys
import time
from typing import Any

import torch

from . import methods as M
from . import report
from .tasks import TASKS, Task

RESULTS = pathlib.Path(__file__).parent / "results"
DEFAULT_METHODS = "all"
QUICK_METHODS = "none,grid,builtins,default,clipopt,gates"
#: Grid values within this relative distance of the best mean tie (as happens when every
#: step is clipped under a scale-invariant optimizer like Adam); the largest one wins.
TIE = 5e-4


def train(task: Task, method: M.Method, seed: int, record_norms: bool) -> dict[str, Any]:
    """Train one seed of ``task`` with ``method``; return its numbers."""
    start = time.perf_counter()
    run = task.make(seed)
    stepper = method.prepare(run)
    params = [p for p in run.model.parameters() if p.requires_grad]
    diverged_at: int | None = None
    norms: list[float] = []
    for step in range(task.steps):
        run.optimizer.zero_grad(set_to_none=True)
        loss = run.train_loss(step)
        if not bool(torch.isfinite(loss)):
            diverged_at = step
            break
        loss.backward()
        if record_norms:
            grads = [p.grad for p in params if p.grad is not None]
            norms.append(float(torch.nn.utils.get_total_norm(grads)))
        stepper.step(loss.detach())
    finite_params = all(bool(torch.isfinite(p).all()) for p in params)
    final = run.heldout_loss() if diverged_at is None and finite_params else math.nan
    diverged = diverged_at is not None or not math.isfinite(final) or final > run.trivial
    out: dict[str, Any] = {
        "task": task.name,
        "method": method.name,
        "kind": method.kind,
        "max_norm": method.max_norm,
        "seed": seed,
        "loss": final if math.isfinite(final) else None,
        "score": run.trivial if diverged else final,
        "trivial": run.trivial,
        "diverged": diverged,
        "diverged_at": diverged_at,
        "skipped": stepper.skipped,
        "corrupted_steps": run.corrupted_steps,
        "seconds": round(time.perf_counter() - start, 3),
    }
    if record_norms:  # every step without clipping, the first 20 for the grid
        kept = norms if method.kind == "none" else norms[:20]
        out["norms"] = [float(f"{n:.4g}") if math.isfinite(n) else None for n in kept]
    return out


def parse_seeds(text: str) -> list[int]:
    """``10`` (seeds 0-9), ``1000-1004`` or ``1,5,7``."""
    if "-" in text:
        lo, hi = text.split("-")
        return list(range(int(lo), int(hi) + 1))
    if "," in text:
        return [int(s) for s in text.split(",")]
    return list(range(int(text)))


def select(selector: str, task: Task, per_decade: int) -> list[M.Method]:
    grid = M.torch_grid(*task.grid, per_decade=per_decade)
    default = M.candidate("recommended default", M.C.recommended)
    groups: dict[str, list[M.Method]] = {
        "none": [M.no_clip()],
        "grid": [M.torch_norm(v) for v in grid],
        "builtins": list(M.BUILTINS),
        "default": [M.CLIPOPT_DEFAULT, default],
        "clipopt": list(M.CLIPOPT_SHIPPED),
        "candidates": M.candidate_methods(),
        "gates": M.gate_methods(default),
    }
    everything = [m for g in groups.values() for m in g]
    chosen: list[M.Method] = []
    for item in selector.split(","):
        item = item.strip()
        if item == "all":
            picked = everything
        elif item in groups:
            picked = groups[item]
        else:
            picked = [m for m in everything if m.name == item]
            if not picked:
                raise SystemExit(f"unknown method or group {item!r}")
        chosen += [m for m in picked if m.name not in {c.name for c in chosen}]
    return chosen


def grid_best(runs: list[dict[str, Any]], task: str) -> float | None:
    """The grid value with the best mean score over the seeds run."""
    by: dict[float, list[float]] = {}
    for r in runs:
        if r["task"] == task and r["kind"] == "torch":
            by.setdefault(r["max_norm"], []).append(r["score"])
    if not by:
        return None
    means = {v: sum(s) / len(s) for v, s in by.items()}
    low = min(means.values())
    return max(v for v, m in means.items() if m <= low * (1 + TIE))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI subset: 2 seeds, coarse grid")
    ap.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    ap.add_argument("--seeds", default=None, help="count (10), range (0-9) or list")
    ap.add_argument("--methods", default=None, help="groups or method names")
    ap.add_argument("--out", default=None, help="output path without suffix")
    ap.add_argument("--append", action="store_true", help="merge into an existing json")
    ap.add_argument("--per-decade", type=int, default=None, help="grid points per decade")
    args = ap.parse_args(argv)

    torch.set_num_threads(1)
    tasks = (
        list(TASKS.values())
        if args.tasks == "all"
        else [TASKS[t] for t in args.tasks.split(",")]
    )
    seeds = parse_seeds(args.seeds or ("2" if args.quick else "10"))
    per_decade = args.per_decade or (1 if args.quick else 2)
    args.methods = args.methods or (QUICK_METHODS if args.quick else DEFAULT_METHODS)
    out = (
        pathlib.Path(args.out)
        if args.out
        else RESULTS / ("quick" if args.quick else "latest")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    path = out.with_suffix(".json")

    runs: list[dict[str, Any]] = []
    earlier: dict[str, Any] | None = None
    if args.append and path.exists():
        previous = json.loads(path.read_text())
        runs, earlier = previous["runs"], previous.get("meta")
    meta = {
        "argv": sys.argv[1:] if argv is None else argv,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "seeds": seeds,
        "per_decade": per_decade,
    }
    t_all = time.perf_counter()
    for task in tasks:
        t0 = time.perf_counter()
        chosen = select(args.methods, task, per_decade)
        wants_gate_best = "gates" in args.methods or args.methods == "all"
        fresh: list[dict[str, Any]] = []
        for method in chosen:
            for seed in seeds:
                record = method.kind in ("none", "torch")
                fresh.append(train(task, method, seed, record_norms=record))
        keep = [r for r in runs if r["task"] == task.name]
        merged = {(r["method"], r["seed"]): r for r in keep}
        merged.update({(r["method"], r["seed"]): r for r in fresh})
        task_runs = list(merged.values())
        best = grid_best(task_runs, task.name)
        if wants_gate_best and best is not None:
            m = M.gated(M.torch_norm(best), "gate (norm) + torch grid-best")
            for seed in seeds:
                r = train(task, m, seed, record_norms=False)
                merged[(r["method"], r["seed"])] = r
        runs = [r for r in runs if r["task"] != task.name] + list(merged.values())
        payload = {"meta": meta, "tasks": report.task_info(), "runs": runs}
        path.write_text(json.dumps(payload))
        n = len(chosen) * len(seeds)
        print(
            f"{task.name}: {n} runs in {time.perf_counter() - t0:.0f} s "
            f"(grid-best max_norm {best})",
            flush=True,
        )
    seconds = meta["seconds"] = round(time.perf_counter() - t_all, 1)
    if earlier is not None:  # the header describes the first run; appends are listed
        meta = {**earlier, "appended": [*earlier.get("appended", []), meta]}
    payload = {"meta": meta, "tasks": report.task_info(), "runs": runs}
    path.write_text(json.dumps(payload))
    md = report.render(payload)
    out.with_suffix(".md").write_text(md)
    print("\n" + report.main_table(md) + "\n")
    print(f"wrote {path} and {out.with_suffix('.md')} in {seconds} s")


if __name__ == "__main__":
    main()
