"""Draw the strategy plots in docs/img/ (committed; rerun after changing a strategy).

Run: python docs/make_plots.py   (needs matplotlib: pip install -e ".[docs]")

Every plot feeds the same spiky synthetic run of gradient norms through a strategy and
shows the pre-clip norm, the threshold that applied, and the norm after clipping.
"""

from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import clipopt

OUT = pathlib.Path(__file__).parent / "img"
STEPS = 300


def spiky_norms(seed: int = 0) -> list[float]:
    """A slowly decaying log-normal norm with rare spikes 5-40x larger."""
    g = torch.Generator().manual_seed(seed)
    base = torch.exp(0.25 * torch.randn(STEPS, generator=g, dtype=torch.float64))
    trend = torch.linspace(2.0, 1.0, STEPS, dtype=torch.float64)
    spikes = torch.rand(STEPS, generator=g, dtype=torch.float64) < 0.04
    factor = 5 + 35 * torch.rand(STEPS, generator=g, dtype=torch.float64)
    return (base * trend * torch.where(spikes, factor, 1.0)).tolist()


def run(strategy: clipopt.ClipStrategy, norms: list[float]):
    p = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
    opt = clipopt.ClippedOptimizer(torch.optim.SGD([p], lr=0.0), strategy)
    pre, thr, post = [], [], []
    for n in norms:
        p.grad = torch.tensor([n], dtype=torch.float64)
        opt.step()
        stats = opt.last_stats.to_dict()
        pre.append(stats["norm"])
        thr.append(stats["threshold"])
        post.append(float(p.grad.abs()))
    return pre, thr, post


def plot(name: str, title: str, strategy: clipopt.ClipStrategy) -> None:
    pre, thr, post = run(strategy, spiky_norms())
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=110)
    steps = range(len(pre))
    ax.plot(steps, pre, color="0.6", lw=1, label="pre-clip norm")
    ax.plot(steps, post, color="tab:blue", lw=1.2, label="after clipping")
    ax.plot(steps, thr, color="tab:red", lw=1, ls="--", label="threshold")
    clipped = [i for i in steps if post[i] < pre[i] * (1 - 1e-5)]
    ax.scatter(
        clipped,
        [pre[i] for i in clipped],
        s=8,
        color="tab:red",
        zorder=3,
        label=f"clipped ({len(clipped)} of {len(pre)})",
    )
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper right", ncol=2)
    fig.tight_layout()
    fig.savefig(OUT / f"{name}.png")
    plt.close(fig)


def monitoring_plots() -> None:
    """The monitoring page's plots: a model whose first layer's gradient explodes."""
    import clipopt.plots

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 32),
        torch.nn.Tanh(),
        torch.nn.Linear(32, 1),
    )
    opt = clipopt.ClippedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05), "zscore")
    history = clipopt.StatsHistory(opt)
    recorder = clipopt.GradRecorder(model)
    g = torch.Generator().manual_seed(1)
    for step in range(150):
        x = torch.randn(32, 16, generator=g)
        y = x[:, :1] * (60.0 if step % 37 == 36 else 1.0)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        recorder.record()
        opt.step()
    clipopt.plots.plot_stats(
        history, OUT / "monitor_stats.png", title="ZScoreClip on a run with corrupt batches"
    )
    clipopt.plots.plot_layer_heatmap(recorder, OUT / "monitor_heatmap.png")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    monitoring_plots()
    plot(
        "relative",
        "RelativeClip(), the default: 0.4 x a capped EMA of the norm, 20-step ramp",
        clipopt.RelativeClip(),
    )
    plot("norm", "NormClip(max_norm=3.0): a fixed ceiling", clipopt.NormClip(3.0))
    plot(
        "value", "ValueClip(clip_value=3.0) on a one-entry gradient", clipopt.ValueClip(3.0)
    )
    plot(
        "percentile",
        "PercentileClip(percentile=10, window=1000): AutoClip",
        clipopt.PercentileClip(10),
    )
    plot(
        "percentile90",
        "PercentileClip(percentile=90, window=100)",
        clipopt.PercentileClip(90, window=100),
    )
    plot(
        "zscore",
        "ZScoreClip(): spikes against EMA mean and variance (ZClip)",
        clipopt.ZScoreClip(),
    )
    plot(
        "adagc",
        "AdaGC(warmup_steps=25, max_norm=3.0): per-tensor EMA",
        clipopt.AdaGC(warmup_steps=25, max_norm=3.0),
    )
    plot("agc", "AGC(clipping=2.0) with a weight of norm 1", clipopt.AGC(clipping=2.0))
    plot(
        "chain",
        "Chain(ZScoreClip(), NormClip(5.0))",
        clipopt.Chain(clipopt.ZScoreClip(), clipopt.NormClip(5.0)),
    )


if __name__ == "__main__":
    main()
