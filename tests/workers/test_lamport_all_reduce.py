"""The barrier-free all-reduce kernel (workers/kernels/lamport_all_reduce.py) sums like
NCCL: on CPU through Triton's interpreter, with 2 and 4 simulated ranks in one process
(each call split into every rank's sends, then every rank's receives) and with 2 forked
processes running whole calls at once over shared memory; on 2 GPUs (gpu marker) through
OneShotAllReduce, eagerly, in a replayed graph and both interleaved."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.workers.conftest import run_distributed, run_in_triton_interpreter, skip_unless_gpus
from workers.kernels.lamport_all_reduce import MAX_NUMEL, takes

# Message sizes in call order: grids of 4, 1, 3, 128 and 1 programs, so programs' slots
# drift apart and every slot is reused more than once.
NUMELS = (4096, 5, 2049, MAX_NUMEL, 1, 4096, 3000, 7)


def messages(world_size: int, numel: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    """One message per rank. Rank 0's starts with -0.0 and 0.0, which every rank must
    still receive (as zeros), then NaN, +Inf and +Inf, against rank 1's -Inf in the last
    of those: sums of NaN, Inf and NaN (Inf - Inf) that must stay so."""
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randn(numel, generator=gen).to(dtype) for _ in range(world_size)]
    parts[0][:5] = torch.tensor([-0.0, 0.0, float("nan"), float("inf"), float("inf")])[:numel]
    if numel >= 5:
        parts[1][4] = float("-inf")
    return parts


def expected_sum(parts: list[torch.Tensor]) -> torch.Tensor:
    """Float32 sum in rank order, rounded once."""
    return torch.stack([p.float() for p in parts]).sum(dim=0).to(parts[0].dtype)


def same_values(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal, with NaN where the other has NaN (a NaN's sign and payload may differ)."""
    nan = want.isnan()
    return torch.equal(got.isnan(), nan) and torch.equal(got[~nan], want[~nan])


CHECK = """
import sys, torch
from tests.workers.test_lamport_all_reduce import NUMELS, expected_sum, messages, same_values
from workers.kernels import lamport_all_reduce as lamport

for world_size in (2, 4):
    buffers = [torch.full((lamport.buffer_numel(world_size),), lamport.EMPTY, dtype=torch.int16)
               for _ in range(world_size)]
    addresses = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
    slots = [torch.zeros(lamport.MAX_PROGRAMS, dtype=torch.int32) for _ in range(world_size)]
    calls = torch.zeros(lamport.MAX_PROGRAMS, dtype=torch.int32)
    for call, numel in enumerate(NUMELS):
        dtype = torch.bfloat16 if call % 2 == 0 else torch.float16
        parts = messages(world_size, numel, dtype, seed=call)
        want = expected_sum(parts)
        xs = [p.clone() for p in parts]
        for rank in range(world_size):
            lamport.lamport_all_reduce(xs[rank], addresses, slots[rank], rank, world_size, reduce=False)
        # Where the sends landed: on every rank, the slot program 0 was at, the sender's
        # part, its message with -0.0 sent as +0.0 (one program's share, BLOCK elements).
        slot, share = int(calls[0]) % 3, min(numel, lamport.BLOCK)
        for receiver in range(world_size):
            for sender in range(world_size):
                start = (slot * world_size + sender) * lamport.MAX_NUMEL
                sent = parts[sender][:share].view(torch.int16)
                sent = torch.where(sent == lamport.EMPTY, torch.zeros_like(sent), sent)
                assert torch.equal(buffers[receiver][start:start + share], sent), (world_size, call, receiver, sender)
        for rank in range(world_size):
            lamport.lamport_all_reduce(xs[rank], addresses, slots[rank], rank, world_size, push=False)
        for rank in range(world_size):
            assert same_values(xs[rank], want), (world_size, call, rank)
            assert torch.equal(xs[rank].view(torch.int16), xs[0].view(torch.int16)), "ranks differ in bits"
        programs = -(-numel // lamport.BLOCK)
        calls[:programs] += 1
        for rank in range(world_size):
            assert torch.equal(slots[rank], calls % 3), (world_size, call, rank)
            assert bool((buffers[rank] == lamport.EMPTY).all()), f"rank {rank}'s buffer not emptied after call {call}"
print("checked")
"""


def test_lamport_kernel_sums_like_nccl_in_the_interpreter():
    run_in_triton_interpreter(CHECK, timeout_s=300)


# Two forked processes at once, over buffers in shared memory that both map at the same
# addresses: rank 0 runs whole calls (sends, then polling) as on GPUs; rank 1 pauses
# between its sends and its receives, so rank 0 sends its next call while rank 1 has yet
# to read this one (the case the rotating slots are for).
CONCURRENT = """
import multiprocessing, time, torch
from tests.workers.test_lamport_all_reduce import NUMELS, expected_sum, messages, same_values
from workers.kernels import lamport_all_reduce as lamport

world_size = 2
buffers = [torch.full((lamport.buffer_numel(world_size),), lamport.EMPTY, dtype=torch.int16).share_memory_()
           for _ in range(world_size)]
addresses = torch.tensor([b.data_ptr() for b in buffers], dtype=torch.int64)
calls = [(numel, torch.bfloat16 if i % 2 == 0 else torch.float16) for i, numel in enumerate(NUMELS * 2)]


def rank_main(rank, results):
    torch.set_num_threads(1)
    slots = torch.zeros(lamport.MAX_PROGRAMS, dtype=torch.int32)
    wrong = []
    for call, (numel, dtype) in enumerate(calls):
        parts = messages(world_size, numel, dtype, seed=call)
        got = parts[rank].clone()
        if rank == 0:
            lamport.lamport_all_reduce(got, addresses, slots, rank, world_size)
        else:  # slow between its sends and its receives: rank 0 runs into the next call meanwhile
            lamport.lamport_all_reduce(got, addresses, slots, rank, world_size, reduce=False)
            time.sleep(0.02)
            lamport.lamport_all_reduce(got, addresses, slots, rank, world_size, push=False)
        want = expected_sum(parts)
        if not same_values(got, want):  # what a failure needs to be read: the first wrong element's bits
            bad = (got.view(torch.int16) != want.view(torch.int16)) & ~(got.isnan() & want.isnan())
            i = int(bad.nonzero()[0])
            wrong.append(dict(call=call, numel=numel, wrong=int(bad.sum()), index=i, got=int(got.view(torch.int16)[i]),
                              want=int(want.view(torch.int16)[i]), sent=[int(p.view(torch.int16)[i]) for p in parts]))
    results.put((rank, wrong))


ctx = multiprocessing.get_context("fork")
results = ctx.Queue()
procs = [ctx.Process(target=rank_main, args=(rank, results)) for rank in range(world_size)]
for p in procs:
    p.start()
by_rank = dict(results.get(timeout=90) for _ in procs)  # a hang (e.g. a slot reused too soon) fails here
for p in procs:
    p.join(timeout=30)
assert by_rank == {0: [], 1: []}, by_rank
assert all(bool((b == lamport.EMPTY).all()) for b in buffers), "a buffer not emptied after the last call"
print("checked")
"""


def test_lamport_kernel_on_two_processes_at_once_in_the_interpreter():
    run_in_triton_interpreter(CONCURRENT, timeout_s=150)


def test_takes_only_contiguous_16_bit_messages_up_to_the_cap():
    assert takes(torch.ones(4096, dtype=torch.bfloat16))
    assert takes(torch.ones(MAX_NUMEL, dtype=torch.float16))
    assert not takes(torch.ones(MAX_NUMEL + 1, dtype=torch.bfloat16))
    assert not takes(torch.ones(4096, dtype=torch.float32))
    assert not takes(torch.ones(8, 8, dtype=torch.bfloat16).t())
    assert not takes(torch.ones(0, dtype=torch.bfloat16))


def _sequence(pg, numels):
    from workers.cuda_graphs import capture
    from workers.one_shot_all_reduce import try_one_shot_all_reduce

    device = torch.device("cuda", pg.rank)
    all_reduce = try_one_shot_all_reduce(pg, device)
    assert all_reduce is not None and all_reduce._lamport is not None, "the Lamport path is off"
    mismatches = []

    def check(label, x):
        expected = x.clone()
        dist.all_reduce(expected, group=pg._device_group)
        got = all_reduce(x.clone())
        if not same_values(got, expected):
            mismatches.append(label)

    generator = torch.Generator(device=device).manual_seed(7 + pg.rank)
    for round_ in range(3):
        for numel in numels:
            for dtype in (torch.bfloat16, torch.float16):
                check(("eager", round_, numel, str(dtype)),
                      torch.randn(numel, dtype=dtype, device=device, generator=generator))
    for dtype in (torch.bfloat16, torch.float16):  # NaN and Inf sums, as the interpreter test has them
        check(("nan and inf", str(dtype)), messages(2, 4096, dtype, seed=11)[pg.rank].to(device))
    # A graph of 64 calls on a decode row (a decode step's all-reduces), replayed between
    # eager calls of other sizes, as decode graphs run between eager prefills.
    static = torch.zeros(4096, dtype=torch.bfloat16, device=device)

    def halve_and_sum_64_times():
        work = static.clone()
        for _ in range(64):
            work = all_reduce(work * 0.5)
        return work

    graph, work = capture(halve_and_sum_64_times, None)
    for step in range(5):
        value = torch.randn(4096, dtype=torch.bfloat16, device=device, generator=generator)
        static.copy_(value)
        expected = value.clone()
        for _ in range(64):
            expected = expected * 0.5
            dist.all_reduce(expected, group=pg._device_group)
        graph.replay()
        if not torch.equal(work, expected):
            mismatches.append(("graph", step))
        check(("between replays", step), torch.randn(3000 + step, dtype=torch.bfloat16, device=device,
                                                     generator=generator))
    torch.cuda.synchronize()
    return mismatches


@pytest.mark.gpu
def test_lamport_all_reduce_equals_nccl_on_two_gpus():
    skip_unless_gpus(2)
    assert run_distributed(_sequence, 2, NUMELS, device="cuda") == [[], []]
