"""The one-shot all-reduce over symmetric memory sums exactly as NCCL does, eagerly and
replayed in a CUDA graph with new inputs (the decode graphs' use), on 2 GPUs."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.workers.conftest import run_distributed, skip_unless_gpus

# Element counts: two (4 bytes in bfloat16, the shortest the kernel takes), a decode row
# of the 1B and 8B shapes, four 8B rows, and the largest message it takes in bfloat16.
NUMELS = (2, 2048, 4096, 4 * 4096, 1 << 19)


def _sums(pg, numels):
    from workers.cuda_graphs import capture
    from workers.one_shot_all_reduce import MAX_BYTES, try_one_shot_all_reduce

    device = torch.device("cuda", pg.rank)
    all_reduce = try_one_shot_all_reduce(pg, device)
    assert all_reduce is not None, "one-shot all-reduce unavailable on one host of 2 GPUs"
    all_reduce._lamport = None  # symmetric memory for every size here (test_lamport_all_reduce has the rest)
    mismatches = []
    odd = torch.ones(3, dtype=torch.bfloat16, device=device)
    if all_reduce.fits(odd) or all_reduce.fits(torch.ones(16, dtype=torch.bfloat16, device=device)[1:9]):
        mismatches.append("fits() took a tensor the kernel rejects (6 bytes, or 2 bytes into its storage)")
    generator = torch.Generator(device=device).manual_seed(100 + pg.rank)
    for dtype in (torch.bfloat16, torch.float32):
        for numel in numels:
            x = torch.randn(numel, dtype=dtype, device=device, generator=generator)
            expected = x.clone()
            dist.all_reduce(expected, group=pg._device_group)
            if numel * x.element_size() > MAX_BYTES:  # the largest bfloat16 message, in float32
                if all_reduce.fits(x):
                    mismatches.append(("fits() took more than MAX_BYTES", str(dtype), numel))
                continue
            if not all_reduce.fits(x):
                mismatches.append(("fits() refused", str(dtype), numel))
                continue
            got = all_reduce(x.clone())
            if not torch.equal(got, expected):
                mismatches.append(("eager", str(dtype), numel))
    # In a graph: inputs written into a static tensor, the sum read from the graph's output.
    static = torch.zeros(4096, dtype=torch.bfloat16, device=device)
    graph, out = capture(lambda: all_reduce(static.clone()), None)
    for step in range(3):
        value = torch.randn(4096, dtype=torch.bfloat16, device=device, generator=generator)
        static.copy_(value)
        expected = value.clone()
        dist.all_reduce(expected, group=pg._device_group)
        graph.replay()
        if not torch.equal(out, expected):
            mismatches.append(("graph", step))
    torch.cuda.synchronize()
    return mismatches


@pytest.mark.gpu
def test_one_shot_all_reduce_equals_nccl_eagerly_and_in_a_graph():
    skip_unless_gpus(2)
    assert run_distributed(_sums, 2, NUMELS, device="cuda") == [[], []]


def test_bench_all_reduce_names_the_gpus_it_needs(monkeypatch):
    from scripts import bench_all_reduce

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit, match="needs 2 GPUs on this host, it has 1"):
        bench_all_reduce.main(["--world-size", "2"])


def test_bench_all_reduce_refuses_sizes_that_are_no_whole_message(capsys):
    from scripts import bench_all_reduce

    with pytest.raises(SystemExit):
        bench_all_reduce.parse_args(["--sizes", "8192", "6", "0"])
    assert "positive multiple of 4 bytes; got [6, 0]" in capsys.readouterr().err


@pytest.mark.gpu
def test_bench_all_reduce_prints_every_path_per_size(capsys):
    skip_unless_gpus(2)
    from scripts import bench_all_reduce

    bench_all_reduce.main(["--world-size", "2", "--sizes", "8192", "--repeats", "3"])
    lines = capsys.readouterr().out.splitlines()
    paths = [line.split(None, 1)[1].rsplit(None, 2)[0].strip() for line in lines[2:]]
    assert paths == ["Lamport", "one kernel (floor)", "symmetric-memory one-shot", "NCCL"], lines
