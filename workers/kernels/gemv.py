"""Triton GEMV for the linears of small-batch decode steps (1 to MAX_ROWS rows), where the
weight read is the whole cost: many programs each stream a BLOCK_N x BLOCK_K weight tile
per step with 16-byte loads, optionally with SiLU-and-mul fused in as the input prologue.
Chosen at run time on CUDA; F.linear stays the reference. Runs in each shard."""

from __future__ import annotations

import dataclasses
import functools

import torch

from workers.kernels.device import sm_count

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path is used
    triton = None

from workers.kernels.pdl import launch_options


# Registers bound the rows: a thread keeps its weight vectors in float32 for all rows plus
# one accumulator per (row, weight row); compiled for sm_90 that is 72 registers at 1 row
# and 168 at 4 (7 and 3 programs an SM: 112 and 48 KB of loads in flight). Past 4 rows
# cuBLAS's tensor-core kernels, which read the weight once for all rows too, take over.
MAX_ROWS = 4
VEC = 8  # bf16/fp16 elements in a thread's 16-byte load
BLOCK_N = 8  # weight rows a program reads per step: 8 x 16-byte loads in flight a thread
NUM_WARPS = 4
PROGRAMS_PER_SM = 4  # split K when N alone gives far fewer programs than this per SM
MAX_SPLITS = 16
REDUCE_BLOCK = 1024


@dataclasses.dataclass(frozen=True)
class GemvPlan:
    """How one call is cut: programs of block_n weight rows x (K / num_splits) columns,
    stepping block_k columns at a time. block_k = 8 x 32 x num_warps puts the warps side by
    side along K, so each thread's input columns are the same for all its weight rows (no
    shared memory in the loop). num_stages > 1 pipelines the weight loads through shared
    memory; unroll > 1 unrolls the K loop. Benchmarks sweep these."""

    block_n: int
    block_k: int
    num_splits: int
    num_warps: int = NUM_WARPS
    num_stages: int = 1
    unroll: int = 1

    def __post_init__(self):
        for name in ("block_n", "block_k"):
            value = getattr(self, name)
            if value < (VEC if name == "block_k" else 1) or value & (value - 1):
                raise ValueError(f"GemvPlan.{name} must be a power of two (block_k >= {VEC}), got {value}")
        if min(self.num_splits, self.num_warps, self.num_stages, self.unroll) < 1:
            raise ValueError(f"GemvPlan counts must be >= 1, got {self}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def plan_for(m: int, n: int, k: int, num_sms: int) -> GemvPlan:
    """Steps of BLOCK_N x (8 x 32 x NUM_WARPS): one 16-byte vector of each weight row a
    thread. K is split only when N alone gives far fewer than PROGRAMS_PER_SM programs an
    SM (then into about that many, in equal runs of tiles), so long N, most linears, stays
    one kernel. m does not change the plan: the tile's registers suit 1 to MAX_ROWS rows
    (see above), which `scripts/bench_gemv.py --rows M --sweep` checks on a GPU."""
    block_k = min(VEC * 32 * NUM_WARPS, 1 << (k - 1).bit_length())
    n_blocks, k_tiles = _cdiv(n, BLOCK_N), _cdiv(k, block_k)
    target = PROGRAMS_PER_SM * num_sms
    wanted = (2 * target + n_blocks) // (2 * n_blocks)  # target / n_blocks, rounded
    tiles_per_split = _cdiv(k_tiles, max(1, min(MAX_SPLITS, k_tiles, wanted)))
    num_warps = max(1, min(NUM_WARPS, block_k // (VEC * 32)))
    return GemvPlan(BLOCK_N, block_k, _cdiv(k_tiles, tiles_per_split), num_warps)


def is_available(device: torch.device, x: torch.Tensor, weight: torch.Tensor, *,
                 silu_and_mul: bool = False) -> bool:
    """The kernel runs on CUDA for x [M, K] (or [M, 2K] with silu_and_mul), 1 <= M <=
    MAX_ROWS, unit column stride; weight [N, K] contiguous, of x's dtype (bf16 or fp16);
    K a multiple of 16, so every weight row starts 16-byte aligned (vector loads)."""
    if triton is None or device.type != "cuda" or x.dim() != 2 or weight.dim() != 2:
        return False
    k = weight.shape[1]
    return (1 <= x.shape[0] <= MAX_ROWS and x.shape[1] == (2 * k if silu_and_mul else k)
            and k % 16 == 0 and x.stride(1) == 1 and weight.is_contiguous()
            and weight.dtype in (torch.bfloat16, torch.float16) and x.dtype == weight.dtype)


if triton is not None:
    from workers.kernels.pdl import release_dependents, release_then_wait, wait_for_producer

    @triton.jit
    def _input_chunk(x_at, k_ok, K, SILU: tl.constexpr):
        """Columns k of one input row in float32; with SILU, silu(gate) * up rounded as
        elementwise._silu_and_mul_kernel (HF) does: silu to the dtype, then the product."""
        if SILU:
            dtype = x_at.dtype.element_ty
            gate = tl.load(x_at, mask=k_ok, other=0.0).to(tl.float32)
            up = tl.load(x_at + K, mask=k_ok, other=0.0).to(tl.float32)
            act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
            chunk = (act * up).to(dtype).to(tl.float32)
        else:
            chunk = tl.load(x_at, mask=k_ok, other=0.0).to(tl.float32)
        return chunk

    @triton.jit
    def _dot_rows(acc, w, x, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """acc [BLOCK_N, BLOCK_K // 8] plus w [BLOCK_N, BLOCK_K] * x [BLOCK_K] summed over
        each run of 8 columns: one thread's 16-byte vector, so the sum stays in registers."""
        products = tl.reshape(w * x[None, :], [BLOCK_N, BLOCK_K // 8, 8])
        return acc + tl.sum(products, axis=2)

    @triton.jit
    def _store_row(acc, row, n, N, out_ptr, stride_o, part_ptr, split, ROWS: tl.constexpr,
                   SPLIT: tl.constexpr):
        """acc [BLOCK_N, BLOCK_K // 8] summed along K: into out[row, n], or unrounded into
        the workspace part[split, row, n] when K is split."""
        y = tl.sum(acc, axis=1)
        if SPLIT:
            tl.store(part_ptr + (split * ROWS + row) * N + n, y, mask=n < N)
        else:
            tl.store(out_ptr + row * stride_o + n, y.to(out_ptr.dtype.element_ty), mask=n < N)

    @triton.jit
    def _accumulate(acc0, acc1, acc2, acc3, w_tile, t, kk, x_ptr, stride_x, K, ROWS: tl.constexpr,
                    SILU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """One step of the K loop: the loaded weight tile t [BLOCK_N, BLOCK_K] (masked past
        K) times those columns of each input row, into that row's accumulator."""
        k = t * BLOCK_K + kk
        k_ok = k < K
        w = w_tile.to(tl.float32)
        acc0 = _dot_rows(acc0, w, _input_chunk(x_ptr + k, k_ok, K, SILU), BLOCK_N, BLOCK_K)
        if ROWS > 1:
            acc1 = _dot_rows(acc1, w, _input_chunk(x_ptr + stride_x + k, k_ok, K, SILU), BLOCK_N, BLOCK_K)
        if ROWS > 2:
            acc2 = _dot_rows(acc2, w, _input_chunk(x_ptr + 2 * stride_x + k, k_ok, K, SILU), BLOCK_N, BLOCK_K)
        if ROWS > 3:
            acc3 = _dot_rows(acc3, w, _input_chunk(x_ptr + 3 * stride_x + k, k_ok, K, SILU), BLOCK_N, BLOCK_K)
        return acc0, acc1, acc2, acc3

    @triton.jit
    def _weight_tile(w_at, t, kk, K, BLOCK_K: tl.constexpr):
        return tl.load(w_at + t * BLOCK_K, mask=(t * BLOCK_K + kk < K)[None, :], other=0.0)

    @triton.jit
    def _gemv_kernel(
        x_ptr, w_ptr, out_ptr, part_ptr, N, K, stride_x, stride_o, tiles_per_split,
        ROWS: tl.constexpr, SILU: tl.constexpr, SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr, UNROLL: tl.constexpr, PDL: tl.constexpr,
    ):
        """One program per (BLOCK_N weight rows, split of K). Each step loads a weight tile
        [BLOCK_N, BLOCK_K] (a thread: one 16-byte vector of each weight row, at the same
        columns) and those input columns once, and adds each vector's dot product into a
        float32 accumulator per input row (constexpr-pruned past ROWS); the sum across
        threads happens once, at the end. Rows past N are clamped to N - 1, so the weight
        loads need no row mask. With PDL the first tile is loaded before waiting for the
        kernel that writes x (weights are never written), and the next kernel may launch
        once the loop is done."""
        pid_n, split = tl.program_id(0), tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        w_at = w_ptr + tl.minimum(n, N - 1).to(tl.int64)[:, None] * K + kk[None, :]
        start = split * tiles_per_split  # a split past the last tile (a bench plan) loads only masks
        stop = tl.minimum(start + tiles_per_split, tl.cdiv(K, BLOCK_K))
        first = _weight_tile(w_at, start, kk, K, BLOCK_K)
        wait_for_producer(PDL)
        acc0 = tl.zeros([BLOCK_N, BLOCK_K // 8], tl.float32)
        acc1 = tl.zeros([BLOCK_N, BLOCK_K // 8], tl.float32)
        acc2 = tl.zeros([BLOCK_N, BLOCK_K // 8], tl.float32)
        acc3 = tl.zeros([BLOCK_N, BLOCK_K // 8], tl.float32)
        acc0, acc1, acc2, acc3 = _accumulate(acc0, acc1, acc2, acc3, first, start, kk, x_ptr, stride_x, K,
                                             ROWS, SILU, BLOCK_N, BLOCK_K)
        for t in tl.range(start + 1, stop, num_stages=NUM_STAGES, loop_unroll_factor=UNROLL):
            acc0, acc1, acc2, acc3 = _accumulate(acc0, acc1, acc2, acc3, _weight_tile(w_at, t, kk, K, BLOCK_K),
                                                 t, kk, x_ptr, stride_x, K, ROWS, SILU, BLOCK_N, BLOCK_K)
        release_dependents(PDL)
        _store_row(acc0, 0, n, N, out_ptr, stride_o, part_ptr, split, ROWS, SPLIT)
        if ROWS > 1:
            _store_row(acc1, 1, n, N, out_ptr, stride_o, part_ptr, split, ROWS, SPLIT)
        if ROWS > 2:
            _store_row(acc2, 2, n, N, out_ptr, stride_o, part_ptr, split, ROWS, SPLIT)
        if ROWS > 3:
            _store_row(acc3, 3, n, N, out_ptr, stride_o, part_ptr, split, ROWS, SPLIT)

    @triton.jit
    def _sum_splits_kernel(part_ptr, out_ptr, N, stride_o, num_splits, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """One program per (BLOCK outputs, row): the partial sums part[split, row, n] added
        in split order — fixed, so results are bitwise reproducible — and cast."""
        release_then_wait(PDL)
        pid, row = tl.program_id(0), tl.program_id(1)
        n = pid * BLOCK + tl.arange(0, BLOCK)
        total = tl.zeros([BLOCK], tl.float32)
        for split in range(num_splits):
            total += tl.load(part_ptr + (split * tl.num_programs(1) + row) * N + n, mask=n < N, other=0.0)
        tl.store(out_ptr + row * stride_o + n, total.to(out_ptr.dtype.element_ty), mask=n < N)




def gemv(x: torch.Tensor, weight: torch.Tensor, *, silu_and_mul: bool = False,
         plan: GemvPlan | None = None) -> torch.Tensor:
    """x [M, K] (with silu_and_mul: [M, 2K] holding [gate | up], multiplied as
    silu(gate) * up) @ weight [N, K]^T -> [M, N] in x's dtype, accumulated in float32.
    plan: the cut (benchmarks sweep it); None takes plan_for's. No host syncs, and the
    only allocations are the output and, with several splits, a float32 workspace."""
    rows, n, k = x.shape[0], weight.shape[0], weight.shape[1]
    width = 2 * k if silu_and_mul else k
    if x.shape[1] != width or rows > MAX_ROWS or x.stride(1) != 1 or not weight.is_contiguous():
        raise ValueError(f"gemv: x {tuple(x.shape)} with strides {x.stride()}, weight {tuple(weight.shape)} "
                         f"(contiguous: {weight.is_contiguous()}); expected at most {MAX_ROWS} rows of "
                         f"{'2 * ' if silu_and_mul else ''}K unit-stride columns and a contiguous weight")
    out = torch.empty(rows, n, dtype=x.dtype, device=x.device)
    if rows == 0 or n == 0:
        return out
    if plan is None:
        plan = plan_for(rows, n, k, sm_count(x.device))
    tiles_per_split = _cdiv(_cdiv(k, plan.block_k), plan.num_splits)
    split = plan.num_splits > 1
    part = torch.empty(plan.num_splits, rows, n, dtype=torch.float32, device=x.device) if split else out
    _gemv_kernel[(_cdiv(n, plan.block_n), plan.num_splits)](
        x, weight, out, part, n, k, x.stride(0), out.stride(0), tiles_per_split,
        ROWS=rows, SILU=silu_and_mul, SPLIT=split, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
        # 1 leaves the loop unannotated: no pipelining (num_stages=1), no unrolling.
        NUM_STAGES=plan.num_stages if plan.num_stages > 1 else None,
        UNROLL=plan.unroll if plan.unroll > 1 else None,
        num_warps=plan.num_warps, num_stages=plan.num_stages, **launch_options(x.device),
    )
    if split:
        _sum_splits_kernel[(_cdiv(n, REDUCE_BLOCK), rows)](
            part, out, n, out.stride(0), plan.num_splits, BLOCK=REDUCE_BLOCK, num_warps=4,
            **launch_options(x.device),
        )
    return out
