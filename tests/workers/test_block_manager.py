"""BlockManager: allocation, freeing, exhaustion, the reserved null block."""

import pytest

from workers.block_manager import NULL_BLOCK_ID, BlockManager


def test_counts_exclude_the_null_block():
    manager = BlockManager(num_blocks=5, block_size=4)
    assert manager.num_total_blocks == 4
    assert manager.num_free_blocks == 4


@pytest.mark.parametrize("num_tokens,expected", [(0, 0), (1, 1), (4, 1), (5, 2), (8, 2), (9, 3)])
def test_blocks_needed_rounds_up(num_tokens, expected):
    assert BlockManager(num_blocks=10, block_size=4).blocks_needed(num_tokens) == expected


def test_allocate_hands_out_distinct_ids_and_never_the_null_block():
    manager = BlockManager(num_blocks=6, block_size=2)
    block_ids = manager.allocate(2) + manager.allocate(3)
    assert sorted(block_ids) == [1, 2, 3, 4, 5]
    assert NULL_BLOCK_ID not in block_ids
    assert manager.num_free_blocks == 0


def test_exhaustion_raises_and_leaves_state_unchanged():
    manager = BlockManager(num_blocks=4, block_size=2)
    manager.allocate(2)
    assert manager.can_allocate(1)
    assert not manager.can_allocate(2)
    with pytest.raises(ValueError, match="only 1 free"):
        manager.allocate(2)
    assert manager.num_free_blocks == 1
    assert manager.allocate(0) == []


def test_free_returns_blocks_for_reuse():
    manager = BlockManager(num_blocks=4, block_size=2)
    first = manager.allocate(3)
    manager.free(first[:2])
    assert manager.num_free_blocks == 2
    again = manager.allocate(2)
    assert sorted(again) == sorted(first[:2])
    manager.free(again + first[2:])
    assert manager.num_free_blocks == manager.num_total_blocks


def test_double_free_raises_without_partial_effect():
    manager = BlockManager(num_blocks=5, block_size=2)
    block_ids = manager.allocate(3)
    manager.free([block_ids[0]])
    with pytest.raises(ValueError, match="double free"):
        manager.free([block_ids[1], block_ids[0]])
    assert manager.num_free_blocks == 2  # block_ids[1] was not freed by the failed call
    with pytest.raises(ValueError, match="double free"):
        manager.free([block_ids[2], block_ids[2]])
    assert manager.num_free_blocks == 2


@pytest.mark.parametrize("block_id", [NULL_BLOCK_ID, 5, -1, 100])
def test_free_of_unknown_or_null_id_raises(block_id):
    manager = BlockManager(num_blocks=5, block_size=2)
    manager.allocate(4)
    with pytest.raises(ValueError, match="not an allocatable block"):
        manager.free([block_id])


def test_free_of_never_allocated_block_raises():
    manager = BlockManager(num_blocks=5, block_size=2)
    with pytest.raises(ValueError, match="double free"):
        manager.free([1])


@pytest.mark.parametrize("num_blocks,block_size", [(1, 16), (0, 16), (8, 0)])
def test_bad_construction_raises(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks=num_blocks, block_size=block_size)


# -- prefix caching ------------------------------------------------------------------------

def cached_manager(num_blocks: int = 6) -> BlockManager:
    return BlockManager(num_blocks=num_blocks, block_size=2, enable_caching=True)


def test_a_cached_block_is_found_and_shared_by_reference():
    manager = cached_manager()
    first, second = manager.allocate(2)
    manager.cache(first, b"h1")
    manager.cache(second, b"h2")
    assert manager.cached_prefix([b"h1", b"h2", b"h3"]) == [first, second]
    assert manager.cached_prefix([b"h2"]) == [second]  # keys carry their parents: any hit is a prefix
    assert manager.cached_prefix([b"h3", b"h1"]) == []
    assert manager.num_reclaimed([first, second]) == 0  # held: sharing takes no free block
    manager.share([first, second])
    manager.free([first, second])  # the first holder lets go; the sharer still holds them
    assert manager.num_free_blocks == 3
    manager.free([first, second])
    assert manager.num_free_blocks == 5
    with pytest.raises(ValueError, match="double free"):
        manager.free([first])


def test_freed_cached_blocks_are_reused_before_being_evicted():
    manager = cached_manager()
    block_ids = manager.allocate(2)
    for block_id, block_hash in zip(block_ids, (b"a", b"b")):
        manager.cache(block_id, block_hash)
    manager.free(block_ids)
    assert manager.num_free_blocks == 5 and manager.num_cached_blocks == 2
    hit = manager.cached_prefix([b"a", b"b"])
    assert hit == block_ids and manager.num_reclaimed(hit) == 2
    manager.share(hit)
    assert manager.num_free_blocks == 3
    # Three uncached free blocks remain: allocating them evicts nothing.
    fresh = manager.allocate(3)
    assert not set(fresh) & set(block_ids) and manager.num_cached_blocks == 2


def test_allocation_evicts_uncached_blocks_first_then_the_least_recently_freed():
    manager = cached_manager(num_blocks=5)  # 4 usable
    old, new = manager.allocate(1), manager.allocate(1)
    manager.cache(old[0], b"old")
    manager.cache(new[0], b"new")
    manager.free(old)
    manager.free(new)
    assert manager.allocate(2) != old + new  # the two never-cached blocks go first
    assert manager.allocate(1) == old  # then the least recently freed cached block
    assert manager.cached_prefix([b"old"]) == []
    assert manager.cached_prefix([b"new"]) == new


def test_a_request_frees_its_tail_blocks_ahead_of_its_head():
    manager = cached_manager(num_blocks=4)  # 3 usable
    block_ids = manager.allocate(3)
    for index, block_id in enumerate(block_ids):
        manager.cache(block_id, bytes([index]))
    manager.free(block_ids)
    assert manager.allocate(1) == [block_ids[2]]  # the prefix's tail is evicted first
    assert manager.cached_prefix([bytes([0]), bytes([1])]) == block_ids[:2]


def test_one_prefix_is_kept_in_one_block():
    manager = cached_manager()
    first, second = manager.allocate(2)
    manager.cache(first, b"same")
    manager.cache(second, b"same")  # computed twice in one step: the first copy is kept
    manager.cache(first, b"other")  # a block holds one prefix
    assert manager.cached_prefix([b"same"]) == [first]
    assert manager.cached_prefix([b"other"]) == []
    with pytest.raises(ValueError, match="no cached prefix"):
        manager.share([second])


def test_without_caching_nothing_is_kept():
    manager = BlockManager(num_blocks=4, block_size=2)
    block_id = manager.allocate(1)[0]
    manager.cache(block_id, b"h")
    assert manager.cached_prefix([b"h"]) == [] and manager.num_cached_blocks == 0
