"""docs/tuning.md quotes docs/tuning_demo.py's output, in the form the script writes."""

import pathlib
import re

from tests.conftest import load_script

DOCS = pathlib.Path(__file__).parent.parent / "docs"


def skeleton(text):
    """The text with numbers, table rows and names of studies' values blanked out."""
    lines = []
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith(("| trial |", "| --- |")):
            line = "| <row> |"
        if line.startswith(("improvement over", "never clipped")):
            continue  # notes that depend on the run
        if line.startswith(("Reading it:", "trials:")):
            line = line.split(":")[0] + ": <...>"
        line = re.sub(r"\d+(\.\d+)?(e[-+]?\d+)?", "N", line)
        line = re.sub(r"torch \S+, optuna \S+\)", "torch V, optuna V)", line)
        if not lines or lines[-1] != line or line != "| <row> |":
            lines.append(line)
    return lines


def test_the_page_includes_the_scripts_output():
    page = (DOCS / "tuning.md").read_text()
    assert '--8<-- "docs/tuning_output.md"' in page
    output = (DOCS / "tuning_output.md").read_text()
    demo = load_script(DOCS / "tuning_demo.py")
    assert output.startswith(demo.HEADER)
    assert "(40 trials of 300 steps)" in output  # the demo's defaults, not a short run
    for image in ("tuning_objective_vs_threshold.png", "tuning_intermediate_values.png"):
        assert f"img/{image}" in page
        assert (DOCS / "img" / image).read_bytes().startswith(b"\x89PNG")


def test_the_output_file_has_the_form_the_script_writes(tmp_path):
    # A short real run through the script's own functions (the full one takes minutes).
    demo = load_script(DOCS / "tuning_demo.py")
    printed, summary, seconds = demo.run_demo(trials=4, steps=30, folder=tmp_path)
    short = demo.render(printed, summary, seconds, trials=4, steps=30)
    committed = (DOCS / "tuning_output.md").read_text()
    assert skeleton(committed) == skeleton(short)
