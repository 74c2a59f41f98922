"""CUDA-graph capture of steps: the whole sharded forward pass (tensor-parallel all-reduces
included) and the LM head with its logits gather, captured once per bucket when the engine
starts (as vLLM does, so no request pays for a capture) and replayed with the step's
inputs copied into static buffers. Host work per step drops from ~1,500 kernel launches
to one replay. Runs in each shard on CUDA.

- DecodeGraphs: a batch of single-token rows, per batch-size bucket.
- PrefillGraphs: steps of prefills (or prefill chunks) and decodes of up to 2,048 rows
  in up to 64 requests, per row-count bucket: the step an idle engine runs for new
  requests, whose launches (~30 per layer) otherwise cost the host about three times the
  GPU's time (8B shape, 128 rows), and at TP=2 still more than the GPU's at 2,048 rows."""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from workers.attention import NULL_BLOCK, AttentionMetadata, PrefillBatch
from workers.kernels import paged_attention, paged_prefill
from workers.kernels.paged_prefill import query_block_map

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
# Rows of a step the prefill graphs run: every 256 rows past 512, to 2,048 (vLLM's default step).
PREFILL_BUCKETS = (16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048)
MAX_GRAPH_SPANS = 64  # requests in a step the prefill graphs run (decodes among them)

logger = logging.getLogger(__name__)


class Staging:
    """Pinned host buffers that a step's inputs are written into, then copied to the device
    without a host wait, used in turn. A buffer is written again only once the copies out
    of it have run: the host runs ahead of the device by any number of steps that sample
    nothing (a long prompt's prefill chunks), and a buffer rewritten under a pending copy
    would give that step another step's inputs. `make(pinned)` builds one set of buffers,
    pinned on CUDA."""

    def __init__(self, make, device: torch.device, count: int = 2):
        self._cuda = device.type == "cuda"
        self.buffers = [make(self._cuda) for _ in range(count)]
        self._copied = [None] * count  # per set: an event after the last copies out of it
        self.loads = 0  # sets taken so far

    def take(self):
        """The next set, once the device has copied out of it (a host wait only when the
        device is `count` loads behind)."""
        index = self.loads % len(self.buffers)
        self.loads += 1
        if self._copied[index] is not None:
            self._copied[index].synchronize()
        return self.buffers[index]

    def copies_queued(self) -> None:
        """After queuing the copies out of the set take() gave: marks when they will have run."""
        if self._cuda:
            index = (self.loads - 1) % len(self.buffers)
            event = self._copied[index] or torch.cuda.Event()
            event.record()
            self._copied[index] = event


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
        self.staging = Staging(lambda pinned: (torch.zeros(4, size, dtype=torch.long, pin_memory=pinned),
                                               torch.zeros(size, max_blocks_per_seq, dtype=torch.int32,
                                                           pin_memory=pinned)),
                               device)
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
        if not self.graphs:  # not captured (a CPU check of the padding): the same inputs, eagerly
            return self._forward(bucket)[:batch]
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
        small, tables = self.staging.take()
        staged, table_rows = small.numpy(), tables.numpy()  # filled from lists in numpy (see PrefillGraphs._load)
        for row, table in zip(table_rows, block_tables):
            row[:len(table)] = table
            row[len(table):width] = 0
        table_rows[batch:bucket, :width] = self.scratch_block
        positions = np.asarray(positions, dtype=np.int64)
        staged[0, :batch], staged[1, :batch], staged[3, :batch] = input_ids, positions, positions + 1
        staged[2, :batch] = table_rows[np.arange(batch), positions // bs] * bs + positions % bs
        staged[:, batch:bucket] = np.array([[0], [0], [self.scratch_block * bs], [1]])
        self.small[:, :bucket].copy_(small[:, :bucket], non_blocking=True)
        self.block_tables[:bucket, :width].copy_(tables[:bucket, :width], non_blocking=True)
        self.staging.copies_queued()

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

    def _forward(self, bucket: int) -> torch.Tensor | None:
        hidden = self.model(self.input_ids[:bucket], self.positions[:bucket], self._metadata(bucket), self.kv_caches)
        return self.model.compute_logits(hidden)

    def _capture(self, bucket: int):
        graph, logits = capture(lambda: self._forward(bucket), self.pool)
        self.pool = graph.pool()
        return graph, logits


def capture(forward, pool):
    """(graph, forward's output tensor) of `forward` captured into `pool`, after two
    warm-up runs on a side stream (the allocator and kernel autotuning settle)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = forward()
    return graph, out


@dataclass(frozen=True)
class GraphSpan:
    """One request's rows in a step the prefill graphs run: token ids at positions
    num_computed.. (embedding rows read as 0), its block table, its embedding rows (on the
    device) as (offset among its rows, rows) pieces, none for rows of token ids only, and
    whether its last row samples."""

    ids: list[int]
    num_computed: int
    block_table: list[int]
    embeds: list[tuple[int, torch.Tensor]]
    sampled: bool


class PrefillGraphs:
    """Steps of up to `max_spans` requests' rows (prefills, prefill chunks, and decodes as
    one-row spans), n rows in all, replayed in the graph of the smallest bucket T >= n.
    Every row goes through the prefill kernel, whose programs a block map assigns to the
    spans' query blocks (a grid of about T / rows_per_program + max_spans programs per KV
    head, fixed per bucket): the requests' spans, empty spans up to max_spans (no
    programs), then T - n padding rows (possibly none) that
    form a span of their own, whose keys live in the scratch block, so they neither write
    nor read a real request's cache (its table row reaches a whole bucket's keys, which may
    be more than max_model_len). Embedding rows, if any, are copied into a
    static buffer and selected by a mask, so one graph serves token ids and prompt_embeds.
    Logits are those of each sampled span's last row, in span order. Every rank captures the
    same buckets in the same order."""

    def __init__(self, model, kv_caches, *, max_tokens: int, max_blocks_per_seq: int, block_size: int,
                 scratch_block: int, hidden_size: int, dtype: torch.dtype, device: torch.device,
                 max_spans: int = MAX_GRAPH_SPANS, rows_per_program: int = 1):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.max_spans = max_spans
        self.buckets = [b for b in PREFILL_BUCKETS if b <= max_tokens]
        size = self.buckets[-1] if self.buckets else 0
        k = max_spans
        # Static inputs: rows of `small` are token ids, positions, cache slots; `spans` holds
        # the spans' query starts (k + 2: k spans, the padding span, the end), their key
        # counts (k + 1) and the sampled rows (k).
        self.small = torch.zeros(3, size, dtype=torch.long, device=device)
        self.input_ids, self.positions, self.slot_mapping = self.small.unbind(0)
        self.spans = torch.zeros(3 * k + 3, dtype=torch.long, device=device)
        self.query_start_loc, self.seq_lens, self.sample_rows = self.spans.split([k + 2, k + 1, k])
        # The padding span holds up to a whole bucket's rows (all of them at capture), which
        # may be more than max_model_len: its table row must reach that many keys.
        width = max(max_blocks_per_seq, -(-size // block_size))
        self.block_tables = torch.zeros(k + 1, width, dtype=torch.long, device=device)
        self.embeds = torch.zeros(size, hidden_size, dtype=dtype, device=device)
        self.embeds_mask = torch.zeros(size, dtype=torch.bool, device=device)
        self.rows = torch.arange(size, dtype=torch.long, device=device)
        self.no_rows = torch.zeros(0, dtype=torch.long, device=device)
        self.no_lens = torch.zeros(0, dtype=torch.int32, device=device)
        # The prefill kernel's programs, one per query block of each span, in a grid fixed per
        # bucket: each span adds at most one partial block (the kernel's rows_per_program).
        self.rows_per_program = rows_per_program
        num_programs = self.num_programs(size)
        self.block_map = torch.zeros(num_programs, 2, dtype=torch.int32, device=device)
        self.staging = Staging(lambda pinned: (torch.zeros(3, size, dtype=torch.long, pin_memory=pinned),
                                               torch.zeros(3 * k + 3, dtype=torch.long, pin_memory=pinned),
                                               torch.zeros(k + 1, width, dtype=torch.long, pin_memory=pinned),
                                               torch.zeros(size, dtype=torch.bool, pin_memory=pinned),
                                               torch.zeros(num_programs, 2, dtype=torch.int32, pin_memory=pinned)),
                               device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor | None]] = {}  # logits
        self.replays: Counter[int] = Counter()  # per bucket
        self.pool = None

    @staticmethod
    def supports(device: torch.device, head_dim: int, block_size: int) -> bool:
        return device.type == "cuda" and paged_prefill.is_available(device, head_dim, block_size)

    def bucket_for(self, num_rows: int) -> int | None:
        return next((b for b in self.buckets if b >= num_rows), None) if num_rows >= 2 else None

    def num_programs(self, bucket: int) -> int:
        """Prefill-kernel programs (per KV head) of a step of `bucket` rows in up to
        max_spans spans and the padding span."""
        return -(-bucket // self.rows_per_program) + self.max_spans + 1

    def capture_all(self) -> None:
        """Captures every bucket, largest first, on padding inputs (every row a padding
        row: its keys in the scratch block)."""
        started = time.monotonic()
        for bucket in reversed(self.buckets):
            self._load([], bucket)
            self.graphs[bucket] = self._capture(bucket)
        torch.cuda.synchronize()
        logger.info("captured prefill CUDA graphs for %s rows, up to %d requests a step, in %.1f s",
                    self.buckets, self.max_spans, time.monotonic() - started)

    def run(self, spans: list[GraphSpan], fed_tokens=None) -> torch.Tensor | None:
        """float32 logits [S, vocab], one per sampled span in order (a view of the graph's
        output: the next replay of any bucket may overwrite it); None when no span samples.
        fed_tokens (index, tokens on the device) overwrite the input ids at those rows (the
        previous step's samples). Without captured graphs (a CPU check of the padding) the
        same inputs run eagerly."""
        bucket = self.bucket_for(sum(len(span.ids) for span in spans))
        self._load(spans, bucket)
        if fed_tokens is not None:
            index, tokens = fed_tokens
            self.input_ids[index] = tokens
        num_sampled = sum(span.sampled for span in spans)
        if not self.graphs:
            logits = self._forward(bucket)
        else:
            graph, logits = self.graphs[bucket]
            graph.replay()
            self.replays[bucket] += 1
        return logits[:num_sampled] if num_sampled and logits is not None else None

    def _load(self, spans: list[GraphSpan], bucket: int) -> None:
        """Copies the step into the static buffers: four host-to-device copies, plus one
        on the device per span of embedding rows."""
        if len(spans) > self.max_spans:
            raise ValueError(f"{len(spans)} requests in a step; the prefill graphs hold {self.max_spans}")
        bs, k = self.block_size, self.max_spans
        small, staged_spans, tables, mask, block_map = self.staging.take()
        # The staged buffers' own memory, through numpy: filling a row from a list there costs
        # a few µs, a torch.tensor() of the list ~20 (with 64 requests, every step).
        staged, table_rows = small.numpy(), tables.numpy()
        ids, starts, lens, sampled = [], [], [], []
        embeds = []  # (first row, rows)
        for i, span in enumerate(spans):
            starts.append(len(ids))
            embeds += [(len(ids) + offset, rows) for offset, rows in span.embeds]
            ids += span.ids
            lens.append(span.num_computed + len(span.ids))
            if span.sampled:
                sampled.append(len(ids) - 1)
            row, used = table_rows[i], len(span.block_table)
            row[:used] = span.block_table
            row[used:] = NULL_BLOCK
        num_rows, pad = len(ids), bucket - len(ids)
        # Each real row's position and cache slot, from its span's first position and table.
        owner = np.repeat(np.arange(len(spans)), [len(span.ids) for span in spans])
        first_positions = np.asarray([span.num_computed for span in spans], dtype=np.int64)
        positions = np.arange(num_rows) + (first_positions - np.asarray(starts, dtype=np.int64))[owner]
        staged[0, :num_rows] = ids
        staged[1, :num_rows] = positions
        staged[2, :num_rows] = table_rows[owner, positions // bs] * bs + positions % bs
        # Padding rows' positions only rotate their own queries and keys (the kernel places a
        # span's rows by its key count): kept within one block, so within any rotary table.
        padding = np.arange(pad) % bs
        staged[0, num_rows:bucket] = 0
        staged[1, num_rows:bucket] = padding
        staged[2, num_rows:bucket] = self.scratch_block * bs + padding
        empty = k - len(spans)
        staged_spans.copy_(torch.tensor(starts + [num_rows] * (empty + 1) + [bucket]
                                        + lens + [0] * empty + [pad]
                                        + sampled + [0] * (k - len(sampled))))
        table_rows[len(spans):k] = NULL_BLOCK
        table_rows[k] = self.scratch_block
        num_programs = self.num_programs(bucket)
        query_lens = [len(span.ids) for span in spans] + [0] * empty + [pad]
        block_map[:num_programs] = torch.tensor(
            query_block_map(query_lens, self.rows_per_program, num_programs), dtype=torch.int32).view(-1, 2)
        mask[:bucket] = False
        for first, rows in embeds:
            mask[first:first + rows.shape[0]] = True
        self.small[:, :bucket].copy_(small[:, :bucket], non_blocking=True)
        self.spans.copy_(staged_spans, non_blocking=True)
        self.block_tables.copy_(tables, non_blocking=True)
        self.embeds_mask[:bucket].copy_(mask[:bucket], non_blocking=True)
        self.block_map[:num_programs].copy_(block_map[:num_programs], non_blocking=True)
        self.staging.copies_queued()
        for first, rows in embeds:
            self.embeds[first:first + rows.shape[0]].copy_(rows)

    def _metadata(self, bucket: int) -> AttentionMetadata:
        """Metadata over the static buffers: every row in a prefill span, no decodes."""
        return AttentionMetadata(
            positions=self.positions[:bucket],
            query_start_loc=self.query_start_loc,
            seq_lens=self.seq_lens,
            block_tables=self.block_tables,
            slot_mapping=self.slot_mapping[:bucket],
            decode_rows=self.no_rows,
            decode_block_tables=self.block_tables[:0],
            decode_kv_positions=self.no_rows[:, None],
            decode_q_positions=self.no_rows[:, None],
            decode_seq_lens=self.no_lens,
            prefills=[],
            prefill_batch=PrefillBatch(rows=self.rows[:bucket], query_start_loc=self.query_start_loc,
                                       seq_lens=self.seq_lens, block_tables=self.block_tables,
                                       max_query_len=bucket, covers_all_rows=True,
                                       block_map=self.block_map[:self.num_programs(bucket)]),
        )

    def _forward(self, bucket: int) -> torch.Tensor | None:
        hidden = self.model(self.input_ids[:bucket], self.positions[:bucket], self._metadata(bucket),
                            self.kv_caches, input_embeds=self.embeds[:bucket],
                            embeds_mask=self.embeds_mask[:bucket])
        return self.model.compute_logits(hidden[self.sample_rows])

    def _capture(self, bucket: int):
        graph, logits = capture(lambda: self._forward(bucket), self.pool)
        self.pool = graph.pool()
        return graph, logits
