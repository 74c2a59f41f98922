"""Content hashes of full KV blocks, the keys of the prefix cache: a block's hash covers its
tokens and every block before it, so equal hashes mean equal K/V. The chain runs on the
leader shard; an embeddings prompt's row digests where its rows are put (cluster.
engine_client), or for a large put in the engine's hasher actor (cluster/embeds_hasher.py).

Cryptographic hashes, never Python's hash(): a prompt crafted to collide with another
user's prefix would read that user's K/V (vLLM's CVE-2025-25183). The chain is SHA-256 (a
parent's 32 bytes and a block's ids). An embeddings block is keyed by the BLAKE3 digest of
its rows' bytes, kind-tagged so it never equals a token id: BLAKE3 is as collision-resistant
and hashes an 8B model's 128 KiB block 3-5x faster than SHA-256 (BENCHMARKS.md, "Prefix
caching", session 27). A prompt with a cache_salt (vLLM's) chains from a root of that salt:
it shares blocks only with its salt."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import blake3
import numpy as np

BlockHash = bytes
_ROOT = b"shardserve-prefix-cache-v1"


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], embeds_digest: bytes | None = None
               ) -> BlockHash:
    """The hash of one full block: its parent's hash, the digest of its embeddings rows (if
    the block starts inside an embeddings prompt), then its token ids."""
    h = hashlib.sha256(parent if parent is not None else _ROOT)
    if embeds_digest is not None:
        h.update(b"E")
        h.update(embeds_digest)
    h.update(b"T")
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


def salted_root(cache_salt: str | None) -> BlockHash | None:
    """The parent of a prompt's first block: None (the shared root) without a salt; with
    one, a root of that salt's own, so the whole chain differs from every other salt's and
    from the unsalted one ("S" where a block's hash has "E" or "T")."""
    if cache_salt is None:
        return None
    return hashlib.sha256(_ROOT + b"S" + cache_salt.encode()).digest()


def prompt_block_digests(rows: np.ndarray, dtype: str, spans: Sequence[tuple[int, int]] | None,
                         block_size: int) -> tuple[bytes | None, ...]:
    """A prompt's block digests: of its rows alone (spans None), or of a prompt that mixes
    token ids and rows (they fill `spans`)."""
    if spans is None:
        return embeds_block_digests(rows, dtype, block_size)
    return mixed_block_digests(rows, dtype, spans, block_size)


def mixed_block_digests(rows: np.ndarray, dtype: str, spans: Sequence[tuple[int, int]], block_size: int
                        ) -> tuple[bytes | None, ...]:
    """One entry per block of a prompt that mixes token ids and embeddings (`rows` fill the
    positions of `spans`, in order): None for a block of token ids only (keyed by its ids
    alone, so it is shared with the same ids of any prompt), else the digest of where the
    block's embeddings rows sit in it and of their bytes."""
    hidden = rows.shape[1]
    header = f"{dtype}:{hidden}:".encode()
    num_blocks = -(-max(end for _, end in spans) // block_size)
    digests: list[bytes | None] = [None] * num_blocks
    hashers = {}
    row = 0
    for start, end in spans:
        position = start
        while position < end:  # one run of rows per block the span touches
            block = position // block_size
            run_end = min(end, (block + 1) * block_size)
            if block not in hashers:
                hashers[block] = blake3.blake3(header)
            hashers[block].update(np.asarray([position % block_size, run_end - position], dtype=np.int64).tobytes())
            hashers[block].update(_bytes_of(rows[row:row + run_end - position]))
            row, position = row + run_end - position, run_end
    for block, h in hashers.items():
        digests[block] = h.digest()
    return tuple(digests)


def embeds_block_digests(embeds: np.ndarray, dtype: str, block_size: int) -> tuple[bytes, ...]:
    """One digest per block of an embeddings prompt's (prompt_len, hidden) rows: the bytes
    of rows [i * block_size, (i + 1) * block_size), with the dtype and width that give them
    meaning. The last block's rows may be fewer (outputs' tokens fill the rest)."""
    rows, hidden = embeds.shape
    header = f"{dtype}:{hidden}:".encode()
    digests = []
    for start in range(0, rows, block_size):
        h = blake3.blake3(header)
        h.update(_bytes_of(embeds[start:start + block_size]))  # drops the GIL
        digests.append(h.digest())
    return tuple(digests)


def _bytes_of(rows: np.ndarray) -> np.ndarray:
    """Rows as the flat bytes BLAKE3 takes (any dtype, bfloat16's included): a view, unless
    the rows are strided."""
    return np.ascontiguousarray(rows).reshape(-1).view(np.uint8)
