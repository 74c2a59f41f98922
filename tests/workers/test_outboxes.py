"""The leader's outboxes, one per engine client: each request's deltas reach the client that
sent it; a detached or silent client is dropped and its running requests handed back for
abort; a gone client's deltas and requests are refused, never delivered elsewhere."""

from __future__ import annotations

import threading

import pytest

import workers.step_loop as step_loop
from workers.messages import RequestDelta
from workers.step_loop import OWNER_CLIENT, Outboxes, UnknownClientError


def delta(req_id: str, token: int = 1, finish: str | None = None) -> RequestDelta:
    return RequestDelta(req_id, (token,), None, finish_reason=finish)


def test_each_requests_deltas_reach_the_client_that_sent_it():
    boxes = Outboxes()
    a, b = boxes.attach(), boxes.attach()
    boxes.route(["x"], a)
    boxes.route(["y"], b)
    boxes.route(["z"], OWNER_CLIENT)
    boxes.put([delta("x"), delta("y"), delta("z"), delta("unrouted"), delta("x", 2, "stop")])
    assert [(d.req_id, d.new_token_ids) for d in boxes.take(0, a)] == [("x", (1,)), ("x", (2,))]
    assert [d.req_id for d in boxes.take(0, b)] == ["y"]
    assert [d.req_id for d in boxes.take(0)] == ["z", "unrouted"]  # the owner's by default
    assert boxes.clients() == {OWNER_CLIENT: 1, a: 1, b: 1}
    # x finished: a later delta under its id (a reused id) is no longer a's.
    boxes.put([delta("x")])
    assert boxes.take(0, a) == [] and [d.req_id for d in boxes.take(0)] == ["x"]


def test_detach_hands_back_the_running_requests_and_refuses_the_client_after():
    boxes = Outboxes()
    client = boxes.attach()
    boxes.route(["done", "running"], client)
    boxes.put([delta("done", finish="length")])
    assert boxes.detach(client) == ["running"]
    boxes.put([delta("running")])  # dropped: its client is gone
    assert boxes.take(0) == []
    with pytest.raises(UnknownClientError):
        boxes.take(0, client)
    with pytest.raises(UnknownClientError):
        boxes.route(["new"], client)
    with pytest.raises(ValueError, match="owner"):
        boxes.detach(OWNER_CLIENT)
    assert boxes.detach(client) == []  # twice: nothing more


def test_a_client_that_stops_polling_expires_and_one_that_polls_does_not(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(step_loop.time, "monotonic", lambda: now[0])
    boxes = Outboxes()
    silent, polling = boxes.attach(timeout_s=5.0), boxes.attach(timeout_s=5.0)
    boxes.route(["s1", "s2"], silent)
    boxes.route(["p1"], polling)
    now[0] += 4.0
    assert boxes.expire() == []
    assert boxes.take(0, polling) == []  # its poll ends at 104
    now[0] += 2.0  # 106: the silent client is past its timeout, the polling one is not
    assert sorted(boxes.expire()) == ["s1", "s2"]
    assert set(boxes.clients()) == {OWNER_CLIENT, polling}
    boxes.put([delta("s1"), delta("p1", finish="stop")])
    assert [d.req_id for d in boxes.take(0, polling)] == ["p1"]
    assert boxes.take(0) == []  # the expired client's deltas go nowhere else
    now[0] += 1000.0
    assert boxes.expire() == [] and set(boxes.clients()) == {OWNER_CLIENT}  # the owner never expires
    with pytest.raises(ValueError):
        boxes.attach(timeout_s=0)


def test_close_wakes_every_clients_poll():
    boxes = Outboxes()
    client = boxes.attach()
    results: list = []
    pollers = [threading.Thread(target=lambda c=c: results.append(boxes.take(60.0, c))) for c in (OWNER_CLIENT, client)]
    for poller in pollers:
        poller.start()
    boxes.close()
    for poller in pollers:
        poller.join(10)
    assert results == [[], []]
    assert boxes.take(60.0, boxes.attach()) == []  # a client attached after close: closed too
