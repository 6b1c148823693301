"""Per task: volatility statistics of the pre-clip norm under a rule (diagnostic).

Run: python -m benchmarks.stability.volstat [RULE]
"""

import math
import statistics as st
import sys

import torch

from .adaptive import specs
from .tasks import TASKS


def main() -> None:
    torch.set_num_threads(1)
    rule_name = sys.argv[1] if len(sys.argv) > 1 else "REC"
    for name, task in TASKS.items():
        out = []
        for seed in (1000, 1001):
            run = task.make(seed)
            params = [p for p in run.model.parameters() if p.requires_grad]
            rule = specs()[rule_name](params)
            ms = []
            for step in range(task.steps):
                run.optimizer.zero_grad(set_to_none=True)
                loss = run.train_loss(step)
                if not bool(torch.isfinite(loss)):
                    break
                loss.backward()
                ms.append(float(torch.nn.utils.get_total_norm([p.grad for p in params])))
                rule.clip_()
                run.optimizer.step()
            lr = [math.log(ms[i + 1] / ms[i]) for i in range(len(ms) - 1)]
            # windows: steps 0-20, 20-60, 60-150, 150-end: rms of consecutive log-ratio
            w = [(0, 20), (20, 60), (60, 150), (150, len(lr))]
            rms = [math.sqrt(st.fmean(x * x for x in lr[a:b])) for a, b in w]
            drift = [
                math.log(st.median(ms[b - 10 : b]) / ms[0]) for b in (20, 60, 150, len(ms))
            ]
            out.append(
                " ".join(f"{r:.2f}" for r in rms)
                + " | drift "
                + " ".join(f"{d:+.1f}" for d in drift)
            )
        print(f"{name:26s}", " || ".join(out), flush=True)


if __name__ == "__main__":
    main()
