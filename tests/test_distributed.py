"""torch.distributed with real processes: gloo, 2 ranks on CPU, against 1 process.

Each test spawns two ranks that write their results to a file; the parent compares them
with a single-process run on the same global batch. Every collective runs on every rank.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import clipopt
from clipopt import ClippedOptimizer

ROOT = pathlib.Path(__file__).parent.parent
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")
WORLD = 2
STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank, fn, port, out, args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result = fn(rank, *args)
        torch.save(result, f"{out}.{rank}")
        # Free the worker's DDP models (their reducers hold the group) while the group
        # is alive, and let both ranks finish before either tears the group down.
        gc.collect()
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without interpreter finalization: gloo's C++ threads can still be torn down
    # there and abort the process after the work is done and saved ("terminate called
    # without an active exception", SIGABRT; seen in CI on the checkpoint test even with
    # the barrier above; torch PR 179291 describes the finalization race). The result is
    # already on disk, so the exit code only reports a crash, never the test's outcome.
    # (atexit handlers are skipped too: a coverage plugin would lose the ranks' data.)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def spawn(fn, tmp_path, *args, timeout=300.0):
    out = str(tmp_path / "result")
    context = mp.spawn(_entry, args=(fn, _free_port(), out, args), nprocs=WORLD, join=False)
    # Mismatched collectives hang gloo rather than fail: bound the wait.
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish within {timeout:.0f} s")
    return [torch.load(f"{out}.{r}", weights_only=False) for r in range(WORLD)]


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 16),
        torch.nn.Linear(16, 4),
    )


def _data():
    """Global batches of 8 rows with a spike at step 3; rank r takes rows r::2."""
    g = torch.Generator().manual_seed(1)
    batches = []
    for step in range(STEPS):
        x = torch.randn(8, 8, generator=g)
        y = torch.randn(8, 4, generator=g) * (50.0 if step == 3 else 1.0)
        batches.append((x, y))
    return batches


def _train(model, opt, batches, rank=None):
    norms = []
    for x, y in batches:
        if rank is not None:
            x, y = x[rank::WORLD], y[rank::WORLD]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        norms.append(opt.last_stats.to_dict())
    return norms


STRATEGIES = {
    "norm": lambda: clipopt.NormClip(0.5),
    "norm-inf": lambda: clipopt.NormClip(0.1, float("inf")),
    "norm-l1": lambda: clipopt.NormClip(1.0, 1.0),
    "percentile": lambda: clipopt.PercentileClip(50, window=4),
    "zscore": lambda: clipopt.ZScoreClip(warmup_steps=2, z_thresh=1.0),
    "adagc": lambda: clipopt.AdaGC(warmup_steps=2, max_norm=0.5),
    "agc": lambda: clipopt.AGC(0.05),
    "relative": lambda: clipopt.RelativeClip(ramp=2),
    "norm-tensor": lambda: clipopt.NormClip(0.1, scope="tensor"),
    "norm-group": lambda: clipopt.NormClip(0.2, scope="group"),
}


def _reference(name, groups=list):
    """One process, the global batch: what every distributed run must reproduce."""
    model = _model()
    opt = ClippedOptimizer(
        torch.optim.SGD(groups(model.parameters()), lr=0.1), STRATEGIES[name]()
    )
    stats = _train(model, opt, _data())
    return [p.detach().clone() for p in model.parameters()], stats


# -- DDP ----------------------------------------------------------------------------------


def _ddp_worker(rank, names):
    out = {}
    for name in names:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        opt = ClippedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), STRATEGIES[name]()
        )
        stats = _train(model, opt, _data(), rank)
        out[name] = (
            [p.detach().clone() for p in model.parameters()],
            stats,
            opt.strategy.state_dict(),
        )
    return out


@pytest.mark.slow
def test_ddp_ranks_agree_bitwise_and_match_one_process(tmp_path):
    names = ["norm", "percentile", "zscore", "adagc"]
    r0, r1 = spawn(_ddp_worker, tmp_path, names)
    for name in names:
        params0, stats0, state0 = r0[name]
        params1, stats1, state1 = r1[name]
        assert all(torch.equal(a, b) for a, b in zip(params0, params1, strict=True)), name
        assert stats0 == stats1, name
        for key in state0:
            assert torch.equal(state0[key].nan_to_num(), state1[key].nan_to_num()), name
        ref_params, ref_stats = _reference(name)
        assert any(s["clipped"] for s in stats0), name  # the spike was clipped
        for a, b in zip(params0, ref_params, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for ours, ref in zip(stats0, ref_stats, strict=True):
            assert ours["norm"] == pytest.approx(ref["norm"], rel=1e-5), name


# -- FSDP2 ---------------------------------------------------------------------------------


def _fsdp2_worker(rank, names):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}
    for name in names:
        model = _model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = ClippedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), STRATEGIES[name]()
        )
        stats = _train(model, opt, _data(), rank)
        full = [p.full_tensor().detach().clone() for p in model.parameters()]
        out[name] = (full, stats)
    return out


def _fsdp2_agc_excluded_worker(rank):
    """FSDP2 with AGC excluding the last layer, and a process_group passed as well."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}
    for group in (None, mesh):
        model = _model()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        strategy = clipopt.AGC(0.05, exclude=list(model[3].parameters()))
        opt = ClippedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), strategy, process_group=group
        )
        stats = _train(model, opt, _data(), rank)
        full = [p.full_tensor().detach().clone() for p in model.parameters()]
        out["group" if group is not None else "none"] = (full, stats)
    return out


@pytest.mark.slow
def test_fsdp2_agc_with_exclusions_matches_one_process_with_or_without_a_group(tmp_path):
    """DTensor gradients are global already: a process_group must not count them twice."""
    r0, r1 = spawn(_fsdp2_agc_excluded_worker, tmp_path)
    model = _model()
    ref = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        clipopt.AGC(0.05, exclude=list(model[3].parameters())),
    )
    ref_stats = _train(model, ref, _data())
    for key in ("none", "group"):
        (params0, stats0), (params1, stats1) = r0[key], r1[key]
        assert stats0 == stats1, key
        assert all(torch.equal(a, b) for a, b in zip(params0, params1, strict=True))
        for ours, theirs in zip(stats0, ref_stats, strict=True):
            assert ours["norm"] == pytest.approx(theirs["norm"], rel=1e-5), key
            assert ours["coef"] == pytest.approx(theirs["coef"], rel=1e-5), key
        for a, c in zip(params0, model.parameters(), strict=True):
            torch.testing.assert_close(a, c.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fsdp2_global_norms_and_results_match_one_process(tmp_path):
    names = ["norm", "norm-inf", "norm-l1", "percentile", "zscore", "adagc", "agc"]
    r0, r1 = spawn(_fsdp2_worker, tmp_path, names)
    for name in names:
        params0, stats0 = r0[name]
        params1, stats1 = r1[name]
        assert stats0 == stats1, name  # last_stats identical on every rank
        ref_params, ref_stats = _reference(name)
        for ours, ref in zip(stats0, ref_stats, strict=True):
            # the global norm, not a rank's local one (inf-norm included)
            assert ours["norm"] == pytest.approx(ref["norm"], rel=1e-5), name
            assert ours["clipped"] == ref["clipped"], name
        for a, b, c in zip(params0, params1, ref_params, strict=True):
            assert torch.equal(a, b), name
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def _tp_worker(rank, names):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    mesh = init_device_mesh("cpu", (WORLD,))
    out = {}
    for name in names:
        model = _model()
        # layer 0 column-wise (Shard(0) weights), layer 2 row-wise (Shard(1) weights)
        parallelize_module(model, mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
        opt = ClippedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), STRATEGIES[name]()
        )
        stats = _train(model, opt, _data())  # tensor parallel: every rank, the whole batch
        full = [
            p.full_tensor().detach().clone()
            if hasattr(p, "full_tensor")
            else p.detach().clone()
            for p in model.parameters()
        ]
        out[name] = (full, stats)
    return out


@pytest.mark.slow
def test_tensor_parallel_placements_give_global_norms(tmp_path):
    names = ["norm", "norm-inf", "norm-l1", "zscore", "adagc"]
    r0, r1 = spawn(_tp_worker, tmp_path, names)
    for name in names:
        params0, stats0 = r0[name]
        params1, stats1 = r1[name]
        assert stats0 == stats1, name
        ref_params, ref_stats = _reference(name)
        for ours, ref in zip(stats0, ref_stats, strict=True):
            assert ours["norm"] == pytest.approx(ref["norm"], rel=1e-5), name
        for a, b, c in zip(params0, params1, ref_params, strict=True):
            assert torch.equal(a, b), name
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


# -- FSDP1 and explicit process groups ----------------------------------------------------


def _fsdp1_worker(rank):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # noqa: N817

    model = FSDP(_model(), device_id=torch.device("cpu"))
    opt = ClippedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        "norm",
        max_norm=0.5,
        process_group=model.process_group,
    )
    stats = _train(model, opt, _data(), rank)
    with FSDP.summon_full_params(model):
        full = [p.detach().clone() for p in model.parameters()]
    return full, stats


@pytest.mark.slow
def test_fsdp1_with_process_group_uses_the_global_norm(tmp_path):
    (params0, stats0), (_, stats1) = spawn(_fsdp1_worker, tmp_path)
    assert stats0 == stats1
    ref_params, ref_stats = _reference("norm")
    for ours, ref in zip(stats0, ref_stats, strict=True):
        assert ours["norm"] == pytest.approx(ref["norm"], rel=1e-5)
    for a, b in zip(params0, ref_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


ORIG_PARAMS = ["norm", "percentile", "adagc", "norm-tensor", "norm-group"]


def _two_groups(params):
    """The first layer in one parameter group, the rest in another (group scope)."""
    params = list(params)
    return [{"params": params[:2]}, {"params": params[2:]}]


def _fsdp1_orig_params_worker(rank):
    """FSDP1 with use_orig_params=True: parameters outside a rank's shard have no grad."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP  # noqa: N817

    out = {}
    for name in ORIG_PARAMS:
        model = FSDP(_model(), device_id=torch.device("cpu"), use_orig_params=True)
        opt = ClippedOptimizer(
            torch.optim.SGD(_two_groups(model.parameters()), lr=0.1),
            STRATEGIES[name](),
            process_group=model.process_group,
        )
        stats = _train(model, opt, _data(), rank)
        missing = sum(p.grad is None for p in model.parameters())
        with FSDP.summon_full_params(model):
            full = [p.detach().clone() for p in model.parameters()]
        out[name] = (full, stats, missing)
    return out


@pytest.mark.slow
def test_fsdp1_use_orig_params_with_gradients_missing_on_some_ranks(tmp_path):
    """Ranks hold different numbers of gradients: the norms still line up by position.

    (An element-wise reduction of per-tensor norms aborted gloo here.)
    """
    r0, r1 = spawn(_fsdp1_orig_params_worker, tmp_path)
    for name in ORIG_PARAMS:
        params0, stats0, missing0 = r0[name]
        params1, stats1, missing1 = r1[name]
        assert missing0 > 0
        assert missing1 > 0
        assert missing0 != missing1  # the ranks hold different numbers of gradients
        ref_params, ref_stats = _reference(name, _two_groups)
        # AdaGC's threshold, coef and clipped are taken over a rank's own gradients
        keys = ("norm",) if name == "adagc" else ("norm", "coef", "clipped", "threshold")
        for ours0, ours1, ref in zip(stats0, stats1, ref_stats, strict=True):
            for key in keys:
                assert ours0[key] == ours1[key], (name, key)
                assert ours0[key] == pytest.approx(ref[key], rel=1e-5), (name, key)
        assert any(s["clipped"] for s in stats0), name
        for a, b, c in zip(params0, params1, ref_params, strict=True):
            assert torch.equal(a, b)
            torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6, msg=name)


UNEVEN = {0: [(4, 3), (3,)], 1: [(5, 2), (6,)]}  # rank 1's (6,) is excluded from AGC


def _uneven_tensors():
    g = torch.Generator().manual_seed(5)
    out = {}
    for rank, shapes in UNEVEN.items():
        out[rank] = [
            (torch.randn(s, generator=g), torch.randn(s, generator=g)) for s in shapes
        ]
    return out


def _uneven_strategies(params):
    excluded = [p for p in params if p.dim() == 1 and p.numel() == 6]
    return {
        "agc": clipopt.AGC(0.05, exclude=excluded),
        # rank 0 then holds no included gradient at all
        "agc-none": clipopt.AGC(0.05, exclude=[p for p in params if p.shape == (4, 3)]),
        "value": clipopt.ValueClip(0.3),
    }


def _uneven_worker(rank):
    """Pipeline-like: the ranks own different tensors, in different numbers."""
    out = {}
    for name in ("agc", "agc-none", "value", "value-nan"):
        mine = [
            torch.nn.Parameter(w.clone()) for w, _ in _uneven_tensors()[rank][: rank + 1]
        ]
        for p, (_, g) in zip(mine, _uneven_tensors()[rank], strict=False):
            p.grad = g.clone()
        if name == "value-nan" and rank == 1:
            mine[0].grad[0, 0] = math.nan
        strategy = _uneven_strategies(mine)[name.removesuffix("-nan")]
        opt = ClippedOptimizer(
            torch.optim.SGD(mine, lr=1.0), strategy, process_group=dist.group.WORLD
        )
        opt.step()
        out[name] = (
            opt.last_stats.to_dict(),
            opt.counts(),
            [p.grad.clone() for p in mine],
            [p.detach().clone() for p in mine],
        )
    return out


@pytest.mark.slow
def test_process_group_with_ranks_holding_different_tensors(tmp_path):
    """AGC (one rank excludes a tensor, the other none) and value clipping, uneven ranks.

    Every rank must make the same collectives whatever it holds, and a NaN on one rank
    must make every rank skip (gloo's MAX can drop a NaN, depending on the order).
    """
    r0, r1 = spawn(_uneven_worker, tmp_path)
    tensors = _uneven_tensors()
    held = {0: tensors[0][:1], 1: tensors[1][:2]}  # rank r holds r + 1 tensors
    everything = [t for r in (0, 1) for t in held[r]]
    for name in ("agc", "agc-none", "value"):
        params = [torch.nn.Parameter(w.clone()) for w, _ in everything]
        for p, (_, g) in zip(params, everything, strict=True):
            p.grad = g.clone()
        ref = ClippedOptimizer(
            torch.optim.SGD(params, lr=1.0), _uneven_strategies(params)[name]
        )
        ref.step()
        expected = ref.last_stats.to_dict()
        assert r0[name][0] == r1[name][0]
        for key in ("norm", "coef", "clipped"):
            assert r0[name][0][key] == pytest.approx(expected[key], rel=1e-6), (name, key)
        got = r0[name][2] + r1[name][2]
        for a, b in zip(got, [p.grad for p in params], strict=True):
            torch.testing.assert_close(a, b)
    for result in (r0, r1):
        stats, counts, _, params = result["value-nan"]
        assert counts["skipped_steps"] == 1, stats
        assert math.isnan(stats["norm"]) or math.isinf(stats["norm"])
    assert torch.equal(r0["value-nan"][3][0], tensors[0][0][0])  # rank 0 did not step


# Repeated small shapes (their norms are batched: NormBatches) and large tensors (a dot
# product where torch's bits are not promised), split evenly over the ranks: the ranks'
# per-tensor norms are reduced element by element, so they hold as many tensors each.
GROUP_SHAPES = [(5, 4), (7,), (3, 3), (6,)] * 40 + [(300, 300), (200, 400)]


def _group_worker(rank):
    """Hand-made model parallelism: rank r owns the tensors r, r + 2, ... of a list."""
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(s, generator=g) for s in GROUP_SHAPES]
    mine = [torch.nn.Parameter(torch.zeros_like(t)) for t in grads[rank::WORLD]]
    for p, t in zip(mine, grads[rank::WORLD], strict=True):
        p.grad = t.clone()
    calls = []
    original = dist.all_reduce

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    dist.all_reduce = counting
    try:
        results = {}
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (WORLD,))  # a 1-D mesh works as the group too
        for name, strategy, group in [
            ("norm", clipopt.NormClip(1.0), dist.group.WORLD),
            ("adagc", clipopt.AdaGC(warmup_steps=0), mesh),
            ("tensor", clipopt.NormClip(1.0, scope="tensor"), dist.group.WORLD),
        ]:
            for p, t in zip(mine, grads[rank::WORLD], strict=True):
                p.grad = t.clone()
            opt = ClippedOptimizer(
                torch.optim.SGD(mine, lr=1.0), strategy, process_group=group
            )
            calls.clear()
            opt.step()
            results[name] = (
                opt.last_stats.to_dict(),
                len(calls),
                [p.grad.clone() for p in mine],
            )
            assert opt.clipper._gradients.layout is not None
            assert opt.clipper._gradients.layout.norm_plan(exact=True) is not None
    finally:
        dist.all_reduce = original
    return results


@pytest.mark.slow
def test_explicit_process_group_gives_global_norms_in_one_collective(tmp_path):
    r0, r1 = spawn(_group_worker, tmp_path)
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(s, generator=g) for s in GROUP_SHAPES]
    total = torch.nn.utils.get_total_norm(grads)
    for name in ("norm", "adagc", "tensor"):
        stats0, calls0, _ = r0[name]
        stats1, calls1, _ = r1[name]
        assert stats0 == stats1
        assert stats0["norm"] == pytest.approx(float(total), rel=1e-6)
        assert calls0 == calls1 == 1  # all per-tensor norms in one all_reduce
    # global clipping: each rank's shard scaled by the same global factor
    expected = [t * min(1.0, 1.0 / (float(total) + 1e-6)) for t in grads]
    got = {0: r0["norm"][2], 1: r1["norm"][2]}
    for i, t in enumerate(expected):
        torch.testing.assert_close(got[i % WORLD][i // WORLD], t)


# -- distributed checkpoint --------------------------------------------------------------


def _dcp_worker(rank, directory):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    data = _data()
    model = torch.nn.parallel.DistributedDataParallel(_model())
    opt = ClippedOptimizer(
        torch.optim.AdamW(model.parameters(), lr=0.01), clipopt.PercentileClip(50, window=4)
    )
    _train(model, opt, data[:3], rank)
    state = {
        "model": model.state_dict(),
        "optim": get_optimizer_state_dict(model, opt),
        "clipopt": opt.clipopt_state_dict(),
    }
    dcp.save(state, checkpoint_id=directory)
    uninterrupted = _train(model, opt, data[3:], rank)

    fresh = torch.nn.parallel.DistributedDataParallel(_model())
    opt2 = ClippedOptimizer(
        torch.optim.AdamW(fresh.parameters(), lr=0.01), clipopt.PercentileClip(50, window=4)
    )
    target = {
        "model": fresh.state_dict(),
        "optim": get_optimizer_state_dict(fresh, opt2),
        "clipopt": opt2.clipopt_state_dict(),
    }
    dcp.load(target, checkpoint_id=directory)
    fresh.load_state_dict(target["model"])
    set_optimizer_state_dict(fresh, opt2, optim_state_dict=target["optim"])
    opt2.load_clipopt_state_dict(target["clipopt"])
    resumed = _train(fresh, opt2, data[3:], rank)
    same = all(
        torch.equal(a, b)
        for a, b in zip(model.parameters(), fresh.parameters(), strict=True)
    )
    return uninterrupted, resumed, same


@pytest.mark.slow
def test_distributed_checkpoint_recipe_restores_strategy_state(tmp_path):
    (u0, r0, same0), (_, _, same1) = spawn(_dcp_worker, tmp_path, str(tmp_path / "ckpt"))
    assert same0
    assert same1
    assert u0 == r0  # thresholds and norms after the resume equal the uninterrupted run


# -- the example under torchrun ------------------------------------------------------------


@pytest.mark.slow
def test_ddp_example_runs_under_torchrun(tmp_path):
    port = _free_port()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(port),
            str(ROOT / "examples" / "ddp_train.py"),
            "--steps",
            "6",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ranks agree: True" in out.stdout


def test_process_group_is_kept_by_deepcopy_and_refused_by_pickle():
    import pickle

    marker = object()
    p = torch.nn.Parameter(torch.zeros(2))
    opt = ClippedOptimizer(torch.optim.SGD([p], lr=0.1), process_group=marker)
    assert copy.deepcopy(opt).process_group is marker
    with pytest.raises(TypeError, match="process_group cannot be pickled"):
        pickle.dumps(opt)
    plain = ClippedOptimizer(torch.optim.SGD([p], lr=0.1))
    assert pickle.loads(pickle.dumps(plain)).process_group is None
