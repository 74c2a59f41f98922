"""The `shardserve serve` signal handler: a signal that lands while an earlier one is being
handled must not deadlock the shutdown (no Ray, no server)."""

from __future__ import annotations

import signal
import threading

from api.cli import StopRequest


def test_a_signal_landing_inside_the_stop_handler_returns_at_once():
    """Python runs a handler for a signal that arrives during an earlier handler nested in
    it, at any bytecode: here at the worst point, while Event.set holds the Event's lock.
    The nested handler must return, where a second set() would wait for that lock forever
    (what `lambda *_: event.set()` did: seen as a server that ignored SIGTERM)."""
    stop = StopRequest()
    event_set = stop.event.set

    def set_with_a_signal_landing_inside():
        with stop.event._cond:  # the lock Event.set takes
            stop(signal.SIGINT, None)  # the nested handler
        event_set()

    stop.event.set = set_with_a_signal_landing_inside
    first = threading.Thread(target=stop, args=(signal.SIGTERM, None), daemon=True)
    first.start()
    first.join(5)
    assert not first.is_alive(), "the nested handler waited for the lock its outer call held"
    assert stop.event.is_set()


def test_the_first_signal_sets_the_event_and_later_ones_change_nothing():
    stop = StopRequest()
    assert not stop.event.is_set()
    stop(signal.SIGTERM, None)
    assert stop.event.is_set()
    stop(signal.SIGINT, None)
    assert stop.event.is_set()
