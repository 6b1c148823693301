"""Quickstart: wrap AdamW, schedule the LR, checkpoint, resume, and check the resume.

Run: python examples/quickstart.py  (CPU, a few seconds)
"""

from __future__ import annotations

import argparse
import io

import torch

import clipopt


def make_data(n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A regression task with a few outlier batches that make the gradient spike."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for i in range(n):
        x = torch.randn(32, 16, generator=g)
        y = x[:, :4].sum(dim=1, keepdim=True).repeat(1, 2)
        if i % 7 == 3:  # an outlier batch: targets 100x too large
            y = 100 * y
        data.append((x, y))
    return data


def build(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 2)
    )
    # One line: wrap the optimizer you already have.
    opt = clipopt.ClippedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=3e-3), "norm", max_norm=1.0
    )
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
    return model, opt, sched


def train(model, opt, sched, data, log_every: int = 0) -> float:
    loss = torch.tensor(0.0)
    for i, (x, y) in enumerate(data):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and i % log_every == 0:
            s = opt.last_stats.to_dict()
            print(
                f"step {i:3d}  loss {loss.item():9.3f}  pre-clip norm {s['norm']:8.3f}"
                f"  coef {s['coef']:.3f}  lr {sched.get_last_lr()[0]:.2e}"
            )
    return float(loss.detach())


def main(steps: int = 60, verbose: bool = True) -> dict[str, float]:
    data = make_data(steps)
    half = steps // 2

    # An uninterrupted run.
    model_a, opt_a, sched_a = build()
    train(model_a, opt_a, sched_a, data, log_every=10 if verbose else 0)

    # The same run, stopped halfway, checkpointed, and resumed into fresh objects.
    model_b, opt_b, sched_b = build()
    train(model_b, opt_b, sched_b, data[:half])
    buf = io.BytesIO()
    torch.save(
        {
            "model": model_b.state_dict(),
            "opt": opt_b.state_dict(),
            "sched": sched_b.state_dict(),
        },
        buf,
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # clipopt's state is plain tensors/numbers
    model_c, opt_c, sched_c = build(seed=123)  # different init: the checkpoint overrides it
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    sched_c.load_state_dict(ckpt["sched"])
    train(model_c, opt_c, sched_c, data[half:])

    identical = all(
        torch.equal(a, c)
        for a, c in zip(model_a.parameters(), model_c.parameters(), strict=True)
    )
    counts = opt_a.counts()
    result = {
        "clip_rate": counts["clipped_steps"] / counts["steps"],
        "skipped_steps": float(counts["skipped_steps"]),
        "resume_identical": float(identical),
    }
    if verbose:
        print(f"\n{opt_a.strategy!r}")
        print(f"clipped {counts['clipped_steps']} of {counts['steps']} steps")
        print(f"resumed run bitwise identical to the uninterrupted one: {identical}")
    if not identical:
        raise SystemExit("resume was not bitwise identical")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    main(parser.parse_args().steps)
