"""Benchmark ClippedOptimizer.step() against torch's clip + step, side by side.

For each gradient layout and inner optimizer, every case runs in this one process,
interleaved in a freshly shuffled order each round; a case's time is the median of its
repetitions in a round, and a ratio is the median over rounds of (case / reference) with
the reference, torch's ``clip_grad_norm_`` followed by the inner step, measured in the same
round. Gradients are restored (untimed) before every step from a fixed bank: a total norm
of about 0.5 times a log-normal factor (sigma 0.15), and a 20x spike every 20th step, so
``max_norm=1.0`` clips only spikes and the median step does not clip. Every case counts its
own steps, so all cases see the same gradient sequence.

Run: python benchmarks/bench_step.py            (make bench; about 5 minutes on 2 cores)
     python benchmarks/bench_step.py --quick    (a smoke test of the script, seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import clipopt

# The reference implementations live with the tests, which check them against clipopt.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
from tests.reference import timm_adaptive_clip_grad

RESULTS = pathlib.Path(__file__).parent / "results"
Step = Callable[[], None]


# -- layouts -------------------------------------------------------------------------------


def layout_a(scale: int = 1) -> list[tuple[int, ...]]:
    """A small pre-LN transformer: d=384, 9 layers, 24k x 384 embedding (25.2M, 148)."""
    d, hidden, layers, vocab = 384 // scale, 1536 // scale, 9, 24000 // scale
    shapes: list[tuple[int, ...]] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d,)]  # layer norm
        shapes += [(d, d), (d,)] * 4  # q, k, v, o
        shapes += [(d,), (d,), (hidden, d), (hidden,), (d, hidden), (d,)]  # ln, MLP
    shapes += [(d,), (d,)]
    return shapes


def layout_b(scale: int = 1) -> list[tuple[int, ...]]:
    """2,000 small tensors: 1,000 (40, 48) matrices and 1,000 (80,) vectors (2.0M)."""
    n = 1000 // scale
    return [(40, 48)] * n + [(80,)] * n


def layout_c(scale: int = 1) -> list[tuple[int, ...]]:
    """One tensor of 50M elements."""
    return [(10000 // scale, 5000 // scale)]


def layout_d(scale: int = 1) -> list[tuple[int, ...]]:
    """A small model: six 64 x 64 nn.Linear layers (25k, 12), where host overhead rules.

    Measured on one thread: on an accelerator this per-step overhead is what a
    launch-bound step pays.
    """
    return [(64, 64), (64,)] * 6


def layout_e(scale: int = 1) -> list[tuple[int, ...]]:
    """Three 4M tensors and 20 small ones (12.0M, 23): the layout of issue 12's value
    measurements."""
    return [(2000 // scale, 2000)] * 3 + [(256,)] * 20


LAYOUTS = {
    "A 25M/148": layout_a,
    "B 2M/2000": layout_b,
    "C 50M/1": layout_c,
    "D 25k/12 (1 thread)": layout_d,
    "E 12M/23": layout_e,
}
#: Torch threads per layout (None: as configured).
THREADS = {"D 25k/12 (1 thread)": 1}
#: Repetitions per round, times ``--reps``, where three did not make a ratio stable
#: between runs. D's steps take well under a millisecond, and one such step's time varies
#: by tens of percent with what ran before it (caches): the norm ratio spread from 0.79 to
#: 1.06 in six runs with three; sixty cost about a minute. E's "value" ratio, a target,
#: sits within a few percent of 1.00 and spread from 0.99 to 1.07 over four runs with
#: three; nine cost about a minute more.
REPS_SCALE = {"D 25k/12 (1 thread)": 20, "E 12M/23": 3}


def full_window(window: int) -> clipopt.PercentileClip:
    """A percentile strategy whose window is already full (as after a long run).

    A run of this benchmark is far shorter than 100,000 steps: without this, neither
    window would ever evict, and their costs would say nothing about history length.
    """
    strategy = clipopt.PercentileClip(90, window=window)
    g = torch.Generator().manual_seed(window)
    history = 0.5 * torch.exp(0.15 * torch.randn(window, generator=g, dtype=torch.float64))
    # float32, as a run with float32 gradients keeps it (a float64 window costs twice)
    history = history.to(torch.float32)
    strategy.load_state_dict({"history": history, "count": torch.tensor(window)})
    return strategy


#: The clip value of the value cases: gradient entries reach it on the spike steps.
VALUE = 1e-3
VALUE_REF = "torch clip_grad_value_ + step"
INNERS: dict[str, Callable[[list[torch.Tensor]], torch.optim.Optimizer]] = {
    "AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-4, fused=True),
    "AdamW foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-4, foreach=True),
    "SGD momentum": lambda ps: torch.optim.SGD(ps, lr=1e-4, momentum=0.9, foreach=True),
}
STRATEGIES: dict[str, Callable[[], clipopt.ClipStrategy]] = {
    "norm": lambda: clipopt.NormClip(1.0),
    "relative": clipopt.RelativeClip,  # the default, ClippedOptimizer(opt)
    "value": lambda: clipopt.ValueClip(VALUE),
    "percentile w=100": lambda: full_window(100),
    "percentile w=100000": lambda: full_window(100_000),
    "zscore": lambda: clipopt.ZScoreClip(max_norm=1.0),
    "adagc": lambda: clipopt.AdaGC(warmup_steps=10),
    "agc": lambda: clipopt.AGC(0.01),
}


# -- the gradient sequence -----------------------------------------------------------------


class Gradients:
    """Parameters whose gradients are restored from a fixed random bank every step."""

    def __init__(self, shapes: list[tuple[int, ...]], device: str = "cpu") -> None:
        g = torch.Generator().manual_seed(0)
        self.params = [
            torch.nn.Parameter(0.02 * torch.randn(s, generator=g).to(device))
            for s in shapes
        ]
        bank = [torch.randn(s, generator=g).to(device) for s in shapes]
        total = math.sqrt(sum(float(b.square().sum()) for b in bank))
        self.bank = [b * (0.5 / total) for b in bank]
        for p, b in zip(self.params, self.bank, strict=True):
            p.grad = b.clone()
        self.noise = torch.randn(997, generator=g).tolist()
        self.step = 0

    @torch.no_grad()
    def restore(self, step: int | None = None) -> None:
        """Set the gradients of step ``step`` (by default, the one after the last)."""
        self.step = self.step + 1 if step is None else step
        # log-normal step-to-step variation (sigma 0.15), and a 20x spike every 20th step
        factor = math.exp(0.15 * self.noise[self.step % len(self.noise)])
        factor *= 20.0 if self.step % 20 == 0 else 1.0
        torch._foreach_copy_([p.grad for p in self.params], self.bank)
        if factor != 1.0:
            torch._foreach_mul_([p.grad for p in self.params], factor)


# -- the cases ----------------------------------------------------------------------------


def cases(grads: Gradients, inner_name: str) -> dict[str, Step]:
    params = grads.params
    make = INNERS[inner_name]
    out: dict[str, Step] = {}

    inner = make(params)
    out["inner step alone"] = inner.step

    ref = make(params)

    def torch_clip_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        ref.step()

    out["torch clip_grad_norm_ + step"] = torch_clip_step
    value_ref = make(params)

    def torch_value_step() -> None:
        torch.nn.utils.clip_grad_value_(params, VALUE)
        value_ref.step()

    out[VALUE_REF] = torch_value_step
    for name, factory in STRATEGIES.items():
        wrapper = clipopt.ClippedOptimizer(make(params), factory())
        out[f"clipopt {name}"] = wrapper.step
    # The floor of any per-tensor strategy (AdaGC): it must write the gradients on every
    # step where a tensor clips, where "norm" hands one factor to the kernel for free.
    floor = clipopt.ClippedOptimizer(make(params), STRATEGIES["norm"]())
    factors = [torch.full((), 0.999, device=p.device) for p in params]

    def norm_plus_pass() -> None:
        torch._foreach_mul_([p.grad for p in params], factors)
        floor.step()

    out[FLOOR] = norm_plus_pass
    # AdaGC's bookkeeping alone (per-tensor norms, EMA, state, statistics): the same
    # strategy with thresholds it never reaches, so on the CPU it never writes the
    # gradients (on a GPU it still multiplies them by 1: deciding not to would sync).
    idle = clipopt.ClippedOptimizer(
        make(params), clipopt.AdaGC(1e30, warmup_steps=10, max_norm=1e30)
    )
    out[IDLE] = idle.step
    return out


FLOOR = "clipopt norm + a per-tensor scaling pass"
IDLE = "clipopt adagc, thresholds never reached"


def clip_rates(steps: dict[str, Step]) -> dict[str, float]:
    """Per wrapper case, the share of its steps that changed the gradients."""
    rates = {}
    for name, step in steps.items():
        wrapper = getattr(step, "__self__", None)
        if isinstance(wrapper, clipopt.ClippedOptimizer):
            counts = wrapper.counts()
            rates[name] = counts["clipped_steps"] / max(counts["steps"], 1)
    return rates


def clip_only_cases(grads: Gradients) -> dict[str, Step]:
    """The AGC clipping alone, ours against timm's."""
    params = grads.params
    agc = clipopt.AGC(0.01)
    ours: Step
    if hasattr(agc, "plan"):  # clipopt >= 0.2: the plan is made once per layout
        from clipopt.strategies import clip_gradients

        plan = agc.plan(clipopt.ClipInputs(params, [p.grad for p in params], 0))

        def ours() -> None:
            fresh = clipopt.ClipInputs(params, [p.grad for p in params], 0, plan=plan)
            clip_gradients(agc, fresh)

    else:  # clipopt 0.1, for before/after tables

        def ours() -> None:
            fresh = clipopt.ClipInputs(params, [p.grad for p in params], 0)
            agc.clip_(fresh, agc.measure(fresh))  # type: ignore[attr-defined]

    return {
        "agc clip only: clipopt": ours,
        "agc clip only: timm adaptive_clip_grad": lambda: timm_adaptive_clip_grad(params),
    }


def measure(
    steps: dict[str, Step],
    grads: Gradients,
    rounds: int,
    reps: int,
    sync: Callable[[], None],
) -> dict[str, list[float]]:
    """Per case, the median time (s) of each round; cases interleaved and shuffled."""
    names = list(steps)
    # Each case counts its own steps and sees the same gradient sequence, spikes included:
    # a shared counter would hand the spikes to whichever cases the shuffle put there.
    count = dict.fromkeys(names, 0)
    for name in names:  # warm up: optimizer state, lazily built strategy state
        for _ in range(2):
            count[name] += 1
            grads.restore(count[name])
            steps[name]()
    sync()
    per_round: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(0)
    for _ in range(rounds):
        samples: dict[str, list[float]] = {n: [] for n in names}
        for _ in range(reps):
            order = names[:]
            rng.shuffle(order)
            for name in order:
                count[name] += 1
                grads.restore(count[name])
                sync()
                start = time.perf_counter()
                steps[name]()
                sync()
                samples[name].append(time.perf_counter() - start)
        for name in names:
            per_round[name].append(statistics.median(samples[name]))
    return per_round


def ratios(per_round: dict[str, list[float]], reference: str) -> dict[str, float]:
    ref = per_round[reference]
    return {
        name: statistics.median(t / r for t, r in zip(times, ref, strict=True))
        for name, times in per_round.items()
    }


def run(
    device: str, layouts: list[str], rounds: int, reps: int, scale: int
) -> dict[str, Any]:
    sync: Callable[[], None] = torch.cuda.synchronize if device == "cuda" else lambda: None
    results: dict[str, Any] = {}
    configured = torch.get_num_threads()
    for layout in layouts:
        torch.set_num_threads(THREADS.get(layout) or configured)
        try:
            results[layout] = run_layout(device, layout, rounds, reps, scale, sync)
        finally:
            torch.set_num_threads(configured)
    return results


def run_layout(
    device: str,
    layout: str,
    rounds: int,
    reps: int,
    scale: int,
    sync: Callable[[], None],
) -> dict[str, Any]:
    """Every inner optimizer and case on one layout."""
    grads = Gradients(LAYOUTS[layout](1 if layout.startswith("D") else scale), device)
    reps *= REPS_SCALE.get(layout, 1) if scale == 1 else 1
    entry: dict[str, Any] = {"inners": {}}
    for inner_name in INNERS:
        steps = cases(grads, inner_name)
        per_round = measure(steps, grads, rounds, reps, sync)
        entry["inners"][inner_name] = {
            "ratio_to_torch": ratios(per_round, "torch clip_grad_norm_ + step"),
            "ratio_to_clipopt_norm": ratios(per_round, "clipopt norm"),
            "ratio_to_floor": ratios(per_round, FLOOR),
            "value_to_torch_value": ratios(per_round, VALUE_REF)["clipopt value"],
            # paired within rounds, like every other ratio
            "window_100k_over_100": ratios(per_round, "clipopt percentile w=100")[
                "clipopt percentile w=100000"
            ],
            "median_ms": {n: 1e3 * statistics.median(t) for n, t in per_round.items()},
            "clip_rate": clip_rates(steps),
        }
    per_round = measure(clip_only_cases(grads), grads, rounds, reps, sync)
    entry["agc_clip_only"] = {
        "timm_over_clipopt": ratios(per_round, "agc clip only: clipopt")[
            "agc clip only: timm adaptive_clip_grad"
        ],
        "median_ms": {n: 1e3 * statistics.median(t) for n, t in per_round.items()},
    }
    return entry


# -- targets and report -------------------------------------------------------------------


def targets(results: dict[str, Any]) -> list[tuple[str, str, float, bool]]:
    """(target, where, measured, met) for every target of the performance issue."""
    rows = []
    for layout, entry in results.items():
        inners = entry["inners"]
        # The default (issue 13): no costlier than AdaGC. It clips nearly every step, so
        # without a fused kernel it pays the scaling pass torch's clip_grad_norm_ always
        # pays, where AdaGC writes only on the steps it clips.
        for name, values in inners.items():
            to_torch = values["ratio_to_torch"]
            r = to_torch["clipopt relative"] / to_torch["clipopt adagc"]
            rows.append((f"relative <= 1.00x adagc ({name})", layout, r, r <= 1.0))
        if not layout.startswith("D"):  # memory-bound layouts (D: host overhead)
            r = inners["AdamW fused"]["value_to_torch_value"]
            rows.append(
                ("fused: value <= 1.00x torch clip_grad_value_ + step", layout, r, r <= 1)
            )
        if layout.startswith("E"):  # the value measurements' layout: value only
            continue
        if layout.startswith("D"):  # host overhead: at most torch's, fused or not
            for name in ("AdamW fused", "AdamW foreach"):
                r = inners[name]["ratio_to_torch"]["clipopt norm"]
                rows.append((f"{name}: norm <= 1.00x torch clip + step", layout, r, r <= 1))
            continue
        fused = inners["AdamW fused"]["ratio_to_torch"]["clipopt norm"]
        rows.append(
            ("fused: norm <= 0.85x torch clip + fused step", layout, fused, fused <= 0.85)
        )
        for name in ("AdamW foreach", "SGD momentum"):
            r = inners[name]["ratio_to_torch"]["clipopt norm"]
            rows.append((f"{name}: norm <= 1.00x torch clip + step", layout, r, r <= 1.0))
        for name, values in inners.items():
            for strategy in ("percentile w=100", "percentile w=100000", "zscore", "adagc"):
                r = values["ratio_to_clipopt_norm"][f"clipopt {strategy}"]
                rows.append((f"{strategy} <= 1.10x norm ({name})", layout, r, r <= 1.10))
            r = values["ratio_to_floor"]["clipopt adagc"]
            rows.append(
                (f"(restated) adagc <= 1.10x norm + pass ({name})", layout, r, r <= 1.10)
            )
            r = values["ratio_to_clipopt_norm"][IDLE]
            rows.append(
                (
                    f"(restated) adagc bookkeeping <= 1.10x norm ({name})",
                    layout,
                    r,
                    r <= 1.10,
                )
            )
            r = values["window_100k_over_100"]
            rows.append(
                (f"window 100k within 5% of 100 ({name})", layout, r, abs(r - 1) <= 0.05)
            )
        speedup = entry["agc_clip_only"]["timm_over_clipopt"]
        if layout.startswith("B"):
            rows.append(("agc >= 5x faster than timm", layout, speedup, speedup >= 5.0))
    return rows


def markdown(results: dict[str, Any], command: str) -> str:
    lines = [f"Command: `{command}`", ""]
    lines.append(
        f"Machine: {platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}."
    )
    lines.append("")
    for layout, entry in results.items():
        inners = entry["inners"]
        names = list(next(iter(inners.values()))["ratio_to_torch"])
        lines.append(f"### Layout {layout}: ratio to torch `clip_grad_norm_` + step")
        lines.append("")
        lines.append("| case | " + " | ".join(inners) + " |")
        lines.append("| --- |" + " --- |" * len(inners))
        for name in names:
            cells = [f"{v['ratio_to_torch'][name]:.3f}" for v in inners.values()]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        refs = [
            f"{v['median_ms']['torch clip_grad_norm_ + step']:.2f}" for v in inners.values()
        ]
        lines.append("| *reference, ms* | " + " | ".join(refs) + " |")
        values = [f"{v['value_to_torch_value']:.3f}" for v in inners.values()]
        lines.append(
            "| *clipopt value / torch clip_grad_value_ + step* | "
            + " | ".join(values)
            + " |"
        )
        rates = [
            f"norm {v['clip_rate']['clipopt norm']:.0%}, "
            f"relative {v['clip_rate']['clipopt relative']:.0%}, "
            f"adagc {v['clip_rate']['clipopt adagc']:.0%}"
            for v in inners.values()
        ]
        lines.append("| *steps that clipped* | " + " | ".join(rates) + " |")
        agc = entry["agc_clip_only"]
        lines.append("")
        lines.append(
            "AGC clipping alone: clipopt "
            f"{agc['median_ms']['agc clip only: clipopt']:.2f} ms, "
            f"timm {agc['median_ms']['agc clip only: timm adaptive_clip_grad']:.2f} ms "
            f"({agc['timm_over_clipopt']:.1f}x)."
        )
        lines.append("")
    lines.append("### Targets")
    lines.append("")
    lines.append("| target | layout | measured | met |")
    lines.append("| --- | --- | --- | --- |")
    for target, layout, value, met in targets(results):
        lines.append(f"| {target} | {layout} | {value:.3f} | {'yes' if met else 'NO'} |")
    return "\n".join(lines) + "\n"


def cuda_section(rounds: int, reps: int, scale: int) -> dict[str, Any] | None:
    """The same ratios on a GPU, steps under set_sync_debug_mode('error')."""
    if not torch.cuda.is_available():
        print("CUDA section skipped: no GPU")
        return None
    torch.cuda.set_sync_debug_mode("error")
    try:
        params = Gradients(layout_a(scale), "cuda").params
        opt = clipopt.ClippedOptimizer(torch.optim.AdamW(params, fused=True), "norm")
        opt.step()  # raises if the fused skip path reads the device
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return run("cuda", list(LAYOUTS), rounds, reps, scale)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny layouts, one round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help="comma-separated")
    parser.add_argument("--out", default=str(RESULTS), help="directory for the results")
    args = parser.parse_args(argv)
    layouts = [
        name
        for name in LAYOUTS
        if name.split()[0] in args.layouts.split(",") or name in args.layouts.split(",")
    ]
    # quick: tiny layouts, but 22 steps per case, so a 20th-step spike is among them
    scale, rounds, reps = (8, 1, 20) if args.quick else (1, args.rounds, args.reps)
    command = "python benchmarks/bench_step.py" + (" --quick" if args.quick else "")
    results = {"cpu": run("cpu", layouts, rounds, reps, scale)}
    cuda = cuda_section(rounds, reps, scale)
    if cuda is not None:
        results["cuda"] = cuda
    report = markdown(results["cpu"], command)
    if cuda is not None:
        report += "\n## CUDA\n\n" + markdown(cuda, command)
    print(report)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "quick" if args.quick else "latest"
    (out / f"{name}.json").write_text(
        json.dumps(
            {"command": command, "torch": torch.__version__, "results": results}, indent=1
        )
    )
    (out / f"{name}.md").write_text(report)
    return results


if __name__ == "__main__":
    main()
