"""Code in the docs runs: each page's Python blocks, with what they assume defined."""

import pathlib
import re

import torch

DOCS = pathlib.Path(__file__).parent.parent / "docs"


def _blocks(page):
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), re.S)


def test_the_custom_strategy_page_runs_and_clips():
    namespace = {"model": torch.nn.Linear(3, 1)}
    for block in _blocks("custom.md"):
        exec(block, namespace)
    opt = namespace["opt"]
    namespace["model"](torch.randn(4, 3)).pow(2).sum().mul(100).backward()
    opt.step()
    stats = opt.last_stats
    assert bool(stats.clipped)
    assert float(stats.coef) < 1
    assert type(opt.strategy).__name__ == "SoftNorm"
