"""The Triton paged decode-attention kernel against a dense reference on random inputs of
many shapes, block tables and lengths: on CUDA (gpu marker), and on CPU through Triton's
interpreter where Triton is installed."""

from __future__ import annotations

import random

import pytest
import torch

from tests.workers.conftest import run_in_triton_interpreter

# (heads, kv_heads, head_dim, block_size, window, dtype)
CASES = [
    (4, 4, 16, 16, None, torch.float32),
    (8, 2, 32, 16, None, torch.float32),
    (8, 1, 64, 8, None, torch.float32),
    (6, 2, 32, 16, 5, torch.float32),
    (32, 8, 128, 16, None, torch.bfloat16),
    (16, 4, 64, 16, 21, torch.float16),
]


def _case(heads, kv_heads, head_dim, block_size, dtype, device, seed, max_len=70):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    lens = [rng.randint(1, max_len) for _ in range(rng.randint(1, 6))]
    num_blocks = sum(-(-n // block_size) for n in lens) + 4
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    width = max(-(-n // block_size) for n in lens) + 1  # one unused column past every length
    tables = [[free.pop() for _ in range(-(-n // block_size))] for n in lens]
    tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    # Finite garbage everywhere: any slot read without masking changes the result.
    k_cache = (torch.randn(shape, generator=gen) * 3).to(dtype)
    v_cache = (torch.randn(shape, generator=gen) * 3).to(dtype)
    q = torch.randn(len(lens), heads, head_dim, generator=gen).to(dtype)
    to = dict(device=device)
    return q.to(**to), k_cache.to(**to), v_cache.to(**to), tables.to(**to), torch.tensor(lens, dtype=torch.int32, **to)


def _reference(q, k_cache, v_cache, tables, lens, scale, window):
    """Dense attention of each query (position len - 1) over its gathered context, float32."""
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    outs = []
    for b, n in enumerate(lens.tolist()):
        slots = torch.arange(n, device=q.device)
        blocks = tables[b].long()[slots // block_size]
        k = k_cache[blocks, slots % block_size].float()  # [n, kvh, d]
        v = v_cache[blocks, slots % block_size].float()
        group = q.shape[1] // kv_heads
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        if window is not None:
            scores[:, slots <= n - 1 - window] = float("-inf")
        outs.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), v))
    return torch.stack(outs)


def _check(kernels, case, device, seed, num_splits=None, max_len=70):
    """num_splits: programs per (sequence, KV head), None for the kernel's own choice;
    longer contexts (max_len) give every split several tiles, shorter ones leave some empty."""
    heads, kv_heads, head_dim, block_size, window, dtype = case
    q, k_cache, v_cache, tables, lens = _case(heads, kv_heads, head_dim, block_size, dtype, device, seed, max_len)
    scale = head_dim**-0.5
    out = kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale, window, num_splits)
    expected = _reference(q, k_cache, v_cache, tables, lens, scale, window)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tol, rtol=tol)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("num_splits, max_len", [(None, 70), (None, 600), (1, 600), (5, 600)])
def test_kernel_matches_reference_on_cuda(case, seed, num_splits, max_len):
    from workers.kernels import paged_attention

    assert paged_attention.is_available(torch.device("cuda"), case[2], case[3])
    _check(paged_attention, case, "cuda", seed, num_splits, max_len)


def test_kernel_logic_in_triton_interpreter():
    """The kernel's indexing and online softmax, run by Triton's CPU interpreter in a fresh
    process (the interpreter must be chosen before the kernel is decorated)."""
    run_in_triton_interpreter(
        "import torch\n"
        "from tests.workers.test_paged_attention_kernel import CASES, _check\n"
        "from workers.kernels import paged_attention\n"
        "for case in [c for c in CASES if c[-1] == torch.float32]:\n"
        "    for seed in range(2):\n"
        "        for num_splits, max_len in ((1, 70), (3, 70), (4, 300)):\n"
        "            _check(paged_attention, case, 'cpu', seed, num_splits, max_len)\n"
        "print('checked')\n"
    )
