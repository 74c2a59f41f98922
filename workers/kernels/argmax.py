"""Greedy decoding's argmax over the vocabulary on CUDA, in two Triton kernels of ~2 µs
(torch.argmax reduces a row in one thread block: 28 µs for 128K logits on an H200). Runs
on the leader (the sampler) and, for greedy feedback at TP > 1, on followers."""

from __future__ import annotations

import torch

from workers.kernels.pdl import launch_options

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: torch.argmax is used
    triton = None

BLOCK = 4096  # columns per program: 32 programs a row for a 128K vocabulary


def is_available(logits: torch.Tensor) -> bool:
    return (triton is not None and logits.is_cuda and logits.dim() == 2 and logits.stride(1) == 1
            and logits.dtype in (torch.float32, torch.bfloat16, torch.float16))


# Many programs each take the max of a BLOCK of the row (first index on ties); one program
# per row then picks the first block holding the row's max: torch.argmax's answer.
if triton is not None:
    from workers.kernels.pdl import release_then_wait

    @triton.jit
    def _block_argmax_kernel(x_ptr, value_ptr, index_ptr, V, stride_x, num_blocks,
                             BLOCK: tl.constexpr, PDL: tl.constexpr):
        """One program per (row, block of columns): the block's max and its first index."""
        release_then_wait(PDL)
        row, block = tl.program_id(0), tl.program_id(1)
        cols = block * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row.to(tl.int64) * stride_x + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        best = tl.argmax(x, axis=0, tie_break_left=True)
        tl.store(value_ptr + row * num_blocks + block, tl.max(x, axis=0))
        tl.store(index_ptr + row * num_blocks + block, block * BLOCK + best)

    @triton.jit
    def _row_argmax_kernel(value_ptr, index_ptr, out_ptr, num_blocks, BLOCKS: tl.constexpr,
                           PDL: tl.constexpr):
        """One program per row: the first block holding the row's max, and its index."""
        release_then_wait(PDL)
        row = tl.program_id(0)
        b = tl.arange(0, BLOCKS)
        values = tl.load(value_ptr + row * num_blocks + b, mask=b < num_blocks, other=float("-inf"))
        first = tl.argmax(values, axis=0, tie_break_left=True)
        tl.store(out_ptr + row, tl.load(index_ptr + row * num_blocks + first).to(tl.int64))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """[M, V] -> [M] int64: each row's index of its max, the first on ties, as
    logits.argmax(dim=-1) (which runs where the kernels do not). Rows holding NaN are not
    defined here (torch.argmax returns the NaN's index)."""
    if not is_available(logits) or logits.shape[1] == 0:
        return logits.argmax(dim=-1)
    return triton_argmax(logits)


def triton_argmax(logits: torch.Tensor) -> torch.Tensor:
    """argmax through the kernels, on any device Triton runs them on (its interpreter on CPU
    tensors, for tests). logits [M, V >= 1] with unit column stride."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    num_blocks = triton.cdiv(vocab, BLOCK)
    values = torch.empty(rows, num_blocks, dtype=torch.float32, device=logits.device)
    indices = torch.empty(rows, num_blocks, dtype=torch.int32, device=logits.device)
    options = launch_options(logits.device)
    _block_argmax_kernel[(rows, num_blocks)](logits, values, indices, vocab, logits.stride(0), num_blocks,
                                             BLOCK=BLOCK, num_warps=8, **options)
    _row_argmax_kernel[(rows,)](values, indices, out, num_blocks,
                                BLOCKS=max(16, triton.next_power_of_2(num_blocks)), num_warps=1, **options)
    return out
