"""The prefix cache's keys: block hashes chained over tokens and embedding rows, and the
leader's digests of an embeddings prompt, hashed on its own thread or on the hashing
threads while the rows upload."""

from __future__ import annotations

from concurrent.futures import Future

import numpy as np

from workers.block_hash import embeds_block_digests, hash_block, mixed_block_digests, salted_root
from workers.config import EngineConfig, ModelConfig
from workers.messages import NewRequest, PromptEmbedsRef
from workers.sampling_params import SamplingParams
from workers.shard_worker import INLINE_DIGEST_BYTES, ShardWorker


def test_a_block_hash_covers_its_parent_its_tokens_and_its_rows():
    root = hash_block(None, [1, 2, 3, 4])
    assert hash_block(None, [1, 2, 3, 4]) == root and len(root) == 32
    assert hash_block(None, [1, 2, 3, 5]) != root
    assert hash_block(root, [5, 6, 7, 8]) != hash_block(hash_block(None, [9, 9, 9, 9]), [5, 6, 7, 8])
    rows = hash_block(None, [], b"digest")
    assert rows != hash_block(None, [])  # rows are never the same as no rows
    assert hash_block(None, [7], b"digest") != rows  # rows then an output token
    # An int64 per id: ids that print alike do not collide.
    assert hash_block(None, [1, 23]) != hash_block(None, [12, 3])


def test_a_salted_root_is_its_salts_own_and_never_a_block_of_the_shared_chain():
    assert salted_root(None) is None
    assert salted_root("a") == salted_root("a") != salted_root("b") and len(salted_root("a")) == 32
    unsalted_first = hash_block(None, [1, 2, 3, 4])
    assert hash_block(salted_root("a"), [1, 2, 3, 4]) not in (unsalted_first, hash_block(salted_root("b"), [1, 2, 3, 4]))
    # The salt's root is tagged apart from any block's hash: no block's tokens or rows make it.
    assert salted_root("a") not in (hash_block(None, []), hash_block(None, [], b"a"))


def test_embeds_digests_are_per_block_and_carry_dtype_and_width():
    rows = np.arange(10 * 4, dtype=np.uint16).reshape(10, 4)
    digests = embeds_block_digests(rows, "bfloat16", 4)
    assert len(digests) == 3  # 4 + 4 + 2 rows
    assert digests == embeds_block_digests(rows.copy(), "bfloat16", 4)
    assert embeds_block_digests(rows, "float16", 4) != digests  # the same bits, other values
    changed = rows.copy()
    changed[9, 3] += 1
    assert embeds_block_digests(changed, "bfloat16", 4)[:2] == digests[:2]
    assert embeds_block_digests(changed, "bfloat16", 4)[2] != digests[2]
    wide = rows.reshape(5, 8)
    assert embeds_block_digests(wide, "bfloat16", 2)[0] != embeds_block_digests(rows, "bfloat16", 4)[0]


def test_the_leader_hashes_large_prompts_on_its_hashing_threads(tiny_checkpoints):
    path = tiny_checkpoints("llama")
    config = EngineConfig(model=str(path), model_config=ModelConfig.from_pretrained(path), block_size=16)
    worker = ShardWorker(config, 0)
    worker.leader = object()  # rank 0 once init() ran; only whether it is the leader matters here
    ref = PromptEmbedsRef(None, "float32", (0, 0))
    new = NewRequest("r", None, ref, SamplingParams())
    small = np.random.default_rng(0).standard_normal((8, 64), dtype=np.float32)
    large = np.random.default_rng(1).standard_normal((INLINE_DIGEST_BYTES // 256 + 16, 64), dtype=np.float32)
    assert worker._embeds_block_digests(new, small) == embeds_block_digests(small, "float32", 16)
    future = worker._embeds_block_digests(new, large)
    assert isinstance(future, Future)
    assert future.result(timeout=30) == embeds_block_digests(large, "float32", 16)
    worker.leader = None  # a follower keys nothing
    assert worker._embeds_block_digests(new, large) is None


def test_the_leader_keys_a_mixed_prompts_rows_by_where_they_sit(tiny_checkpoints):
    path = tiny_checkpoints("llama")
    config = EngineConfig(model=str(path), model_config=ModelConfig.from_pretrained(path), block_size=4)
    worker = ShardWorker(config, 0)
    worker.leader = object()
    rows = np.random.default_rng(2).standard_normal((3, 8), dtype=np.float32)
    new = NewRequest("r", (5,) * 10, PromptEmbedsRef(None, "float32", (3, 8)), SamplingParams(),
                     embeds_spans=((5, 8),))
    assert worker._embeds_block_digests(new, rows) == mixed_block_digests(rows, "float32", ((5, 8),), 4)


def test_mixed_digests_key_blocks_with_embeddings_rows_by_their_place_and_bytes():
    rows = np.random.default_rng(3).standard_normal((5, 8), dtype=np.float32)
    # Block size 4, positions 0..11: rows at [2, 4) and [6, 9): blocks 0, 1 and 2 hold rows.
    digests = mixed_block_digests(rows, "float32", ((2, 4), (6, 9)), 4)
    assert len(digests) == 3 and all(d is not None for d in digests)
    assert mixed_block_digests(rows[:2], "float32", ((2, 4),), 4) == (digests[0],)
    # The same rows one position later are another block's content.
    assert mixed_block_digests(rows[:2], "float32", ((1, 3),), 4)[0] != digests[0]
    # A block of token ids only has no digest: it is keyed by its ids, as any prompt's.
    assert mixed_block_digests(rows[:2], "float32", ((8, 10),), 4)[:2] == (None, None)
    changed = rows.copy()
    changed[4, 0] += 1  # the last row: block 2 only
    assert mixed_block_digests(changed, "float32", ((2, 4), (6, 9)), 4)[:2] == digests[:2]
    assert mixed_block_digests(changed, "float32", ((2, 4), (6, 9)), 4)[2] != digests[2]
