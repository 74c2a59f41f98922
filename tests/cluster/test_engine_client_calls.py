"""EngineClient sends requests and aborts to the shards from its own thread, in order:
never from the caller's thread, whose Ray task (a Serve request whose client went away)
may be cancelled, and Ray cancels the calls such a task made, recursively. Stand-in shards
(no Ray) record where each call came from."""

from __future__ import annotations

import collections
import queue
import threading

from cluster.engine_client import EngineClient
from workers.messages import PromptEmbedsRef
from workers.sampling_params import SamplingParams


class Method:
    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def remote(self, *args):
        self.log.append((self.name, args, threading.current_thread().name))


class StandInShard:
    def __init__(self, log: list, rank: int):
        self.add_request = Method(log, f"add_request@{rank}")
        self.abort = Method(log, f"abort@{rank}")


def _client(log: list) -> EngineClient:
    client = EngineClient.__new__(EngineClient)  # no cluster: only the intake path runs
    client.shards = [StandInShard(log, 0), StandInShard(log, 1)]
    client.leader = client.shards[0]
    client._sinks, client._lock, client.dead_reason = {}, threading.Lock(), None
    client._calls, client._sent_adds = queue.SimpleQueue(), collections.deque()
    client._caller = threading.Thread(target=client._make_calls, name="shardserve-calls", daemon=True)
    client._caller.start()
    return client


def test_adds_and_aborts_leave_from_the_clients_own_thread_in_order():
    log: list = []
    client = _client(log)
    embeds = PromptEmbedsRef(ref="object-ref", dtype="float32", shape=(3, 8))
    client.add_request("a", SamplingParams(), lambda delta: None, (5, 6, 7))
    client.add_request("b", SamplingParams(), lambda delta: None, None, embeds)
    client.abort("a")
    client.abort("never-added")  # unknown: nothing is sent
    client._calls.put((None, ()))
    client._caller.join(timeout=10)
    assert [(name, args[0] if name.startswith("abort") else args[0].req_id) for name, args, _ in log] == [
        ("add_request@0", "a"), ("add_request@1", "a"), ("add_request@0", "b"), ("add_request@1", "b"),
        ("abort@0", "a")]
    assert {thread for _, _, thread in log} == {"shardserve-calls"}
    # The embeddings' ref goes as the call's argument only, not nested in the request.
    _, (new, array_ref), _ = log[2]
    assert array_ref == "object-ref" and new.prompt_embeds.ref is None
