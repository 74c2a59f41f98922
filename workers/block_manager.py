"""Hands out fixed-size KV cache blocks to requests and, with prefix caching, keeps computed
full blocks for reuse by content (vLLM's automatic prefix caching). Runs on the leader
shard; pure Python.

Block 0 is a reserved null block (padding in block tables points at it), so ids
1 .. num_blocks-1 are the usable ones. A block is in use while a request holds it (a
reference count: requests with one prefix share its blocks) and free otherwise. A free
block may still hold a cached prefix: it is reused by a request with that prefix, or
evicted (least recently freed first) when a block is needed for anything else."""

from __future__ import annotations

from collections import OrderedDict

from workers.block_hash import BlockHash

NULL_BLOCK_ID = 0


class BlockManager:
    """Free blocks in eviction order (uncached ones first, then cached ones least recently
    freed first); O(1) per block allocated, freed or reused."""

    def __init__(self, num_blocks: int, block_size: int, *, enable_caching: bool = False) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be >= 2 (block 0 is the reserved null block), got {num_blocks}"
            )
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.num_total_blocks = num_blocks - 1
        self.enable_caching = enable_caching
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))
        # Indexed by block id; the null block is never free, so it can never be handed out.
        self._ref_counts = [1] + [0] * self.num_total_blocks
        self._hash_of_block: dict[int, BlockHash] = {}
        self._block_of_hash: dict[BlockHash, int] = {}

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds, cached ones included (they are reclaimable)."""
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of_hash)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens (ceiling division)."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free)

    def allocate(self, num_blocks: int) -> list[int]:
        """Fresh blocks for new K/V; a cached prefix in one of them is evicted."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > len(self._free):
            raise ValueError(
                f"cannot allocate {num_blocks} KV blocks: only {self.num_free_blocks} free "
                f"of {self.num_total_blocks}"
            )
        block_ids = []
        for _ in range(num_blocks):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        """Releases a request's hold on its blocks, checking every id before releasing any,
        so a bad call leaves the manager unchanged. A block no request holds any more is
        free: uncached, it is the next to be handed out; cached, it waits for reuse behind
        those freed earlier, a request's last blocks ahead of its first (a prefix's tail
        is the least likely to be asked for again)."""
        seen: set[int] = set()
        for block_id in block_ids:
            if not 1 <= block_id <= self.num_total_blocks:
                raise ValueError(
                    f"block id {block_id} is not an allocatable block "
                    f"(valid: 1..{self.num_total_blocks})"
                )
            if self._ref_counts[block_id] == 0 or block_id in seen:
                raise ValueError(f"block {block_id} is already free (double free)")
            seen.add(block_id)
        for block_id in reversed(block_ids):
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free[block_id] = None
                if block_id not in self._hash_of_block:
                    self._free.move_to_end(block_id, last=False)

    # -- prefix caching ----------------------------------------------------------------

    def cached_prefix(self, block_hashes: list[BlockHash]) -> list[int]:
        """The blocks holding the longest cached prefix of these full-block hashes, in
        order; [] without caching. Takes nothing: see num_reclaimed and share."""
        block_ids = []
        if self.enable_caching:
            for block_hash in block_hashes:
                block_id = self._block_of_hash.get(block_hash)
                if block_id is None:
                    break
                block_ids.append(block_id)
        return block_ids

    def num_reclaimed(self, block_ids: list[int]) -> int:
        """How many of these cached blocks are free: sharing them takes that many blocks
        out of the free pool, as an allocation would."""
        return sum(1 for block_id in block_ids if self._ref_counts[block_id] == 0)

    def share(self, block_ids: list[int]) -> None:
        """A request takes hold of cached blocks (from cached_prefix) as they are."""
        for block_id in block_ids:
            if block_id not in self._hash_of_block:
                raise ValueError(f"block {block_id} holds no cached prefix")
            if self._ref_counts[block_id] == 0:
                del self._free[block_id]
            self._ref_counts[block_id] += 1

    def cache(self, block_id: int, block_hash: BlockHash) -> bool:
        """Keys a full block whose K/V are computed by its content; False if it did not (a
        prefix another block already holds, two requests having computed it in one step,
        stays with that one)."""
        if not self.enable_caching or block_hash in self._block_of_hash or block_id in self._hash_of_block:
            return False
        self._block_of_hash[block_hash] = block_id
        self._hash_of_block[block_id] = block_hash
        return True

    def uncache(self, keys: list[tuple[int, BlockHash]]) -> set[int]:
        """Forgets these (block, hash) keys where they still stand: K/V that must not be
        shared. Such a block, once free, is the next to be handed out. Returns the blocks
        it forgot, the only ones a request can be sharing: a key that no longer stands
        went with its block's eviction, and the block may now hold another request's K/V."""
        forgotten = set()
        for block_id, block_hash in keys:
            if self._block_of_hash.get(block_hash) == block_id:
                self._evict(block_id)
                forgotten.add(block_id)
                if self._ref_counts[block_id] == 0:
                    self._free.move_to_end(block_id, last=False)
        return forgotten

    def _evict(self, block_id: int) -> None:
        block_hash = self._hash_of_block.pop(block_id, None)
        if block_hash is not None:
            del self._block_of_hash[block_hash]
