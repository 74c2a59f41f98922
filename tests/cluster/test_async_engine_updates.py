"""AsyncEngine.generate merges the deltas that wait for a slow consumer into one update
(as vLLM's output collector does): same text, ids and logprobs as one update a delta, far
fewer updates under load; a stop string inside a merged batch still cuts the text and
aborts the request. A SampleStream started from a worker thread streams on the loop; one
the engine finished is never aborted, one ended early is aborted once. A stand-in
EngineClient feeds the deltas (no Ray)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cluster.async_engine import AsyncEngine
from cluster.default_model import default_model_path
from cluster.engine_client import EngineDeadError, RequestFailedError
from cluster.prompts import EnginePrompt
from cluster.tokenizer import load_tokenizer
from workers.messages import RequestDelta, TokenLogprobs
from workers.sampling_params import SamplingParams


class StandInClient:
    """Hands generate() its deltas when told to; records aborts."""

    def __init__(self):
        self.sink, self.aborted, self.dead_reason = None, [], None

    def add_request(self, req_id, params, sink, *prompt):
        self.sink = sink

    def abort(self, req_id):
        self.aborted.append(req_id)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SHARDSERVE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "shardserve-cache"))
        return load_tokenizer(default_model_path())


def _engine(tokenizer):
    engine = AsyncEngine.__new__(AsyncEngine)  # no cluster: only generate() is exercised
    engine.tokenizer, engine.engine = tokenizer, StandInClient()
    return engine


def _deltas(tokenizer, text: str, logprobs: bool):
    ids = tokenizer.encode(text, add_special_tokens=False)
    return [RequestDelta("r", (token,), (TokenLogprobs(-0.5, ((token, -0.5),)),) if logprobs else None,
                         finish_reason="length" if i == len(ids) - 1 else None)
            for i, token in enumerate(ids)]


async def _collect(engine, deltas, params, burst: int):
    """Sends the deltas `burst` at a time, each burst before the consumer runs again."""
    updates = []
    stream = engine.generate("r", _prompt(), params)
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)  # generate() has registered its sink
    for start in range(0, len(deltas), burst):
        for delta in deltas[start:start + burst]:
            engine.engine.sink(delta)
        if start == 0:
            updates.append(await first)
        else:
            try:
                updates.append(await stream.__anext__())
            except StopAsyncIteration:
                break
    async for update in stream:
        updates.append(update)
    return updates


def _prompt():
    return EnginePrompt(None, (5, 6, 7), None)


@pytest.mark.parametrize("logprobs", [False, True])
def test_pending_deltas_merge_into_one_update(tokenizer, logprobs):
    text = "The quick brown fox jumps over the lazy dog, twice over."
    params = SamplingParams(max_tokens=64, logprobs=1 if logprobs else None)

    one_by_one = asyncio.run(_collect(_engine(tokenizer), _deltas(tokenizer, text, logprobs), params, burst=1))
    merged = asyncio.run(_collect(_engine(tokenizer), _deltas(tokenizer, text, logprobs), params, burst=5))
    num_tokens = len(_deltas(tokenizer, text, logprobs))
    assert len(one_by_one) == num_tokens and len(merged) == -(-num_tokens // 5)
    for updates in (one_by_one, merged):
        assert "".join(u.text for u in updates) == text
        assert sum(len(u.token_ids) for u in updates) == num_tokens
        assert updates[-1].finish_reason == "length"
        if logprobs:
            assert sum(len(u.logprobs) for u in updates) == num_tokens


def test_stop_string_inside_a_merged_batch_cuts_and_aborts(tokenizer):
    engine = _engine(tokenizer)
    params = SamplingParams(max_tokens=64, stop=["lazy"])
    updates = asyncio.run(_collect(engine, _deltas(tokenizer, "The quick brown fox jumps over the lazy dog.", False),
                                   params, burst=50))
    assert len(updates) == 1 and updates[0].text == "The quick brown fox jumps over the "
    assert updates[0].finish_reason == "stop" and engine.engine.aborted == ["r"]


def test_a_stream_started_in_a_worker_thread_streams_on_the_loop(tokenizer):
    engine = _engine(tokenizer)
    deltas = _deltas(tokenizer, "Started off the loop.", False)

    async def scenario():
        loop = asyncio.get_running_loop()

        def start_and_feed():  # what the replica's embeddings thread does, then the engine
            stream = engine.start("r", _prompt(), SamplingParams(max_tokens=64), loop)
            for delta in deltas:
                engine.engine.sink(delta)
            return stream, threading.current_thread()

        stream, thread = await asyncio.to_thread(start_and_feed)
        assert thread is not threading.main_thread()
        return [update async for update in stream.updates()]

    updates = asyncio.run(scenario())
    assert "".join(u.text for u in updates) == "Started off the loop."
    assert updates[-1].finish_reason == "length" and engine.engine.aborted == []


def test_close_aborts_only_what_the_engine_has_not_finished_and_only_once(tokenizer):
    engine = _engine(tokenizer)

    async def scenario():
        loop = asyncio.get_running_loop()
        finished = engine.start("done", _prompt(), SamplingParams(max_tokens=64), loop)
        for delta in _deltas(tokenizer, "Short.", False):
            engine.engine.sink(delta)
        assert [u async for u in finished.updates()][-1].finish_reason == "length"
        finished.close()
        never_read = engine.start("gone", _prompt(), SamplingParams(max_tokens=64), loop)
        never_read.close()
        never_read.close()

    asyncio.run(scenario())
    assert engine.engine.aborted == ["gone"]


def test_closing_generate_early_aborts_at_once(tokenizer):
    engine = _engine(tokenizer)

    async def scenario():
        stream = engine.generate("r", _prompt(), SamplingParams(max_tokens=64))
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0)
        engine.engine.sink(_deltas(tokenizer, "Some words here.", False)[0])
        await first
        await stream.aclose()  # the consumer went away after one update
        return list(engine.engine.aborted)

    assert asyncio.run(scenario()) == ["r"]


@pytest.mark.parametrize("dead_reason, error", [(None, RequestFailedError), ("shard 1 died", EngineDeadError)],
                         ids=["engine alive", "engine dead"])
def test_an_error_delta_raises_request_failed_while_the_engine_lives(tokenizer, dead_reason, error):
    """A request that ended with finish_reason "error": RequestFailedError if the engine is
    alive (a shard could not take it), EngineDeadError if the engine died (its sweep)."""
    engine = _engine(tokenizer)
    engine.engine.dead_reason = dead_reason
    failed = [RequestDelta("r", (), None, finish_reason="error", error="the engine could not take request r")]
    with pytest.raises(error, match="could not take request r"):
        asyncio.run(_collect(engine, failed, SamplingParams(max_tokens=8), burst=1))
