"""CUDA-graph capture of decode steps: the whole sharded forward pass (tensor-parallel
all-reduces included) of a batch of single-token rows, captured once per batch-size
bucket and replayed with the step's inputs copied into static buffers. Host work per
step drops from ~1,500 kernel launches to one replay. Runs in each shard on CUDA."""

from __future__ import annotations

import torch

from workers.attention import AttentionMetadata
from workers.kernels import paged_attention

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class DecodeGraphs:
    """Static input buffers, one graph per bucket (captured on first use: every rank sees
    the same plan, so all ranks capture the same bucket at the same step)."""

    def __init__(self, model, kv_caches, *, max_num_seqs: int, max_blocks_per_seq: int,
                 block_size: int, scratch_block: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block  # padding rows write their K/V here, never read
        self.buckets = [b for b in BATCH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        size = self.buckets[-1]
        self.input_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.slot_mapping = torch.zeros(size, dtype=torch.long, device=device)
        self.rows = torch.arange(size + 1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(size, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(size, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    @staticmethod
    def supports(device: torch.device, head_dim: int, block_size: int) -> bool:
        return device.type == "cuda" and paged_attention.is_available(device, head_dim, block_size)

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def run(self, input_ids, positions, block_tables: list[list[int]]) -> torch.Tensor:
        """hidden [B, H] for B decode rows (token, position, block table per row)."""
        batch = len(input_ids)
        bucket = self.bucket_for(batch)
        self._load(input_ids, positions, block_tables, bucket)
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket)
        graph, hidden = self.graphs[bucket]
        graph.replay()
        return hidden[:batch]

    def _load(self, input_ids, positions, block_tables, bucket: int) -> None:
        """Copies the step's rows into the static buffers; rows past them up to the
        bucket are padding that writes to the scratch block and reads one key."""
        batch, bs = len(input_ids), self.block_size
        width = max(len(t) for t in block_tables)
        slots = [t[p // bs] * bs + p % bs for t, p in zip(block_tables, positions)]
        pad = bucket - batch
        self.input_ids[:bucket].copy_(torch.tensor(list(input_ids) + [0] * pad), non_blocking=True)
        self.positions[:bucket].copy_(torch.tensor(list(positions) + [0] * pad), non_blocking=True)
        self.slot_mapping[:bucket].copy_(
            torch.tensor(slots + [self.scratch_block * bs] * pad), non_blocking=True)
        lens = [p + 1 for p in positions] + [1] * pad
        self.seq_lens[:bucket].copy_(torch.tensor(lens, dtype=torch.int32), non_blocking=True)
        tables = [t + [0] * (width - len(t)) for t in block_tables] + [[self.scratch_block] * width] * pad
        self.block_tables[:bucket, :width].copy_(torch.tensor(tables, dtype=torch.int32), non_blocking=True)

    def _metadata(self, bucket: int) -> AttentionMetadata:
        """Metadata over the static buffers: all rows are decodes, no prefill spans."""
        return AttentionMetadata(
            positions=self.positions[:bucket],
            query_start_loc=self.rows[: bucket + 1],  # one row per request
            seq_lens=self.seq_lens[:bucket],
            block_tables=self.block_tables[:bucket],
            slot_mapping=self.slot_mapping[:bucket],
            decode_rows=self.rows[:bucket],
            decode_block_tables=self.block_tables[:bucket],
            decode_kv_positions=self.positions[:bucket, None],  # unused by the kernel path
            decode_q_positions=self.positions[:bucket, None],
            decode_seq_lens=self.seq_lens[:bucket],
            prefills=[],
        )

    def _capture(self, bucket: int):
        metadata = self._metadata(bucket)
        args = (self.input_ids[:bucket], self.positions[:bucket], metadata, self.kv_caches)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: allocator and kernel autotuning settle
            for _ in range(2):
                self.model(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            hidden = self.model(*args)
        self.pool = graph.pool()
        return graph, hidden
