"""Small training tasks whose gradients explode or spike.

Every task is deterministic given its seed: the data (a synthetic teacher, its training
batches, the held-out set and the corrupted steps) come from generators seeded by the
seed alone, and the student's initialisation from ``torch.manual_seed(seed)``. A method
therefore sees exactly the same batches as every other method on the same seed, which
is what makes the paired statistics of ``report.py`` paired.

A task builds a :class:`TaskRun`: the student model, its optimizer (as the task
prescribes: SGD, momentum or AdamW, at a learning rate high enough that gradients
explode without clipping), ``train_loss(step)`` (the loss of that step's batch, with the
task's own reduction, on which ``backward()`` is called) and ``heldout_loss()`` (the
metric, always a mean per element so that it compares with the trivial baseline).

The trivial baseline is the held-out loss of the best constant prediction: the
held-out variance of the targets for regression, the entropy of the label marginal for
classification (the uniform distribution's ``log V`` where labels are uniform).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["TASKS", "Task", "TaskRun"]


def _gen(seed: int, salt: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(1_000_003 * seed + salt)
    return g


def _late_steps(seed: int, steps: int, count: int, start: float) -> list[int]:
    """``count`` distinct steps in ``[start * steps, steps - 10)``, seeded."""
    g = _gen(seed, 99)
    lo, hi = int(start * steps), steps - 10
    picked = torch.randperm(hi - lo, generator=g)[:count] + lo
    return sorted(int(s) for s in picked)


@dataclass
class TaskRun:
    """One seed of one task: a fresh model and optimizer on the seed's data."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_loss: Callable[[int], Tensor]
    heldout_loss: Callable[[], float]
    trivial: float
    corrupted_steps: list[int] = field(default_factory=list)


@dataclass
class Task:
    """A task: its name, what it is, and how to build a run for a seed."""

    name: str
    summary: str
    architecture: str
    optimizer: str
    reduction: str
    failure: str  # "early" (explodes in the first steps) or "late" (corrupted batches)
    steps: int
    build: Callable[[int], TaskRun]
    info: dict[str, Any] = field(default_factory=dict)
    #: exponents (base 10) of the torch max_norm grid's ends, half-decade steps
    grid: tuple[float, float] = (-4.0, 4.0)

    def make(self, seed: int) -> TaskRun:
        """Build the run of ``seed`` (model initialised from ``torch.manual_seed``)."""
        return self.build(seed)


_CACHE: dict[tuple[str, int], Any] = {}


def _cached(key: tuple[str, int], make: Callable[[], Any]) -> Any:
    """Data depend on the seed only: build them once per process and reuse them."""
    if key not in _CACHE:
        if len(_CACHE) > 64:
            _CACHE.clear()
        _CACHE[key] = make()
    return _CACHE[key]


@torch.no_grad()
def _eval(model: nn.Module, fn: Callable[[], Tensor]) -> float:
    model.eval()
    try:
        return float(fn())
    finally:
        model.train()


# -- 1. vanilla RNN, plain SGD, loss summed over batch and time (norms ~1e3) ---------------


class _RNNRegressor(nn.Module):
    def __init__(self, d_in: int, hidden: int, d_out: int, radius: float) -> None:
        super().__init__()
        self.rnn = nn.RNN(d_in, hidden, batch_first=True, nonlinearity="tanh")
        with torch.no_grad():
            q, _ = torch.linalg.qr(torch.randn(hidden, hidden))
            self.rnn.weight_hh_l0.copy_(radius * q)
        self.out = nn.Linear(hidden, d_out)

    def forward(self, x: Tensor) -> Tensor:
        h, _ = self.rnn(x)
        return self.out(h)


def _delay_targets(x: Tensor, delays: tuple[int, ...], mix: Tensor) -> Tensor:
    """y_t = tanh(sum_k mix_k x_{t-delay_k}) per output: a memory task."""
    parts = []
    for d in delays:
        shifted = torch.zeros_like(x)
        shifted[:, d:] = x[:, : x.shape[1] - d]
        parts.append(shifted)
    stacked = torch.cat(parts, dim=-1)  # (B, T, len(delays) * d_in)
    return torch.tanh(stacked @ mix)


def _delay_data(
    name: str,
    seed: int,
    salt: int,
    steps: int,
    batch: int,
    cfg: dict[str, Any],
    d_in: int,
    d_out: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A delayed-recall regression (the recurrent tasks' data): training batches for
    every step and a 512-sequence held-out set, drawn from one generator, cached."""

    def data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
        g = _gen(seed, salt)
        length, delays = cfg["length"], cfg["delays"]
        mix = torch.randn(len(delays) * d_in, d_out, generator=g) * 0.6
        x = torch.randn(steps, batch, length, d_in, generator=g)
        y = _delay_targets(x.flatten(0, 1), delays, mix).view(steps, batch, length, d_out)
        xh = torch.randn(512, length, d_in, generator=g)
        return x, y, xh, _delay_targets(xh, delays, mix)

    return _cached((name, seed), data)


def _rnn_sgd_sum(seed: int) -> TaskRun:
    cfg = TASK_RNN_SGD.info
    steps, batch = TASK_RNN_SGD.steps, cfg["batch"]
    d_in, d_out = 4, 2

    x, y, xh, yh = _delay_data("rnn_sgd_sum", seed, 1, steps, batch, cfg, d_in, d_out)
    torch.manual_seed(seed)
    model = _RNNRegressor(d_in, cfg["hidden"], d_out, cfg["radius"])
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"])

    def train_loss(step: int) -> Tensor:
        return F.mse_loss(model(x[step]), y[step], reduction="sum")

    def heldout() -> float:
        return _eval(model, lambda: F.mse_loss(model(xh), yh))

    trivial = float(yh.var(dim=(0, 1), unbiased=False).mean())
    return TaskRun(model, opt, train_loss, heldout, trivial)


TASK_RNN_SGD = Task(
    name="rnn_sgd_sum",
    summary="vanilla tanh RNN learns a delayed-memory map of its inputs",
    architecture="vanilla RNN (64 units, weight_hh orthogonal x 1.1), seq 40",
    optimizer="SGD lr 8e-4, no momentum",
    reduction="MSE summed over batch, time and outputs",
    failure="early",
    steps=300,
    build=_rnn_sgd_sum,
    info={
        "batch": 16,
        "length": 40,
        "hidden": 64,
        "radius": 1.1,
        "delays": (1, 4, 8),
        "lr": 8e-4,
    },
    grid=(0.0, 4.0),
)


# -- 2. small pre-LN transformer, AdamW at a high LR, no warm-up (norms ~1) ----------------


class _Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class _TinyLM(nn.Module):
    def __init__(self, vocab: int, d: int, heads: int, layers: int, length: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.02)
        self.blocks = nn.ModuleList(_Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.register_buffer(
            "mask", torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
        )

    def forward(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        x = self.emb(tokens) + self.pos[:n]
        mask = self.mask[:n, :n]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def _copy_sequences(
    g: torch.Generator, n: int, half: int, vocab: int, noise: float
) -> Tensor:
    """``a_1..a_L, SEP, b_1..b_L``: b copies a, each token replaced at random with
    probability ``noise`` (SEP = vocab-1), so that the loss has a floor."""
    a = torch.randint(0, vocab - 1, (n, half), generator=g)
    sep = torch.full((n, 1), vocab - 1)
    swap = torch.rand(n, half, generator=g) < noise
    b = torch.where(swap, torch.randint(0, vocab - 1, (n, half), generator=g), a)
    return torch.cat([a, sep, b], dim=1)


def _transformer_adamw(seed: int) -> TaskRun:
    cfg = TASK_TRANSFORMER.info
    steps, batch, half, vocab = (
        TASK_TRANSFORMER.steps,
        cfg["batch"],
        cfg["half"],
        cfg["vocab"],
    )
    length = 2 * half + 1

    def data() -> tuple[Tensor, Tensor, Tensor]:
        g = _gen(seed, 2)
        noise = cfg["noise"]
        train = _copy_sequences(g, steps * batch, half, vocab, noise).view(
            steps, batch, length
        )
        held = _copy_sequences(g, 1024, half, vocab, noise)
        junk = torch.randint(0, vocab - 1, (steps, batch, half), generator=g)
        return train, held, junk

    train, held, junk = _cached(("transformer_adamw", seed), data)
    bad = _late_steps(seed, steps, cfg["corrupt"], 0.3)
    torch.manual_seed(seed)
    model = _TinyLM(vocab, cfg["d"], cfg["heads"], cfg["layers"], length)
    opt = torch.optim.AdamW(
        model.parameters(), lr=cfg["lr"], betas=(0.9, 0.98), weight_decay=0.01
    )

    def loss_of(tokens: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
        logits = model(tokens[:, :-1])[:, half:]  # predict the copied half
        return F.cross_entropy(
            logits.reshape(-1, vocab), targets.reshape(-1), reduction=reduction
        )

    def train_loss(step: int) -> Tensor:
        tokens = train[step]
        if step in bad:  # junk targets, summed instead of averaged (a token-count bug)
            return loss_of(tokens, junk[step], reduction="sum")
        return loss_of(tokens, tokens[:, half + 1 :])

    def heldout() -> float:
        return _eval(model, lambda: loss_of(held, held[:, half + 1 :]))

    return TaskRun(model, opt, train_loss, heldout, math.log(vocab - 1), bad)


TASK_TRANSFORMER = Task(
    name="transformer_adamw",
    summary="2-layer pre-LN transformer learns a noisy copy (induction); a few late "
    "batches have junk targets and a summed loss (x96)",
    architecture="transformer, 2 layers, d 32, 4 heads, seq 13",
    optimizer="AdamW lr 1e-2, betas (0.9, 0.98), no warm-up",
    reduction="cross-entropy, mean over tokens",
    failure="late",
    steps=300,
    build=_transformer_adamw,
    info={
        "batch": 16,
        "half": 6,
        "vocab": 17,
        "d": 32,
        "heads": 4,
        "layers": 2,
        "noise": 0.1,
        "corrupt": 4,
        "lr": 1e-2,
    },
    grid=(-4.0, 2.0),
)


# -- 3. deep MLP without normalisation, momentum SGD (norms ~1) ----------------------------


def _mlp(sizes: list[int], act: type[nn.Module], gain: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        lin = nn.Linear(a, b)
        nn.init.normal_(lin.weight, std=gain / math.sqrt(a))
        nn.init.zeros_(lin.bias)
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _teacher(
    g: torch.Generator, d_in: int, hidden: int, d_out: int
) -> Callable[[Tensor], Tensor]:
    w1 = torch.randn(d_in, hidden, generator=g) / math.sqrt(d_in)
    w2 = torch.randn(hidden, d_out, generator=g) / math.sqrt(hidden)

    def f(x: Tensor) -> Tensor:
        return torch.tanh(2.0 * x @ w1) @ w2

    return f


def _regression_data(
    seed: int,
    salt: int,
    steps: int,
    batch: int,
    d_in: int,
    d_out: int,
    scale: float,
    noise: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    g = _gen(seed, salt)
    f = _teacher(g, d_in, 32, d_out)
    x = torch.randn(steps, batch, d_in, generator=g)
    y = scale * (f(x) + noise * torch.randn(steps, batch, d_out, generator=g))
    xh = torch.randn(2048, d_in, generator=g)
    yh = scale * (f(xh) + noise * torch.randn(2048, d_out, generator=g))
    return x, y, xh, yh


def _deep_mlp(seed: int) -> TaskRun:
    cfg = TASK_DEEP_MLP.info
    steps = TASK_DEEP_MLP.steps
    x, y, xh, yh = _cached(
        ("deep_mlp_momentum", seed),
        lambda: _regression_data(seed, 3, steps, cfg["batch"], 16, 1, 1.0, 0.1),
    )
    torch.manual_seed(seed)
    model = _mlp([16] + [cfg["width"]] * cfg["depth"] + [1], nn.ReLU, cfg["gain"])
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)

    def train_loss(step: int) -> Tensor:
        return F.mse_loss(model(x[step]), y[step])

    def heldout() -> float:
        return _eval(model, lambda: F.mse_loss(model(xh), yh))

    return TaskRun(model, opt, train_loss, heldout, float(yh.var(unbiased=False)))


TASK_DEEP_MLP = Task(
    name="deep_mlp_momentum",
    summary="16-layer ReLU MLP without normalisation regresses a random teacher",
    architecture="MLP, 16 x 64 ReLU, no normalisation, He init",
    optimizer="SGD lr 0.02, momentum 0.9",
    reduction="MSE, mean",
    failure="early",
    steps=300,
    build=_deep_mlp,
    info={"batch": 64, "width": 64, "depth": 16, "gain": math.sqrt(2.0), "lr": 0.02},
    grid=(-3.0, 2.0),
)


# -- 4. tiny-output regression, momentum SGD, corrupted batches late (norms ~1e-3) ---------


def _tiny_regression(seed: int) -> TaskRun:
    cfg = TASK_TINY.info
    steps = TASK_TINY.steps
    x, y, xh, yh = _cached(
        ("tiny_regression_spikes", seed),
        lambda: _regression_data(seed, 4, steps, cfg["batch"], 16, 1, cfg["scale"], 0.1),
    )
    bad = _late_steps(seed, steps, cfg["corrupt"], 0.3)
    torch.manual_seed(seed)
    model = _mlp([16, 64, 64, 1], nn.Tanh, 1.0)
    with torch.no_grad():  # the output layer starts at the targets' scale
        model[-1].weight.mul_(cfg["scale"])
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)

    def train_loss(step: int) -> Tensor:
        target = y[step]
        if step in bad:  # a corrupted batch: targets in the wrong unit
            target = target * cfg["factor"]
        return F.mse_loss(model(x[step]), target)

    def heldout() -> float:
        return _eval(model, lambda: F.mse_loss(model(xh), yh))

    return TaskRun(model, opt, train_loss, heldout, float(yh.var(unbiased=False)), bad)


TASK_TINY = Task(
    name="tiny_regression_spikes",
    summary="regression with outputs of order 1e-3; a few late batches have targets x1e4",
    architecture="MLP 16-64-64-1, tanh",
    optimizer="SGD lr 0.0125, momentum 0.9",
    reduction="MSE, mean (targets ~1e-3)",
    failure="late",
    steps=400,
    build=_tiny_regression,
    info={"batch": 64, "scale": 1e-3, "corrupt": 4, "factor": 1e4, "lr": 0.0125},
    grid=(-6.0, 0.0),
)


# -- 5. CNN without normalisation, momentum SGD (norms ~1) ---------------------------------


def _gratings(g: torch.Generator, n: int, size: int, noise: float) -> tuple[Tensor, Tensor]:
    """Noisy sinusoidal gratings; the target is the orientation as (cos 2t, sin 2t)."""
    theta = math.pi * torch.rand(n, generator=g)
    freq = 0.15 + 0.1 * torch.rand(n, generator=g)
    phase = 2 * math.pi * torch.rand(n, generator=g)
    r = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    proj = xx * theta.cos().view(-1, 1, 1) + yy * theta.sin().view(-1, 1, 1)
    img = torch.sin(2 * math.pi * freq.view(-1, 1, 1) * proj + phase.view(-1, 1, 1))
    img = img + noise * torch.randn(n, size, size, generator=g)
    target = torch.stack([(2 * theta).cos(), (2 * theta).sin()], dim=1)
    return img.unsqueeze(1), target


class _CNN(nn.Module):
    def __init__(self, channels: int, depth: int, classes: int) -> None:
        super().__init__()
        convs: list[nn.Module] = [nn.Conv2d(1, channels, 3, padding=1)]
        convs += [nn.Conv2d(channels, channels, 3, padding=1) for _ in range(depth - 1)]
        self.convs = nn.ModuleList(convs)
        for conv in self.convs:  # He init: the signal keeps its scale through the depth
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.head(x.mean(dim=(-2, -1)))


def _cnn(seed: int) -> TaskRun:
    cfg = TASK_CNN.info
    steps, batch, size = TASK_CNN.steps, cfg["batch"], cfg["size"]

    def data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
        g = _gen(seed, 5)
        x, y = _gratings(g, steps * batch, size, cfg["noise"])
        xh, yh = _gratings(g, 1024, size, cfg["noise"])
        return x.view(steps, batch, 1, size, size), y.view(steps, batch, 2), xh, yh

    x, y, xh, yh = _cached(("cnn_momentum", seed), data)
    torch.manual_seed(seed)
    model = _CNN(cfg["channels"], cfg["depth"], 2)
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)

    def train_loss(step: int) -> Tensor:
        return F.mse_loss(model(x[step]), y[step])

    def heldout() -> float:
        return _eval(model, lambda: F.mse_loss(model(xh), yh))

    trivial = float(yh.var(dim=0, unbiased=False).mean())
    return TaskRun(model, opt, train_loss, heldout, trivial)


TASK_CNN = Task(
    name="cnn_momentum",
    summary="6-layer CNN without normalisation regresses the orientation of noisy gratings",
    architecture="CNN, 6 x conv3x3 (16 ch) ReLU, no normalisation, He init, 10x10",
    optimizer="SGD lr 0.08, momentum 0.9",
    reduction="MSE, mean",
    failure="early",
    steps=250,
    build=_cnn,
    info={"batch": 32, "size": 10, "channels": 16, "depth": 6, "noise": 1.0, "lr": 0.08},
    grid=(-3.0, 2.0),
)


# -- 6. MLP classifier, AdamW, late corrupted batches (norms ~0.1-1) -----------------------


def _classifier(seed: int) -> TaskRun:
    cfg = TASK_CLASSIFIER.info
    steps, batch, classes, d_in = TASK_CLASSIFIER.steps, cfg["batch"], cfg["classes"], 32

    def data() -> tuple[Tensor, Tensor, Tensor, Tensor]:
        g = _gen(seed, 6)
        f = _teacher(g, d_in, 64, classes)
        x = torch.randn(steps, batch, d_in, generator=g)
        y = (4.0 * f(x)).argmax(-1)
        xh = torch.randn(4096, d_in, generator=g)
        yh = (4.0 * f(xh)).argmax(-1)
        return x, y, xh, yh

    x, y, xh, yh = _cached(("classifier_corrupt_adamw", seed), data)
    bad = _late_steps(seed, steps, cfg["corrupt"], 0.3)
    g = _gen(seed, 61)
    perms = {s: torch.randperm(batch, generator=g) for s in bad}
    counts = torch.bincount(yh, minlength=classes).double() / yh.numel()
    entropy = float(-(counts * counts.clamp(min=1e-12).log()).sum())
    torch.manual_seed(seed)
    model = _mlp([d_in, 128, 128, classes], nn.ReLU, math.sqrt(2.0))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)

    def train_loss(step: int) -> Tensor:
        inputs, labels = x[step], y[step]
        if step in bad:  # a corrupted batch: unnormalised inputs, shuffled labels
            inputs, labels = inputs * cfg["factor"], labels[perms[step]]
        return F.cross_entropy(model(inputs), labels)

    def heldout() -> float:
        return _eval(model, lambda: F.cross_entropy(model(xh), yh))

    return TaskRun(model, opt, train_loss, heldout, entropy, bad)


TASK_CLASSIFIER = Task(
    name="classifier_corrupt_adamw",
    summary="MLP classifier of a random teacher; a few late batches are unnormalised "
    "(x30) with shuffled labels",
    architecture="MLP 32-128-128-10, ReLU",
    optimizer="AdamW lr 4e-3",
    reduction="cross-entropy, mean",
    failure="late",
    steps=400,
    build=_classifier,
    info={"batch": 64, "classes": 10, "corrupt": 4, "factor": 30.0, "lr": 4e-3},
    grid=(-4.0, 2.0),
)


# -- 7. vanilla RNN regression, Adam, loss summed, late glitches (norms ~1e2) -------------


def _rnn_adam_glitch(seed: int) -> TaskRun:
    cfg = TASK_RNN_ADAM.info
    steps, batch = TASK_RNN_ADAM.steps, cfg["batch"]
    d_in, d_out = 4, 2

    x, y, xh, yh = _delay_data("rnn_adam_glitch", seed, 7, steps, batch, cfg, d_in, d_out)
    bad = _late_steps(seed, steps, cfg["corrupt"], 0.3)
    torch.manual_seed(seed)
    model = _RNNRegressor(d_in, cfg["hidden"], d_out, cfg["radius"])
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])

    def train_loss(step: int) -> Tensor:
        inputs = x[step]
        if step in bad:  # a glitched batch: one sensor reads in the wrong unit
            inputs = inputs.clone()
            inputs[..., 0] *= cfg["factor"]
        return F.mse_loss(model(inputs), y[step], reduction="sum")

    def heldout() -> float:
        return _eval(model, lambda: F.mse_loss(model(xh), yh))

    trivial = float(yh.var(dim=(0, 1), unbiased=False).mean())
    return TaskRun(model, opt, train_loss, heldout, trivial, bad)


TASK_RNN_ADAM = Task(
    name="rnn_adam_glitch",
    summary="vanilla tanh RNN, delayed-memory map; a few late batches have one input "
    "channel x100",
    architecture="vanilla RNN (64 units, weight_hh orthogonal x 1.0), seq 40",
    optimizer="Adam lr 4e-3",
    reduction="MSE summed over batch, time and outputs",
    failure="late",
    steps=300,
    build=_rnn_adam_glitch,
    info={
        "batch": 16,
        "length": 40,
        "hidden": 64,
        "radius": 1.0,
        "delays": (1, 4, 8),
        "corrupt": 4,
        "factor": 100.0,
        "lr": 4e-3,
    },
    grid=(-1.0, 4.0),
)


# -- validation tasks, added after the recommended rule was frozen (README) ----------------


def _mlp_sgd_spikes(seed: int) -> TaskRun:
    cfg = TASK_MLP_SPIKES.info
    steps = TASK_MLP_SPIKES.steps
    x, y, xh, yh = _cached(
        ("mlp_sgd_spikes", seed),
        lambda: _regression_data(seed, 8, steps, cfg["batch"], 32, 1, 1.0, 0.1),
    )
    bad = _late_steps(seed, steps, cfg["corrupt"], 0.3)
    torch.manual_seed(seed)
    model = _mlp([32, 128, 128, 128, 1], nn.ReLU, math.sqrt(2.0))
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)

    def train_loss(step: int) -> Tensor:
        inputs = x[step]
        if step in bad:  # a corrupted batch: unnormalised inputs
            inputs = inputs * cfg["factor"]
        return F.mse_loss(model(inputs), y[step])

    def heldout() -> float:
        return _eval(model, lambda: F.mse_loss(model(xh), yh))

    return TaskRun(model, opt, train_loss, heldout, float(yh.var(unbiased=False)), bad)


TASK_MLP_SPIKES = Task(
    name="mlp_sgd_spikes",
    summary="validation: 3-hidden-layer ReLU MLP regression at its best unclipped LR; a "
    "few late batches have unnormalised inputs (x20)",
    architecture="MLP 32-128-128-128-1, ReLU",
    optimizer="SGD lr 0.0125, momentum 0.9",
    reduction="MSE, mean",
    failure="late",
    steps=400,
    build=_mlp_sgd_spikes,
    info={"batch": 64, "corrupt": 4, "factor": 20.0, "lr": 0.0125},
    grid=(-3.0, 2.0),
)


def _rnn_momentum_mean(seed: int) -> TaskRun:
    cfg = TASK_RNN_MOMENTUM.info
    steps, batch = TASK_RNN_MOMENTUM.steps, cfg["batch"]
    d_in, d_out = 3, 2

    x, y, xh, yh = _delay_data("rnn_momentum_mean", seed, 9, steps, batch, cfg, d_in, d_out)
    torch.manual_seed(seed)
    model = _RNNRegressor(d_in, cfg["hidden"], d_out, cfg["radius"])
    opt = torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=0.9)

    def train_loss(step: int) -> Tensor:
        return F.mse_loss(model(x[step]), y[step])

    def heldout() -> float:
        return _eval(model, lambda: F.mse_loss(model(xh), yh))

    trivial = float(yh.var(dim=(0, 1), unbiased=False).mean())
    return TaskRun(model, opt, train_loss, heldout, trivial)


TASK_RNN_MOMENTUM = Task(
    name="rnn_momentum_mean",
    summary="validation: vanilla tanh RNN, delayed-memory map, mean loss, momentum SGD",
    architecture="vanilla RNN (48 units, weight_hh orthogonal x 1.2), seq 30",
    optimizer="SGD lr 0.64, momentum 0.9",
    reduction="MSE, mean",
    failure="early",
    steps=300,
    build=_rnn_momentum_mean,
    info={
        "batch": 16,
        "length": 30,
        "hidden": 48,
        "radius": 1.2,
        "delays": (2, 6),
        "lr": 0.64,
    },
    grid=(-3.0, 2.0),
)


TASKS: dict[str, Task] = {
    t.name: t
    for t in (
        TASK_RNN_SGD,
        TASK_TRANSFORMER,
        TASK_DEEP_MLP,
        TASK_TINY,
        TASK_CNN,
        TASK_CLASSIFIER,
        TASK_RNN_ADAM,
        TASK_MLP_SPIKES,
        TASK_RNN_MOMENTUM,
    )
}
