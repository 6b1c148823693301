"""Compare clipping strategies on a task whose gradients spike.

A small MLP learns a regression; one batch in ten has targets 50x too large (corrupt
labels), which makes the gradient norm spike. Each strategy trains the same model from the
same start on the same batches; the table shows the clean validation loss at the end and
how often each strategy clipped.

Run: python examples/adaptive_strategies.py  (CPU, a few seconds)
"""

from __future__ import annotations

import argparse

import torch

import clipopt


def make_data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(16, 1, generator=g)

    def batch(corrupt: bool):
        x = torch.randn(64, 16, generator=g)
        y = torch.tanh(x @ w) + 0.05 * torch.randn(64, 1, generator=g)
        return x, (50 * y if corrupt else y)

    train = [batch(i % 10 == 7) for i in range(n)]
    valid = [batch(False) for _ in range(8)]
    return train, valid


STRATEGIES = {
    "none": lambda: clipopt.NormClip(max_norm=float("inf")),
    "norm 1.0": lambda: clipopt.NormClip(max_norm=1.0),
    "percentile p=90": lambda: clipopt.PercentileClip(percentile=90, window=200),
    "zscore": lambda: clipopt.ZScoreClip(warmup_steps=20),
    "adagc": lambda: clipopt.AdaGC(warmup_steps=20, clip_ratio=1.5),
    "agc 0.05": lambda: clipopt.AGC(clipping=0.05),
    "zscore + norm 5": lambda: clipopt.Chain(
        clipopt.ZScoreClip(warmup_steps=20), clipopt.NormClip(5.0)
    ),
}


def train(strategy: clipopt.ClipStrategy, data, valid) -> tuple[float, float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1)
    )
    opt = clipopt.ClippedOptimizer(
        torch.optim.AdamW(model.named_parameters(), lr=1e-2), strategy
    )
    for x, y in data:
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    with torch.no_grad():
        loss = sum(float(torch.nn.functional.mse_loss(model(x), y)) for x, y in valid)
    counts = opt.counts()
    return loss / len(valid), counts["clipped_steps"] / max(counts["steps"], 1)


def main(steps: int = 300, verbose: bool = True) -> dict[str, tuple[float, float]]:
    data, valid = make_data(steps)
    results = {name: train(factory(), data, valid) for name, factory in STRATEGIES.items()}
    if verbose:
        print(f"{'strategy':<18} {'valid loss':>10} {'clip rate':>10}")
        for name, (loss, rate) in results.items():
            print(f"{name:<18} {loss:>10.4f} {rate:>10.1%}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300)
    main(parser.parse_args().steps)
