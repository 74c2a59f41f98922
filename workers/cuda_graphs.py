"""CUDA-graph capture of decode steps: the whole sharded forward pass (tensor-parallel
all-reduces included) and the LM head with its logits gather, of a batch of single-token
rows, captured once per batch-size bucket when the engine starts (as vLLM does, so no
request pays for a capture) and replayed with the step's inputs copied into static
buffers. Host work per step drops from ~1,500 kernel launches to one replay. Runs in each
shard on CUDA."""

from __future__ import annotations

import logging
import time
from collections import Counter

import torch

from workers.attention import AttentionMetadata
from workers.kernels import paged_attention

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)

logger = logging.getLogger(__name__)


class DecodeGraphs:
    """Static input buffers and one graph per bucket, all captured by capture_all() (every
    rank captures the same buckets in the same order, so their collectives pair up)."""

    def __init__(self, model, kv_caches, *, max_num_seqs: int, max_blocks_per_seq: int,
                 block_size: int, scratch_block: int, device: torch.device):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block  # padding rows write their K/V here, never read
        self.buckets = [b for b in BATCH_BUCKETS if b < max_num_seqs] + [max_num_seqs]
        size = self.buckets[-1]
        # Static inputs: rows of `small` are token ids, positions, cache slots, seq lens.
        self.small = torch.zeros(4, size, dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slot_mapping, self.seq_lens = self.small.unbind(0)
        self.rows = torch.arange(size + 1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(size, max_blocks_per_seq, dtype=torch.int32, device=device)
        # Two pinned staging sets, used in turn: a step's inputs are copied while the step
        # before it may still run (async scheduling), never while the one before that does.
        pinned = device.type == "cuda"
        self.staging = [(torch.zeros(4, size, dtype=torch.long, pin_memory=pinned),
                         torch.zeros(size, max_blocks_per_seq, dtype=torch.int32, pin_memory=pinned))
                        for _ in range(2)]
        self._num_loads = 0
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}  # logits
        self.replays: Counter[int] = Counter()  # per bucket
        self.pool = None

    def capture_all(self) -> None:
        """Captures every bucket, largest first (its memory pool then serves the smaller
        ones), on padding inputs: every row writes its K/V to the scratch block."""
        started = time.monotonic()
        self.input_ids.zero_()
        self.positions.zero_()
        self.slot_mapping.fill_(self.scratch_block * self.block_size)
        self.seq_lens.fill_(1)
        self.block_tables.fill_(self.scratch_block)
        for bucket in reversed(self.buckets):
            self.graphs[bucket] = self._capture(bucket)
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s in %.1f s",
                    self.buckets, time.monotonic() - started)

    @staticmethod
    def supports(device: torch.device, head_dim: int, block_size: int) -> bool:
        return device.type == "cuda" and paged_attention.is_available(device, head_dim, block_size)

    def bucket_for(self, batch: int) -> int | None:
        return next((b for b in self.buckets if b >= batch), None)

    def run(self, input_ids, positions, block_tables: list[list[int]],
            fed_tokens: tuple[slice | torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | None:
        """float32 logits [B, vocab] for B decode rows (token, position, block table per
        row) on the leader, None on the others; fed_tokens (index, tokens on the device)
        overwrite the input ids at index. The LM head and its gather run inside the graph."""
        batch = len(input_ids)
        bucket = self.bucket_for(batch)
        self._load(input_ids, positions, block_tables, bucket)
        if fed_tokens is not None:
            index, tokens = fed_tokens
            self.input_ids[index] = tokens
        graph, logits = self.graphs[bucket]
        graph.replay()
        self.replays[bucket] += 1
        return logits[:batch] if logits is not None else None

    def _load(self, input_ids, positions, block_tables, bucket: int) -> None:
        """Copies the step's rows into the static buffers (two host-to-device copies);
        rows past them up to the bucket are padding that writes to the scratch block
        and reads one key."""
        batch, bs = len(input_ids), self.block_size
        width = max(len(t) for t in block_tables)
        slots = [t[p // bs] * bs + p % bs for t, p in zip(block_tables, positions)]
        pad = bucket - batch
        small, tables = self.staging[self._num_loads % 2]
        self._num_loads += 1
        small[:, :bucket] = torch.tensor([
            list(input_ids) + [0] * pad,
            list(positions) + [0] * pad,
            slots + [self.scratch_block * bs] * pad,
            [p + 1 for p in positions] + [1] * pad,
        ])
        rows = [t + [0] * (width - len(t)) for t in block_tables] + [[self.scratch_block] * width] * pad
        tables[:bucket, :width] = torch.tensor(rows, dtype=torch.int32)
        self.small[:, :bucket].copy_(small[:, :bucket], non_blocking=True)
        self.block_tables[:bucket, :width].copy_(tables[:bucket, :width], non_blocking=True)

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
                self.model.compute_logits(self.model(*args))
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = self.model.compute_logits(self.model(*args))
        self.pool = graph.pool()
        return graph, logits
