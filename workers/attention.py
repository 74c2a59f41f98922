"""Paged attention, plain-torch reference: the per-layer KV cache, the per-step metadata
that locates every row in it, and causal (optionally sliding-window) GQA attention over
it with SDPA. Runs in each shard, on CPU or CUDA tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from workers.config import ModelConfig
from workers.kernels import elementwise, paged_attention, paged_prefill
from workers.layers import num_local_kv_heads
from workers.parallel import ProcessGroup
from workers.rotary import RotaryEmbedding
from workers.transfer import to_device

NULL_BLOCK = 0  # reserved, always zeros: padded gathers read it instead of garbage


def kv_cache_bytes_per_block(config: ModelConfig, tp_size: int, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes on one rank: K and V, every layer."""
    kv_heads = num_local_kv_heads(config.num_key_value_heads, tp_size)
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * block_size * kv_heads * config.head_dim * element_size


def allocate_kv_caches(
    config: ModelConfig, pg: ProcessGroup, num_blocks: int, block_size: int, dtype: torch.dtype, device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k_cache, v_cache), each [num_blocks, block_size, kv_heads_local, head_dim],
    zeroed: decode gathers whole blocks, and masked-out slots a request never wrote must
    hold finite values (NaN garbage would poison attention even at weight 0). Block 0 is
    the null block that padding reads."""
    if num_blocks < 2:
        raise ValueError(f"num_blocks must be >= 2 (block 0 is the reserved null block), got {num_blocks}")
    shape = (num_blocks, block_size, num_local_kv_heads(config.num_key_value_heads, pg.world_size), config.head_dim)
    caches = []
    for _ in range(config.num_hidden_layers):
        caches.append((torch.zeros(shape, dtype=dtype, device=device),
                       torch.zeros(shape, dtype=dtype, device=device)))
    return caches


@dataclass
class PrefillSpan:
    """A request with several new rows: rows [row_start, row_end) of the batch, whose
    queries sit at positions num_computed .. seq_len - 1 and see keys 0 .. seq_len - 1."""

    row_start: int
    row_end: int
    num_computed: int
    kv_slots: torch.Tensor  # LongTensor [seq_len]: cache slot of each key position
    q_positions: torch.Tensor  # LongTensor [num_new, 1]
    kv_positions: torch.Tensor  # LongTensor [1, seq_len]


@dataclass(frozen=True)
class PrefillBatch:
    """Every prefill span of a step packed for one kernel launch: the spans' rows of the
    batch, in order, with the spans' own cumulative rows, lengths and block tables."""

    rows: torch.Tensor  # LongTensor [P]: batch row of each prefill row
    query_start_loc: torch.Tensor  # LongTensor [S + 1]: cumulative rows of the spans
    seq_lens: torch.Tensor  # LongTensor [S]: keys of each span's request (computed + new)
    block_tables: torch.Tensor  # LongTensor [S, max_blocks]
    max_query_len: int  # rows of the longest span (sizes the kernel's grid)
    covers_all_rows: bool = False  # rows == 0..N-1 (no decodes): no gather, no scatter
    block_map: torch.Tensor | None = None  # a captured step's: the kernel's program map


@dataclass
class AttentionMetadata:
    """Where one step's N rows (R requests, each's rows contiguous) live in the paged cache.

    Requests with one new row are decodes, batched into one call of the decode kernel (on
    CUDA) or of SDPA over keys gathered into [B, max_seq_len]; the others are prefill spans,
    all in one call of the prefill kernel (on CUDA) or one SDPA call each.
    """

    positions: torch.Tensor  # LongTensor [N]
    query_start_loc: torch.Tensor  # LongTensor [R + 1]
    seq_lens: torch.Tensor  # LongTensor [R]: computed + new
    block_tables: torch.Tensor  # LongTensor [R, max_blocks], padded with the null block
    slot_mapping: torch.Tensor  # LongTensor [N]: block_id * block_size + offset
    decode_rows: torch.Tensor  # LongTensor [B]: batch row of each decode request
    decode_block_tables: torch.Tensor  # LongTensor [B, max_blocks], padded with the null block
    decode_kv_positions: torch.Tensor  # LongTensor [B, max_blocks * block_size]; -1 past the end
    decode_q_positions: torch.Tensor  # LongTensor [B, 1]
    decode_seq_lens: torch.Tensor  # IntTensor [B]: context of each decode row, its own token included
    prefills: list[PrefillSpan]
    prefill_batch: PrefillBatch | None = None  # the spans packed (None without spans)
    _masks: dict = field(default_factory=dict, repr=False)  # per sliding window, per step

    @property
    def num_decodes(self) -> int:
        return self.decode_rows.numel()

    @classmethod
    def build(
        cls,
        num_computed_tokens: list[int],
        num_new_tokens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device,
    ) -> "AttentionMetadata":
        _check_batch(num_computed_tokens, num_new_tokens, block_tables, block_size)
        seq_lens = [c + n for c, n in zip(num_computed_tokens, num_new_tokens)]
        starts = [0]
        for n in num_new_tokens:
            starts.append(starts[-1] + n)
        positions = torch.cat([torch.arange(c, s) for c, s in zip(num_computed_tokens, seq_lens)])
        width = max(len(t) for t in block_tables)
        tables = torch.tensor([t + [NULL_BLOCK] * (width - len(t)) for t in block_tables], dtype=torch.long)
        request_of_row = torch.repeat_interleave(torch.arange(len(seq_lens)), torch.tensor(num_new_tokens))
        slot_mapping = _slots(tables[request_of_row], positions[:, None], block_size)[:, 0]
        decodes = [r for r, n in enumerate(num_new_tokens) if n == 1]
        spans = [r for r, n in enumerate(num_new_tokens) if n > 1]
        return cls(
            positions=to_device(positions, device),
            query_start_loc=to_device(starts, device, torch.long),
            seq_lens=to_device(seq_lens, device, torch.long),
            block_tables=to_device(tables, device),
            slot_mapping=to_device(slot_mapping, device),
            **_decode_fields(decodes, starts, seq_lens, tables, block_size, device),
            prefills=[
                _prefill_span(r, starts, num_computed_tokens, seq_lens, tables, block_size, device)
                for r in spans
            ],
            prefill_batch=_prefill_batch(spans, starts, num_new_tokens, seq_lens, tables, device),
        )

    def decode_mask(self, sliding_window: int | None) -> torch.Tensor:
        """Bool [B, 1, 1, max_seq_len]: True where a decode query may attend."""
        key = ("decode", sliding_window)
        if key not in self._masks:
            self._masks[key] = _visible(self.decode_q_positions, self.decode_kv_positions, sliding_window)[:, None, None]
        return self._masks[key]

    def prefill_mask(self, index: int, sliding_window: int | None) -> torch.Tensor | None:
        """Bool [num_new, seq_len] for prefill span `index`; None means plain is_causal."""
        span = self.prefills[index]
        if span.num_computed == 0 and sliding_window is None:
            return None
        key = (index, sliding_window)
        if key not in self._masks:
            self._masks[key] = _visible(span.q_positions, span.kv_positions, sliding_window)
        return self._masks[key]


def _check_batch(num_computed, num_new, block_tables, block_size) -> None:
    if not (len(num_computed) == len(num_new) == len(block_tables)) or not num_new:
        raise ValueError(
            "num_computed_tokens, num_new_tokens and block_tables need one entry per request "
            f"(at least one); got {len(num_computed)}, {len(num_new)}, {len(block_tables)}"
        )
    for r, (c, n, table) in enumerate(zip(num_computed, num_new, block_tables)):
        if n < 1 or c < 0:
            raise ValueError(f"request {r}: num_new_tokens must be >= 1 and num_computed_tokens >= 0; got {n}, {c}")
        if len(table) * block_size < c + n:
            raise ValueError(
                f"request {r}: block table of {len(table)} blocks holds {len(table) * block_size} "
                f"tokens, fewer than its {c + n} (computed + new)"
            )


def _slots(tables: torch.Tensor, positions: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slot of each position: tables [K, max_blocks], positions [K, L] -> [K, L]."""
    blocks = torch.gather(tables, 1, positions // block_size)
    return blocks * block_size + positions % block_size


def _visible(q_pos: torch.Tensor, kv_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """Causal (and HF Mistral's window: kv > q - window) visibility; kv_pos -1 is padding."""
    mask = (kv_pos <= q_pos) & (kv_pos >= 0)
    if sliding_window is not None:
        mask &= kv_pos > q_pos - sliding_window
    return mask


def _decode_fields(decodes, starts, seq_lens, tables, block_size, device) -> dict:
    """Decodes gather whole blocks (contiguous copies, far cheaper than per-slot
    indexing); positions past a request's length are masked as padding."""
    lens = torch.tensor([seq_lens[r] for r in decodes], dtype=torch.long)
    num_blocks = (int(lens.max()) + block_size - 1) // block_size if decodes else 0
    kv_pos = torch.arange(num_blocks * block_size).expand(len(decodes), -1)
    return dict(
        decode_rows=to_device([starts[r] for r in decodes], device, torch.long),
        decode_block_tables=to_device(tables[decodes, :num_blocks], device),
        decode_kv_positions=to_device(torch.where(kv_pos < lens[:, None], kv_pos, -1), device),
        decode_q_positions=to_device((lens - 1)[:, None], device),
        decode_seq_lens=to_device(lens, device, torch.int32),
    )


def _prefill_batch(spans, starts, num_new_tokens, seq_lens, tables, device) -> PrefillBatch | None:
    if not spans:
        return None
    span_starts = [0]
    for r in spans:
        span_starts.append(span_starts[-1] + num_new_tokens[r])
    return PrefillBatch(
        rows=to_device(torch.cat([torch.arange(starts[r], starts[r + 1]) for r in spans]), device),
        query_start_loc=to_device(span_starts, device, torch.long),
        seq_lens=to_device([seq_lens[r] for r in spans], device, torch.long),
        block_tables=to_device(tables[spans], device),
        max_query_len=max(num_new_tokens[r] for r in spans),
        covers_all_rows=len(spans) == len(num_new_tokens),
    )


def _prefill_span(r, starts, num_computed, seq_lens, tables, block_size, device) -> PrefillSpan:
    kv_positions = torch.arange(seq_lens[r])
    return PrefillSpan(
        row_start=starts[r],
        row_end=starts[r + 1],
        num_computed=num_computed[r],
        kv_slots=to_device(_slots(tables[r : r + 1], kv_positions[None], block_size)[0], device),
        q_positions=to_device(torch.arange(num_computed[r], seq_lens[r])[:, None], device),
        kv_positions=to_device(kv_positions[None, :], device),
    )


class Attention(nn.Module):
    """Writes this step's K/V into the paged cache, then attends each row causally.

    forward(q [N, heads, d], k [N, kv_heads, d], v [N, kv_heads, d], kv_cache, metadata)
    -> [N, heads, d]. Head counts are this rank's; heads share KV heads in groups (GQA).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, sliding_window: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window

    def forward(self, q, k, v, kv_cache: tuple[torch.Tensor, torch.Tensor], metadata: AttentionMetadata,
                rotary: tuple[RotaryEmbedding, torch.Tensor] | None = None):
        """rotary: (rotary_emb, positions [N]) to rotate q and k by before anything else; on
        CUDA one kernel rotates them in place and writes k and v into the cache."""
        k_flat = kv_cache[0].view(-1, self.num_kv_heads, self.head_dim)  # [slots, kvh, d]
        v_flat = kv_cache[1].view(-1, self.num_kv_heads, self.head_dim)
        if elementwise.is_available(q.device):
            if rotary is None:
                elementwise.store_kv(k, v, kv_cache[0], kv_cache[1], metadata.slot_mapping)
            else:
                rotary_emb, positions = rotary
                elementwise.rotary_store_kv_(positions, q, k, v, rotary_emb.cos, rotary_emb.sin,
                                             kv_cache[0], kv_cache[1], metadata.slot_mapping)
        else:
            if rotary is not None:
                q, k = rotary[0](rotary[1], q, k)
            k_flat.index_copy_(0, metadata.slot_mapping, k)
            v_flat.index_copy_(0, metadata.slot_mapping, v)
        if metadata.num_decodes == q.shape[0]:  # all decodes (captured steps): no scatter
            return self._decode(q, kv_cache, metadata, all_rows=True)
        batch = metadata.prefill_batch
        kernel = batch is not None and paged_prefill.is_available(q.device, self.head_dim, kv_cache[0].shape[1])
        if kernel and batch.covers_all_rows:  # all prefill rows: no gather, no scatter
            return self._prefill(q, kv_cache, batch)
        out = torch.empty_like(q)
        if metadata.num_decodes:
            out.index_copy_(0, metadata.decode_rows, self._decode(q, kv_cache, metadata))
        if kernel:
            return out.index_copy_(0, batch.rows, self._prefill(q[batch.rows], kv_cache, batch))
        for index, span in enumerate(metadata.prefills):
            rows = slice(span.row_start, span.row_end)
            if span.num_computed == 0:  # no earlier context: this step's rows are all the keys
                keys, values = k[rows], v[rows]
            else:
                keys, values = k_flat[span.kv_slots], v_flat[span.kv_slots]
            mask = metadata.prefill_mask(index, self.sliding_window)
            out[rows] = self._sdpa(q[rows].unsqueeze(0), keys.unsqueeze(0), values.unsqueeze(0), mask)[0]
        return out

    def _prefill(self, q, kv_cache, batch: PrefillBatch) -> torch.Tensor:
        """[P, heads, d]: the prefill rows q (batch.rows of the step, in order) against their
        keys in the paged cache, one kernel launch for every span."""
        return paged_prefill.paged_prefill_attention(
            q, kv_cache[0], kv_cache[1], batch.block_tables, batch.query_start_loc, batch.seq_lens,
            self.scale, self.sliding_window, max_query_len=batch.max_query_len, block_map=batch.block_map)

    def _decode(self, q, kv_cache, metadata: AttentionMetadata, all_rows: bool = False) -> torch.Tensor:
        """[B, heads, d]: each decode row against its context (all_rows: every row of q is
        a decode, in order). On CUDA the Triton kernel reads the paged cache in place;
        otherwise gather, pad and mask for SDPA."""
        queries = q if all_rows else q[metadata.decode_rows]  # [B, heads, d]
        if paged_attention.is_available(q.device, self.head_dim, kv_cache[0].shape[1]):
            return paged_attention.paged_decode_attention(
                queries, kv_cache[0], kv_cache[1], metadata.decode_block_tables,
                metadata.decode_seq_lens, self.scale, self.sliding_window)
        tables = metadata.decode_block_tables  # [B, nb]
        shape = (tables.shape[0], -1, self.num_kv_heads, self.head_dim)
        keys = kv_cache[0].index_select(0, tables.flatten()).view(shape)  # [B, nb * bs, kvh, d]
        values = kv_cache[1].index_select(0, tables.flatten()).view(shape)
        queries = queries.unsqueeze(1)  # [B, 1, heads, d]
        return self._sdpa(queries, keys, values, metadata.decode_mask(self.sliding_window))[:, 0]

    def _sdpa(self, q, k, v, mask) -> torch.Tensor:
        """q [B, Lq, h, d], k/v [B, Lk, kvh, d], mask broadcastable to [B, h, Lq, Lk] or
        None for causal -> [B, Lq, h, d]."""
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.transpose(1, 2)
