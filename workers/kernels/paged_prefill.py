"""Paged prefill attention as one Triton kernel launch per layer: every request's new rows
attend causally (optionally in a sliding window) to their keys straight from the paged KV
cache, flash-attention style. Replaces one SDPA call per prefill span; runs in each shard."""

from __future__ import annotations

import torch

from workers.kernels.device import supports_paged_cache
from workers.kernels.pdl import launch_options

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path is used
    triton = None


BLOCK_M = 64  # tile rows: (query row, query head) pairs of one KV head, flattened
BLOCK_N = 64  # keys per inner step, gathered through the block table key by key
LOG2_E = 1.4426950408889634


def is_available(device: torch.device, head_dim: int, block_size: int) -> bool:
    """Whether the kernel runs for this device, head size and cache block size."""
    return supports_paged_cache(device, head_dim, block_size)


if triton is not None:
    from workers.kernels.pdl import release_then_wait

    # The block table's width (stride_tb) is an eager step's longest context: not
    # specialized on, so that no step compiles a variant while requests wait.
    @triton.jit(do_not_specialize=["stride_tb"])
    def _paged_prefill_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, query_start_ptr, seq_lens_ptr, block_map_ptr,
        qk_scale, window,
        stride_qn, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh, stride_kd,
        stride_tb, stride_on, stride_oh,
        GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HAS_WINDOW: tl.constexpr,
        MAPPED: tl.constexpr, PDL: tl.constexpr,
    ):
        """One program per (query block, request, KV head): BLOCK_Q query rows times the
        GROUP heads sharing the KV head, flattened into BLOCK_M tile rows (row i is query
        row i // GROUP, head i % GROUP), so each K/V tile is read once for the whole group.
        Online softmax in float32 over the keys the block can see: from the window start of
        its first row to its last row's position; nothing past that is read."""
        release_then_wait(PDL)  # every program, before the early return below
        if MAPPED:  # a grid fixed in advance (a captured step): (request, query block) per program
            req = tl.load(block_map_ptr + 2 * tl.program_id(0)).to(tl.int32)
            q_block = tl.load(block_map_ptr + 2 * tl.program_id(0) + 1).to(tl.int32)
            if req < 0:  # past the step's query blocks
                return
        else:
            q_block = tl.program_id(0)
            req = tl.program_id(1)
        kv_head = tl.program_id(2)
        # positions fit int32: the same arithmetic for int32 and int64 index tensors
        row_start = tl.load(query_start_ptr + req).to(tl.int32)
        num_rows = tl.load(query_start_ptr + req + 1).to(tl.int32) - row_start
        if q_block * BLOCK_Q >= num_rows:  # grid sized for the longest request
            return
        seq_len = tl.load(seq_lens_ptr + req).to(tl.int32)
        i = tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_DIM)
        n = tl.arange(0, BLOCK_N)
        row = q_block * BLOCK_Q + i // GROUP  # [M] row within the request
        heads = kv_head * GROUP + i % GROUP
        row_ok = (i < BLOCK_Q * GROUP) & (row < num_rows)
        q_pos = seq_len - num_rows + row  # the request's rows are the last of its sequence
        token = (row_start + row).to(tl.int64)
        q = tl.load(q_ptr + token[:, None] * stride_qn + heads[:, None] * stride_qh + d[None, :] * stride_qd,
                    mask=row_ok[:, None], other=0.0)  # [M, D]
        first_pos = seq_len - num_rows + q_block * BLOCK_Q
        key_end = tl.minimum(first_pos + BLOCK_Q, seq_len)  # past the block's last row
        key_start = 0
        if HAS_WINDOW:  # HF Mistral: a key is visible if its position > query - window
            key_start = tl.maximum(first_pos - window + 1, 0)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
        for start in range(key_start, key_end, BLOCK_N):
            k_pos = start + n  # [N]
            k_ok = k_pos < key_end
            physical = tl.load(tables_ptr + req * stride_tb + k_pos // BLOCK_SIZE, mask=k_ok, other=0)
            offsets = (physical.to(tl.int64)[:, None] * stride_kb + (k_pos % BLOCK_SIZE)[:, None] * stride_ks
                       + kv_head * stride_kh + d[None, :] * stride_kd)  # [N, D]
            k = tl.load(k_ptr + offsets, mask=k_ok[:, None], other=0.0)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [M, N], log2 units
            visible = k_ok[None, :] & (k_pos[None, :] <= q_pos[:, None])
            if HAS_WINDOW:
                visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
            scores = tl.where(visible, scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet
            p = tl.exp2(scores - m_safe[:, None])
            alpha = tl.exp2(m - m_safe)
            v = tl.load(v_ptr + offsets, mask=k_ok[:, None], other=0.0)  # [N, D]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
        out = acc / tl.where(row_ok, l, 1.0)[:, None]
        tl.store(out_ptr + token[:, None] * stride_on + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    max_query_len: int,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    block_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [N, heads, d], request r's rows q[query_start_loc[r]:query_start_loc[r + 1]] at
    the last positions of its seq_lens[r] keys; caches [num_blocks, block_size, kv_heads, d]
    holding every key of those positions (this step's too); block_tables [R, max_blocks]
    (entries past a request's length never read) -> [N, heads, d] in q's dtype.
    max_query_len: rows of the longest request (a host int, sizes the grid without a sync);
    block_m / block_n: tile rows and keys per step, powers of two >= 16; block_map: an int32
    [P, 2] map of program to (request, query block), -1 past the step's blocks
    (`query_block_map`): the grid is then P programs per KV head, however the rows fall into
    requests (a captured step's grid is fixed; without a map it is max_query_len by
    requests)."""
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache and v_cache need the same layout; strides {k_cache.stride()}, {v_cache.stride()}")
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_requests = seq_lens.shape[0]
    if num_tokens == 0 or num_requests == 0 or max_query_len == 0:
        return out
    block_m = _tile_rows(group, block_m)
    block_q = block_m // group
    grid = (triton.cdiv(max_query_len, block_q), num_requests, num_kv_heads)
    if block_map is not None:
        grid = (block_map.shape[0], 1, num_kv_heads)
    _paged_prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, query_start_loc, seq_lens,
        block_map if block_map is not None else seq_lens,
        scale * LOG2_E, sliding_window or 0,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, HAS_WINDOW=sliding_window is not None, MAPPED=block_map is not None,
        num_warps=4 if block_m * head_dim <= 64 * 128 else 8,
        **launch_options(q.device),
    )
    return out


def query_rows_per_program(num_heads: int, num_kv_heads: int, block_m: int = BLOCK_M) -> int:
    """Query rows one program of the kernel takes (its BLOCK_Q) for this head grouping."""
    group = num_heads // num_kv_heads
    return _tile_rows(group, block_m) // group


def _tile_rows(group: int, block_m: int) -> int:
    """A program's tile rows (BLOCK_M): block_m, or more so that it holds at least one
    query row of `group` heads."""
    return max(block_m, 1 << (group - 1).bit_length())


def query_block_map(query_lens: list[int], rows_per_program: int, num_programs: int) -> list[int]:
    """The kernel's block_map, flattened: (request, query block) for each query block of
    each request in turn, then (-1, 0) up to num_programs."""
    entries = [(req, block) for req, n in enumerate(query_lens) for block in range(-(-n // rows_per_program))]
    if len(entries) > num_programs:
        raise ValueError(f"{len(entries)} query blocks, over the {num_programs} programs of the grid")
    return [x for entry in entries for x in entry] + [-1, 0] * (num_programs - len(entries))
