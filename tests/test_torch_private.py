"""Every torch internal clipopt relies on (clipopt/_torch_private.py) still behaves.

Each test names its touchpoint: when a torch release changes one, the failure says
which, and where clipopt uses it.
"""

import pytest
import torch

from clipopt import _torch_private as P


def test_foreach_grouping_matches_torch_utils():
    """Item 1: torch.utils._foreach_utils groups by (device, dtype) with positions."""
    tensors = [torch.ones(2), torch.ones(3, dtype=torch.float64), torch.ones(1)]
    groups = list(P.group_by_device_and_dtype(tensors))
    assert sorted(positions for _, _, positions in groups) == [[0, 2], [1]], (
        "torch.utils._foreach_utils._group_tensors_by_device_and_dtype changed"
    )
    pairs = P.group_pairs_by_device_and_dtype(tensors, [t * 2 for t in tensors])
    assert {(len(a), len(b)) for _, _, a, b in pairs} == {(2, 2), (1, 1)}
    assert P.use_foreach(tensors[:1], torch.device("cpu"), None) in (True, False)
    meta = torch.device("meta")
    with pytest.raises(RuntimeError, match="foreach=True"):  # else: meta gained kernels
        P.use_foreach([torch.ones(1, device=meta)], meta, True)


def test_foreach_answer_is_torchs_and_kept_per_device_type():
    """Item 1: use_foreach gives torch's _has_foreach_support answer (kept per type)."""
    from torch.utils._foreach_utils import _has_foreach_support

    cpu, meta = torch.device("cpu"), torch.device("meta")
    plain, param = torch.ones(2), torch.nn.Parameter(torch.ones(2))
    for tensors, device in (([plain], cpu), ([param], cpu), ([plain, None], cpu)):
        for _ in range(2):  # the second answer comes from the kept one
            assert P.use_foreach(tensors, device, None) == _has_foreach_support(
                tensors, device
            ), f"torch's foreach support changed for {tensors!r} on {device}"
    meta_tensor = torch.ones(1, device=meta)
    assert P.use_foreach([meta_tensor], meta, None) == _has_foreach_support(
        [meta_tensor], meta
    )
    assert P.use_foreach([plain], cpu, False) is False


def test_grad_mode_switch_is_what_no_grad_sets():
    """Item 1: set_grad_mode switches the mode torch.no_grad switches."""
    assert torch.is_grad_enabled()
    P.set_grad_mode(False)
    try:
        assert not torch.is_grad_enabled(), "torch._C._set_grad_enabled changed"
        x = torch.ones(2, requires_grad=True)
        assert not (x * 2).requires_grad
    finally:
        P.set_grad_mode(True)
    assert torch.is_grad_enabled()


def _fused_adam():
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 4.0)
    return p, torch.optim.Adam([p], lr=0.1, fused=True)


def test_fused_kernels_read_grad_scale_and_found_inf():
    """Item 2: fused Adam/AdamW/SGD/Adagrad read grad_scale and found_inf in step()."""
    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad):
        p = torch.nn.Parameter(torch.ones(3))
        assert P.fused_kernel(cls([p], lr=0.1, fused=True)), (
            f"{cls.__name__}(fused=True)._step_supports_amp_scaling changed"
        )
        assert not P.fused_kernel(cls([p], lr=0.1))
    p, opt = _fused_adam()
    saved = P.hand_over(opt, torch.tensor(2.0), torch.tensor(1.0))
    opt.step()
    assert torch.equal(p.detach(), torch.ones(3)), "found_inf no longer skips the step"
    assert int(opt.state[p]["step"]) == 0, "a skipped fused step advanced 'step'"
    P.take_back(opt, saved)
    assert "grad_scale" not in vars(opt)
    assert "found_inf" not in vars(opt)
    p, opt = _fused_adam()
    P.hand_over(opt, torch.tensor(2.0), None)
    opt.step()
    assert torch.equal(p.grad, torch.full((3,), 2.0)), (
        "the fused kernel no longer writes the unscaled gradients back to .grad"
    )
    assert P.read_handed(opt)[0] is not None


def test_gradscaler_uses_the_fused_protocol():
    """Item 2: GradScaler sets grad_scale/found_inf on such optimizers, then deletes."""
    p, opt = _fused_adam()
    seen = {}
    step = opt.step

    def spy(*args, **kwargs):
        seen["scale"], seen["inf"] = P.read_handed(opt)
        return step(*args, **kwargs)

    opt.step = spy
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale((p * 2).sum())  # the scaler starts its scale here
    scaler.step(opt)
    assert seen["scale"] is not None, "GradScaler no longer hands grad_scale over"
    assert seen["inf"] is not None, "GradScaler no longer hands found_inf over"
    assert P.read_handed(opt) == (None, None), "GradScaler no longer deletes them"


def test_fused_sgd_makes_momentum_buffers_on_a_skipped_first_step():
    """Item 2: why the host decides until buffers exist (kernel_skip_is_safe)."""
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.ones(3)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True)
    assert not P.kernel_skip_is_safe(opt, [p], [0])
    P.hand_over(opt, None, torch.tensor(1.0))
    opt.step()
    assert opt.state[p].get("momentum_buffer") is not None, (
        "fused SGD no longer creates momentum buffers at a skipped step: revisit "
        "kernel_skip_is_safe"
    )
    assert P.kernel_skip_is_safe(opt, [p], [0])
    assert P.kernel_skip_is_safe(torch.optim.Adam([p], fused=True), [p], [0])


def test_finishing_an_optimizer_without_its_init():
    """Item 3: Optimizer.__setstate__({}) makes the hook registries and patches step."""

    class Shell(torch.optim.Optimizer):
        def __init__(self):
            self.defaults, self.state, self.param_groups = {}, {}, []
            P.finish_optimizer(self)

        @P.mark_hooked
        def step(self, closure=None):
            return "own"

    shell = Shell()
    for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks"):
        assert name in vars(shell), f"Optimizer.__setstate__ no longer creates {name}"
    assert shell.step() == "own"
    assert type(shell).step.hooked, "a step marked hooked was patched again"


def test_type_names_of_dtensor_and_flat_parameter():
    """Item 4: detection by type name (no torch.distributed import at clipopt import)."""
    from torch.distributed.fsdp._flat_param import FlatParameter
    from torch.distributed.tensor import DTensor

    assert DTensor.__name__ == "DTensor", "DTensor was renamed"
    assert hasattr(DTensor, "to_local")
    assert FlatParameter.__name__ == "FlatParameter", "FlatParameter was renamed"
    assert not P.is_dtensor(torch.ones(1))
    assert not P.is_flat_parameter(torch.nn.Parameter(torch.ones(1)))


def test_gradscaler_steps_and_records_unscale_as_clipopt_reads_it():
    """Item 5: the frames that call optimizer.step(), and the UNSCALED stage."""
    seen = []
    for fused in (False, True):
        p = torch.nn.Parameter(torch.ones(3))
        opt = torch.optim.Adam([p], lr=0.1, fused=fused)
        step = opt.step

        def spy(*args, step=step, **kwargs):
            seen.append(P.calling_gradscaler(depth=2))
            return step(*args, **kwargs)

        opt.step = spy
        scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
        scaler.scale((p * 2).sum()).backward()
        assert not P.unscaled(scaler, opt)
        scaler.unscale_(opt)
        assert P.unscaled(scaler, opt), "GradScaler's UNSCALED stage changed"
        scaler.step(opt)
        assert seen[-1] is scaler, "GradScaler's step frames changed"
    assert P.calling_gradscaler(depth=1) is None
