"""EngineClient sends requests and aborts to the shards from its own thread, in order:
never from the caller's thread, whose Ray task (a Serve request whose client went away)
may be cancelled, and Ray cancels the calls such a task made, recursively. Stand-in shards
(no Ray) record where each call came from. A sink that raises stops neither the output
thread nor the other requests; shutdown ends every request still in flight."""

from __future__ import annotations

import collections
import itertools
import queue
import threading
import time
import types

import numpy as np
import pytest

import cluster.engine_client as engine_client
from cluster.engine_client import EngineClient, EngineDeadError
from cluster.prompts import EnginePrompt
from workers.block_hash import prompt_block_digests
from workers.messages import PromptEmbedsRef, RequestDelta
from workers.sampling_params import SamplingParams
from workers.step_loop import OWNER_CLIENT


class Method:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def remote(self, *args):
        self.log.append((self.name, args, threading.current_thread().name))


class StandInShard:
    def __init__(self, log: list, rank: int):
        self.add_requests = Method(log, f"add_requests@{rank}")
        self.abort = Method(log, f"abort@{rank}")
        self.shutdown = Method(log, f"shutdown@{rank}")
        self.fail = Method(log, f"fail@{rank}")
        self.run = Method(log, f"run@{rank}")


def _client(log: list, start: bool = True) -> EngineClient:
    client = EngineClient.__new__(EngineClient)  # no cluster: only the intake path runs
    client.shards = [StandInShard(log, 0), StandInShard(log, 1)]
    client.leader = client.shards[0]
    client._sinks, client._engine_ids, client._serials = {}, {}, itertools.count()
    client._lock, client.dead_reason = threading.Lock(), None
    client._calls, client._sent_adds = queue.SimpleQueue(), collections.deque()
    client._together = threading.Lock()
    client._hasher = None
    client._client, client._owns_engine = OWNER_CLIENT, True
    client._caller = threading.Thread(target=client._make_calls, name="shardserve-calls", daemon=True)
    if start:
        client._caller.start()
    return client


def _sent(log: list) -> list:
    """(call, the engine ids it carried, or the aborted id) of each call the shards got."""
    return [(name, args[0] if name.startswith("abort") else [new.req_id for new in args[0]]) for name, args, _ in log]


def test_adds_and_aborts_leave_from_the_clients_own_thread_in_order():
    log: list = []
    client = _client(log)
    embeds = PromptEmbedsRef(ref="object-ref", dtype="float32", shape=(3, 8), digests="digests-ref")
    client.add_request("a", SamplingParams(), lambda delta: None, (5, 6, 7))
    client.add_request("b", SamplingParams(), lambda delta: None, None, embeds)
    client.abort("a")
    client.abort("never-added")  # unknown: nothing is sent
    client._calls.put((None, ()))
    client._caller.join(timeout=10)
    assert _sent(log) == [
        ("add_requests@0", ["a#0"]), ("add_requests@1", ["a#0"]), ("add_requests@0", ["b#1"]),
        ("add_requests@1", ["b#1"]), ("abort@0", "a#0")]  # the shards know each request by the engine's own id
    assert {thread for _, _, thread in log} == {"shardserve-calls"}
    # The embeddings' ref goes as the call's argument only, not nested in the request; the
    # ref of their digests (the hasher's answer) to the leader alone, in a list (Ray passes
    # a nested ref as it is: the leader's call does not wait for the hashing).
    _, ([new], array_ref, digests, client), _ = log[2]
    assert array_ref == "object-ref" and digests == ["digests-ref"]
    assert client == OWNER_CLIENT  # the leader's outbox these requests' deltas go to
    assert new.prompt_embeds.ref is None and new.prompt_embeds.digests is None
    _, ([new], array_ref), _ = log[3]
    assert array_ref == "object-ref" and new.prompt_embeds.digests is None
    assert log[0][1][2] is None  # token ids: no digests


def test_a_small_puts_digests_are_made_at_the_put_and_a_large_ones_asked_of_the_hasher(monkeypatch):
    """With prefix caching, the rows of a put up to INLINE_DIGESTS_MAX_BYTES are hashed
    where they are put, so they travel with the requests and the leader never waits for
    them; a larger put's digests are the hasher's answer, asked for at once."""
    log: list = []
    client = _client(log, start=False)
    client.config = types.SimpleNamespace(block_size=16)
    client._hasher = types.SimpleNamespace(digests=Method(log, "digests"))
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((n, 8), dtype=np.float32) for n in (40, 3)]
    prompts = [EnginePrompt(None, None, rows[0], "float32"),
               EnginePrompt((1, 2, 3, 4, 5), None, rows[1], "float32", embeds_spans=((1, 4),))]
    digests = client._digests_of("object-ref", prompts)
    assert digests == [prompt_block_digests(rows[0], "float32", None, 16),
                       prompt_block_digests(rows[1], "float32", ((1, 4),), 16)]
    assert len(digests[0]) == 3 and digests[1][0] is not None and log == []
    monkeypatch.setattr(engine_client, "INLINE_DIGESTS_MAX_BYTES", rows[0].nbytes + rows[1].nbytes - 1)
    client._digests_of("object-ref", prompts)
    assert log == [("digests", ("object-ref", [("float32", None), ("float32", ((1, 4),))]), "MainThread")]


def test_requests_queued_together_with_one_embeddings_object_go_in_one_call_per_shard():
    """Adds waiting in the queue at once go together while they share the embeddings
    object (a group put as one, or none: token ids), so each shard fetches it once; an
    abort, or another object, starts the next call, and the order stays the queue's."""
    log: list = []
    client = _client(log, start=False)
    group = [PromptEmbedsRef(ref="group-ref", dtype="float32", shape=(3, 8), index=i) for i in range(3)]
    other = PromptEmbedsRef(ref="other-ref", dtype="float32", shape=(2, 8))
    client.add_request("i1", SamplingParams(), lambda delta: None, (5, 6))
    client.add_request("i2", SamplingParams(), lambda delta: None, (7,))
    for i, embeds in enumerate(group):
        client.add_request(f"g{i}", SamplingParams(), lambda delta: None, None, embeds)
    client.abort("g0")
    client.add_request("o", SamplingParams(), lambda delta: None, None, other)
    client.add_request("i3", SamplingParams(), lambda delta: None, (8,))
    client._calls.put((None, ()))
    client._caller.start()
    client._caller.join(timeout=10)
    assert [(name, ids) for name, ids in _sent(log) if name.endswith("@0")] == [
        ("add_requests@0", ["i1#0", "i2#1"]), ("add_requests@0", ["g0#2", "g1#3", "g2#4"]), ("abort@0", "g0#2"),
        ("add_requests@0", ["o#5"]), ("add_requests@0", ["i3#6"])]
    _, (news, array_ref, _digests, _owner), _ = log[2]
    assert array_ref == "group-ref" and [new.prompt_embeds.index for new in news] == [0, 1, 2]
    assert [req_ids for req_ids, _ in client._sent_adds] == [
        ("i1#0", "i2#1"), ("g0#2", "g1#3", "g2#4"), ("o#5",), ("i3#6",)]


def test_requests_added_together_go_in_one_call_though_the_calls_thread_took_the_first():
    """Inside together(), the calls thread, having taken the block's first request, waits
    for the block's end before it sends: the shards get the block's requests in one call,
    so the engine's next step does not begin with the first alone."""
    log: list = []
    client = _client(log)
    with client.together():
        client.add_request("a", SamplingParams(), lambda delta: None, (5, 6))
        deadline = time.monotonic() + 10
        while not client._calls.empty():  # the calls thread has taken "a" and waits for the block
            assert time.monotonic() < deadline, "the calls thread never took the first request"
            time.sleep(0.001)
        client.add_request("b", SamplingParams(), lambda delta: None, (7,))
        client.add_request("c", SamplingParams(), lambda delta: None, (8, 9))
    client._calls.put((None, ()))
    client._caller.join(timeout=10)
    assert _sent(log) == [("add_requests@0", ["a#0", "b#1", "c#2"]), ("add_requests@1", ["a#0", "b#1", "c#2"])]


def test_a_request_one_shard_could_not_take_fails_alone_among_those_sent_with_it(monkeypatch, no_ray):
    """A shard's add_requests replies per request: the one it could not take ends with an
    error, the others of the same call run on."""
    client, received = _client([]), {"a": [], "b": [], "c": []}
    for req_id in received:
        client.add_request(req_id, SamplingParams(), received[req_id].append, (5, 6))
    client._calls.put((None, ()))
    client._caller.join(timeout=10)
    client._sent_adds.clear()
    client._sent_adds.append((("a#0", "b#1", "c#2"), ["add@0", "add@1"]))  # one call to each shard
    replies = {"add@0": [None, None, None], "add@1": [None, ValueError("no memory for b"), None]}
    monkeypatch.setattr(engine_client.ray, "wait", lambda refs, **kwargs: (list(refs), []))
    monkeypatch.setattr(engine_client.ray, "get", lambda refs: [replies[ref] for ref in refs])
    client.name, client._closed, client._unchecked_adds = "t", False, {}
    client._run_refs, client._get_outputs = [], lambda: []
    _poll_once(client, [])
    assert [d.finish_reason for d in received["b"]] == ["error"] and "ValueError" in received["b"][0].error
    assert received["a"] == received["c"] == [] and client.num_unfinished == 2


@pytest.fixture
def no_ray(monkeypatch):
    """ray.wait finds nothing finished and ray.kill does nothing: stand-in shards only."""
    monkeypatch.setattr(engine_client.ray, "wait", lambda refs, **kwargs: ([], list(refs)))
    monkeypatch.setattr(engine_client.ray, "kill", lambda actor: None)


def _poll_once(client: EngineClient, deltas: list[RequestDelta]) -> None:
    """Runs the output thread's loop on this thread over one poll that returns `deltas`."""
    def get_outputs():
        client._closed = True  # the loop ends after this poll
        return deltas

    client._closed, client._run_refs, client._unchecked_adds = False, [], {}
    client._get_outputs = get_outputs
    client._poll_outputs()


def test_a_sink_that_raises_stops_neither_the_output_thread_nor_other_requests(no_ray):
    """A stream whose event loop has closed raises from its sink (call_soon_threadsafe):
    the output thread must go on delivering to the other requests."""
    client, received = _client([]), []

    def closed_loop_sink(delta):
        raise RuntimeError("Event loop is closed")

    client.add_request("gone", SamplingParams(), closed_loop_sink, (5, 6))
    client.add_request("live", SamplingParams(), received.append, (7, 8))
    gone_end = RequestDelta("gone#0", (), None, finish_reason="abort")  # as the shards name them
    live_token = RequestDelta("live#1", (9,), None)
    _poll_once(client, [gone_end, live_token])
    assert received == [RequestDelta("live", (9,), None)]  # under the caller's id
    assert client.num_unfinished == 1  # "gone" ended, "live" still runs


def test_shutdown_ends_requests_in_flight_and_refuses_new_ones(no_ray):
    """Nothing is left waiting forever: a request still running at shutdown gets an error
    delta (EngineDeadError for its caller), and a request added after it raises."""
    log: list = []
    client, received = _client(log), []
    client.name, client._closed, client._owns_group, client._run_refs = "t", False, False, []
    client._poller = threading.Thread(target=lambda: None)
    client._poller.start()
    client.add_request("running", SamplingParams(), received.append, (5, 6, 7))
    client.shutdown()
    assert [d.finish_reason for d in received] == ["error"]
    assert client.num_unfinished == 0 and client.dead_reason is not None
    assert engine_client.request_error(client, received[0].error).__class__ is EngineDeadError
    with pytest.raises(EngineDeadError):
        client.add_request("late", SamplingParams(), received.append, (5,))
    assert ("shutdown@0", (), "MainThread") in [(n, a, t) for n, a, t in log]


def test_the_output_thread_starts_after_what_it_reads(monkeypatch):
    """The output thread reads the calls' state (_sent_adds, _unchecked_adds) after its
    first poll: __init__ must have made it before starting the thread."""
    log: list = []
    shard = StandInShard(log, 0)
    monkeypatch.setattr(EngineClient, "_start_shards", lambda self: [shard])
    monkeypatch.setattr(engine_client.ray, "wait", lambda refs, **kwargs: ([], list(refs)))

    def first_poll(self):  # the poller's first poll returns at once, before __init__ goes on
        self._closed = True
        return []

    monkeypatch.setattr(EngineClient, "_get_outputs", first_poll)
    real_thread = threading.Thread

    def thread(target, name, daemon):  # the output thread's first poll runs before start() returns
        if name != "shardserve-outputs":
            return real_thread(target=target, name=name, daemon=daemon)
        done = threading.Event()

        class FirstPollFirst:
            def start(self):
                target()
                done.set()

            def join(self, timeout=None):
                done.wait(timeout)
        return FirstPollFirst()

    monkeypatch.setattr(engine_client.threading, "Thread", thread)
    config = types.SimpleNamespace(enable_prefix_caching=False, enable_prompt_embeds=False)  # no hasher
    client = EngineClient(config=config, placement_group=object(), name="t")
    client._calls.put((None, ()))
    client._caller.join(timeout=10)


def test_a_request_id_already_running_is_refused_and_a_finished_ones_may_come_again():
    """A second request under a running one's id would take over the first's sink (that
    one then never ends), and its abort could not tell the two apart: the client refuses
    it at once. A finished request's id is free again, though the leader may still hold
    the request (it drops finished ones at its next step): the shards know every request
    by the engine's own id for it, so the leader never sees an id twice."""
    log: list = []
    client, first = _client(log), []
    client.add_request("same", SamplingParams(), first.append, (5, 6))
    with pytest.raises(ValueError, match="same"):
        client.add_request("same", SamplingParams(), lambda delta: None, (7, 8))
    client._deliver(RequestDelta("same#0", (9,), None, finish_reason="length"))
    assert [(d.req_id, d.new_token_ids) for d in first] == [("same", (9,))]
    # Once it has finished, its id may come again: the shards know the new one by another.
    again = []
    client.add_request("same", SamplingParams(), again.append, (7, 8))
    client._deliver(RequestDelta("same#0", (1,), None))  # the first one's, late: not the new one's
    client._deliver(RequestDelta("same#1", (4,), None, finish_reason="stop", error=None))
    client._calls.put((None, ()))
    client._caller.join(timeout=10)
    assert [i for name, ids in _sent(log) if name == "add_requests@0" for i in ids] == ["same#0", "same#1"]
    assert [(d.req_id, d.new_token_ids) for d in again] == [("same", (4,))]


def test_an_add_lost_with_a_dead_shard_ends_as_the_engines_death(monkeypatch, no_ray):
    """A follower that dies fails its pending add_request calls as it fails its run():
    their requests must end as the engine's (EngineDeadError: 503, retry), not as requests
    the engine could not take (RequestFailedError: 500, "a retry fails the same way")."""
    client, seen = _client([]), []

    def died(refs):
        raise engine_client.ray.exceptions.ActorDiedError()

    monkeypatch.setattr(engine_client.ray, "wait", lambda refs, **kwargs: (list(refs), []))
    monkeypatch.setattr(engine_client.ray, "get", died)
    client.add_request("x", SamplingParams(), lambda d: seen.append((d, client.dead_reason)), (5, 6))
    client._sent_adds.append((("x#0",), ["add-x@0", "add-x@1"]))  # what the calls thread records
    client.name, client._closed, client._unchecked_adds = "t", False, {}
    client._run_refs, client._get_outputs = ["run@0", "run@1"], lambda: []
    client._poll_outputs()  # one poll: the adds' and the runs' failures seen together
    assert len(seen) == 1
    delta, dead_reason = seen[0]
    assert delta.finish_reason == "error" and dead_reason is not None


def test_embeddings_in_flight_are_bounded_by_what_the_devices_had_free():
    """2 GiB at most; on a GPU, half of what the emptiest shard had free once started; never
    less than one prompt of max_model_len rows (one such prompt must always be admitted)."""
    from types import SimpleNamespace

    import torch

    config = SimpleNamespace(max_model_len=1024, model_config=SimpleNamespace(hidden_size=4096),
                             torch_dtype=torch.bfloat16)
    one_prompt = 1024 * 4096 * 2  # 8 MiB
    bound = engine_client.embeds_in_flight_bound
    assert bound(config, [None, None]) == engine_client.EMBEDS_IN_FLIGHT_MAX_BYTES == 2 << 30  # CPU
    assert bound(config, [80 << 30, 60 << 30]) == 2 << 30  # a large GPU: the cap
    assert bound(config, [3 << 30, 1 << 30]) == 512 << 20  # a small one: half the emptiest shard's free
    assert bound(config, [4 << 20]) == one_prompt  # almost nothing free: one prompt still goes


def test_an_engines_store_warmup_is_512_mib_at_most_an_eighth_of_the_store():
    """An engine that takes embeddings writes this much of its node's object store while its
    shards start (the store's fresh pages cost its first puts a fault per 4 KiB)."""
    assert engine_client.store_warmup_bytes(37.4 * 2**30) == engine_client.STORE_WARMUP_MAX_BYTES == 512 << 20
    assert engine_client.store_warmup_bytes(2 << 30) == 256 << 20
    assert engine_client.store_warmup_bytes(0) == 0


def test_warm_object_store_puts_into_this_nodes_store_and_keeps_no_reference(ray_cluster):
    import ray

    core_worker = ray._private.worker.global_worker.core_worker
    before = set(core_worker.get_all_reference_counts())
    assert engine_client.warm_object_store(8 << 20) == 8 << 20
    # The object was put (owned by this process) and its reference dropped at once, so Ray
    # frees it with its next batch: this process holds none of it.
    held = {ref: counts for ref, counts in core_worker.get_all_reference_counts().items() if ref not in before}
    assert not any(counts["local"] for counts in held.values()), held


def test_no_store_warmup_through_ray_client(monkeypatch):
    """A driver connected by Ray Client (ray://) puts over the network into a store it
    never maps: warming would only send 512 MiB across."""
    import ray

    monkeypatch.setattr(ray.util.client.ray, "is_connected", lambda: True)
    monkeypatch.setattr(engine_client.ray, "put", lambda value: pytest.fail("put through Ray Client"))
    assert engine_client.warm_object_store() == 0
