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
