"""Run the tuning demo for real and write what docs/tuning.md shows of it.

Writes docs/tuning_output.md (the demo's printed output, its summary table and the
measured time; docs/tuning.md includes the file) and the two plots under docs/img/.
Run from the repository root: python docs/tuning_demo.py  (the demo's defaults: 40
trials of 300 steps). tests/test_tuning_docs.py checks that the page includes the file
and that the file has the form render() gives it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import pathlib
import platform
import re
import shutil
import sys
import tempfile
import time

import optuna
import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "docs" / "tuning_output.md"
IMAGES = ROOT / "docs" / "img"
HEADER = "<!-- Written by docs/tuning_demo.py from a real run: do not edit by hand. -->"


def run_demo(trials: int, steps: int, folder: pathlib.Path) -> tuple[str, object, float]:
    """Run examples/tune_max_norm.py's main() on a fresh study; return its output."""
    sys.path.insert(0, str(ROOT / "examples"))
    import tune_max_norm

    printed = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(printed):
        summary = tune_max_norm.main(
            trials=trials,
            steps=steps,
            storage=f"sqlite:///{folder / 'demo.db'}",
            plots=str(folder / "plots"),
        )
    return printed.getvalue(), summary, time.perf_counter() - start


def render(printed: str, summary, seconds: float, trials: int, steps: int) -> str:
    """The markdown docs/tuning.md includes, from one run's output."""
    lines = printed.splitlines()
    probe, study_line = lines[0], lines[1]
    table, rest = str(summary).split("\n\n", 1)
    p5 = float(re.search(r"p5 ([0-9.e+-]+)", probe).group(1))
    reading = f"best: {summary.best.strategy} {summary.best.params}"
    if summary.best.strategy == "norm":
        max_norm = summary.best.params["max_norm"]
        reading = (
            f"the best max_norm, {max_norm:.3g}, is {p5 / max_norm:.1f} times below p5 "
            f"of the unclipped norms ({p5:.3g})"
        )
    for row in summary.baselines:
        if row.label == "max_norm=1.0" and row.value and summary.best.value:
            reading += f"; max_norm=1.0 scores {row.value / summary.best.value:.1f} times"
            reading += " the best value"
    ran = next(line for line in lines if line.startswith("the study ran"))
    return "\n".join(
        [
            HEADER,
            "",
            f"Output of a fresh run ({trials} trials of {steps} steps), measured on a "
            f"2-core {platform.machine()} CPU machine with {torch.get_num_threads()} "
            f"torch thread(s), torch {torch.__version__}, optuna {optuna.__version__}: "
            f"{ran}; the whole run, probe and plots included, took {seconds:.0f} s.",
            "",
            "```text",
            probe,
            study_line,
            "```",
            "",
            table,
            "",
            "```text",
            rest.strip(),
            "```",
            "",
            f"Reading it: {reading}.",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the demo script does
    with tempfile.TemporaryDirectory() as tmp:
        folder = pathlib.Path(tmp)
        printed, summary, seconds = run_demo(args.trials, args.steps, folder)
        text = render(printed, summary, seconds, args.trials, args.steps)
        OUTPUT.write_text(text)
        for name in ("objective_vs_threshold", "intermediate_values"):
            shutil.copy(folder / "plots" / f"{name}.png", IMAGES / f"tuning_{name}.png")
    print(text)


if __name__ == "__main__":
    main()
