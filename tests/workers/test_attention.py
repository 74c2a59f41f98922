"""Paged attention against dense causal attention on the same Q/K/V: random shapes,
non-contiguous block tables, mixed prefill/decode steps, chunked prefill, GQA, windows."""

from __future__ import annotations

import random

import pytest
import torch

from workers.attention import (
    Attention,
    AttentionMetadata,
    allocate_kv_caches,
    kv_cache_bytes_per_block,
)
from workers.config import ModelConfig
from workers.parallel import ProcessGroup


def _dense_reference(q, k, v, sliding_window):
    """q [L, h, d], k/v [L, kvh, d] of one whole sequence -> [L, h, d], in float32."""
    q, k, v = q.float(), k.float(), v.float()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
    i = torch.arange(q.shape[0])[:, None]
    j = torch.arange(q.shape[0])[None, :]
    visible = j <= i
    if sliding_window is not None:
        visible &= j > i - sliding_window
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _chunks(total: int, rng: random.Random) -> list[int]:
    """Random step sizes that add up to `total`: prefill chunks then some decodes."""
    sizes = []
    while sum(sizes) < total:
        sizes.append(min(total - sum(sizes), rng.choice([1, 1, 2, 3, 5, 9])))
    return sizes


def _block_tables(lengths, block_size, num_blocks, rng):
    """Non-contiguous, shuffled blocks from 1 .. num_blocks - 1 (block 0 is the null block)."""
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    tables = []
    for length in lengths:
        need = -(-length // block_size)
        tables.append([free.pop() for _ in range(need)])
    return tables


CASES = [
    # heads, kv_heads, head_dim, block_size, window, dtype
    (4, 4, 16, 4, None, torch.float32),
    (4, 2, 16, 4, None, torch.float32),
    (8, 1, 8, 1, None, torch.float32),
    (4, 2, 32, 16, None, torch.float32),
    (4, 2, 16, 4, 5, torch.float32),
    (6, 3, 16, 8, 1, torch.float32),
    (4, 2, 16, 4, 7, torch.bfloat16),
    (4, 2, 16, 4, None, torch.float16),
]


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,window,dtype", CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_paged_attention_matches_dense(heads, kv_heads, head_dim, block_size, window, dtype, seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    lengths = [rng.randint(1, 30) for _ in range(rng.randint(1, 5))]
    seqs = [[torch.randn(n, h, head_dim, generator=gen).to(dtype) for h in (heads, kv_heads, kv_heads)] for n in lengths]
    num_blocks = sum(-(-n // block_size) for n in lengths) + 3
    tables = _block_tables(lengths, block_size, num_blocks, rng)
    shape = (num_blocks, block_size, kv_heads, head_dim)
    # Large finite garbage everywhere but the null block (the cache is zero-initialized and
    # freed blocks keep stale finite values): any slot read without masking shows up.
    kv_cache = tuple((torch.randn(shape, generator=gen) * 1e3).to(dtype) for _ in range(2))
    kv_cache[0][0].zero_(), kv_cache[1][0].zero_()
    attention = Attention(heads, kv_heads, head_dim, window)
    outputs = [torch.full((n, heads, head_dim), float("nan")) for n in lengths]
    chunks = [_chunks(n, rng) for n in lengths]
    done = [0] * len(lengths)
    while any(chunks):
        batch = [r for r in range(len(lengths)) if chunks[r]]
        new = [chunks[r].pop(0) for r in batch]
        meta = AttentionMetadata.build([done[r] for r in batch], new, [tables[r] for r in batch], block_size, "cpu")
        q, k, v = (torch.cat([seqs[r][i][done[r] : done[r] + n] for r, n in zip(batch, new)]) for i in range(3))
        out = attention(q, k, v, kv_cache, meta)
        for r, n, start in zip(batch, new, meta.query_start_loc.tolist()):
            outputs[r][done[r] : done[r] + n] = out[start : start + n].float()
            done[r] += n
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for r in range(len(lengths)):
        torch.testing.assert_close(outputs[r], _dense_reference(*seqs[r], window), atol=tol, rtol=tol)
    assert (kv_cache[0][0] == 0).all() and (kv_cache[1][0] == 0).all()


def test_metadata_locates_rows_in_the_paged_cache():
    # request 0: 2 cached + 3 new, blocks [7, 2]; request 1: decode at position 4, blocks [5, 9]
    meta = AttentionMetadata.build([2, 4], [3, 1], [[7, 2], [5, 9, 3]], 4, "cpu")
    assert meta.positions.tolist() == [2, 3, 4, 4]
    assert meta.query_start_loc.tolist() == [0, 3, 4]
    assert meta.seq_lens.tolist() == [5, 5]
    assert meta.block_tables.tolist() == [[7, 2, 0], [5, 9, 3]]
    assert meta.slot_mapping.tolist() == [7 * 4 + 2, 7 * 4 + 3, 2 * 4 + 0, 9 * 4 + 0]
    assert meta.decode_rows.tolist() == [3]
    assert meta.decode_block_tables.tolist() == [[5, 9]]
    assert meta.decode_kv_positions.tolist() == [[0, 1, 2, 3, 4, -1, -1, -1]]
    assert [(p.row_start, p.row_end, p.num_computed) for p in meta.prefills] == [(0, 3, 2)]
    assert meta.prefills[0].kv_slots.tolist() == [28, 29, 30, 31, 8]
    assert meta.decode_mask(2)[0, 0, 0].tolist() == [False, False, False, True, True, False, False, False]
    batch = meta.prefill_batch  # the kernel's view: the span's rows gathered, then scattered back
    assert batch.rows.tolist() == [0, 1, 2] and batch.query_start_loc.tolist() == [0, 3]
    assert batch.seq_lens.tolist() == [5] and batch.max_query_len == 3 and not batch.covers_all_rows
    # Spans only (no decodes): the kernel reads and writes the step's rows in place.
    only_spans = AttentionMetadata.build([0, 2], [2, 3], [[1], [4, 6]], 4, "cpu").prefill_batch
    assert only_spans.covers_all_rows and only_spans.rows.tolist() == [0, 1, 2, 3, 4]


def test_metadata_rejects_inconsistent_batches():
    with pytest.raises(ValueError, match="holds 4 tokens"):
        AttentionMetadata.build([3], [2], [[1]], 4, "cpu")
    with pytest.raises(ValueError, match="one entry per request"):
        AttentionMetadata.build([0, 0], [1], [[1]], 4, "cpu")
    with pytest.raises(ValueError, match="num_new_tokens must be >= 1"):
        AttentionMetadata.build([0], [0], [[1]], 4, "cpu")


def _config(kv_heads: int) -> ModelConfig:
    return ModelConfig(
        architecture="LlamaForCausalLM",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        vocab_size=100,
    )


@pytest.mark.parametrize("kv_heads,tp,local_kv", [(2, 1, 2), (2, 2, 1), (2, 4, 1), (4, 2, 2)])
def test_kv_cache_allocation_and_size(kv_heads, tp, local_kv):
    config = _config(kv_heads)
    caches = allocate_kv_caches(config, ProcessGroup(0, tp), 6, 8, torch.bfloat16, "cpu")
    assert len(caches) == 3
    for k_cache, v_cache in caches:
        assert k_cache.shape == v_cache.shape == (6, 8, local_kv, 16)
        assert k_cache.dtype == torch.bfloat16
        assert (k_cache[0] == 0).all() and (v_cache[0] == 0).all()
    per_block = kv_cache_bytes_per_block(config, tp, 8, torch.bfloat16)
    assert per_block == sum(k[1].nbytes + v[1].nbytes for k, v in caches)
    with pytest.raises(ValueError, match="null block"):
        allocate_kv_caches(config, ProcessGroup(), 1, 8, torch.float32, "cpu")
