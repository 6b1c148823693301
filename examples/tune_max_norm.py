"""Tune the clipping strategy and threshold of a vanilla RNN with an Optuna study.

The task: a tanh RNN reads 60 noisy inputs and must output a mix of two it saw 8 and 16
steps before the end. Its recurrent weights start slightly expansive (an orthogonal
matrix scaled by 1.2) and it trains with SGD and momentum, the setting in which Pascanu
et al. (2013) described exploding gradients: without clipping, the loss stalls far above
what clipping reaches, or diverges.

The study lives in an embedded SQLite file. A short probe of unclipped steps calibrates the
``max_norm`` range first (stored in the study, once). Then Optuna searches no clipping,
norm clipping and percentile clipping (AutoClip) with their thresholds, pruning poor trials
after 40% of their run. The script prints a summary table and writes plots; running it
again resumes the same study and adds trials.

Run: python examples/tune_max_norm.py      (CPU; it prints how long the study took)
     optuna-dashboard sqlite:///tune_max_norm.db   (to browse the study, if installed)
"""

from __future__ import annotations

import argparse
import time

import optuna
import torch

import clipopt
import clipopt.tuning as ct

SEQ_LEN, DELAY, BATCH = 60, 8, 32


def make_batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randn(BATCH, SEQ_LEN, 1, generator=g)
        y = x[:, -1 - DELAY, :] + 0.5 * x[:, -1 - 2 * DELAY, :]
        batches.append((x, y))
    return batches


class DelayRNN(torch.nn.Module):
    def __init__(self, hidden: int = 32, recurrent_scale: float = 1.2) -> None:
        super().__init__()
        self.rnn = torch.nn.RNN(1, hidden, batch_first=True, nonlinearity="tanh")
        self.head = torch.nn.Linear(hidden, 1)
        with torch.no_grad():
            torch.nn.init.orthogonal_(self.rnn.weight_hh_l0)
            self.rnn.weight_hh_l0.mul_(recurrent_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


def build(seed: int = 0) -> tuple[DelayRNN, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = DelayRNN()
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def evaluate(model: torch.nn.Module, batches) -> float:
    with torch.no_grad():
        losses = [torch.nn.functional.mse_loss(model(x), y) for x, y in batches]
    return float(torch.stack(losses).mean())


def make_objective(steps: int, report_every: int):
    train, valid = make_batches(steps, seed=1), make_batches(4, seed=2)

    def objective(trial: optuna.Trial, strategy: clipopt.ClipStrategy) -> float:
        model, sgd = build()
        opt = clipopt.ClippedOptimizer(sgd, strategy)
        reporter = ct.TrialReporter(trial, opt, total_steps=steps)
        for step, (x, y) in enumerate(train, start=1):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
            if step % report_every == 0:
                reporter.report(evaluate(model, valid), step)
        return reporter.finish(evaluate(model, valid))

    return objective


def probe(study: optuna.Study, n_steps: int) -> tuple[float, float]:
    """Measure unclipped gradient norms once per study and store the max_norm range."""
    stored = ct.norm_range(study)
    if stored is not None:
        return stored
    model, sgd = build()
    batches = iter(make_batches(n_steps, seed=3))

    def train_step(opt: torch.optim.Optimizer) -> None:
        x, y = next(batches)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()

    result = ct.probe_grad_norms(train_step, sgd, n_steps=n_steps)
    return ct.store_probe(study, result)


def main(
    trials: int = 40,
    steps: int = 300,
    storage: str = "sqlite:///tune_max_norm.db",
    study_name: str = "rnn-delay",
    plots: str = "tune_max_norm_plots",
    probe_steps: int = 60,
    seed: int = 0,
    verbose: bool = True,
) -> ct.TuningSummary:
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the progress bar is enough
    study = optuna.create_study(
        storage=ct.make_storage(storage), study_name=study_name, load_if_exists=True
    )
    low, high = probe(study, probe_steps)
    done = ct.count_finished(study)
    if verbose:
        percentiles = study.user_attrs[ct.PERCENTILES_ATTR]
        print(
            f"unclipped gradient norms: p5 {percentiles['5']:.3g}, "
            f"p50 {percentiles['50']:.3g}, p95 {percentiles['95']:.3g}; "
            f"max_norm searched in [{low:.3g}, {high:.3g}]"
        )
        print(f"study {study_name!r} has {done} finished trials; adding {trials}")
    start = time.perf_counter()
    study = ct.tune(
        make_objective(steps, report_every=max(steps // 6, 1)),
        n_trials=done + trials,
        storage=storage,
        study_name=study_name,
        seed=seed,
        worker_id=f"run{done}",
        strategies=("none", "norm", "percentile"),
        show_progress_bar=verbose,
    )
    seconds = time.perf_counter() - start
    summary = ct.summarize(study)
    files = ct.save_plots(study, plots, objective_name="validation MSE")
    if verbose:
        print(f"the study ran {ct.count_finished(study) - done} trials in {seconds:.0f} s")
        print()
        print(summary)
        print()
        print("plots:", ", ".join(str(f) for f in files))
        best = ct.strategy_from_params(study.best_params)
        print(f"best strategy: {best!r}")
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=40, help="trials to add this run")
    parser.add_argument("--steps", type=int, default=300, help="training steps per trial")
    parser.add_argument("--storage", default="sqlite:///tune_max_norm.db")
    parser.add_argument("--study-name", default="rnn-delay")
    parser.add_argument("--plots", default="tune_max_norm_plots")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # Global state, so only as a script (a caller's numerics keep their own threads):
    # tiny ops are fastest on one thread, which also leaves a core free.
    torch.set_num_threads(1)
    main(args.trials, args.steps, args.storage, args.study_name, args.plots, seed=args.seed)
