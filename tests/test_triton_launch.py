"""Host-side launch logic of the Triton kernels, on the CPU without running a kernel: the device
guard, the grid limits, the scratch budget and the occupancy arithmetic.  Launches are recorded
through the modules' launch hook on meta tensors."""
import contextlib

import pytest
import torch

pytest.importorskip("triton")

from focalnet_kernels.triton import focal_context_bwd as bwd  # noqa: E402
from focalnet_kernels.triton import focal_context_fwd as fwd  # noqa: E402


def _inputs(B, H, W, C, ks, device="meta"):
    ctx = torch.empty(B, H, W, C, device=device)
    gates = torch.empty(B, H, W, len(ks) + 1, device=device)
    weights = [torch.empty(C, k, k, device=device) for k in ks]
    return ctx, gates, weights


@pytest.fixture
def recorded(monkeypatch):
    launches = []

    def hook(kernel, grid, args, kwargs):
        g = grid(dict(TILE_H=8, TILE_W=8, BLOCK_C=32, **kwargs)) if callable(grid) else grid
        launches.append((getattr(kernel, "fn", kernel), tuple(g)))
    monkeypatch.setattr(fwd, "_LAUNCH_HOOK", hook)
    return launches


def _within_limits(grid):
    return grid[0] <= 2**31 - 1 and all(n <= 65535 for n in grid[1:])


def test_batch_above_65535_stays_within_grid_limits(recorded):
    B = 65537
    ctx, gates, weights = _inputs(B, 1, 1, 2, [3])
    fwd.focal_context_fwd_triton(ctx, gates, weights, False)
    gout = torch.empty_like(ctx)
    bwd.focal_context_bwd_triton(gout, ctx, gates, weights, torch.empty(B, 2, device="meta"), False)
    assert len(recorded) >= 5
    for _, grid in recorded:
        assert _within_limits(grid), grid


def test_grid_functions_for_huge_maps():
    # 2^23 pixels per image: cdiv(H*W, 64) = 131072 blocks would exceed grid y
    H, W = 4096, 2048
    for grid in (fwd.global_grid(3, H * W, 96), bwd.global_grid(3, H * W),
                 bwd._tile_grid(3, H, W, 96)({"TILE_H": 8, "TILE_W": 8, "BLOCK_C": 32})):
        assert _within_limits(grid), grid
    assert bwd.global_grid(3, H * W) == (3 * H * W // 64,)
    with pytest.raises(ValueError):
        fwd._check_grid((2**31,))


def test_launchers_enter_the_tensors_device(monkeypatch, recorded):
    entered = []

    @contextlib.contextmanager
    def spy(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", spy)
    # a CPU stand-in for a cuda:1 tensor: the guard is taken for any device of type cuda
    real_guard = fwd.device_guard

    def guard(device):
        return real_guard(torch.device("cuda", 1)) if device.type == "meta" else real_guard(device)
    monkeypatch.setattr(fwd, "device_guard", guard)
    monkeypatch.setattr(bwd, "device_guard", guard)
    ctx, gates, weights = _inputs(2, 5, 6, 8, [3, 5])
    fwd.focal_context_fwd_triton(ctx, gates, weights, False)
    assert entered == [torch.device("cuda", 1)]
    n_fwd = len(recorded)
    bwd.focal_context_bwd_triton(torch.empty_like(ctx), ctx, gates, weights,
                                 torch.empty(2, 8, device="meta"), False)
    assert entered == [torch.device("cuda", 1)] * 2 and len(recorded) > n_fwd


def test_guard_is_torch_cuda_device():
    assert isinstance(fwd.device_guard(torch.device("cpu")), contextlib.nullcontext)
    assert isinstance(fwd.device_guard(torch.device("cuda", 1)), torch.cuda.device)


def test_scratch_is_bounded_for_detection_windows():
    # k = 9..15 at a detection-size map: every config's scratch stays within the budget
    plan = fwd.scratch_plan(16, 200, 304, 256, [9, 11, 13, 15], sms=132, per_sm=4)
    assert plan
    for label, nprog, nbytes in plan:
        assert 1 <= nprog <= 132 * 4
        assert nbytes <= fwd.SCRATCH_BUDGET_BYTES, (label, nbytes)


@pytest.mark.parametrize("regs,warps,expect", [(128, 4, 4), (144, 4, 3), (168, 4, 3), (255, 4, 2),
                                               (64, 4, 8), (96, 4, 5)])
def test_ctas_per_sm_from_registers(regs, warps, expect):
    assert fwd.ctas_per_sm(regs, warps) == expect


def test_autotune_pruning_takes_constexprs_as_triton_36_passes_them():
    """Triton 3.6's autotuner calls early_config_prune(configs, nargs, **kwargs) with only the
    positional launch arguments in nargs and the constexprs (KOUT, KIN, TOP) in kwargs; 3.9 puts
    both in nargs. The first GPU run (triton 3.6) failed every Triton backward with KeyError 'KOUT'."""
    prune = bwd._bwd_step_kernel.early_config_prune
    configs = list(bwd._bwd_step_kernel.configs)
    dout = torch.empty(1, dtype=torch.bfloat16)
    as_36 = prune(configs, {"dout_ptr": dout}, KOUT=5, KIN=7, TOP=False)
    as_39 = prune(configs, {"dout_ptr": dout, "KOUT": 5, "KIN": 7, "TOP": False})
    assert as_36 == as_39 and as_36
    fwd_prune = fwd._fwd_local.early_config_prune
    ctx = torch.empty(1, dtype=torch.bfloat16)
    assert fwd_prune(list(fwd._fwd_local.configs), {"C": 96, "ctx_ptr": ctx}, L=3, K0=3)
