"""A shard's upload of a call's embeddings rows (workers/transfer.py): gather_rows copies
every prompt's rows into its own part of one buffer, piece by piece on a pool of threads,
whatever the rows' count, width and dtype; on CUDA (gpu marker), upload_rows gives each
prompt its own tensor on the device, equal to its rows. A shard uploads each array of a
call once, and leaves each request to its own path on CPU or when the upload cannot go."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from workers import transfer
from workers.transfer import gather_rows, upload_rows


def prompts_rows(shapes, dtype=torch.float32, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen).to(dtype) for shape in shapes]


@pytest.fixture()
def pool():
    with ThreadPoolExecutor(max_workers=3) as executor:
        yield executor


@pytest.mark.parametrize("shapes", [
    [(1, 64)],  # one row: one piece
    [(7, 64), (1, 64), (300, 64)],  # rows past one piece, and not a multiple of it
    [(256, 4096)] * 3,  # the 8B's width: 2 MiB prompts, two pieces each
])
def test_gather_rows_copies_each_prompt_into_its_own_part(monkeypatch, pool, shapes):
    monkeypatch.setattr(transfer, "UPLOAD_PIECE_BYTES", 1 << 12 if shapes[0][1] == 64 else 1 << 20)
    rows = prompts_rows(shapes)
    buffer = torch.full((sum(r.numel() for r in rows) + 5,), float("nan"))
    parts = gather_rows(rows, buffer, pool)
    assert [tuple(p.shape) for p in parts] == [tuple(s) for s in shapes]
    for part, source in zip(parts, rows):
        assert torch.equal(part, source)
    assert torch.isnan(buffer[-5:]).all(), "wrote past the parts"
    starts = [p.data_ptr() for p in parts]
    assert starts == sorted(starts) and len(set(starts)) == len(starts), "parts overlap"


def test_gather_rows_casts_to_the_buffers_dtype_and_reads_strided_rows(pool):
    wide = prompts_rows([(40, 96)], torch.float32)[0]
    strided = wide[:, ::3]  # (40, 32), not contiguous
    rows = [strided, prompts_rows([(9, 32)], torch.float16, seed=1)[0]]
    buffer = torch.empty(sum(r.numel() for r in rows), dtype=torch.bfloat16)
    parts = gather_rows(rows, buffer, pool)
    for part, source in zip(parts, rows):
        assert part.dtype == torch.bfloat16
        assert torch.equal(part, source.to(torch.bfloat16))


def test_gather_rows_without_a_pool_copies_the_same(monkeypatch, pool):
    monkeypatch.setattr(transfer, "UPLOAD_PIECE_BYTES", 256)
    rows = prompts_rows([(33, 16), (2, 16)])
    with_pool = gather_rows(rows, torch.empty(sum(r.numel() for r in rows)), pool)
    alone = gather_rows(rows, torch.empty(sum(r.numel() for r in rows)))
    for a, b, source in zip(with_pool, alone, rows):
        assert torch.equal(a, source) and torch.equal(b, source)


@pytest.mark.gpu
def test_upload_rows_gives_each_prompt_its_rows_on_the_device(pool):
    device = torch.device("cuda", 0)
    rows = prompts_rows([(256, 4096), (3, 4096), (600, 4096)], torch.bfloat16)
    uploaded = upload_rows(rows, device, torch.bfloat16, pool)
    torch.cuda.synchronize(device)
    for tensor, source in zip(uploaded, rows):
        assert tensor.device == device and tensor.dtype == torch.bfloat16
        assert torch.equal(tensor.cpu(), source)
    storages = {t.untyped_storage().data_ptr() for t in uploaded}
    assert len(storages) == len(uploaded), "prompts share a device buffer: one's rows would outlive it"


def _shard_on(monkeypatch, device_type: str, upload=None):
    """A ShardWorker with only what _upload_call reads: a runner on `device_type`, the
    config's dtype; upload_rows replaced by `upload`."""
    import types

    from workers import shard_worker

    shard = object.__new__(shard_worker.ShardWorker)
    shard.runner = types.SimpleNamespace(device=types.SimpleNamespace(type=device_type))
    shard.config = types.SimpleNamespace(torch_dtype=torch.bfloat16)
    shard._upload_pool = None
    if upload is not None:
        monkeypatch.setattr(shard_worker, "upload_rows", upload)
    return shard


def _news(shapes):
    from workers.messages import NewRequest, PromptEmbedsRef
    from workers.sampling_params import SamplingParams

    return [NewRequest(f"r{i}", None, PromptEmbedsRef(None, "float32", shape, index=i), SamplingParams())
            for i, shape in enumerate(shapes)]


def test_a_shard_uploads_a_calls_rows_together_by_their_index(monkeypatch):
    import numpy as np

    seen = []

    def upload(tensors, device, dtype, pool):
        seen.append(([tuple(t.shape) for t in tensors], dtype, pool is not None))
        return [f"device rows {i}" for i in range(len(tensors))]

    shard = _shard_on(monkeypatch, "cuda", upload)
    arrays = [np.zeros((3, 8), np.float32), np.ones((5, 8), np.float32)]
    news = _news([(3, 8), (5, 8)]) + _news([(3, 8)])[:1]  # a third request on the first array
    assert shard._upload_call(news, arrays) == {0: "device rows 0", 1: "device rows 1"}
    assert seen == [([(3, 8), (5, 8)], torch.bfloat16, True)]  # each array once, on the pool
    shard._upload_pool.shutdown()


def test_a_shard_leaves_each_request_to_its_own_path_on_cpu_or_when_the_upload_cannot_go(monkeypatch):
    import numpy as np

    arrays = [np.zeros((3, 8), np.float32)]
    assert _shard_on(monkeypatch, "cpu")._upload_call(_news([(3, 8)]), arrays) == {}

    def short_of_pinned_memory(*args):
        raise RuntimeError("CUDA error: out of memory")

    shard = _shard_on(monkeypatch, "cuda", short_of_pinned_memory)
    assert shard._upload_call(_news([(3, 8)]), arrays) == {}  # _take then meets the error per request
    assert shard._upload_call(_news([(3, 8), (3, 8)]), arrays[:1]) == {}  # no array for index 1
    shard._upload_pool.shutdown()
