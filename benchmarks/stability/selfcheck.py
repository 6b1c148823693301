"""Self-checks of candidates.py (1 s): python -m benchmarks.stability.selfcheck.

1. The recommended rule is scale-free: the same gradients times 1e6 get the same factors.
2. Its state is three scalars.
3. ``SpikeSkip(exclude_outliers=False)`` decides exactly as OLMo-core's
   ``get_step_factor`` does (re-implemented here from its source, norm only), on a noisy
   series with spikes.
"""

from __future__ import annotations

import random

import torch

from . import candidates as C


def _factors(scale: float) -> tuple[list[float], dict[str, torch.Tensor]]:
    params = [torch.nn.Parameter(torch.zeros(5, 3)), torch.nn.Parameter(torch.zeros(7))]
    rule = C.recommended(params)
    g = torch.Generator().manual_seed(1)
    out = []
    for t in range(60):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * scale * (50 if t == 40 else 1)
        out.append(float(rule.clip_()[0]))
    return out, rule.state_dict()


def _olmo_reference(
    values: list[float], window: int = 128, sigma: float = 6.0
) -> list[bool]:
    """OLMo-core's rule: keep window + 1 values, test the last against the others."""
    kept: list[torch.Tensor] = []
    steps = []
    for v in values:
        kept.append(torch.tensor(v))
        kept = kept[-(window + 1) :]
        if len(kept) < max(2, window // 2):
            steps.append(True)
            continue
        std, mean = torch.std_mean(torch.stack(kept[:-1]))
        steps.append(bool(kept[-1] - mean <= sigma * std))
    return steps


def main() -> None:
    a, state = _factors(1.0)
    b, _ = _factors(1e6)
    assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-5, "not scale-free"
    assert all(v.numel() == 1 for v in state.values()), state
    assert abs(a[0] - 0.02) < 1e-6, a[0]  # step 0 passes c / R = 0.4 / 20 of its norm
    rng = random.Random(0)
    values = [abs(rng.gauss(1.0, 0.1)) for _ in range(400)]
    for i in (100, 150, 151, 300):
        values[i] = 10.0
    gate = C.SpikeSkip(exclude_outliers=False)
    mine = [bool(gate.update(torch.tensor(v))) for v in values]
    assert mine == _olmo_reference(values), "SpikeSkip differs from OLMo-core's rule"
    assert [i for i, s in enumerate(mine) if not s] == [100, 150, 151, 300]
    print("selfcheck passed")


if __name__ == "__main__":
    main()
