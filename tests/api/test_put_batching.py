"""PutBatcher on its own (a recording engine, no Ray): the requests that reach it in one turn
of the event loop share one put and one together() block; each gets its own prompts back;
a failure stays with the requests it belongs to; a cancelled request is not started, or is
closed when it was."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest

from api.metrics import Metrics
from api.put_batching import PutBatcher
from cluster.prompts import EnginePrompt


class RecordingEngine:
    """put_prompts and together() as EngineClient has them, recorded: each put's prompts,
    and how many together() blocks were entered."""

    def __init__(self, fail_put: bool = False):
        self.puts: list[list[EnginePrompt]] = []
        self.num_together = 0
        self.in_together = False
        self.fail_put = fail_put

    def put_prompts(self, prompts):
        if self.fail_put:
            raise RuntimeError("object store full")
        self.puts.append(list(prompts))
        return [("put", len(self.puts), p) for p in prompts]

    @contextlib.contextmanager
    def together(self):
        self.num_together += 1
        self.in_together = True
        try:
            yield
        finally:
            self.in_together = False


class FakeStream:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


class FakeChoice:
    def __init__(self, prompt):
        self.prompt, self.stream = prompt, FakeStream()


def prompt(value: float) -> EnginePrompt:
    return EnginePrompt(None, None, np.full((2, 4), value, np.float32), "float32")


def starter(engine, started: list, fail: bool = False):
    """A start() that records its share, checks it runs inside together(), and returns one
    choice per prompt (or fails, as an APIError or a dead engine would)."""

    def start(share):
        assert engine.in_together
        started.append(share)
        if fail:
            raise ValueError("request id is already running")
        return [FakeChoice(p) for p in share]

    return start


def run(coro):
    return asyncio.run(coro)


def test_requests_of_one_turn_share_one_put_and_get_their_own_prompts():
    engine, metrics, started = RecordingEngine(), Metrics(), []
    batcher = PutBatcher(engine, metrics)
    requests = [[prompt(1)], [prompt(2), prompt(3)], [prompt(4)]]

    async def main():
        return await asyncio.gather(*(batcher.start(r, starter(engine, started)) for r in requests))

    results = run(main())
    assert len(engine.puts) == 1 and engine.puts[0] == [p for r in requests for p in r]
    assert engine.num_together == 1
    for request, choices in zip(requests, results):
        assert [c.prompt[2] for c in choices] == request  # its own prompts, in order
        assert all(c.prompt[:2] == ("put", 1) for c in choices)
    text = metrics.render(None).decode()
    assert "shardserve_prompt_embeds_put_requests_sum 3.0" in text
    assert "shardserve_prompt_embeds_put_requests_count 1.0" in text


def test_requests_of_later_turns_get_puts_of_their_own():
    engine, started = RecordingEngine(), []
    batcher = PutBatcher(engine, Metrics())

    async def main():
        first = await batcher.start([prompt(1)], starter(engine, started))
        second = await batcher.start([prompt(2)], starter(engine, started))
        return first, second

    run(main())
    assert [len(put) for put in engine.puts] == [1, 1] and engine.num_together == 2


def test_a_failed_start_fails_only_its_request():
    engine, started = RecordingEngine(), []
    batcher = PutBatcher(engine, Metrics())

    async def main():
        return await asyncio.gather(batcher.start([prompt(1)], starter(engine, started)),
                                    batcher.start([prompt(2)], starter(engine, started, fail=True)),
                                    batcher.start([prompt(3)], starter(engine, started)),
                                    return_exceptions=True)

    first, second, third = run(main())
    assert isinstance(second, ValueError) and "already running" in str(second)
    assert [c.prompt[2] for c in first] == [engine.puts[0][0]]
    assert [c.prompt[2] for c in third] == [engine.puts[0][2]]


def test_a_failed_put_fails_every_request_of_the_turn_and_the_next_turn_puts_again():
    engine, started = RecordingEngine(fail_put=True), []
    batcher = PutBatcher(engine, Metrics())

    async def main():
        results = await asyncio.gather(*(batcher.start([prompt(v)], starter(engine, started)) for v in (1, 2)),
                                       return_exceptions=True)
        engine.fail_put = False
        return results, await batcher.start([prompt(3)], starter(engine, started))

    failed, later = run(main())
    assert all(isinstance(r, RuntimeError) and "object store full" in str(r) for r in failed)
    assert started == [[("put", 1, engine.puts[0][0])]] and len(later) == 1


def test_a_request_cancelled_before_the_put_is_neither_put_nor_started():
    engine, started = RecordingEngine(), []
    batcher = PutBatcher(engine, Metrics())
    gone, kept = prompt(1), prompt(2)

    async def main():
        leaving = asyncio.ensure_future(batcher.start([gone], starter(engine, started)))
        staying = asyncio.ensure_future(batcher.start([kept], starter(engine, started)))
        await asyncio.sleep(0)  # both are waiting now; the put comes in the next turn
        leaving.cancel()
        choices = await staying
        with pytest.raises(asyncio.CancelledError):
            await leaving
        return choices

    choices = run(main())
    assert engine.puts == [[kept]] and [c.prompt[2] for c in choices] == [kept]


def test_a_request_cancelled_after_its_start_closes_its_choices():
    """Started in the put's turn, cancelled before its task resumed (the client left just
    then): nobody else would end its engine requests."""
    engine, started, made = RecordingEngine(), [], []
    batcher = PutBatcher(engine, Metrics())

    def start(share):
        made.extend(FakeChoice(p) for p in share)
        return list(made)

    async def main():
        waiting = asyncio.ensure_future(batcher.start([prompt(1)], start))
        await asyncio.sleep(0)  # waiting on its future; the put is next
        loop = asyncio.get_running_loop()
        loop.call_soon(waiting.cancel)  # runs after the put's callback, before the task resumes
        with pytest.raises(asyncio.CancelledError):
            await waiting

    run(main())
    assert len(made) == 1 and made[0].stream.closed
