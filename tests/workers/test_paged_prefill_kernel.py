"""The Triton paged prefill-attention kernel against a dense float32 reference: batches of
requests with different row counts and earlier context, shuffled block tables, GQA groups
and sliding windows; on CUDA (gpu marker), and on CPU through Triton's interpreter."""

from __future__ import annotations

import random

import pytest
import torch

from tests.workers.conftest import run_in_triton_interpreter

# (heads, kv_heads, head_dim, block_size, window, dtype)
CASES = [
    (2, 2, 16, 16, None, torch.float32),
    (4, 1, 32, 16, None, torch.float32),
    (7, 1, 16, 32, 21, torch.float32),
    (8, 2, 64, 16, 5, torch.float32),
    (2, 2, 32, 16, 3, torch.float32),  # narrow window: some rows see no key of a whole key step
    (3, 3, 16, 32, 40, torch.float32),
    (8, 2, 64, 16, None, torch.float16),
    (7, 1, 16, 16, 21, torch.bfloat16),
    (32, 8, 128, 16, None, torch.bfloat16),
    (28, 4, 128, 32, 37, torch.bfloat16),
    (8, 8, 64, 16, 100, torch.float16),
    (16, 2, 256, 16, None, torch.bfloat16),
]

# Each batch: (num_computed, num_rows) per request, as one step mixes them: fresh prompts,
# chunked-prefill continuations and decodes (one row).
BATCHES = [
    [(0, 17), (5, 1), (40, 64), (0, 2), (13, 100)],
    [(0, 1), (70, 1), (0, 64), (33, 1)],
    [(3, 2), (0, 100), (1, 17)],
    [(90, 38)],
]
# As captured steps give the kernel on a block map: requests of no rows among them.
MAPPED_BATCHES = [[(0, 17), (5, 0), (40, 1), (0, 0), (3, 30)], [(0, 0), (7, 2)]]
# block_m / block_n for the kernel; {} for its defaults.
TILES = [{}, {"block_m": 16, "block_n": 16}, {"block_m": 64, "block_n": 16}, {"block_m": 32, "block_n": 32}]
GPU_BATCHES = BATCHES + [
    [(0, 256)] * 31 + [(random.Random(r).randint(1, 900), 1) for r in range(225)],  # a mixed 8k step
    [(1000, 512), (0, 1), (3000, 257)],
]


def _tables(lens, block_size, rng):
    """Shuffled distinct blocks per request, padded with block 0 past its length; block 0
    holds garbage like the rest, so reading padding or a slot past a length changes a row."""
    num_blocks = sum(-(-n // block_size) for n in lens) + 3
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    width = max(-(-n // block_size) for n in lens) + 1
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
    return num_blocks, torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)


def _case(case, batch, device, seed):
    heads, kv_heads, head_dim, block_size, _, dtype = case
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    batch = rng.sample(batch, len(batch))
    lens = [c + n for c, n in batch]
    num_blocks, tables = _tables(lens, block_size, rng)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = (torch.randn(shape, generator=gen) * 2).to(dtype)
    v_cache = (torch.randn(shape, generator=gen) * 2).to(dtype)
    num_tokens = sum(n for _, n in batch)
    # q as a view into a wider row (as a fused QKV projection would leave it): strided rows.
    q = (torch.randn(num_tokens, heads + 2, head_dim, generator=gen) * 2).to(dtype)[:, 1 : heads + 1]
    starts = [0]
    for _, n in batch:
        starts.append(starts[-1] + n)
    index = dict(device=device, dtype=torch.int64 if seed % 2 else torch.int32)  # both, as callers may
    return (q.to(device), k_cache.to(device), v_cache.to(device), tables.to(**index),
            torch.tensor(starts, **index), torch.tensor(lens, **index), max(n for _, n in batch))


def _reference(q, k_cache, v_cache, tables, starts, lens, scale, window):
    """Each request's rows (its last positions) against its gathered keys, float32."""
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for r, seq_len in enumerate(lens.tolist()):
        rows = slice(int(starts[r]), int(starts[r + 1]))
        k_pos = torch.arange(seq_len, device=q.device)
        q_pos = k_pos[seq_len - (rows.stop - rows.start) :]
        blocks = tables[r].long()[k_pos // block_size]
        k = k_cache[blocks, k_pos % block_size].float().repeat_interleave(group, dim=1)  # [n, h, d]
        v = v_cache[blocks, k_pos % block_size].float().repeat_interleave(group, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[rows].float(), k) * scale
        visible = k_pos[None, :] <= q_pos[:, None]
        if window is not None:
            visible &= k_pos[None, :] > q_pos[:, None] - window
        scores = scores.masked_fill(~visible, float("-inf"))
        out[rows] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def _check(kernels, case, batch, device, seed, mapped=False, **tiles):
    """tiles: block_m / block_n for the kernel (its defaults if none). mapped: launched on
    a block map (as captured steps are) with a few programs to spare, not on the grid of
    the longest request."""
    window, dtype = case[4], case[5]
    q, k_cache, v_cache, tables, starts, lens, max_rows = _case(case, batch, device, seed)
    scale = case[2] ** -0.5
    if mapped:
        per_program = kernels.query_rows_per_program(case[0], case[1], tiles.get("block_m", kernels.BLOCK_M))
        query_lens = (starts[1:] - starts[:-1]).tolist()
        num_programs = sum(-(-n // per_program) for n in query_lens) + 3
        flat = kernels.query_block_map(query_lens, per_program, num_programs)
        tiles = {**tiles, "block_map": torch.tensor(flat, dtype=torch.int32, device=device).view(-1, 2)}
    out = kernels.paged_prefill_attention(q, k_cache, v_cache, tables, starts, lens, scale, window,
                                          max_query_len=max_rows, **tiles)
    assert out.dtype == q.dtype and out.shape == q.shape
    expected = _reference(q, k_cache, v_cache, tables, starts, lens, scale, window)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


def test_reference_matches_sdpa():
    """The dense reference agrees with SDPA's causal GQA attention for a fresh prompt."""
    case = (6, 2, 16, 16, None, torch.float32)
    q, k_cache, v_cache, tables, starts, lens, _ = _case(case, [(0, 40)], "cpu", 0)
    expected = _reference(q, k_cache, v_cache, tables, starts, lens, 0.25, None)
    pos = torch.arange(40)
    k = k_cache[tables[0].long()[pos // 16], pos % 16]
    v = v_cache[tables[0].long()[pos // 16], pos % 16]
    sdpa = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(sdpa.transpose(0, 1), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch", range(len(MAPPED_BATCHES)))
def test_kernel_on_a_block_map_matches_reference_on_cuda(case, batch):
    from workers.kernels import paged_prefill

    _check(paged_prefill, case, MAPPED_BATCHES[batch], "cuda", seed=batch, mapped=True)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("batch", range(len(GPU_BATCHES)))
@pytest.mark.parametrize("tiles", TILES + [{"block_m": 128, "block_n": 32}])
def test_kernel_matches_reference_on_cuda(case, batch, tiles):
    from workers.kernels import paged_prefill

    assert paged_prefill.is_available(torch.device("cuda"), case[2], case[3])
    _check(paged_prefill, case, GPU_BATCHES[batch], "cuda", seed=batch, **tiles)


def test_is_available_only_on_cuda_with_power_of_two_shapes():
    from workers.kernels import paged_prefill

    assert not paged_prefill.is_available(torch.device("cpu"), 64, 16)
    if paged_prefill.triton is not None:
        cuda = torch.device("cuda")
        assert paged_prefill.is_available(cuda, 128, 16)
        assert not paged_prefill.is_available(cuda, 96, 16)
        assert not paged_prefill.is_available(cuda, 8, 16)
        assert not paged_prefill.is_available(cuda, 64, 24)


def test_kernel_logic_in_triton_interpreter():
    """Indexing, masks and online softmax under Triton's CPU interpreter (fresh process:
    the interpreter must be chosen before the kernel is decorated). Small tiles give every
    program several key steps and query blocks. Small head dims keep it quick; bfloat16 is
    left to the CUDA test (the interpreter's tl.dot of bfloat16 tiles returns garbage)."""
    run_in_triton_interpreter(
        "from tests.workers.test_paged_prefill_kernel import BATCHES, CASES, MAPPED_BATCHES, TILES, _check\n"
        "from workers.kernels import paged_prefill\n"
        "import torch\n"
        "cases = [c for c in CASES if c[2] <= 64 and c[5] != torch.bfloat16]\n"
        "for index, case in enumerate(cases):\n"
        "    for seed, batch in enumerate(BATCHES):\n"
        "        tiles = TILES[(index + seed) % len(TILES)]\n"
        "        _check(paged_prefill, case, batch, 'cpu', seed, **tiles)\n"
        "for index, case in enumerate(cases[:3]):\n"  # on a block map, with requests of no rows
        "    for seed, batch in enumerate(MAPPED_BATCHES):\n"
        "        _check(paged_prefill, case, batch, 'cpu', seed, mapped=True, **TILES[(index + seed) % len(TILES)])\n"
        "print('checked')\n"
    )
