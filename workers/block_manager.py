"""Hands out fixed-size KV cache blocks to requests. Runs on the leader shard; pure Python.

Block 0 is a reserved null block (padding in block tables points at it), so ids
1 .. num_blocks-1 are the usable ones."""

from __future__ import annotations

from collections import deque

NULL_BLOCK_ID = 0


class BlockManager:
    """A free list of block ids; O(1) per block allocated or freed. No prefix caching."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError(
                f"num_blocks must be >= 2 (block 0 is the reserved null block), got {num_blocks}"
            )
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.num_total_blocks = num_blocks - 1
        self._free_block_ids: deque[int] = deque(range(1, num_blocks))
        # Indexed by block id; the null block is never free, so it can never be handed out.
        self._is_free = [False] + [True] * self.num_total_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks that hold `num_tokens` tokens (ceiling division)."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= len(self._free_block_ids)

    def allocate(self, num_blocks: int) -> list[int]:
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > len(self._free_block_ids):
            raise ValueError(
                f"cannot allocate {num_blocks} KV blocks: only {self.num_free_blocks} free "
                f"of {self.num_total_blocks}"
            )
        block_ids = [self._free_block_ids.popleft() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._is_free[block_id] = False
        return block_ids

    def free(self, block_ids: list[int]) -> None:
        """Returns blocks to the free list. Checks every id before freeing any, so a bad
        call leaves the manager unchanged."""
        seen: set[int] = set()
        for block_id in block_ids:
            if not 1 <= block_id <= self.num_total_blocks:
                raise ValueError(
                    f"block id {block_id} is not an allocatable block "
                    f"(valid: 1..{self.num_total_blocks})"
                )
            if self._is_free[block_id] or block_id in seen:
                raise ValueError(f"block {block_id} is already free (double free)")
            seen.add(block_id)
        for block_id in block_ids:
            self._is_free[block_id] = True
            self._free_block_ids.append(block_id)
