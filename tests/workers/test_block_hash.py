"""The prefix cache's keys: block hashes chained over tokens and embedding rows, and the
digests of an embeddings prompt's rows, made by the engine's hasher and met by the
leader's Request when its scheduler first keys the prompt."""

from __future__ import annotations

import time
from concurrent.futures import Future

import numpy as np
import pytest
import torch

from cluster.embeds_hasher import EmbedsHasher
from workers.block_hash import embeds_block_digests, hash_block, mixed_block_digests, salted_root
from workers.config import EngineConfig, ModelConfig
from workers.messages import NewRequest, PromptEmbedsRef
from workers import request as request_module
from workers.request import Request
from workers.sampling_params import SamplingParams
from workers.step_loop import Outboxes
from workers.shard_worker import ShardWorker


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


def test_embeds_digests_are_of_the_rows_bytes_whatever_their_layout_and_dtype():
    """The digest is BLAKE3 of the rows' bytes after the dtype and width: a strided view (a
    column slice), a float32 array and a bfloat16 tensor's bits all hash as their bytes."""
    import blake3

    rows = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    digest = blake3.blake3(b"float32:4:" + np.ascontiguousarray(rows[:3, :4]).tobytes()).digest()
    assert embeds_block_digests(rows[:, :4], "float32", 3)[0] == digest  # strided: not a view
    bits = torch.from_numpy(rows).to(torch.bfloat16).view(torch.uint16).numpy()
    assert embeds_block_digests(bits, "bfloat16", 6) == (blake3.blake3(b"bfloat16:8:" + bits.tobytes()).digest(),)


def test_the_hasher_gives_each_prompt_of_a_put_object_its_digests():
    """EmbedsHasher.digests (run here in-process; the engine runs it as an actor): what the
    engine client put, one array or a list, gives each prompt's digests in order, a mixed
    prompt's keyed by where its rows sit."""
    hasher = EmbedsHasher(block_size=4, threads=2)
    rng = np.random.default_rng(1)
    alone = rng.standard_normal((10, 8), dtype=np.float32)
    assert hasher.digests(alone, [("float32", None)]) == [embeds_block_digests(alone, "float32", 4)]
    rows = rng.standard_normal((3, 8), dtype=np.float32)
    got = hasher.digests([alone, rows], [("float32", None), ("float32", ((5, 8),))])
    assert got == [embeds_block_digests(alone, "float32", 4), mixed_block_digests(rows, "float32", ((5, 8),), 4)]
    assert got[1][0] is None and got[1][1] is not None  # block 0: token ids only; block 1 holds the rows
    long = rng.standard_normal((4 * 9 + 3, 8), dtype=np.float32)  # 10 blocks: hashed 4, 4 and 2 to a task
    assert hasher.digests(long, [("float32", None)]) == [embeds_block_digests(long, "float32", 4)]
    with pytest.raises(ValueError, match="2 embeddings arrays, but specs for 1"):
        hasher.digests([alone, rows], [("float32", None)])


class _Leader:
    """What add_requests hands the leader's step loop: the Requests taken, in order."""

    def __init__(self):
        self.requests = []
        self.outbox = Outboxes()

    def add_requests(self, requests):
        self.requests.extend(requests)


class _AnswerRef:
    """Stands in for the ObjectRef of the hasher's answer: its future() is ours to resolve."""

    def __init__(self):
        self.answer: Future = Future()

    def future(self) -> Future:
        return self.answer


def test_the_leader_takes_a_calls_prompts_before_their_digests_arrive(tiny_checkpoints):
    """The leader takes a call's embeddings prompts (rows uploaded, Requests handed to the
    step loop) without waiting for the hasher; each Request then meets its own prompt's
    digests, by the prompt's index in the put object, when the scheduler first keys it."""
    path = tiny_checkpoints("llama")
    config = EngineConfig(model=str(path), model_config=ModelConfig.from_pretrained(path), block_size=16)
    worker = ShardWorker(config, 0)
    worker.leader = _Leader()
    worker.runner = type("Runner", (), {"device": torch.device("cpu")})()
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal((40, 64), dtype=np.float32) for _ in range(3)]
    news = [NewRequest(f"r{i}", None, PromptEmbedsRef(None, "float32", (40, 64), index=i), SamplingParams())
            for i in range(3)]
    answer = _AnswerRef()
    assert worker.add_requests(news, arrays, [answer]) == [None, None, None]
    assert [r.req_id for r in worker.leader.requests] == ["r0", "r1", "r2"] and len(worker.intake) == 3
    assert all(not r._embeds_block_digests.done() for r in worker.leader.requests)  # taken before the answer
    digests = [embeds_block_digests(array, "float32", 16) for array in arrays]
    answer.answer.set_result(digests)
    assert [r.embeds_block_digests for r in worker.leader.requests] == digests
    follower = ShardWorker(config, 1)
    follower.runner = worker.runner
    assert follower.add_requests(news[:1], arrays, None) == [None] and len(follower.intake) == 1


def test_a_prompt_whose_digests_failed_or_came_late_runs_with_its_blocks_unshared(caplog, monkeypatch):
    failed: Future = Future()
    failed.set_exception(MemoryError("hashing thread ran out of memory (injected)"))
    ref = PromptEmbedsRef(None, "float32", (40, 8))
    request = Request.from_new_request(NewRequest("r", None, ref, SamplingParams()), (2,), 64,
                                       embeds_block_digests=failed)
    assert request.full_block_hashes(2, 16) == []  # never keyed, so never shared
    assert request.embeds_block_digests is None
    assert "hashing its embeddings rows failed" in caplog.text
    monkeypatch.setattr(request_module, "DIGESTS_WAIT_S", 0.05)
    never: Future = Future()  # a hasher that does not answer (restarting) keeps nobody waiting
    request = Request.from_new_request(NewRequest("t", None, ref, SamplingParams()), (2,), 64,
                                       embeds_block_digests=never)
    began = time.monotonic()
    assert request.digests_pending(hold_s=0.01) and time.monotonic() - began < 0.04  # held once, briefly
    assert request.full_block_hashes(2, 16) == [] and "did not come" not in caplog.text  # not yet
    time.sleep(0.05)
    assert not request.digests_pending() and request.full_block_hashes(2, 16) == []
    assert "did not come within 0.05 s" in caplog.text
    never.set_result((b"a" * 32, b"b" * 32))  # too late: the prompt stays unshared
    assert request.embeds_block_digests is None and request.full_block_hashes(2, 16) == []
    hashed: Future = Future()
    hashed.set_result((b"a" * 32, b"b" * 32))
    request = Request.from_new_request(NewRequest("s", None, ref, SamplingParams()), (2,), 64,
                                       embeds_block_digests=hashed)
    assert len(request.full_block_hashes(2, 16)) == 2
