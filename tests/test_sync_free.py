"""No host read in step(): run it on meta tensors, where any read of a value raises."""

import pytest
import torch

import clipopt
from clipopt import ClippedOptimizer

STRATEGIES = [
    ("norm", {"max_norm": 1.0}),
    ("norm", {"max_norm": 1.0, "norm_type": 1.0}),
    ("norm", {"max_norm": 1.0, "norm_type": float("inf")}),
    ("value", {"clip_value": 0.5}),
    ("relative", {}),
]


def _meta_params():
    params = [
        torch.nn.Parameter(torch.empty(s, device="meta")) for s in [(4, 3), (3,), (2, 2)]
    ]
    for p in params:
        p.grad = torch.empty_like(p)
    return params


def test_meta_tensors_do_raise_on_host_reads():
    t = torch.empty((), device="meta")
    with pytest.raises((RuntimeError, NotImplementedError)):
        bool(t > 0)
    with pytest.raises((RuntimeError, NotImplementedError)):
        t.item()


@pytest.mark.parametrize("nonfinite", ["zero", "propagate"])
@pytest.mark.parametrize(("name", "kwargs"), STRATEGIES)
@pytest.mark.parametrize(
    "inner",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, foreach=False),
        lambda ps: torch.optim.Adam(ps, lr=0.1, foreach=False),
    ],
    ids=["SGD", "Adam"],
)
def test_step_is_sync_free(inner, name, kwargs, nonfinite):
    params = _meta_params()
    opt = ClippedOptimizer(inner(params), name, nonfinite=nonfinite, **kwargs)
    for _ in range(2):
        opt.step()
    stats = opt.last_stats
    assert all(t.device.type == "meta" for t in stats)
    assert opt.state_dict()["clipopt"]["clipped_steps"].device.type == "meta"


def test_skip_policy_reads_the_host_once_and_says_so():
    params = _meta_params()
    opt = ClippedOptimizer(torch.optim.SGD(params, lr=0.1), nonfinite="skip")
    with pytest.raises((RuntimeError, NotImplementedError)):
        opt.step()


def test_strategy_that_reads_the_host_is_caught():
    class Reads(clipopt.NormClip):
        def clip(self, inputs, measured, skip=None):
            if measured.norm > self.max_norm:  # a host read
                pass
            return super().clip(inputs, measured, skip)

    opt = ClippedOptimizer(
        torch.optim.SGD(_meta_params(), lr=0.1), Reads(), nonfinite="propagate"
    )
    with pytest.raises((RuntimeError, NotImplementedError)):
        opt.step()
