"""The Triton GEMV kernel against F.linear (float32, then cast to the dtype) and, with
SiLU-and-mul fused in, against the elementwise kernel's silu_and_mul then F.linear: its
plan choice on CPU, the kernel on CUDA (gpu marker) and on CPU through Triton's interpreter."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.workers.conftest import run_in_triton_interpreter
from workers.kernels.gemv import MAX_ROWS, GemvPlan, gemv, is_available, plan_for

# (rows, n, k, plan): explicit plans reach every edge at interpreter-sized shapes.
CASES = [
    (1, 37, 64, GemvPlan(16, 32, 1)),  # N not a multiple of BLOCK_N; no workspace
    (2, 50, 96, GemvPlan(8, 32, 3)),  # three splits of one tile each
    (3, 24, 160, GemvPlan(8, 64, 2)),  # last K tile half full; uneven splits (2 + 1 tiles)
    (4, 19, 48, GemvPlan(4, 16, 4, num_warps=1)),  # more splits than tiles: the last adds zero
    (2, 16, 2048, plan_for(2, 16, 2048, 8)),  # plan_for's own split of K, full-size tiles
    (4, 40, 512, None),  # plan_for's at the device's SM count (1 in the interpreter)
]

# (n, k) of the decode linears the kernel is for: Llama-3.1-8B at TP 1 and 2, 3.2-1B,
# 3.1-70B at TP 2, and LM heads.
MODEL_SHAPES = [
    (6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336),
    (3072, 4096), (4096, 2048), (14336, 4096), (4096, 7168),
    (3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192),
    (5120, 8192), (8192, 4096), (28672, 8192), (8192, 14336),
    (128256, 2048), (128256, 4096), (64128, 8192),
]


def _tol(dtype):
    """One unit in the last place of the output: both sides round a float32 sum once, in
    different orders, so a value near a rounding boundary may land on either side."""
    return dict(atol=1e-4, rtol=2**-7 if dtype == torch.bfloat16 else 2**-10)


def _inputs(rows, cols, n, k, dtype, device, seed):
    """x [rows, cols] on the device, a view with a row stride wider than cols (and its CPU
    copy); weight [n, k] scaled so outputs are O(1); one_hot [n, k] picking column idx[i]
    for output i, which makes the GEMV exact."""
    gen = torch.Generator().manual_seed(seed)
    wide = (torch.randn(rows, cols + 48, generator=gen) * 2).to(dtype)
    x = wide[:, 16 : 16 + cols]
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    idx = torch.randint(0, k, (n,), generator=gen)
    one_hot = F.one_hot(idx, k).to(dtype)
    return x, wide.to(device)[:, 16 : 16 + cols], weight, weight.to(device), idx, one_hot.to(device)


def check_linear(case, dtype, device, seed):
    rows, n, k, plan = case
    x, x_dev, weight, weight_dev, idx, one_hot_dev = _inputs(rows, k, n, k, dtype, device, seed)
    out = gemv(x_dev, weight_dev, plan=plan)
    assert out.shape == (rows, n) and out.dtype == dtype
    torch.testing.assert_close(out.cpu(), F.linear(x.float(), weight.float()).to(dtype), **_tol(dtype))
    torch.testing.assert_close(gemv(x_dev, one_hot_dev, plan=plan).cpu(), x[:, idx], atol=0, rtol=0)


def check_silu_and_mul(case, dtype, device, seed):
    from workers.kernels import elementwise

    rows, n, k, plan = case
    _, x_dev, weight, weight_dev, idx, one_hot_dev = _inputs(rows, 2 * k, n, k, dtype, device, seed)
    act = elementwise.silu_and_mul(x_dev).cpu()
    out = gemv(x_dev, weight_dev, silu_and_mul=True, plan=plan)
    torch.testing.assert_close(out.cpu(), F.linear(act.float(), weight.float()).to(dtype), **_tol(dtype))
    # silu rounded to the dtype, then the product: bit for bit the elementwise kernel's.
    exact = gemv(x_dev, one_hot_dev, silu_and_mul=True, plan=plan).cpu()
    torch.testing.assert_close(exact, act[:, idx], atol=0, rtol=0)


CHECKS = [check_linear, check_silu_and_mul]


def test_kernel_logic_in_triton_interpreter():
    """Indexing, masks, split handling and roundings, run by Triton's CPU interpreter in a
    fresh process (the interpreter must be chosen before the kernels are decorated)."""
    run_in_triton_interpreter(
        "import torch\n"
        "from tests.workers.test_gemv_kernel import CASES, CHECKS\n"
        "for check in CHECKS:\n"
        "    for i, case in enumerate(CASES):\n"
        "        for dtype in (torch.bfloat16, torch.float16):\n"
        "            check(case, dtype, 'cpu', seed=i)\n"
        "print('checked')\n"
    )


@pytest.mark.parametrize("m", range(1, MAX_ROWS + 1))
def test_plan_fills_an_h200(m):
    """At least 2 programs per SM of an H200 (132) unless K has no tiles left to split,
    no empty split, and warps side by side along K (a thread: one 16-byte vector a row)."""
    for n, k in MODEL_SHAPES:
        plan = plan_for(m, n, k, 132)
        n_blocks, k_tiles = -(-n // plan.block_n), -(-k // plan.block_k)
        assert n_blocks * plan.num_splits >= 2 * 132 or plan.num_splits == k_tiles, (n, k, plan)
        tiles_per_split = -(-k_tiles // plan.num_splits)
        assert (plan.num_splits - 1) * tiles_per_split < k_tiles, (n, k, plan)
        assert plan.block_k == 8 * 32 * plan.num_warps, (n, k, plan)


def test_plan_splits_k_only_when_n_is_short():
    assert plan_for(1, 128256, 4096, 132).num_splits == 1  # LM head: 8016 programs already
    assert plan_for(1, 28672, 4096, 132).num_splits == 1
    assert plan_for(1, 4096, 4096, 132).num_splits == 1  # 512 programs: about 4 an SM
    assert plan_for(1, 2048, 2048, 132).num_splits == 2  # 256 N blocks alone
    assert plan_for(1, 2048, 2048, 1).num_splits == 1  # one SM is full anyway
    assert plan_for(1, 64, 16, 132) == GemvPlan(8, 16, 1, num_warps=1)  # K of one short tile


def test_plan_rejects_impossible_blocks():
    with pytest.raises(ValueError, match="block_n"):
        GemvPlan(12, 256, 1)
    with pytest.raises(ValueError, match="block_k"):
        GemvPlan(8, 4, 1)
    with pytest.raises(ValueError, match=">= 1"):
        GemvPlan(16, 256, 0)


def test_availability_rules():
    pytest.importorskip("triton", reason="Triton is not installed (CPU-only install)")
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    w = torch.zeros(8, 64, dtype=bf16)
    assert is_available(cuda, torch.zeros(1, 64, dtype=bf16), w)
    assert is_available(cuda, torch.zeros(MAX_ROWS, 128, dtype=bf16), w, silu_and_mul=True)
    assert not is_available(torch.device("cpu"), torch.zeros(1, 64, dtype=bf16), w)
    assert not is_available(cuda, torch.zeros(MAX_ROWS + 1, 64, dtype=bf16), w)
    assert not is_available(cuda, torch.zeros(0, 64, dtype=bf16), w)
    assert not is_available(cuda, torch.zeros(1, 128, dtype=bf16), w)  # 2K without silu_and_mul
    assert not is_available(cuda, torch.zeros(1, 64, dtype=torch.float16), w)
    assert not is_available(cuda, torch.zeros(1, 64), w.float())
    assert not is_available(cuda, torch.zeros(1, 24, dtype=bf16), torch.zeros(8, 24, dtype=bf16))
    assert not is_available(cuda, torch.zeros(1, 64, dtype=bf16), torch.zeros(64, 8, dtype=bf16).t())
    assert not is_available(cuda, torch.zeros(64, 2, dtype=bf16)[:, :1].t(), w)  # column stride 2


def test_gemv_rejects_shapes_it_cannot_run():
    w = torch.zeros(8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="at most 4 rows"):
        gemv(torch.zeros(MAX_ROWS + 1, 64, dtype=torch.bfloat16), w)
    with pytest.raises(ValueError, match="2 \\* K"):
        gemv(torch.zeros(1, 64, dtype=torch.bfloat16), w, silu_and_mul=True)
    with pytest.raises(ValueError, match="contiguous: False"):
        gemv(torch.zeros(1, 64, dtype=torch.bfloat16), torch.zeros(64, 8, dtype=torch.bfloat16).t())


@pytest.mark.gpu
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}x{c[1]}x{c[2]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_matches_reference_on_cuda(check, case, dtype):
    check(case, dtype, "cuda", seed=0)


@pytest.mark.gpu
@pytest.mark.parametrize("m", range(1, MAX_ROWS + 1))
@pytest.mark.parametrize("n, k", [(6144, 4096), (2048, 2048), (4096, 14336), (3000, 1040)])
def test_model_shapes_match_reference_on_cuda(m, n, k):
    """plan_for's own plans at real sizes, plain and with SiLU-and-mul fused in."""
    for check in CHECKS:
        check((m, n, k, None), torch.bfloat16, "cuda", seed=m)


@pytest.mark.gpu
@pytest.mark.parametrize("plan", [GemvPlan(8, 1024, 4), None], ids=["split-k", "plan_for"])
def test_graph_replay_is_bitwise_reproducible(plan):
    """Captured in a CUDA graph (split K: two kernels and a workspace), replays give the
    eager result bit for bit, as do repeated eager calls."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 2 * 4096, generator=gen).to(torch.bfloat16).cuda()
    weight = (torch.randn(2048, 4096, generator=gen) / 64).to(torch.bfloat16).cuda()
    eager = gemv(x, weight, silu_and_mul=True, plan=plan)  # also compiles before capture
    assert torch.equal(gemv(x, weight, silu_and_mul=True, plan=plan), eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = gemv(x, weight, silu_and_mul=True, plan=plan)
    for _ in range(2):
        fresh = torch.randn(2, 2 * 4096, generator=gen).to(torch.bfloat16).cuda()
        x.copy_(fresh)
        graph.replay()
        assert torch.equal(captured, gemv(fresh, weight, silu_and_mul=True, plan=plan))
