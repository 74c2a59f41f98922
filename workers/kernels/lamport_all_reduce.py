"""A one-shot all-reduce without a barrier, for decode-sized messages between the GPUs of
one host (the Lamport scheme of TensorRT-LLM's and FlashInfer's all-reduces): each rank
stores its message straight into every rank's receive buffer over NVLink, then polls its
own buffer until every rank's part has landed, sums them in rank order, and puts the
buffer back to "empty" for a later call.

"Empty" is a bit pattern no message carries: negative zero (the sign bit alone). A sender
writes -0.0 as +0.0, so a receiver knows an element has arrived as soon as it reads
anything else, element by element, and no flag, fence or barrier is needed between the
ranks. The wait is one NVLink store and the polling of local memory, where a barrier
first is two NVLink round trips more.

Each rank's buffer holds three slots of `world_size` parts. Program p of a launch takes
its slot from its own entry of a slot table, and moves it on by one (only program p
touches that entry, on every rank alike, since every rank makes the same calls with the
same grids), so graph replays and eager calls rotate through the slots on the device
without the host. A slot is emptied as it is read;
a peer writes into it again three calls later, after it has itself received this rank's
part of the next two calls.

16-bit floats only (bfloat16, float16: the sentinel is their -0.0); sums in float32,
rounded once, the same bits on every rank. Runs in each shard."""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

from workers.kernels.pdl import launch_options

SLOTS = 3  # the kernel's `% 3`
BLOCK = 1024  # elements a program carries: a row of 1B..8B hidden size is 2-4 programs
MAX_PROGRAMS = 128
MAX_NUMEL = BLOCK * MAX_PROGRAMS  # 256 KiB of bfloat16: a decode step of 32 rows of 4096
EMPTY = -(1 << 15)  # int16 bits of -0.0


def buffer_numel(world_size: int) -> int:
    """int16 elements in each rank's receive buffer: SLOTS slots of world_size parts."""
    return SLOTS * world_size * MAX_NUMEL


if triton is not None:
    from workers.kernels.pdl import release_then_wait

    @triton.jit
    def _lamport_all_reduce_kernel(
        x_ptr, out_ptr, buffers_ptr, slots_ptr, numel, rank,
        WORLD: tl.constexpr, IS_BF16: tl.constexpr, BLOCK: tl.constexpr, MAX_NUMEL: tl.constexpr,
        PUSH: tl.constexpr, REDUCE: tl.constexpr, PDL: tl.constexpr,
    ):
        """x, out: int16 views of the message (out may be x). buffers_ptr: WORLD int64
        addresses of the ranks' buffers, as this process maps them. PUSH and REDUCE are
        both set on GPUs; Triton's interpreter runs them as two launches per rank, since
        it cannot run two ranks' programs at once."""
        release_then_wait(PDL)
        pid = tl.program_id(0)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        slot = tl.load(slots_ptr + pid)
        slot_base = slot * (WORLD * MAX_NUMEL)
        if PUSH:
            bits = tl.load(x_ptr + offs, mask=mask, other=0)
            bits = tl.where(bits == -32768, 0, bits)  # -0.0 means "not arrived": send +0.0
            for peer in tl.static_range(WORLD):
                buffer = tl.load(buffers_ptr + peer).to(tl.pointer_type(tl.int16))
                tl.store(buffer + slot_base + rank * MAX_NUMEL + offs, bits, mask=mask)
        if REDUCE:
            mine = tl.load(buffers_ptr + rank).to(tl.pointer_type(tl.int16))
            total = tl.zeros([BLOCK], dtype=tl.float32)
            for sender in tl.static_range(WORLD):
                part = mine + slot_base + sender * MAX_NUMEL + offs
                bits = tl.load(part, mask=mask, other=0, volatile=True)
                while tl.max(tl.where(bits == -32768, 1, 0), axis=0) > 0:
                    bits = tl.load(part, mask=mask, other=0, volatile=True)
                if IS_BF16:
                    total += bits.to(tl.bfloat16, bitcast=True).to(tl.float32)
                else:
                    total += bits.to(tl.float16, bitcast=True).to(tl.float32)
                tl.store(part, tl.full([BLOCK], -32768, tl.int16), mask=mask)
            if IS_BF16:  # rounded to nearest even by hand (Triton's interpreter truncates)
                wide = total.to(tl.uint32, bitcast=True)
                summed = ((wide + 0x7FFF + ((wide >> 16) & 1)) >> 16).to(tl.int16)
                # A NaN's payload may carry into the sign (the GPU's 0x7FFFFFFF gives -0.0):
                # NaN stays NaN, as in NCCL's sum.
                summed = tl.where(total != total, 0x7FC0, summed)
            else:
                summed = total.to(tl.float16).to(tl.int16, bitcast=True)
            tl.store(out_ptr + offs, summed, mask=mask)
            tl.store(slots_ptr + pid, (slot + 1) % 3)


def takes(x: torch.Tensor) -> bool:
    """A contiguous bfloat16 or float16 message of at most MAX_NUMEL elements."""
    return x.dtype in (torch.bfloat16, torch.float16) and x.is_contiguous() and 0 < x.numel() <= MAX_NUMEL


def lamport_all_reduce(x: torch.Tensor, buffers: torch.Tensor, slots: torch.Tensor, rank: int,
                       world_size: int, push: bool = True, reduce: bool = True) -> torch.Tensor:
    """Sums x over the ranks in place and returns it (`takes(x)` must hold). buffers:
    int64 [world_size], each rank's receive buffer (buffer_numel(world_size) int16, filled
    with EMPTY before the first call) as mapped here; slots: int32 [MAX_PROGRAMS] zeros at
    the start, this rank's own. push / reduce split a call in two for the interpreter."""
    if not takes(x):  # a larger grid would run past the slot table and into other parts
        raise ValueError(f"the Lamport all-reduce takes contiguous bfloat16/float16 messages of 1 to "
                         f"{MAX_NUMEL} elements, got {tuple(x.shape)} {x.dtype}")
    flat = x.view(-1).view(torch.int16)
    grid = (triton.cdiv(flat.numel(), BLOCK),)
    options = launch_options(x.device) if push and reduce else {"PDL": False}
    _lamport_all_reduce_kernel[grid](
        flat, flat, buffers, slots, flat.numel(), rank,
        WORLD=world_size, IS_BF16=x.dtype == torch.bfloat16, BLOCK=BLOCK, MAX_NUMEL=MAX_NUMEL,
        PUSH=push, REDUCE=reduce, num_warps=4, **options,
    )
    return x
