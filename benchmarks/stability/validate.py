"""Validate rules on the benchmark's seeds against the grid-best stored in main's results.

python -m benchmarks.stability.validate RULES [latest|more]
Grid scores: results/latest.json (seeds 0-9, all tasks), results/more_seeds.json
(seeds 10-29, cnn_momentum and rnn_momentum_mean).
"""

import json
import pathlib
import statistics
import sys

import torch

from . import methods as M
from .adaptive import specs
from .report import TIE, gap
from .run import train
from .tasks import TASKS

HERE = pathlib.Path(__file__).parent / "results"


def main() -> None:
    torch.set_num_threads(1)
    names = sys.argv[1].split(",")
    which = sys.argv[2] if len(sys.argv) > 2 else "latest"
    src = json.loads(
        (HERE / ("latest.json" if which == "latest" else "more_seeds.json")).read_text()
    )
    by: dict = {}
    for r in src["runs"]:
        by.setdefault(r["task"], {}).setdefault(r["method"], {})[r["seed"]] = r
    out_path = HERE / "adaptive" / f"validate_{which}.json"
    cache = json.loads(out_path.read_text()) if out_path.exists() else {}
    sp = specs()
    tasks = [t for t in TASKS if t in by]
    rows = {}
    for t in tasks:
        grid = {
            m: rs for m, rs in by[t].items() if next(iter(rs.values()))["kind"] == "torch"
        }
        seeds = sorted(next(iter(grid.values())))
        means = {
            m: statistics.fmean(rs[s]["score"] for s in seeds) for m, rs in grid.items()
        }
        low = min(means.values())
        tied = [m for m in grid if means[m] <= low * (1 + TIE)]
        bm = max(tied, key=lambda m: grid[m][seeds[0]]["max_norm"])
        best = [grid[bm][s]["score"] for s in seeds]
        rec = by[t]["recommended default"]
        rows.setdefault("REC (stored)", {})[t] = (
            [rec[s]["score"] for s in seeds],
            sum(rec[s]["diverged"] for s in seeds),
            best,
            bm,
        )
        for n in names:
            key = f"{n}|{t}"
            if key not in cache:
                rs = [train(TASKS[t], M.candidate(n, sp[n]), s, False) for s in seeds]
                cache[key] = [[r["score"], r["diverged"]] for r in rs]
                out_path.write_text(json.dumps(cache))
            rows.setdefault(n, {})[t] = (
                [x[0] for x in cache[key]],
                sum(x[1] for x in cache[key]),
                best,
                bm,
            )
        print(t, "done", flush=True)
    print("| rule | " + " | ".join(tasks) + " |")
    print("| --- |" + " --- |" * len(tasks))
    print("| grid-best | " + " | ".join(rows["REC (stored)"][t][3] for t in tasks) + " |")
    for n, row in rows.items():
        cells = []
        for t in tasks:
            sc, div, best, _ = row[t]
            g, se = gap(sc, best)
            ok = (
                "ok"
                if g <= 2 and not div
                else ("~" if g - 2 * se <= 2 and not div else "X")
            )
            cells.append(f"{g:+.1f} ± {se:.1f} {ok}" + (f" ({div} div)" if div else ""))
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
