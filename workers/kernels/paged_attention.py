"""Paged decode attention as a Triton kernel: each decode row attends to its context
straight from the paged KV cache, reading blocks through its block table — no gather into
a padded copy. Chosen at run time on CUDA; the SDPA path in workers/attention.py stays
the reference (and the CPU path). Runs in each shard."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path is used
    triton = None


TILE_KEYS = 64  # keys per inner step: several blocks' loads in flight at once


def is_available(device: torch.device, head_dim: int, block_size: int) -> bool:
    """The kernel runs on CUDA with power-of-two head_dim >= 16 and block_size (Triton
    ranges; tensor-core dots need 16)."""
    def is_pow2(n: int) -> bool:
        return n > 0 and n & (n - 1) == 0

    return (triton is not None and device.type == "cuda" and is_pow2(head_dim) and head_dim >= 16
            and is_pow2(block_size))


if triton is not None:

    @triton.jit
    def _paged_decode_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, seq_lens_ptr,
        scale, window,
        stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb, stride_ob, stride_oh,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
        TILE: tl.constexpr, HAS_WINDOW: tl.constexpr,
    ):
        """One program per (sequence, KV head): the GROUP query heads that share the KV
        head (padded to BLOCK_G >= 16 rows for tensor-core dots), with an online softmax
        over tiles of TILE keys, each tile gathered from TILE / BLOCK_SIZE paged blocks."""
        seq = tl.program_id(0)
        kv_head = tl.program_id(1)
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
        m = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        for tile in range(first // TILE, tl.cdiv(seq_len, TILE)):
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
        out = acc / l[:, None]
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q [B, heads, d]; caches [num_blocks, block_size, kv_heads, d]; block_tables
    [B, max_blocks] (entries past a sequence's length are never read); seq_lens [B]
    (context including the query's own, already-written token) -> [B, heads, d]."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    if batch == 0:
        return out
    _paged_decode_kernel[(batch, num_kv_heads)](
        q, k_cache, v_cache, out, block_tables, seq_lens,
        scale, sliding_window or 0,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_SIZE=block_size,
        HEAD_DIM=head_dim, TILE=max(TILE_KEYS, block_size), HAS_WINDOW=sliding_window is not None,
    )
    return out
