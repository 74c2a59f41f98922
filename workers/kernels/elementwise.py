"""Fused Triton kernels for the small per-layer ops of a decoder layer on CUDA: residual
add + RMSNorm, in-place RoPE on q and k with the K/V cache write (also apart), and
SiLU-and-mul. Each
replaces 2–16 PyTorch kernels, which matters most inside a captured decode step, where
every kernel boundary costs GPU time. Roundings follow Hugging Face's order of bf16/fp16
operations, so results match the PyTorch reference path (the CPU path). Runs in each shard."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference path is used
    triton = None

from workers.kernels.pdl import launch_options


def is_available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def _pow2(n: int) -> int:
    return triton.next_power_of_2(n)


def _num_warps(block: int) -> int:
    return min(max(block // 512, 1), 16)


if triton is not None:
    from workers.kernels.pdl import release_then_wait

    @triton.jit
    def _rms_norm_kernel(
        x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
        stride_x0, stride_x1, stride_r0, stride_o0, stride_o1, stride_ro0,
        num_cols, eps, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
    ):
        """One program per row (program ids: row, sub-row for [N, heads, d] inputs)."""
        release_then_wait(PDL)
        row, sub = tl.program_id(0), tl.program_id(1)
        cols = tl.arange(0, BLOCK)
        mask = cols < num_cols
        dtype = out_ptr.dtype.element_ty
        x = tl.load(x_ptr + row * stride_x0 + sub * stride_x1 + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:  # HF adds in the model dtype, then normalizes the sum
            r = tl.load(res_ptr + row * stride_r0 + cols, mask=mask, other=0.0).to(tl.float32)
            x = (x + r).to(dtype)
            tl.store(res_out_ptr + row * stride_ro0 + cols, x, mask=mask)
            x = x.to(tl.float32)
        inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / num_cols + eps)
        y = (x * inv_rms).to(dtype).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_o0 + sub * stride_o1 + cols, (y * w).to(dtype), mask=mask)

    @triton.jit
    def _rotated(ptr, c, s, mask, HALF: tl.constexpr):
        """(x1 c - x2 s, x2 c + x1 s) of the halves (x1, x2) at ptr, in the tensor's dtype,
        each product rounded to that dtype first, as PyTorch does in that dtype."""
        dtype = ptr.dtype.element_ty
        x1 = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptr + HALF, mask=mask, other=0.0).to(tl.float32)
        o1 = (x1 * c).to(dtype).to(tl.float32) - (x2 * s).to(dtype).to(tl.float32)
        o2 = (x2 * c).to(dtype).to(tl.float32) + (x1 * s).to(dtype).to(tl.float32)
        return o1.to(dtype), o2.to(dtype)

    @triton.jit
    def _rotate_pair(ptr, c, s, mask, HALF: tl.constexpr):
        """In place: the halves at ptr rotated (see _rotated)."""
        o1, o2 = _rotated(ptr, c, s, mask, HALF)
        tl.store(ptr, o1, mask=mask)
        tl.store(ptr + HALF, o2, mask=mask)

    @triton.jit
    def _rotary_kernel(
        q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_cos,
        NUM_Q: tl.constexpr, NUM_K: tl.constexpr, HALF: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
    ):
        """One program per row: every q and k head of that token, rotated in place."""
        release_then_wait(PDL)
        row = tl.program_id(0)
        pos = tl.load(pos_ptr + row)
        i = tl.arange(0, BLOCK_D)
        h = tl.arange(0, BLOCK_H)
        c = tl.load(cos_ptr + pos * stride_cos + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
        s = tl.load(sin_ptr + pos * stride_cos + i, mask=i < HALF, other=0.0).to(tl.float32)[None, :]
        q_at = q_ptr + row * stride_qn + h[:, None] * stride_qh + i[None, :]
        _rotate_pair(q_at, c, s, (h[:, None] < NUM_Q) & (i[None, :] < HALF), HALF)
        k_at = k_ptr + row * stride_kn + h[:, None] * stride_kh + i[None, :]
        _rotate_pair(k_at, c, s, (h[:, None] < NUM_K) & (i[None, :] < HALF), HALF)

    @triton.jit
    def _store_kv_kernel(
        k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
        stride_kn, stride_kh, stride_vn, stride_vh, stride_slot, stride_head,
        NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """One program per row: its K and V heads into cache slot slot_mapping[row]."""
        release_then_wait(PDL)
        row = tl.program_id(0)
        slot = tl.load(slot_ptr + row).to(tl.int64)
        h = tl.arange(0, BLOCK_H)[:, None]
        d = tl.arange(0, BLOCK_D)[None, :]
        mask = (h < NUM_KV) & (d < HEAD_DIM)
        to = slot * stride_slot + h * stride_head + d
        k = tl.load(k_ptr + row * stride_kn + h * stride_kh + d, mask=mask)
        tl.store(k_cache_ptr + to, k, mask=mask)
        v = tl.load(v_ptr + row * stride_vn + h * stride_vh + d, mask=mask)
        tl.store(v_cache_ptr + to, v, mask=mask)

    @triton.jit
    def _rotary_store_kv_kernel(
        q_ptr, k_ptr, v_ptr, pos_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
        stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_cos,
        stride_slot, stride_head,
        NUM_Q: tl.constexpr, NUM_KV: tl.constexpr, HALF: tl.constexpr,
        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr,
    ):
        """One program per row: its q heads rotated in place; its k heads rotated in place
        and, as rotated, into cache slot slot_mapping[row]; its v heads into that slot."""
        release_then_wait(PDL)
        row = tl.program_id(0)
        pos = tl.load(pos_ptr + row)
        slot = tl.load(slot_ptr + row).to(tl.int64)
        i = tl.arange(0, BLOCK_D)[None, :]
        h = tl.arange(0, BLOCK_H)[:, None]
        c = tl.load(cos_ptr + pos * stride_cos + i, mask=i < HALF, other=0.0).to(tl.float32)
        s = tl.load(sin_ptr + pos * stride_cos + i, mask=i < HALF, other=0.0).to(tl.float32)
        _rotate_pair(q_ptr + row * stride_qn + h * stride_qh + i, c, s, (h < NUM_Q) & (i < HALF), HALF)
        kv_mask = (h < NUM_KV) & (i < HALF)
        k_at = k_ptr + row * stride_kn + h * stride_kh + i
        k1, k2 = _rotated(k_at, c, s, kv_mask, HALF)
        tl.store(k_at, k1, mask=kv_mask)
        tl.store(k_at + HALF, k2, mask=kv_mask)
        to = slot * stride_slot + h * stride_head + i
        tl.store(k_cache_ptr + to, k1, mask=kv_mask)
        tl.store(k_cache_ptr + to + HALF, k2, mask=kv_mask)
        v_at = v_ptr + row * stride_vn + h * stride_vh + i
        tl.store(v_cache_ptr + to, tl.load(v_at, mask=kv_mask), mask=kv_mask)
        tl.store(v_cache_ptr + to + HALF, tl.load(v_at + HALF, mask=kv_mask), mask=kv_mask)

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, size, BLOCK: tl.constexpr, PDL: tl.constexpr):
        release_then_wait(PDL)
        row, part = tl.program_id(0), tl.program_id(1)
        cols = part * BLOCK + tl.arange(0, BLOCK)
        mask = cols < size
        dtype = out_ptr.dtype.element_ty
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + size + cols, mask=mask, other=0.0).to(tl.float32)
        act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32)
        tl.store(out_ptr + row * stride_o + cols, (act * up).to(dtype), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x [N, size] or [N, heads, size] (last dim contiguous); with `residual` [N, size],
    normalizes x + residual and also returns that sum (the next residual)."""
    size = x.shape[-1]
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(residual) if residual is not None else None
    rows = x.shape[0]
    if rows == 0:
        return out, residual_out
    heads = x.shape[1] if x.dim() == 3 else 1
    stride_x1 = x.stride(1) if x.dim() == 3 else 0
    stride_o1 = out.stride(1) if x.dim() == 3 else 0
    block = _pow2(size)
    _rms_norm_kernel[(rows, heads)](
        x, residual if residual is not None else x, weight, out,
        residual_out if residual_out is not None else out,
        x.stride(0), stride_x1, residual.stride(0) if residual is not None else 0,
        out.stride(0), stride_o1, residual_out.stride(0) if residual_out is not None else 0,
        size, eps, HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=_num_warps(block),
        **launch_options(x.device),
    )
    return out, residual_out


def rotary_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
            cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place: q [N, heads, d] and k [N, kv_heads, d] (last dim contiguous) rotated by
    positions [N], with cos/sin tables [max_position, d / 2]."""
    rows, num_q, head_dim = q.shape
    if rows == 0:
        return
    half = head_dim // 2
    _rotary_kernel[(rows,)](
        q, k, positions, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos.stride(0),
        NUM_Q=num_q, NUM_K=k.shape[1], HALF=half,
        BLOCK_H=_pow2(max(num_q, k.shape[1])), BLOCK_D=_pow2(half),
        **launch_options(q.device),
    )


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [N, kv_heads, d] into caches [num_blocks, block_size, kv_heads, d] at
    slot_mapping [N] (block_id * block_size + offset)."""
    rows, num_kv, head_dim = k.shape
    if rows == 0:
        return
    _store_kv_kernel[(rows,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), k_cache.stride(1), k_cache.stride(2),
        NUM_KV=num_kv, HEAD_DIM=head_dim, BLOCK_H=_pow2(num_kv), BLOCK_D=_pow2(head_dim),
        **launch_options(k.device),
    )


def rotary_store_kv_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slot_mapping: torch.Tensor) -> None:
    """rotary_ then store_kv in one kernel: q [N, heads, d] and k [N, kv_heads, d] rotated
    in place by positions [N], then k and v [N, kv_heads, d] written into the caches
    [num_blocks, block_size, kv_heads, d] at slot_mapping [N]. Last dims contiguous."""
    rows, num_q, head_dim = q.shape
    if rows == 0:
        return
    half = head_dim // 2
    _rotary_store_kv_kernel[(rows,)](
        q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        k_cache.stride(1), k_cache.stride(2),
        NUM_Q=num_q, NUM_KV=k.shape[1], HALF=half,
        BLOCK_H=_pow2(max(num_q, k.shape[1])), BLOCK_D=_pow2(half),
        **launch_options(q.device),
    )


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[N, 2 * I] holding [gate | up] -> silu(gate) * up, [N, I]."""
    rows, size = x.shape[0], x.shape[1] // 2
    out = torch.empty(rows, size, dtype=x.dtype, device=x.device)
    if rows == 0:
        return out
    block = min(_pow2(size), 1024)
    _silu_and_mul_kernel[(rows, triton.cdiv(size, block))](
        x, out, x.stride(0), out.stride(0), size, BLOCK=block, num_warps=4,
        **launch_options(x.device),
    )
    return out
