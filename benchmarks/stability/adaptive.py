"""Adaptive-ratio study: grid-best cache + candidate runs on chosen seeds, all 9 tasks.

python -m benchmarks.stability.adaptive grid  SEEDS        # cache grid-best per task
python -m benchmarks.stability.adaptive run   SEEDS NAMES  # run specs (comma list), cache
python -m benchmarks.stability.adaptive table SEEDS NAMES [TASKS]
"""

from __future__ import annotations

import json
import pathlib
import statistics
import sys
import time

import torch

from . import candidates as C
from . import methods as M
from .report import TIE, gap
from .run import parse_seeds, train
from .tasks import TASKS

RESULTS = pathlib.Path(__file__).parent / "results" / "adaptive"
ALL = list(TASKS)


def _load(path: pathlib.Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _save(path: pathlib.Path, data: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def grid(seeds: list[int], tasks: list[str]) -> None:
    path = RESULTS / f"grid_{seeds[0]}_{seeds[-1]}.json"
    data = _load(path)
    t0 = time.perf_counter()
    for name in tasks:
        if name in data:
            continue
        task = TASKS[name]
        g = {}
        for v in M.torch_grid(*task.grid):
            g[str(v)] = [train(task, M.torch_norm(v), s, False)["score"] for s in seeds]
        means = {v: statistics.fmean(s) for v, s in g.items()}
        low = min(means.values())
        bv = max((v for v, m in means.items() if m <= low * (1 + TIE)), key=float)
        data[name] = {"best": bv, "scores": g[bv], "grid": g}
        _save(path, data)
        print(f"{name}: best {bv} at {time.perf_counter() - t0:.0f}s", flush=True)


def specs() -> dict:
    rec = dict(C.RECOMMENDED)
    out = {"REC": lambda p: C.RelativeClip(p, **rec)}
    out.update(C.ADAPTIVE_SPECS)
    return out


def run(seeds: list[int], names: list[str], tasks: list[str]) -> None:
    path = RESULTS / f"runs_{seeds[0]}_{seeds[-1]}.json"
    data = _load(path)
    sp = specs()
    t0 = time.perf_counter()
    for n in names:
        for name in tasks:
            if name in data.get(n, {}):
                continue
            m = M.candidate(n, sp[n])
            rs = [train(TASKS[name], m, s, False) for s in seeds]
            data.setdefault(n, {})[name] = [[r["score"], r["diverged"]] for r in rs]
            _save(path, data)
        print(f"{n} done {time.perf_counter() - t0:.0f}s", flush=True)
    table(seeds, names, tasks)


def table(seeds: list[int], names: list[str], tasks: list[str]) -> None:
    g = _load(RESULTS / f"grid_{seeds[0]}_{seeds[-1]}.json")
    data = _load(RESULTS / f"runs_{seeds[0]}_{seeds[-1]}.json")
    short = [t[:14] for t in tasks]
    print("| rule | " + " | ".join(short) + " | worst |")
    print("| --- |" + " --- |" * (len(tasks) + 1))
    for n in names:
        cells, worst = [], -1e9
        for t in tasks:
            if t not in data.get(n, {}) or t not in g:
                cells.append("-")
                continue
            runs = data[n][t]
            gp, se = gap([r[0] for r in runs], g[t]["scores"])
            div = sum(r[1] for r in runs)
            ok = "" if gp <= 2 else ("~" if gp - 2 * se <= 2 else "X")
            cells.append(f"{gp:+.1f}±{se:.1f}{ok}" + (f" ({div}d)" if div else ""))
            worst = max(worst, 1e9 if div else gp)
        print(
            f"| {n} | "
            + " | ".join(cells)
            + f" | {'div' if worst >= 1e9 else f'{worst:+.0f}'} |"
        )


if __name__ == "__main__":
    torch.set_num_threads(1)
    cmd, seeds = sys.argv[1], parse_seeds(sys.argv[2])
    tasks = sys.argv[4].split(",") if len(sys.argv) > 4 else ALL
    if cmd == "grid":
        grid(seeds, sys.argv[3].split(",") if len(sys.argv) > 3 else ALL)
    elif cmd == "run":
        run(seeds, sys.argv[3].split(","), tasks)
    else:
        table(seeds, sys.argv[3].split(","), tasks)
