"""Backpressure and mid-stream failures in the HTTP layer, around the fake engine of
test_routes (no Ray): past max_in_flight choices, or past the bytes of embeddings the
engine may hold, a request is a 503 with Retry-After (a 400 if it alone is larger than that);
every way a request ends gives its slots back; an engine that dies mid-stream ends the
stream with an error event and [DONE], without internals."""

from __future__ import annotations

import asyncio
import gc
import json

import pytest
import torch
from starlette.testclient import TestClient

from api.chat import ChatCompletionRequest
from api.embeds_codec import encode_prompt_embeds
from api.protocol import CompletionRequest
from api.routes import build_fastapi_app
from api.errors import APIError
from api.serving import OpenAIServing
from cluster.engine_client import EngineDeadError
from tests.api.test_routes import H, MODEL, FakeEngine, embeds, error_of, post, sse_events, tokenizer  # noqa: F401


class DyingEngine(FakeEngine):
    """Streams one update, then fails as EngineClient does when a shard dies."""

    async def generate(self, req_id, prompt, params):
        async for update in super().generate(req_id, prompt, params):
            yield update
            raise EngineDeadError("shard 1 died: RayActorError at /srv/secret/worker.py:7")


def serving_of(engine, max_in_flight: int) -> OpenAIServing:
    return OpenAIServing(engine, served_model_name=MODEL, enable_prompt_embeds=True,
                         max_in_flight=max_in_flight)


def request(**fields) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": MODEL, "prompt": "hi", "max_tokens": 4, **fields})


def test_past_capacity_is_503_with_retry_after_and_slots_come_back(tokenizer):
    async def scenario():
        serving = serving_of(FakeEngine(tokenizer, hang_after=1), max_in_flight=2)
        streams = [await serving.create_completion(request(stream=True)) for _ in range(2)]
        for stream in streams:
            assert (await anext(stream)).startswith("data: {")  # running, then hangs
        with pytest.raises(APIError) as info:
            await serving.create_completion(request(stream=True))
        assert (info.value.status, info.value.retry_after_s) == (503, 1)
        assert "at capacity (2 requests in flight, limit 2)" in info.value.message
        await streams[0].aclose()  # the client went away: its slot is free again
        third = await serving.create_completion(request(stream=True))
        assert serving.admission.num_in_flight == 2
        await anext(third)
        for stream in (streams[1], third):
            await stream.aclose()
        assert serving.admission.num_in_flight == 0

    asyncio.run(scenario())


def test_a_request_larger_than_the_bound_is_400_not_503(tokenizer):
    """Two prompts x n=2 against a bound of 3: no Retry-After would ever admit it."""
    async def scenario():
        serving = serving_of(FakeEngine(tokenizer), max_in_flight=3)
        with pytest.raises(APIError) as info:
            await serving.create_completion(request(prompt=["a", "b"], n=2))
        assert (info.value.status, info.value.param) == (400, "n")
        assert "asks for 4 choices (prompts x n); the server runs at most 3 at once" in info.value.message
        assert serving.admission.num_in_flight == 0 and serving.engine.started == []
        assert (await serving.create_completion(request(prompt=["a", "b"]))).choices  # 2 fit

    asyncio.run(scenario())


def test_embeddings_past_their_bytes_in_flight_are_503_and_past_the_bound_alone_400(tokenizer):
    """Each shard holds a running choice's rows on its device: the server bounds their bytes
    (counted before decoding, once per sample, as rows of the model's dtype) as it bounds
    choices. A request that would pass the bound alone is a 400 naming prompt_embeds; one
    that would pass it beside those running is a 503 with Retry-After, admitted once they end."""
    payload = embeds(0.5, rows=8)
    one = len(payload) * 3 // 4 * 2  # float32 rows from payloads of at least 2-byte floats

    async def scenario():
        serving = OpenAIServing(FakeEngine(tokenizer, hang_after=1), served_model_name=MODEL,
                                enable_prompt_embeds=True, max_in_flight=64, max_embeds_in_flight_bytes=2 * one)
        with pytest.raises(APIError) as info:
            await serving.create_completion(request(prompt=None, prompt_embeds=[payload] * 3))
        assert (info.value.status, info.value.param) == (400, "prompt_embeds")
        assert f"would hold up to {3 * one} bytes" in info.value.message
        with pytest.raises(APIError) as info:  # n counts: each sample holds its rows
            await serving.create_completion(request(prompt=None, prompt_embeds=payload, n=3))
        assert info.value.status == 400
        chat = ChatCompletionRequest.model_validate({"model": MODEL, "max_tokens": 4, "messages": [
            {"role": "user", "content": [{"type": "prompt_embeds", "data": payload}] * 3}]})
        with pytest.raises(APIError) as info:  # a chat's parts count as a list's payloads do
            await serving.create_chat_completion(chat)
        assert (info.value.status, info.value.param) == (400, "prompt_embeds") and serving.engine.started == []
        first = await serving.create_completion(request(prompt=None, prompt_embeds=payload, stream=True))
        second = await serving.create_completion(request(prompt="text rides free", prompt_embeds=payload, stream=True))
        for stream in (first, second):
            await anext(stream)
        assert serving.admission.embeds_bytes == 2 * one
        with pytest.raises(APIError) as info:
            await serving.create_completion(request(prompt=None, prompt_embeds=payload))
        assert (info.value.status, info.value.retry_after_s) == (503, 1)
        assert f"({2 * one} bytes of prompt embeddings in flight, limit {2 * one})" in info.value.message
        ids = await serving.create_completion(request(prompt="token ids still fit", stream=True))
        await anext(ids)
        await ids.aclose()
        await first.aclose()
        third = await serving.create_completion(request(prompt=None, prompt_embeds=payload, stream=True))
        await anext(third)
        for stream in (second, third):
            await stream.aclose()
        assert serving.admission.embeds_bytes == 0 and serving.admission.num_in_flight == 0

    asyncio.run(scenario())


def test_refusal_over_http_is_openai_shaped_with_retry_after(tokenizer):
    engine = FakeEngine(tokenizer)
    serving = serving_of(engine, max_in_flight=2)
    client = TestClient(build_fastapi_app(serving), raise_server_exceptions=False)
    in_flight = serving.admission.reserve(1)  # another request holds one of the two slots
    response = post(client, {"model": MODEL, "prompt": "hi", "max_tokens": 3, "n": 2})
    error = error_of(response, 503)
    assert error["type"] == "service_unavailable" and response.headers["retry-after"] == "1"
    assert engine.started == []  # refused before the engine saw it
    in_flight.release()
    assert post(client, {"model": MODEL, "prompt": "hi", "max_tokens": 3, "n": 2}).status_code == 200


@pytest.mark.parametrize("fail", [False, True])
def test_finished_or_failed_requests_give_their_slots_back(tokenizer, fail):
    serving = serving_of(FakeEngine(tokenizer, fail=fail), max_in_flight=4)
    client = TestClient(build_fastapi_app(serving), raise_server_exceptions=False)
    for stream in (False, True):
        response = post(client, {"model": MODEL, "prompt": "hi", "max_tokens": 3, "n": 4, "stream": stream})
        assert response.status_code == (500 if fail and not stream else 200)
    assert serving.admission.num_in_flight == 0


def test_a_stream_never_started_gives_its_slots_back_and_aborts_its_requests(tokenizer):
    async def scenario():
        engine = FakeEngine(tokenizer)
        serving = serving_of(engine, max_in_flight=3)
        stream = await serving.create_completion(request(stream=True, n=3))
        assert serving.admission.num_in_flight == 3 and len(engine.started) == 3 and not engine.closed
        del stream  # the client left before the response started
        gc.collect()
        assert serving.admission.num_in_flight == 0
        assert engine.closed == set(engine.started)  # the engine had started them: aborted


def test_a_bad_request_gives_its_slots_back_and_starts_nothing(tokenizer):
    async def scenario():
        engine = FakeEngine(tokenizer)
        serving = serving_of(engine, max_in_flight=3)
        too_long = encode_prompt_embeds(torch.ones(60, H))  # 60 rows + 8 tokens > 64
        with pytest.raises(APIError) as info:
            await serving.create_completion(request(prompt=["hi", "there"], prompt_embeds=too_long,
                                                    max_tokens=8, stream=True))
        assert info.value.status == 400 and info.value.param == "prompt_embeds"
        assert serving.admission.num_in_flight == 0 and engine.started == []

    asyncio.run(scenario())


def test_engine_death_mid_stream_is_an_error_event_then_done(tokenizer):
    serving = serving_of(DyingEngine(tokenizer), max_in_flight=8)
    client = TestClient(build_fastapi_app(serving), raise_server_exceptions=False)
    response = post(client, {"model": MODEL, "prompt": "hi", "max_tokens": 5, "stream": True})
    assert response.status_code == 200  # the headers went out before the failure
    events = sse_events(response.text)
    assert events[-1] == "[DONE]" and json.loads(events[0])["choices"][0]["text"]
    error = json.loads(events[-2])["error"]
    assert (error["code"], error["type"]) == (503, "service_unavailable")
    assert "retry" in error["message"] and "secret" not in response.text
    assert serving.admission.num_in_flight == 0


def test_engine_death_without_stream_is_503_with_retry_after(tokenizer):
    client = TestClient(build_fastapi_app(serving_of(DyingEngine(tokenizer), 8)), raise_server_exceptions=False)
    response = post(client, {"model": MODEL, "prompt": "hi", "max_tokens": 5})
    error = error_of(response, 503)
    assert response.headers["retry-after"] == "1" and "secret" not in response.text
    assert error["type"] == "service_unavailable"


def test_settings_and_flags_set_the_bounds_and_reject_bad_values():
    from api.cli import build_parser, settings_from_args
    from api.settings import ServerSettings

    args = build_parser().parse_args(["serve", "--max-num-seqs", "8", "--max-waiting-requests", "3",
                                      "--step-timeout-s", "5", "--graceful-shutdown-timeout-s", "7"])
    settings = settings_from_args(args)
    assert (settings.max_in_flight, settings.step_timeout_s, settings.graceful_shutdown_timeout_s) == (11, 5.0, 7.0)
    for bad, name in (({"max_waiting_requests": -1}, "max_waiting_requests"), ({"step_timeout_s": 0}, "step_timeout_s"),
                      ({"graceful_shutdown_timeout_s": -2}, "graceful_shutdown_timeout_s")):
        with pytest.raises(ValueError, match=name):
            ServerSettings(**bad)


def test_engine_speed_flags_reach_the_engine_config():
    from api.cli import build_parser, settings_from_args

    defaults = settings_from_args(build_parser().parse_args(["serve"])).engine_args()
    assert defaults.async_scheduling and not defaults.disable_custom_all_reduce and not defaults.enforce_eager
    args = build_parser().parse_args(["serve", "--no-async-scheduling", "--disable-custom-all-reduce", "--enforce-eager"])
    engine_args = settings_from_args(args).engine_args()
    assert not engine_args.async_scheduling and engine_args.disable_custom_all_reduce and engine_args.enforce_eager


def test_the_embeddings_bound_is_the_engines_unless_given(tokenizer):
    """The replica's admission holds the bytes its engine allows in flight (on a GPU, half
    of what the shards had free once started), or what the caller passes."""
    engine = FakeEngine(tokenizer)
    engine.max_embeds_in_flight_bytes = 3 << 20
    serving = OpenAIServing(engine, served_model_name=MODEL, enable_prompt_embeds=True)
    assert serving.admission.max_embeds_bytes == 3 << 20
    serving = OpenAIServing(engine, served_model_name=MODEL, enable_prompt_embeds=True,
                            max_embeds_in_flight_bytes=1 << 20)
    assert serving.admission.max_embeds_bytes == 1 << 20
