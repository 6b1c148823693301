"""Print norm / threshold traces of one rule on one task and seed.

Run: python -m benchmarks.stability.trace TASK SEED RULES[,...] [EVERY]
"""

import sys

import torch

from .adaptive import specs
from .tasks import TASKS


def main() -> None:
    torch.set_num_threads(1)
    task, seed, names = TASKS[sys.argv[1]], int(sys.argv[2]), sys.argv[3].split(",")
    every = int(sys.argv[4]) if len(sys.argv) > 4 else 10
    sp = specs()
    for n in names:
        run = task.make(seed)
        if n.startswith("torch"):
            mn = float(n[5:])
            rule = None
        else:
            rule = sp[n]([p for p in run.model.parameters() if p.requires_grad])
        params = [p for p in run.model.parameters() if p.requires_grad]
        rows = []
        for step in range(task.steps):
            run.optimizer.zero_grad(set_to_none=True)
            loss = run.train_loss(step)
            if not bool(torch.isfinite(loss)):
                rows.append(f"{step}: diverged")
                break
            loss.backward()
            m = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
            if rule is None:
                torch.nn.utils.clip_grad_norm_(params, mn)
                extra = ""
            else:
                coef = float(rule.clip_()[0])
                g = float(rule.gamma[0])
                c = float(torch.as_tensor(rule.c).reshape(-1)[0])
                extra = f" g={g:.3g} c={c:.3g} coef={coef:.2f}"
            run.optimizer.step()
            if step % every == 0 or (step < 30 and every > 1 and step % 2 == 0):
                rows.append(f"{step}: loss={float(loss):.3g} m={m:.3g}{extra}")
        print(n, "heldout", run.heldout_loss())
        print("\n".join(rows))


if __name__ == "__main__":
    main()
