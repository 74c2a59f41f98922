"""How an API server finds its engine with --api-server-count > 1 (no Ray): ShardServeEngine
turns away an API server of another node while that one looks on its own, and one past its
count; one API server at a time reports the engine's figures to Ray. The API server asks an
engine on its own node first, then any, and says so when its rows will cross the network.
A stopping engine waits for its requests, not for an API server that never detaches."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest

import api.deployment as deployment
from api.deployment import ShardServeEngine
from api.settings import ServerSettings
from cluster.engine_client import EngineAttachment
from workers.messages import EngineStats


class FakeEngineClient:
    """The owner's EngineClient as open_client uses it: clients and their outboxes."""

    def __init__(self):
        self.attached: dict[int, int] = {}
        self._ids = itertools.count(1)

    def clients(self) -> dict[int, int]:
        return {0: 0, **self.attached}

    def open_client(self, share: int) -> EngineAttachment:
        client = next(self._ids)
        self.attached[client] = 0
        return EngineAttachment("e", "ns", client, 100, (1 << 20) // share)


def engine_host(api_server_count: int = 2) -> ShardServeEngine:
    host = ShardServeEngine.func_or_class.__new__(ShardServeEngine.func_or_class)
    host.settings = ServerSettings(api_server_count=api_server_count)
    host.engine, host.node_id = FakeEngineClient(), "node-a"
    host._opening, host._reporter = asyncio.Lock(), None
    return host


def test_the_engine_admits_its_count_of_api_servers_one_of_them_reporting():
    async def run():
        host = engine_host()
        assert await host.open_client("node-b") is None  # still looking on its own node
        first = await host.open_client("node-a")
        second = await host.open_client(None)  # any node will do
        assert await host.open_client(None) is None  # two already
        assert [(a.client, reports, node) for a, reports, node in (first, second)] == [
            (1, True, "node-a"), (2, False, "node-a")]
        del host.engine.attached[1]  # the reporter's client dropped (its process died)
        third = await host.open_client("node-a")
        assert (third[0].client, third[1]) == (3, True)

    asyncio.run(run())


class FakeEngines:
    """ShardServeEngine's handle: open_client.remote(node) answered by `answer`."""

    def __init__(self, answer):
        self.open_client, self.asked, self._answer = self, [], answer

    def remote(self, node_id=None):
        self.asked.append(node_id)

        async def result():
            return self._answer(node_id)
        return result()


@pytest.fixture
def quick_retries(monkeypatch):
    monkeypatch.setattr(deployment, "_this_node", lambda: "node-a")
    monkeypatch.setattr(deployment, "ATTACH_RETRY_S", 0.001)
    monkeypatch.setattr(deployment, "ATTACH_RETRY_MAX_S", 0.004)
    monkeypatch.setattr(deployment, "LOCAL_ATTACH_WAIT_S", 0.05)


def test_an_api_server_takes_an_engine_on_its_own_node_first(quick_retries, caplog):
    attachment = EngineAttachment("e", "ns", 1, 100, 1)
    tries = itertools.count()
    engines = FakeEngines(lambda node: (attachment, True, "node-a") if next(tries) == 3 else None)
    assert asyncio.run(deployment._attachment(engines)) == (attachment, True)
    assert engines.asked == ["node-a"] * 4
    assert "across the network" not in caplog.text


def test_an_api_server_with_no_engine_on_its_node_takes_another_and_warns(quick_retries, caplog):
    attachment = EngineAttachment("e", "ns", 1, 100, 1)
    engines = FakeEngines(lambda node: None if node == "node-a" else (attachment, False, "node-b"))
    with caplog.at_level(logging.WARNING, logger=deployment.__name__):
        assert asyncio.run(deployment._attachment(engines)) == (attachment, False)
    assert engines.asked[0] == "node-a" and engines.asked[-1] is None and len(engines.asked) > 2
    assert "on node node-b" in caplog.text and "across the network" in caplog.text


class StoppingEngineClient(FakeEngineClient):
    """An engine whose API server never detaches (Serve killed it), running `busy_polls`
    more polls' worth of requests, then nothing."""

    def __init__(self, busy_polls: int):
        super().__init__()
        self.attached, self.busy_polls, self.stopped, self.dead_reason = {1: 5}, busy_polls, False, None

    def stats(self) -> EngineStats:
        self.busy_polls -= 1
        return EngineStats(num_running=int(self.busy_polls > 0), num_waiting=0, num_total_blocks=4, num_free_blocks=4)

    def clients(self, timeout_s: float = 0.0) -> dict[int, int]:
        return super().clients()

    def shutdown(self) -> None:
        self.stopped = True


def test_a_stopping_engine_waits_for_its_requests_not_for_an_api_server_that_never_detaches(monkeypatch):
    monkeypatch.setattr(deployment, "IDLE_BEFORE_STOP_S", 0.3)
    monkeypatch.setattr(deployment.time, "sleep", lambda s: None)  # the loop's own pause
    now = [0.0]

    def ticking() -> float:
        now[0] += 0.1
        return now[0]

    monkeypatch.setattr(deployment.time, "monotonic", ticking)
    host = engine_host()
    host.engine = StoppingEngineClient(busy_polls=10)
    host.__del__()
    assert host.engine.stopped
    # Ten polls with a request running, then idle past 0.3 s: stopped long before the 30 s
    # graceful timeout, and not before the requests ended.
    assert host.engine.busy_polls < 0 and 1.0 < now[0] < 10.0, (host.engine.busy_polls, now[0])
