"""Turn the runs of ``run.py`` into markdown tables.

Statistics
----------
Every method runs on the same seeds of a task, and a seed fixes the data, the corrupted
steps and the initialisation, so the comparison is paired by seed. A run's *score* is
its final held-out loss, or the task's trivial baseline if it diverged.

* **Grid-best**: the torch ``clip_grad_norm_`` grid value with the lowest mean score over
  the seeds; one value per task, the same for every seed. Means within 0.05% of the
  lowest tie (under Adam, every max_norm small enough to clip every step gives the same
  run up to rounding) and the largest tied value is taken. It is *interior* when it is
  neither end of the task's grid. (Being the best of ~10 grid values on the same seeds,
  it is slightly optimistic, so the gaps of other methods are slightly pessimistic.)
* **Gap** of method m: the ratio of mean scores minus one,
  :math:`G = \\bar L_m / \\bar L_* - 1` (in %), with :math:`\\bar L_*` the grid-best's.
* **Standard error** of G, paired by seed, by the delta method: with
  :math:`R = \\bar L_m / \\bar L_*` and :math:`z_s = (L_{m,s} - R L_{*,s}) / \\bar L_*`,
  :math:`SE(G) = sd(z) / \\sqrt{n}` (sample sd). It is small when a method tracks the
  grid-best seed by seed, however different the seeds are from each other.
* **Target** (the issue's): no divergence and :math:`G \\le 2\\%`. A cell is marked
  ``ok`` when that holds, ``~`` when :math:`G > 2\\%` but :math:`G - 2\\,SE \\le 2\\%`
  (within noise), and ``X`` otherwise (or on any divergence).

Run ``python -m benchmarks.stability.report results/latest.json`` to re-render.
"""

from __future__ import annotations

import json
import math
import pathlib
import statistics
import sys
from typing import Any

from .tasks import TASKS

__all__ = ["gap", "render", "task_info"]

#: Grid means within this relative distance of the best tie; the largest max_norm wins.
TIE = 5e-4


def task_info() -> dict[str, dict[str, Any]]:
    return {
        t.name: {
            "summary": t.summary,
            "architecture": t.architecture,
            "optimizer": t.optimizer,
            "reduction": t.reduction,
            "failure": t.failure,
            "steps": t.steps,
            "grid": list(t.grid),
            "info": {
                k: (list(v) if isinstance(v, tuple) else v) for k, v in t.info.items()
            },
        }
        for t in TASKS.values()
    }


def gap(method: list[float], best: list[float]) -> tuple[float, float]:
    """Gap (%) of paired scores to the grid-best's, and its standard error (%)."""
    n = len(best)
    mb, mm = statistics.fmean(best), statistics.fmean(method)
    r = mm / mb
    if n < 2:
        return 100 * (r - 1), math.nan
    z = [(a - r * b) / mb for a, b in zip(method, best, strict=True)]
    return 100 * (r - 1), 100 * statistics.stdev(z) / math.sqrt(n)


def _by(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    out: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for r in runs:
        out.setdefault(r["task"], {}).setdefault(r["method"], {})[r["seed"]] = r
    return out


def _fmt_norm(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    return f"{x:.2g}" if x < 1e4 else f"{x:.1e}"


def _best(
    methods: dict[str, dict[int, dict[str, Any]]],
) -> tuple[str, float, list[str]] | None:
    grid = {
        name: runs
        for name, runs in methods.items()
        if next(iter(runs.values()))["kind"] == "torch"
    }
    if not grid:
        return None
    order = sorted(grid, key=lambda n: next(iter(grid[n].values()))["max_norm"])
    means = {n: statistics.fmean(r["score"] for r in grid[n].values()) for n in order}
    low = min(means.values())
    # ties (every step clipped under a scale-invariant optimizer): the largest max_norm
    best = [n for n in order if means[n] <= low * (1 + TIE)][-1]
    return best, next(iter(grid[best].values()))["max_norm"], order


def _natural(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Norm scale and failure of the unclipped runs."""
    first, ratios, max_at, div_at = [], [], [], []
    for r in runs.values():
        norms = [n if n is not None else math.inf for n in r.get("norms", [])]
        if not norms:
            continue
        first.append(norms[0])
        peak = max(norms)
        ratios.append(peak / norms[0])
        max_at.append(norms.index(peak))
        if r["diverged_at"] is not None:
            div_at.append(r["diverged_at"])
    return {
        "n0": statistics.median(first) if first else math.nan,
        "ratio": statistics.median(ratios) if ratios else math.nan,
        "max_at": statistics.median(max_at) if max_at else math.nan,
        "div": sum(r["diverged"] for r in runs.values()),
        "div_at": sorted(div_at),
        "n": len(runs),
    }


def _typical(runs: dict[int, dict[str, Any]]) -> float:
    """Median pre-clip norm over steps 0-19 of a run (median over seeds)."""
    meds = [
        statistics.median(n for n in r["norms"][:20] if n is not None)
        for r in runs.values()
        if r.get("norms")
    ]
    return statistics.median(meds) if meds else math.nan


def _cell(method: dict[int, dict[str, Any]], best: dict[int, dict[str, Any]]) -> str:
    seeds = sorted(set(method) & set(best))
    if not seeds:
        return ""
    g, se = gap([method[s]["score"] for s in seeds], [best[s]["score"] for s in seeds])
    div = sum(method[s]["diverged"] for s in seeds)
    mark = (
        "ok" if div == 0 and g <= 2.0 else ("~" if div == 0 and g - 2 * se <= 2.0 else "X")
    )
    text = f"{g:+.1f} ± {se:.1f}" if math.isfinite(se) else f"{g:+.1f}"
    if div:
        text += f" ({div} div)"
    return f"{text} {mark}"


#: The rows of the summary table: no clipping, each built-in with its published
#: defaults, and what ``ClippedOptimizer(opt)`` and ``skip_spikes=True`` do.
SUMMARY = (
    "no clipping",
    "norm (max_norm=1.0)",
    "value (clip_value=1.0)",
    "percentile (AutoClip p10)",
    "zscore (ZClip)",
    "adagc (AdaGC)",
    "agc (AGC 0.01)",
    "clipopt default",
    "clipopt default + skip_spikes",
    "clipopt skip_spikes only",
)


def _order(name: str) -> int:
    """A method's place in the report: :func:`methods.all_methods`' order."""
    from . import methods  # imports clipopt; rendering a json alone does not need it

    names = [m.name for m in methods.all_methods([])]
    return names.index(name) if name in names else len(names)


def main_table(markdown: str) -> str:
    """The gap table's section of a rendered report (what ``make stability`` prints)."""
    start = markdown.index("## Gap to the grid-best")
    end = markdown.index("\n## ", start + 1)
    return markdown[start:end].strip()


def render(payload: dict[str, Any]) -> str:
    runs = payload["runs"]
    info = payload["tasks"]
    by = _by(runs)
    tasks = [t for t in info if t in by]
    lines: list[str] = []
    meta = payload.get("meta", {})
    lines.append("# Stability benchmark results\n")
    lines.append(
        f"torch {meta.get('torch')}, {meta.get('threads')} thread, seeds "
        f"{_seed_text(meta.get('seeds', []))}, "
        f"grid {meta.get('per_decade')} points per decade"
        + (f", {meta['seconds'] / 60:.0f} min" if "seconds" in meta else "")
        + "".join(
            f"; then `{' '.join(a.get('argv', []))}` appended ({a['seconds'] / 60:.0f} min)"
            for a in meta.get("appended", [])
        )
        + ". Generated by `benchmarks/stability/report.py` from the json next to it.\n"
    )

    # tasks
    lines.append("## Tasks\n")
    lines.append(
        "| task | model | optimizer | loss | fails | norm at step 0 "
        "| median norm, steps 0-19, grid-best run | no clipping: diverged (at step) "
        "| no clipping: peak norm / step-0 norm (at step) | trivial loss "
        "| grid-best max_norm | grid-best loss |"
    )
    lines.append("|" + " --- |" * 12)
    for t in tasks:
        ti = info[t]
        nat = _natural(by[t].get("no clipping", {}))
        best = _best(by[t])
        if best:
            bname, bval, order = best
            interior = bname not in (order[0], order[-1])
            bloss = statistics.fmean(r["score"] for r in by[t][bname].values())
            btext = f"{bval:g} ({'interior' if interior else 'AT EDGE'})"
            ltext = f"{bloss:.4g}"
        else:
            btext = ltext = ""
        trivial = statistics.fmean(
            r["trivial"] for r in next(iter(by[t].values())).values()
        )
        div_at = ", ".join(str(s) for s in nat["div_at"][:10])
        lines.append(
            f"| {t} | {ti['architecture']} | {ti['optimizer']} | {ti['reduction']} "
            f"| {ti['failure']} | {_fmt_norm(nat['n0'])} "
            f"| {_fmt_norm(_typical(by[t][bname])) if best else ''} "
            f"| {nat['div']}/{nat['n']}" + (f", at {div_at}" if div_at else "") + " "
            f"| {_fmt_norm(nat['ratio'])} (step {nat['max_at']:.0f}) | {trivial:.4g} "
            f"| {btext} | {ltext} |"
        )
    lines.append("")

    # summary: what clipopt ships against the reference (docs/strategies/which.md)
    bests = {t: _best(by[t]) for t in tasks}
    shipped = [n for n in SUMMARY if any(n in by[t] for t in tasks)]
    if shipped:
        lines.append("## Summary: the built-ins and the default\n")
        lines.append("<!-- --8<-- [start:summary] -->")
        lines.append("| method | " + " | ".join(f"`{t}`" for t in tasks) + " |")
        lines.append("| --- |" + " --- |" * len(tasks))
        row = ["grid-best `max_norm`"]
        row += [f"{b[1]:g}" if (b := bests[t]) else "" for t in tasks]
        lines.append("| " + " | ".join(row) + " |")
        for name in shipped:
            cells = []
            for t in tasks:
                b, m = bests[t], by[t].get(name)
                cells.append(_cell(m, by[t][b[0]]) if (b and m) else "")
            label = f"**{name}**" if name.startswith("clipopt default") else name
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("<!-- --8<-- [end:summary] -->")
        lines.append("")

    # main table
    lines.append("## Gap to the grid-best torch clip_grad_norm_ (%, ± paired SE)\n")
    lines.append(
        "Mean final held-out loss relative to the grid-best's, minus one; a diverged run "
        "is scored at the trivial baseline. `ok`: no divergence and gap <= +2%; `~`: "
        "within 2 SE of +2%; `X`: otherwise.\n"
    )
    method_names: list[str] = []
    for r in runs:
        if r["kind"] != "torch" and r["method"] not in method_names:
            method_names.append(r["method"])
    method_names.sort(key=_order)  # report order, however the runs were appended
    lines.append("| method | " + " | ".join(tasks) + " |")
    lines.append("| --- |" + " --- |" * len(tasks))
    row = ["torch grid-best"]
    for t in tasks:
        b = bests[t]
        row.append(f"max_norm={b[1]:g}" if b else "")
    lines.append("| " + " | ".join(row) + " |")
    for name in method_names:
        row = [name]
        for t in tasks:
            b = bests[t]
            m = by[t].get(name)
            row.append(_cell(m, by[t][b[0]]) if (b and m) else "")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")

    # grid
    lines.append("## The torch grid: gap of each max_norm to the task's grid-best (%)\n")
    values = sorted({r["max_norm"] for r in runs if r["kind"] == "torch"})
    lines.append("| task | " + " | ".join(f"{v:g}" for v in values) + " |")
    lines.append("| --- |" + " --- |" * len(values))
    for t in tasks:
        b = bests[t]
        if not b:
            continue
        cells = []
        for v in values:
            name = next(
                (
                    n
                    for n, rs in by[t].items()
                    if next(iter(rs.values()))["kind"] == "torch"
                    and next(iter(rs.values()))["max_norm"] == v
                ),
                None,
            )
            if name is None:
                cells.append("")
                continue
            seeds = sorted(by[t][name])
            g, _ = gap(
                [by[t][name][s]["score"] for s in seeds],
                [by[t][b[0]][s]["score"] for s in seeds],
            )
            div = sum(by[t][name][s]["diverged"] for s in seeds)
            cell = "**0**" if name == b[0] else f"{g:+.0f}"
            cells.append(cell + (f" ({div}d)" if div else ""))
        lines.append(f"| {t} | " + " | ".join(cells) + " |")
    lines.append("")

    # steps skipped as spikes: the gates and clipopt's skip_spikes
    skippers = [
        n
        for n in method_names
        if any(
            r["kind"] in ("gate", "clipopt") and r["skipped"]
            for t in tasks
            for r in by[t].get(n, {}).values()
        )
    ]
    if skippers:
        lines.append("## Steps skipped as spikes (mean per run, and the most in one run)\n")
        lines.append("| method | " + " | ".join(tasks) + " |")
        lines.append("| --- |" + " --- |" * len(tasks))
        first = {t: next(iter(by[t].values())) for t in tasks}  # any method's runs
        corrupted = [
            statistics.fmean(len(r["corrupted_steps"]) for r in first[t].values())
            for t in tasks
        ]
        lines.append(
            "| *corrupted batches per run* | "
            + " | ".join(f"{c:.1f}" for c in corrupted)
            + " |"
        )
        for n in skippers:
            row = [n]
            for t in tasks:
                rs = by[t].get(n)
                counts = [r["skipped"] for r in rs.values()] if rs else []
                row.append(
                    f"{statistics.fmean(counts):.1f} ({max(counts)})" if counts else ""
                )
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")

    # mean losses
    lines.append("## Mean final held-out loss (diverged runs at the trivial baseline)\n")
    lines.append("| method | " + " | ".join(tasks) + " |")
    lines.append("| --- |" + " --- |" * len(tasks))
    for name in ["torch grid-best", *method_names]:
        row = [name]
        for t in tasks:
            key = bests[t][0] if name == "torch grid-best" and bests[t] else name
            rs = by[t].get(key)
            row.append(
                f"{statistics.fmean(r['score'] for r in rs.values()):.4g}" if rs else ""
            )
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return "\n".join(lines)


def _seed_text(seeds: list[int]) -> str:
    if seeds and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]} ({len(seeds)})"
    return ",".join(map(str, seeds))


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    path = pathlib.Path(
        args[0] if args else pathlib.Path(__file__).parent / "results/latest.json"
    )
    payload = json.loads(path.read_text())
    path.with_suffix(".md").write_text(render(payload))
    print(f"wrote {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()
