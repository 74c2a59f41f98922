"""Paged decode attention as a Triton kernel: each decode row attends to its context
straight from the paged KV cache, reading blocks through its block table — no gather into
a padded copy. Chosen at run time on CUDA; the SDPA path in workers/attention.py stays
the reference (and the CPU path). Runs in each shard."""

from __future__ import annotations

import torch

from workers.kernels.device import sm_count, supports_paged_cache
from workers.kernels.pdl import launch_options

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path is used
    triton = None


TILE_KEYS = 64  # keys per inner step: several blocks' loads in flight at once
MAX_SPLITS = 16  # programs per (sequence, KV head) at most (flash-decoding split)


def is_available(device: torch.device, head_dim: int, block_size: int) -> bool:
    """Whether the kernel runs for this device, head size and cache block size."""
    return supports_paged_cache(device, head_dim, block_size)


if triton is not None:
    from workers.kernels.pdl import release_then_wait

    # The block table's width (stride_tb) and the split count change with every eager
    # step's contexts and batch: not specialized on, so that one compiled kernel (with or
    # without SPLIT) serves them all, and no step compiles a variant while requests wait.
    @triton.jit(do_not_specialize=["num_splits", "stride_tb"])
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, part_ptr, ml_ptr, tables_ptr, seq_lens_ptr,
        scale, window, num_heads, num_splits,
        stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb, stride_ob, stride_oh,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
        TILE: tl.constexpr, SPLIT: tl.constexpr, HAS_WINDOW: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """One program per (sequence, KV head, split): the GROUP query heads that share the
        KV head (padded to BLOCK_G >= 16 rows for tensor-core dots), with an online softmax
        over its split's share of the sequence, in tiles of TILE keys gathered from
        TILE / BLOCK_SIZE paged blocks. One split writes the output; several write partial
        (max, sum, unnormalized output) rows that _reduce_splits_kernel combines."""
        release_then_wait(PDL)
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
        split = tl.program_id(2)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, HEAD_DIM)
        t = tl.arange(0, TILE)
        heads = kv_head * GROUP + g
        g_ok = g < GROUP
        q = tl.load(q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None], other=0.0)  # [G, D]
        seq_len = tl.load(seq_lens_ptr + seq)
        first = 0
        if HAS_WINDOW:  # HF Mistral: a key is visible if its position > query - window
            first = tl.maximum(seq_len - window, 0)
        first_tile = first // TILE
        per_split = tl.cdiv(tl.cdiv(seq_len, TILE) - first_tile, num_splits)
        start = first_tile + split * per_split
        stop = tl.minimum(start + per_split, tl.cdiv(seq_len, TILE))
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        for tile in range(start, stop):
            pos = tile * TILE + t
            visible = (pos < seq_len) & (pos >= first)
            physical = tl.load(tables_ptr + seq * stride_tb + pos // BLOCK_SIZE, mask=visible, other=0)
            offsets = (physical.to(tl.int64)[:, None] * stride_kb + (pos % BLOCK_SIZE)[:, None] * stride_ks
                       + kv_head * stride_kh + d[None, :])
            k = tl.load(k_ptr + offsets, mask=visible[:, None], other=0.0)  # [T, D]
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [G, T]
            scores = tl.where(visible[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m - m_new)
            v = tl.load(v_ptr + offsets, mask=visible[:, None], other=0.0)  # [T, D]
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
        if not SPLIT:  # one split: num_splits == 1
            out = acc / l[:, None]
            tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
        else:
            row = (seq * num_heads + heads) * num_splits + split  # [G] rows of [B, H, S]
            tl.store(part_ptr + row[:, None] * HEAD_DIM + d[None, :], acc, mask=g_ok[:, None])
            tl.store(ml_ptr + row * 2, m, mask=g_ok)
            tl.store(ml_ptr + row * 2 + 1, l, mask=g_ok)

    @triton.jit(do_not_specialize=["num_splits"])
    def _reduce_splits_kernel(
        part_ptr, ml_ptr, out_ptr, stride_ob, stride_oh, num_splits,
        BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, PDL: tl.constexpr,
    ):
        """One program per (sequence, head): the splits' partial softmaxes rescaled to
        their common max and summed (an empty split has max -inf and weighs 0)."""
        release_then_wait(PDL)
        seq, head = tl.program_id(0), tl.program_id(1)
        s = tl.arange(0, BLOCK_S)
        d = tl.arange(0, HEAD_DIM)
        row = (seq * tl.num_programs(1) + head) * num_splits + s
        s_ok = s < num_splits
        m = tl.load(ml_ptr + row * 2, mask=s_ok, other=float("-inf"))
        l = tl.load(ml_ptr + row * 2 + 1, mask=s_ok, other=0.0)
        weight = tl.where(s_ok, tl.exp(m - tl.max(m, axis=0)), 0.0)
        acc = tl.load(part_ptr + row[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
        out = tl.sum(weight[:, None] * acc, axis=0) / tl.sum(weight * l, axis=0)
        tl.store(out_ptr + seq * stride_ob + head * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def num_splits_for(batch: int, num_kv_heads: int, max_keys: int, device: torch.device) -> int:
    """Splits of each sequence: enough programs to fill the GPU at small batches (a
    batch-1 step has one program per KV head otherwise), at most MAX_SPLITS, and no more
    than the tiles of the longest possible context."""
    if device.type != "cuda":  # Triton's interpreter: one split
        return 1
    programs = batch * num_kv_heads
    sms = sm_count(device)
    if programs >= sms:
        return 1
    return max(1, min(MAX_SPLITS, -(-max_keys // TILE_KEYS), -(-2 * sms // programs)))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q [B, heads, d]; caches [num_blocks, block_size, kv_heads, d]; block_tables
    [B, max_blocks] (entries past a sequence's length are never read); seq_lens [B]
    (context including the query's own, already-written token) -> [B, heads, d].
    num_splits: programs per (sequence, KV head), 1 to MAX_SPLITS; None picks it from the
    batch (CUDA)."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    if num_splits is None:
        num_splits = num_splits_for(batch, num_kv_heads, block_tables.shape[1] * block_size, q.device)
    if not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be 1 to {MAX_SPLITS} (the split reduction's width), got {num_splits}")
    part = ml = out  # unused by a single split
    if num_splits > 1:
        part = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        ml = torch.empty(batch, num_heads, num_splits, 2, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part, ml, block_tables, seq_lens,
        scale, sliding_window or 0, num_heads, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, TILE=max(TILE_KEYS, block_size), SPLIT=num_splits > 1,
        HAS_WINDOW=sliding_window is not None, **launch_options(q.device),
    )
    if num_splits > 1:
        _reduce_splits_kernel[(batch, num_heads)](
            part, ml, out, out.stride(0), out.stride(1), num_splits,
            BLOCK_S=triton.next_power_of_2(MAX_SPLITS), HEAD_DIM=head_dim, **launch_options(q.device),
        )
    return out
