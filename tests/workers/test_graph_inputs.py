"""What the captured graphs' _load stages for a step, on CPU (the buffers a replay reads):
each row's token, position, cache slot and key count, each request's block table, and the
padding rows up to the bucket, which write to the scratch block only."""

from __future__ import annotations

import torch

from workers.attention import NULL_BLOCK
from workers.cuda_graphs import DecodeGraphs, GraphSpan, PrefillGraphs

BS, SCRATCH = 4, 99


def test_decode_rows_and_padding():
    graphs = DecodeGraphs(None, [], max_num_seqs=8, max_blocks_per_seq=6, block_size=BS, scratch_block=SCRATCH,
                          device=torch.device("cpu"))
    tables = [[7], [3, 8, 12], [5, 6]]
    positions = [2, 9, 4]  # blocks 0, 2 and 1 of their tables
    graphs._load([11, 12, 13], positions, tables, bucket=4)
    ids, pos, slots, lens = graphs.small[:, :4].tolist()
    assert ids == [11, 12, 13, 0] and pos == [2, 9, 4, 0] and lens == [3, 10, 5, 1]
    assert slots == [7 * BS + 2, 12 * BS + 1, 6 * BS + 0, SCRATCH * BS]
    assert graphs.block_tables[:4, :3].tolist() == [[7, 0, 0], [3, 8, 12], [5, 6, 0], [SCRATCH] * 3]
    # A later, smaller step leaves no row of the earlier one among its own.
    graphs._load([21], [5], [[4, 2]], bucket=2)
    assert graphs.small[:, :2].tolist() == [[21, 0], [5, 0], [2 * BS + 1, SCRATCH * BS], [6, 1]]
    assert graphs.block_tables[:2, :2].tolist() == [[4, 2], [SCRATCH, SCRATCH]]


def test_prefill_spans_rows_and_padding():
    graphs = PrefillGraphs(None, [], max_tokens=64, max_blocks_per_seq=4, block_size=BS, scratch_block=SCRATCH,
                           hidden_size=8, dtype=torch.float32, device=torch.device("cpu"), max_spans=4)
    embeds = torch.ones(2, 8)
    spans = [GraphSpan(ids=[5, 6, 7], num_computed=3, block_table=[10, 11], embeds=[], sampled=True),  # a chunk's rest
             GraphSpan(ids=[0], num_computed=6, block_table=[20, 21], embeds=[], sampled=True),  # a decode
             GraphSpan(ids=[0, 0, 9], num_computed=0, block_table=[30], embeds=[(0, embeds)], sampled=False)]
    graphs._load(spans, bucket=16)
    ids, pos, slots = graphs.small[:, :16].tolist()
    assert ids == [5, 6, 7, 0, 0, 0, 9] + [0] * 9
    assert pos[:7] == [3, 4, 5, 6, 0, 1, 2] and pos[7:] == [p % BS for p in range(9)]
    assert slots[:7] == [10 * BS + 3, 11 * BS + 0, 11 * BS + 1, 21 * BS + 2, 30 * BS + 0, 30 * BS + 1, 30 * BS + 2]
    assert slots[7:] == [SCRATCH * BS + p % BS for p in range(9)]
    k = graphs.max_spans
    starts, lens, sampled = graphs.query_start_loc.tolist(), graphs.seq_lens.tolist(), graphs.sample_rows.tolist()
    assert starts == [0, 3, 4, 7, 7, 16] and lens == [6, 7, 3, 0, 9] and sampled[:2] == [2, 3]
    tables = graphs.block_tables.tolist()
    width = len(tables[0])
    assert tables[:3] == [[10, 11] + [NULL_BLOCK] * (width - 2), [20, 21] + [NULL_BLOCK] * (width - 2),
                          [30] + [NULL_BLOCK] * (width - 1)]
    assert tables[3] == [NULL_BLOCK] * width and tables[k] == [SCRATCH] * width
    assert graphs.embeds_mask[:16].tolist() == [False] * 4 + [True, True] + [False] * 10
