"""The HTTP layer (routes + OpenAIServing) around a fake engine, no Ray: error shapes, API
key, choice order and usage, SSE framing, /metrics, 500s without internals, and a client
that disconnects mid-stream cancelling the engine's generator."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import time

import pytest
import torch
from starlette.testclient import TestClient

from api.embeds_codec import encode_prompt_embeds
from api.routes import build_fastapi_app
from api.logprobs import echoed_prompt_logprobs, openai_logprobs
from api.serving import OpenAIServing
from cluster.async_engine import SampleUpdate
from cluster.default_model import default_model_path
from cluster.engine_client import EngineDeadError, RequestFailedError
from cluster.outputs import Logprob
from cluster.prompts import embeds_prompt, mixed_prompt, parse_prompt
from cluster.tokenizer import load_tokenizer
from workers.messages import EngineStats

MODEL = "fake-model"
H = 16
ERROR_KEYS = {"message", "type", "param", "code"}


class FakeEngine:
    """What OpenAIServing uses of AsyncEngine. Each sample's text is "[tag|s<seed>]"
    followed by " w1", " w2", ...: one piece per token, the tag naming the prompt
    (e<first value> for embeddings, the text itself, or t<length> for token ids)."""

    max_model_len = 64
    hidden_size = H
    dtype = torch.float32
    max_embeds_in_flight_bytes = 2 << 30

    def __init__(self, tokenizer, *, fail: bool = False, hang_after: int | None = None,
                 hold_back: bool = False):
        self.tokenizer = tokenizer
        self.fail = fail  # generate raises an internal error
        self.fail_request = False  # generate raises as for a request a shard could not take
        self.hang_after = hang_after  # yield this many updates, then wait forever
        self.hold_back = hold_back  # add updates with tokens but no final text yet
        self.is_dead = False
        self.started: list[str] = []
        self.started_salts: list[str | None] = []  # per start(): its prompt's cache_salt
        self.started_off_loop: list[bool] = []  # per start(): from a worker thread
        self.closed: set[str] = set()
        self.generated: dict[str, int] = {}
        self.num_embeds_puts = 0  # objects put (each holds a request's embeddings prompts)
        self.embeds_per_put: list[int] = []
        self.cached_per_start: list[int] = []  # each start's prompt tokens "found in the prefix cache"
        self.cached_of: dict[str, int] = {}
        self.logprob_of = lambda i: -0.5 * (i + 1)  # the i-th generated token's

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def parse_prompt(self, prompt):
        return parse_prompt(prompt, tokenizer=self.tokenizer, vocab_size=len(self.tokenizer),
                            hidden_size=H, dtype=self.dtype, enable_prompt_embeds=True)

    def embeds_prompt(self, tensor):
        return embeds_prompt(tensor, H, self.dtype)

    def mixed_prompt(self, token_ids, rows, embeds_spans):
        return mixed_prompt(tuple(token_ids), rows, embeds_spans, H, self.dtype)

    def put_prompts(self, prompts):
        """As EngineClient.put_prompts: one object for the request's embeddings (the fake
        keeps the arrays in place); records how many prompts' rows each put held."""
        held = sum(prompt.prompt_embeds is not None for prompt in prompts)
        if held:
            self.num_embeds_puts += 1
            self.embeds_per_put.append(held)
        return prompts

    @staticmethod
    def together():
        return contextlib.nullcontext()

    @staticmethod
    def tag(prompt) -> str:
        if prompt.prompt_embeds is not None:
            return f"e{prompt.prompt_embeds[0, 0]:g}"
        return prompt.prompt if prompt.prompt is not None else f"t{len(prompt.prompt_token_ids)}"

    def start(self, req_id, prompt, params, loop):
        if self.is_dead:
            raise EngineDeadError("shard 0 died")
        self.started.append(req_id)
        self.started_salts.append(prompt.cache_salt)
        self.started_off_loop.append(not _on_event_loop())
        if self.cached_per_start:
            self.cached_of[req_id] = self.cached_per_start.pop(0)
        return FakeStream(self, req_id, self.generate(req_id, prompt, params))

    async def generate(self, req_id, prompt, params):
        try:
            if self.fail:
                raise RuntimeError("shard 1 failed at /srv/secret/model_runner.py:42 (token sk-123)")
            if self.fail_request:
                raise RequestFailedError(f"the engine could not take request {req_id}: ValueError")
            pieces = [f"[{self.tag(prompt)}|s{params.seed}]"]
            pieces += [f" w{i}" for i in range(1, params.max_tokens)]
            start = time.monotonic()
            for i, piece in enumerate(pieces):
                if i == self.hang_after:
                    await asyncio.Event().wait()
                await asyncio.sleep(0)
                if self.hold_back and i < len(pieces) - 1:  # a token whose text is not final yet
                    self.generated[req_id] = self.generated.get(req_id, 0) + 1
                    yield SampleUpdate("", (900 + i,), None, first_token_time=start)
                is_last = i == len(pieces) - 1
                self.generated[req_id] = self.generated.get(req_id, 0) + 1
                logprobs = None
                if params.logprobs is not None:
                    logprobs = ({100 + i: Logprob(self.logprob_of(i), 1, piece)},)
                prompt_logprobs = None  # the first token's update carries the prompt's
                if i == 0 and params.prompt_logprobs is not None:
                    prompt_logprobs = [None] + [{t: Logprob(-0.25 * p, 1, f"<{t}>")}
                                                for p, t in enumerate(prompt.prompt_token_ids[1:], 1)]
                yield SampleUpdate(piece, (100 + i,), logprobs,
                                   finish_reason="length" if is_last else None,
                                   first_token_time=start, prompt_logprobs=prompt_logprobs,
                                   num_cached_tokens=self.cached_of.get(req_id) if i == 0 else None)
        finally:
            self.closed.add(req_id)

    async def stats(self):
        return EngineStats(num_running=3, num_waiting=1, num_total_blocks=8, num_free_blocks=2)

    def check_health(self):
        if self.is_dead:
            raise EngineDeadError("shard 0 died")


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class FakeStream:
    """What OpenAIServing uses of a SampleStream: close() ends a request the engine has
    not finished (recorded in engine.closed, as the generator's own end is)."""

    def __init__(self, engine: FakeEngine, req_id: str, updates):
        self.req_id, self.start_time = req_id, time.monotonic()
        self._engine, self._updates = engine, updates

    def updates(self):
        return self._updates

    def close(self):
        self._engine.closed.add(self.req_id)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(default_model_path())


def make_app(engine, *, enable_prompt_embeds=True, api_key=None, max_body_bytes=1 << 20,
             max_embeds_bytes=1 << 16, enable_prompt_tokens_details=False):
    serving = OpenAIServing(engine, served_model_name=MODEL, enable_prompt_embeds=enable_prompt_embeds,
                            max_embeds_bytes=max_embeds_bytes,
                            enable_prompt_tokens_details=enable_prompt_tokens_details)
    return build_fastapi_app(serving, api_key=api_key, max_body_bytes=max_body_bytes)


@pytest.fixture
def engine(tokenizer):
    return FakeEngine(tokenizer)


@pytest.fixture
def client(engine):
    return TestClient(make_app(engine), raise_server_exceptions=False)


def embeds(value: float, rows: int = 3) -> str:
    return encode_prompt_embeds(torch.full((rows, H), float(value)))


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS
    assert body["error"]["code"] == status and body["error"]["message"]
    return body["error"]


def sse_events(text: str) -> list[str]:
    """The data of each server-sent event; every event is exactly 'data: ...\\n\\n'."""
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    assert all(event.startswith("data: ") and "\n" not in event for event in events), text
    return [event.removeprefix("data: ") for event in events]


def post(client, body, **kwargs):
    return client.post("/v1/completions", json=body, **kwargs)


# Errors -------------------------------------------------------------------------------

def test_a_models_card_is_the_same_in_the_list_and_alone_as_the_clock_moves(engine, monkeypatch):
    """`created` is when the server took the model up, not when it was asked: a client that
    compares the list's card with GET /v1/models/{id} across a second's tick sees one card."""
    import itertools

    ticks, now = itertools.count(0, 2), time.time
    monkeypatch.setattr(time, "time", lambda: now() + next(ticks))  # 2 s later at every read
    client = TestClient(make_app(engine))
    (listed,) = client.get("/v1/models").json()["data"]
    assert client.get(f"/v1/models/{MODEL}").json() == listed
    assert client.get("/v1/models").json()["data"] == [listed]


def test_unknown_model_is_404(client):
    error = error_of(post(client, {"model": "gpt-9", "prompt": "hi"}), 404)
    assert "gpt-9" in error["message"] and error["param"] == "model"


def test_unknown_field_is_400_naming_it(client, engine):
    error = error_of(post(client, {"model": MODEL, "prompt": "hi", "logit_bias_v2": {}}), 400)
    assert error["param"] == "logit_bias_v2" and "logit_bias_v2" in error["message"]
    assert error["type"] == "invalid_request_error" and engine.started == []


@pytest.mark.parametrize("content, expected", [
    (b'{"model": "fake-model", "prompt": ', "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b'["hi"]', "must be a JSON object"),
    (b'"hi"', "must be a JSON object"),
    (b"null", "must be a JSON object"),
    (b'{"model": "fake-model", "prompt": "\\ud800"}', "not valid JSON"),  # lone surrogates: not text
    (b'{"model": "fake-model", "prompt": "a\\udfffb"}', "not valid JSON"),
    (b'{"model": "fake-model", "\\ud800": 1}', "not valid JSON"),
    (b'{"model": "fake-model", "prompt": "\xed\xa0\x80"}', "not valid JSON"),  # an encoded surrogate
    (b'{"a":' * 50_000, "not valid JSON"),
    (b"[" * 100_000, "not valid JSON"),
])
def test_invalid_json_and_non_object_bodies_are_400(client, engine, content, expected):
    response = client.post("/v1/completions", content=content,
                           headers={"content-type": "application/json"})
    assert expected in error_of(response, 400)["message"] and engine.started == []


def test_a_paired_surrogate_escape_is_text(client, engine):
    response = client.post("/v1/completions", content=b'{"model": "fake-model", "prompt": "\\ud83d\\ude00"}',
                           headers={"content-type": "application/json"})
    assert response.status_code == 200 and engine.started, response.text


def test_oversized_body_is_413_by_declared_length_and_by_streamed_bytes(engine):
    client = TestClient(make_app(engine, max_body_bytes=1000), raise_server_exceptions=False)
    body = json.dumps({"model": MODEL, "prompt": "x" * 2000}).encode()
    assert "1000-byte limit" in error_of(client.post("/v1/completions", content=body), 413)["message"]

    def chunks():  # no content-length: the limit is enforced while reading
        yield body[:600]
        yield body[600:]

    error_of(client.post("/v1/completions", content=chunks()), 413)
    assert engine.started == []


def test_prompt_embeds_with_flag_off_names_the_flag(engine):
    client = TestClient(make_app(engine, enable_prompt_embeds=False), raise_server_exceptions=False)
    error = error_of(post(client, {"model": MODEL, "prompt": "", "prompt_embeds": embeds(1)}), 400)
    assert "--enable-prompt-embeds" in error["message"] and error["param"] == "prompt_embeds"
    assert engine.started == []


@pytest.mark.parametrize("body, param, expected", [
    ({}, "prompt", "either prompt or prompt_embeds"),
    ({"prompt": ""}, "prompt", "either prompt or prompt_embeds"),
    ({"prompt": None, "prompt_embeds": []}, "prompt", "either prompt or prompt_embeds"),
    ({"prompt_embeds": "EMBEDS", "echo": True}, "echo", "echo is not supported with prompt_embeds"),
    ({"prompt": "hi", "temperature": -1}, "temperature", "temperature must be a finite number >= 0"),
    ({"prompt": "hi", "seed": 2**64}, "seed", "seed must be a 64-bit integer"),
    ({"prompt": "hi", "seed": -(2**63) - 1}, "seed", "seed must be a 64-bit integer"),
    ({"prompt": "hi", "top_p": 0}, "top_p", "top_p must be in (0, 1]"),
    ({"prompt": "hi", "n": 0}, "n", "n must be >= 1"),
    ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "max_tokens must be >= 1"),
    ({"prompt": "hi", "logprobs": 21}, "logprobs", "logprobs must be between 0 and 20"),
    ({"prompt": "hi", "temperature": "hot"}, "temperature", "temperature: "),
    ({"prompt": "hi", "stop": [""]}, "stop", "stop must be a non-empty string"),
    ({"prompt": "hi", "max_tokens": 64}, "max_tokens", "maximum context length is 64"),
    ({"prompt_embeds": "EMBEDS", "max_tokens": 62}, "prompt_embeds", "maximum context length is 64"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
    ({"prompt": "hi", "stream_options": {"include_usage": False}}, "stream_options", "only allowed when stream"),
    ({"prompt": "hi", "cache_salt": ""}, "cache_salt", "cache_salt must be a non-empty string"),
    ({"prompt": "hi", "cache_salt": 7}, "cache_salt", "cache_salt: "),
    ({"prompt": [[]]}, "prompt", "prompt[0] is an empty list"),
    ({"prompt": 5}, "prompt", "prompt: Input should be a valid string; prompt: Input should be a valid list"),
    ({"prompt": [1, 99999]}, "prompt", "prompt_token_ids must be integers in [0, 1536)"),
])
def test_bad_requests_are_400_naming_the_field(client, engine, body, param, expected):
    if body.get("prompt_embeds") == "EMBEDS":
        body = {**body, "prompt_embeds": embeds(1)}
    error = error_of(post(client, {"model": MODEL, **body}), 400)
    assert error["param"] == param and expected in error["message"]
    assert engine.started == []


def test_empty_stream_options_without_stream_are_no_options(client):
    """As vLLM reads them: {} sets nothing, so it is not refused as options of a non-stream."""
    response = post(client, {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream_options": {}})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("inline_decode_max_chars", [0, 1 << 20])  # embeddings decoded in a thread, on the loop
def test_cache_salt_reaches_every_choice_of_every_prompt(engine, inline_decode_max_chars):
    serving = OpenAIServing(engine, served_model_name=MODEL, enable_prompt_embeds=True,
                            inline_decode_max_chars=inline_decode_max_chars)
    client = TestClient(build_fastapi_app(serving))
    body = {"model": MODEL, "prompt": ["a", "b"], "prompt_embeds": embeds(1), "n": 2, "max_tokens": 2,
            "cache_salt": "tenant-7"}
    assert post(client, body).status_code == 200
    assert engine.started_salts == ["tenant-7"] * 6
    assert post(client, {**body, "cache_salt": None}).status_code == 200
    assert engine.started_salts[6:] == [None] * 6


@pytest.mark.parametrize("field, literal, expected", [
    ("temperature", "Infinity", "temperature must be a finite number >= 0"),
    ("temperature", "NaN", "temperature must be a finite number >= 0"),
    ("repetition_penalty", "Infinity", "repetition_penalty must be a finite number > 0"),
    ("top_p", "NaN", "top_p must be in (0, 1]"),
    ("presence_penalty", "-Infinity", "presence_penalty must be in [-2, 2]"),
])
def test_non_finite_json_numbers_are_400(client, engine, field, literal, expected):
    """JSON parsers take NaN and Infinity literals (as Python's json does); no sampling
    parameter may be one."""
    content = f'{{"model": "{MODEL}", "prompt": "hi", "{field}": {literal}}}'.encode()
    error = error_of(client.post("/v1/completions", content=content, headers={"content-type": "application/json"}),
                     400)
    assert error["param"] == field and expected in error["message"] and engine.started == []


@pytest.mark.parametrize("payload, expected", [
    ("not base64!!", "standard base64"),
    (encode_prompt_embeds(torch.ones(2, H + 1)), f"expected shape (seq_len, {H}), got (2, {H + 1})"),
    (encode_prompt_embeds(torch.ones(2, H, dtype=torch.int64)), "found torch.LongStorage"),
    (encode_prompt_embeds(torch.ones(1100, H)), "the limit is 65536"),
])
def test_bad_prompt_embeds_are_400_with_param_prompt_embeds(client, engine, payload, expected):
    body = {"model": MODEL, "prompt": "", "prompt_embeds": [embeds(1), payload]}
    error = error_of(post(client, body), 400)
    assert error["param"] == "prompt_embeds" and expected in error["message"]
    assert engine.started == []


def test_internal_error_is_500_without_internals(tokenizer):
    client = TestClient(make_app(FakeEngine(tokenizer, fail=True)), raise_server_exceptions=False)
    response = post(client, {"model": MODEL, "prompt": "hi"})
    error = error_of(response, 500)
    assert error == {"message": "internal server error", "type": "internal_server_error",
                     "param": None, "code": 500}
    for leak in ("Traceback", "RuntimeError", "secret", "sk-123", ".py"):
        assert leak not in response.text


@pytest.mark.parametrize("stream", [False, True])
def test_request_the_engine_could_not_take_is_500_that_says_so_and_the_server_keeps_serving(engine, client, stream):
    """Not 503 + Retry-After, as for a dead engine: the engine is fine, and the same
    request would fail again."""
    engine.fail_request = True
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": stream}
    response = post(client, body)
    if stream:
        events = [json.loads(line[len("data: "):]) for line in response.text.splitlines()
                  if line.startswith("data: {")]
        [error] = [event["error"] for event in events if "error" in event]
    else:
        error = error_of(response, 500)
        assert "retry-after" not in response.headers
    assert error["code"] == 500 and error["type"] == "internal_server_error"
    assert error["message"].startswith("the engine could not take request ") and "ValueError" in error["message"]
    engine.fail_request = False
    assert post(client, {**body, "stream": False}).status_code == 200


def test_dead_engine_is_503_on_health(engine, client):
    assert client.get("/health").status_code == 200
    engine.is_dead = True
    assert error_of(client.get("/health"), 503)["type"] == "service_unavailable"


@pytest.mark.parametrize("prompt_embeds", [None, "EMBEDS"], ids=["text", "embeddings last (started by their thread)"])
def test_dead_engine_is_503_with_retry_after_on_completions(engine, client, prompt_embeds):
    engine.is_dead = True
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True}
    if prompt_embeds:
        body = {**body, "prompt": "", "prompt_embeds": embeds(1)}
    response = post(client, body)
    error = error_of(response, 503)
    assert error["type"] == "service_unavailable" and response.headers["retry-after"] == "1"
    engine.is_dead = False  # the replica answers again once the engine is back
    assert post(client, {**body, "stream": False}).status_code == 200


# API key ------------------------------------------------------------------------------

@pytest.mark.parametrize("root_path", ["", "/prefix"])  # Serve passes route_prefix as root_path
def test_api_key_guards_v1_and_leaves_health_and_metrics_open(engine, root_path):
    client = TestClient(make_app(engine, api_key="s3cret"), root_path=root_path,
                        raise_server_exceptions=False)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        error = error_of(client.post(f"{root_path}/v1/completions", json=body, headers=headers), 401)
        assert error["type"] == "authentication_error"
        error_of(client.get(f"{root_path}/v1/models", headers=headers), 401)
    assert engine.started == []
    good = {"Authorization": "Bearer s3cret"}
    assert client.post(f"{root_path}/v1/completions", json=body, headers=good).status_code == 200
    assert client.get(f"{root_path}/v1/models", headers=good).status_code == 200
    assert client.get(f"{root_path}/health").status_code == 200
    assert client.get(f"{root_path}/metrics").status_code == 200


# Responses ----------------------------------------------------------------------------

def test_choices_are_embeds_first_and_indexed_position_times_n_plus_sample(client, tokenizer):
    body = {"model": MODEL, "prompt": ["alpha", "beta"], "prompt_embeds": [embeds(7, rows=3), embeds(2, rows=5)],
            "n": 2, "seed": 40, "max_tokens": 3}
    response = post(client, body)
    assert response.status_code == 200, response.text
    result = response.json()
    tags = ["e7", "e2", "alpha", "beta"]
    expected = [f"[{tag}|s{40 + sample}] w1 w2" for tag in tags for sample in range(2)]
    assert [c["index"] for c in result["choices"]] == list(range(8))
    assert [c["text"] for c in result["choices"]] == expected
    assert {c["finish_reason"] for c in result["choices"]} == {"length"}
    # Prompt tokens count once per prompt: 3 + 5 embedding rows, then the texts' tokens.
    text_tokens = sum(len(tokenizer.encode(t)) for t in ("alpha", "beta"))
    assert result["usage"] == {"prompt_tokens": 8 + text_tokens, "completion_tokens": 24,
                               "total_tokens": 32 + text_tokens}
    assert result["model"] == MODEL and result["object"] == "text_completion"


@pytest.mark.parametrize("prompt, num_embeds, inline_max, off_loop", [
    ("", 2, 0, True), ("hi", 2, 0, True), ("", 2, 1 << 20, True), ("hi", 1, 1 << 20, True), ("", 1, 1 << 20, False),
], ids=["large embeddings last: put and started by their thread", "text last: the embeddings put in a thread",
        "small embeddings: decoded on the loop, put in a thread", "small embeddings, text last: put in a thread",
        "one small prompt_embeds: all on the loop"])
def test_choices_start_off_the_loop_where_embeddings_are_decoded_or_put(engine, prompt, num_embeds, inline_max,
                                                                        off_loop):
    """The request's embeddings go into the object store in one put (about 1 ms), off the
    event loop: in the thread that decoded the last prompt, or in one of its own when the
    last prompt was read on the loop and earlier ones hold embeddings. One prompt_embeds
    small enough to decode on the loop is put and started there."""
    serving = OpenAIServing(engine, served_model_name=MODEL, enable_prompt_embeds=True,
                            inline_decode_max_chars=inline_max)
    client = TestClient(build_fastapi_app(serving, api_key=None, max_body_bytes=1 << 20))
    payload = [embeds(1), embeds(2)][:num_embeds]
    body = {"model": MODEL, "prompt": prompt, "prompt_embeds": payload, "n": 2, "max_tokens": 3}
    response = post(client, body)
    assert response.status_code == 200, response.text
    assert engine.started_off_loop == [off_loop] * len(response.json()["choices"])
    assert [c["text"] for c in response.json()["choices"]][:2] == ["[e1|sNone] w1 w2"] * 2
    assert engine.embeds_per_put[-1] == num_embeds


def test_token_id_prompts_and_echo(client):
    result = post(client, {"model": MODEL, "prompt": [[5, 6], [7, 8, 9]], "max_tokens": 1}).json()
    assert [c["text"] for c in result["choices"]] == ["[t2|sNone]", "[t3|sNone]"]
    assert result["usage"]["prompt_tokens"] == 5
    echoed = post(client, {"model": MODEL, "prompt": "hello", "echo": True, "max_tokens": 2}).json()
    assert echoed["choices"][0]["text"] == "hello[hello|sNone] w1"


def test_logprobs_shape_and_offsets(client):
    result = post(client, {"model": MODEL, "prompt": "hi", "max_tokens": 3, "logprobs": 1}).json()
    logprobs = result["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["[hi|sNone]", " w1", " w2"]
    assert logprobs["token_logprobs"] == [-0.5, -1.0, -1.5]
    assert logprobs["top_logprobs"] == [{"[hi|sNone]": -0.5}, {" w1": -1.0}, {" w2": -1.5}]
    assert logprobs["text_offset"] == [0, 10, 13]


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_scores_the_prompt_tokens_first(client, tokenizer, stream):
    """As OpenAI and vLLM answer (lm-evaluation-harness scores texts this way): the echoed
    prompt's tokens lead the logprobs, the first with none, then the completion's."""
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2, "echo": True, "logprobs": 1, "stream": stream}
    response = post(client, body)
    assert response.status_code == 200, response.text
    if stream:
        chunks = [json.loads(line[6:]) for line in response.text.splitlines()
                  if line.startswith("data: {")]
        logprobs = {key: sum((c["choices"][0]["logprobs"][key] for c in chunks), [])
                    for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
        text = "".join(c["choices"][0]["text"] for c in chunks)
    else:
        logprobs, text = response.json()["choices"][0]["logprobs"], response.json()["choices"][0]["text"]
    first, echo = tokenizer.decode([5]), tokenizer.decode([5, 6, 7])
    assert text == echo + "[t3|sNone] w1"
    assert logprobs["tokens"] == [first, "<6>", "<7>", "[t3|sNone]", " w1"]
    assert logprobs["token_logprobs"] == [None, -0.25, -0.5, -0.5, -1.0]
    assert logprobs["top_logprobs"] == [None, {"<6>": -0.25}, {"<7>": -0.5}, {"[t3|sNone]": -0.5}, {" w1": -1.0}]
    assert logprobs["text_offset"] == [0, len(first), len(first) + 3, len(echo), len(echo) + 10]


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_max_tokens_0_returns_the_scored_prompt_alone(client, tokenizer, stream):
    """vLLM's echo without generation: the prompt and its logprobs, nothing generated."""
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 0, "echo": True, "logprobs": 0, "stream": stream,
            "stream_options": {"include_usage": True} if stream else None}
    response = post(client, body)
    assert response.status_code == 200, response.text
    if stream:
        chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
        (choice,) = [c["choices"][0] for c in chunks if c["choices"]]
        usage = chunks[-1]["usage"]
    else:
        (choice,), usage = response.json()["choices"], response.json()["usage"]
    assert choice["text"] == tokenizer.decode([5, 6, 7]) and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == [tokenizer.decode([5]), "<6>", "<7>"]
    assert choice["logprobs"]["token_logprobs"] == [None, -0.25, -0.5]
    assert usage["prompt_tokens"] == 3 and usage["completion_tokens"] == 0
    metrics = client.get("/metrics").text.splitlines()  # ended as asked, streamed or not
    assert 'shardserve_requests_total{status="length"} 1.0' in metrics
    assert not any(line.startswith('shardserve_requests_total{status="abort"}') for line in metrics)


def test_echoed_text_prompt_offsets_index_the_text_its_bos_is_not_in(tokenizer):
    """A text prompt is echoed as sent, without the BOS its tokens start with: the BOS takes
    none of the text and every other token's offset is where its string stands in the text
    (OpenAI's offsets index the text), so they never go back at the first generated token."""
    text = "hello world"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids[:1]) == tokenizer.bos_token  # not part of the echoed text
    entries = [None] + [{t: Logprob(-1.0, 1, tokenizer.decode([t]))} for t in ids[1:]]
    out = echoed_prompt_logprobs(ids, entries, 1, tokenizer, text)
    assert out.text_offset[0] == 0
    assert all(text[offset:offset + len(token)] == token
               for token, offset in zip(out.tokens[1:], out.text_offset[1:]))


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_offsets_never_go_back(client, stream):
    body = {"model": MODEL, "prompt": "hello world", "max_tokens": 3, "echo": True, "logprobs": 1, "n": 2,
            "stream": stream}
    response = post(client, body)
    assert response.status_code == 200, response.text
    chunks = [json.loads(e) for e in sse_events(response.text)[:-1]] if stream else [response.json()]
    for index in (0, 1):
        offsets = sum((c["choices"][0]["logprobs"]["text_offset"] for c in chunks
                       if c["choices"][0]["index"] == index), []) if stream \
            else chunks[0]["choices"][index]["logprobs"]["text_offset"]
        assert offsets == sorted(offsets) and offsets[-3:] == [11, 11 + len("[hello world|sNone]"),
                                                               11 + len("[hello world|sNone] w1")]


def test_return_tokens_as_token_ids_names_tokens_by_id(client, tokenizer):
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2, "echo": True, "logprobs": 1,
            "return_tokens_as_token_ids": True}
    logprobs = post(client, body).json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == ["token_id:5", "token_id:6", "token_id:7", "token_id:100", "token_id:101"]
    assert logprobs["top_logprobs"][1:] == [{"token_id:6": -0.25}, {"token_id:7": -0.5},
                                            {"token_id:100": -0.5}, {"token_id:101": -1.0}]
    echo = tokenizer.decode([5, 6, 7])  # offsets still index the text
    assert logprobs["text_offset"][3:] == [len(echo), len(echo) + len("[t3|sNone]")]


@pytest.mark.parametrize("stream", [False, True])
def test_vllm_prompt_logprobs_field_comes_with_each_choice(client, stream):
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2, "prompt_logprobs": 1, "n": 2, "stream": stream}
    response = post(client, body)
    assert response.status_code == 200, response.text
    if stream:
        chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
        found = [c["choices"][0]["prompt_logprobs"] for c in chunks if "prompt_logprobs" in c["choices"][0]]
    else:
        found = [c["prompt_logprobs"] for c in response.json()["choices"]]
        assert all(c["logprobs"] is None for c in response.json()["choices"])  # not asked
    expected = [None, {"6": {"logprob": -0.25, "rank": 1, "decoded_token": "<6>"}},
                {"7": {"logprob": -0.5, "rank": 1, "decoded_token": "<7>"}}]
    assert found == [expected, expected]  # once per choice (in its first chunk when streamed)
    plain = post(client, {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2}).json()["choices"][0]
    assert "prompt_logprobs" not in plain  # left out when not asked for


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_logprobs_without_echo_leave_the_completions_logprobs_to_generated_tokens(client, stream):
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2, "prompt_logprobs": 1, "logprobs": 1,
            "stream": stream}
    response = post(client, body)
    chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")] \
        if stream else [response.json()]
    tokens = sum((c["choices"][0]["logprobs"]["tokens"] for c in chunks), [])
    assert tokens == ["[t3|sNone]", " w1"]
    assert [c["choices"][0]["prompt_logprobs"] for c in chunks if "prompt_logprobs" in c["choices"][0]][0][1] \
        == {"6": {"logprob": -0.25, "rank": 1, "decoded_token": "<6>"}}


def test_prompt_logprobs_of_prompt_embeds_are_refused(client):
    body = {"model": MODEL, "prompt": "", "prompt_embeds": embeds(1), "max_tokens": 2, "prompt_logprobs": 1}
    error = error_of(post(client, body), 400)
    assert error["param"] == "prompt_logprobs" and "no tokens to score" in error["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_echo_only_with_prompt_logprobs_but_no_logprobs_leaves_logprobs_null(client, stream):
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 0, "echo": True, "prompt_logprobs": 1, "stream": stream}
    response = post(client, body)
    assert response.status_code == 200, response.text
    chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")] \
        if stream else [response.json()]
    (choice,) = [c["choices"][0] for c in chunks if c["choices"]]
    assert choice["logprobs"] is None and choice["prompt_logprobs"][1] == {
        "6": {"logprob": -0.25, "rank": 1, "decoded_token": "<6>"}}


@pytest.mark.parametrize("stream", [False, True])
def test_a_logprob_of_minus_infinity_is_floored_as_vllms(client, engine, stream):
    """JSON has no -Infinity: a token whose probability underflowed reads -9999.0."""
    engine.logprob_of = lambda i: float("-inf") if i == 1 else -0.5
    response = post(client, {"model": MODEL, "prompt": "hi", "max_tokens": 3, "logprobs": 0, "stream": stream})
    assert response.status_code == 200, response.text
    chunks = [json.loads(e) for e in sse_events(response.text)[:-1]] if stream else [response.json()]
    logprobs = sum((c["choices"][0]["logprobs"]["token_logprobs"] for c in chunks), [])
    assert logprobs == [-0.5, -9999.0, -0.5]


def test_max_tokens_0_without_echo_is_refused(client):
    error = error_of(post(client, {"model": MODEL, "prompt": "hi", "max_tokens": 0}), 400)
    assert error["param"] == "max_tokens" and "max_tokens must be >= 1" in error["message"]


@pytest.mark.parametrize("num_top, expected", [
    (0, {"c": -2.0}), (1, {"a": -0.5, "c": -2.0}), (3, {"a": -0.5, "b": -1.0, "c": -2.0}),
])
def test_top_logprobs_always_hold_the_sampled_token(num_top, expected):
    # OpenAI: "the API will always return the logprob of the sampled token, so there may be
    # up to logprobs+1 elements"; the sampled token (id 5, ranked third) joins the top ones.
    entry = {1: Logprob(-0.5, 1, "a"), 2: Logprob(-1.0, 2, "b"), 5: Logprob(-2.0, 3, "c")}
    out = openai_logprobs([5], [entry], num_top)
    assert out.top_logprobs == [expected] and out.tokens == ["c"] and out.token_logprobs == [-2.0]


@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_framing_ends_with_done_and_matches_the_full_response(client, include_usage):
    body = {"model": MODEL, "prompt": "alpha", "prompt_embeds": embeds(3), "n": 2, "seed": 1, "max_tokens": 4}
    full = post(client, body).json()
    stream_body = {**body, "stream": True}
    if include_usage:
        stream_body["stream_options"] = {"include_usage": True}
    response = post(client, stream_body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len({chunk["id"] for chunk in chunks}) == 1
    if include_usage:
        usage_chunk = chunks.pop()
        assert usage_chunk["choices"] == [] and usage_chunk["usage"] == full["usage"]
    assert all(chunk["usage"] is None and len(chunk["choices"]) == 1 for chunk in chunks)
    texts = {}
    for chunk in chunks:
        choice = chunk["choices"][0]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert [texts[i] for i in sorted(texts)] == [c["text"] for c in full["choices"]]
    finals = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(c["index"] for c in finals) == [0, 1, 2, 3]


def test_a_requests_embeddings_are_put_once_for_all_its_prompts_and_samples(client, engine):
    body = {"model": MODEL, "prompt": "alpha", "prompt_embeds": [embeds(3), embeds(4)], "n": 3, "max_tokens": 2}
    puts_before = engine.num_embeds_puts
    result = post(client, body).json()
    assert len(result["choices"]) == 9
    assert engine.num_embeds_puts - puts_before == 1 and engine.embeds_per_put[-1] == 2


def test_stream_skips_held_back_updates_but_counts_their_tokens(tokenizer):
    engine = FakeEngine(tokenizer, hold_back=True)
    client = TestClient(make_app(engine), raise_server_exceptions=False)
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    chunks = [json.loads(e) for e in sse_events(post(client, body).text)[:-1]]
    usage = chunks.pop()["usage"]
    assert [c["choices"][0]["text"] for c in chunks] == ["[hi|sNone]", " w1", " w2"]
    assert usage["completion_tokens"] == sum(engine.generated.values()) == 5


def test_models_version_health_and_metrics(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [(MODEL, 64)]
    assert client.get("/version").json() == {"version": "0.1.0"}
    assert client.get("/health").status_code == 200
    post(client, {"model": MODEL, "prompt": "hi", "max_tokens": 3})
    post(client, {"model": MODEL, "prompt": "hi", "prompt_embeds": [embeds(1), embeds(2)], "max_tokens": 2,
                  "stream": True})
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    lines = metrics.text.splitlines()
    for sample in ('shardserve_requests_total{status="length"} 4.0',
                   "shardserve_time_to_first_token_seconds_count 4.0",
                   "shardserve_time_per_output_token_seconds_count 4.0",
                   "shardserve_e2e_request_latency_seconds_count 4.0",
                   "shardserve_generation_tokens_total 9.0",
                   # One intake per request, by whether it has embeddings (three choices here).
                   'shardserve_request_intake_seconds_count{input="prompt"} 1.0',
                   'shardserve_request_intake_seconds_count{input="prompt_embeds"} 1.0',
                   "shardserve_num_requests_running 3.0",
                   "shardserve_num_requests_waiting 1.0",
                   "shardserve_kv_cache_usage_perc 0.75"):
        assert sample in lines, sample
    intake = {line.split(" ")[0]: float(line.split(" ")[1]) for line in lines
              if line.startswith("shardserve_request_intake_seconds_sum")}
    assert len(intake) == 2 and all(0 < seconds < 10 for seconds in intake.values()), intake


# Disconnect ---------------------------------------------------------------------------

async def _stream_then_disconnect(app, engine: FakeEngine, body: dict, *, cancel_in: str | None = None):
    """Drives the ASGI app by hand: sends the request, then the client goes away. Either
    receive() reports http.disconnect after the first SSE chunk, as a closed connection
    does, or the app's task is cancelled while it waits in send() (cancel_in: the
    "response start" or the "second chunk"), as a Serve replica's is when the proxy loses
    the client. Returns what was sent and which engine requests had ended, looked at
    before asyncio.run's teardown could cancel anything itself, with the app's task (and
    so the response) still referenced."""
    raw = json.dumps(body).encode()
    pending = [{"type": "http.request", "body": raw, "more_body": False}]
    parked, first_chunk, gone = asyncio.Event(), asyncio.Event(), asyncio.Event()
    sent: list[dict] = []

    async def receive():
        if pending:
            return pending.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)
        is_chunk = message["type"] == "http.response.body" and message.get("body")
        if (cancel_in == "response start" and message["type"] == "http.response.start"
                or cancel_in == "second chunk" and is_chunk and first_chunk.is_set()):
            parked.set()
            await asyncio.Event().wait()  # a peer that stopped reading
        if is_chunk:
            first_chunk.set()

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "root_path": "", "query_string": b"", "client": ("127.0.0.1", 5000),
             "server": ("127.0.0.1", 8000),
             "headers": [(b"content-type", b"application/json"),
                         (b"content-length", str(len(raw)).encode())]}
    task = asyncio.create_task(app(scope, receive, send))
    if cancel_in is not None:
        await asyncio.wait_for(parked.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
    else:
        await asyncio.wait_for(first_chunk.wait(), 10)
        gone.set()
        await asyncio.wait_for(task, 10)
    for _ in range(100):  # the cancelled generators run their finally on later loop turns
        if engine.closed == set(engine.started):
            break
        await asyncio.sleep(0.01)
    return sent, set(engine.closed)


@pytest.mark.parametrize("cancel_in", [None, "response start", "second chunk"],
                         ids=["http.disconnect", "cancelled sending the response start",
                              "cancelled sending the second chunk"])
def test_client_disconnect_mid_stream_cancels_every_engine_generator(tokenizer, cancel_in):
    engine = FakeEngine(tokenizer, hang_after=1)
    body = {"model": MODEL, "prompt": "hi", "prompt_embeds": embeds(1), "max_tokens": 50, "stream": True}
    app = make_app(engine)
    # No garbage collection: cancelling must close the stream itself, not leave it to the
    # collector finding the suspended generator (minutes later on a quiet server).
    gc.disable()
    try:
        sent, closed = asyncio.run(_stream_then_disconnect(app, engine, body, cancel_in=cancel_in))
    finally:
        gc.enable()
    assert sent[0]["status"] == 200
    assert len(engine.started) == 2
    # The generators were parked forever after their first token: only cancellation ends them.
    assert closed == set(engine.started)
    assert b"[DONE]" not in b"".join(m.get("body", b"") for m in sent[1:])
    metrics = TestClient(app).get("/metrics").text.splitlines()
    assert 'shardserve_requests_total{status="abort"} 2.0' in metrics
    assert not any(line.startswith('shardserve_requests_total{status="error"}') for line in metrics)


def test_tokenize_gives_the_ids_a_completion_would_use_and_detokenize_inverts_it(client, engine, tokenizer):
    text = "The quick brown fox"
    response = client.post("/tokenize", json={"model": MODEL, "prompt": text})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tokens"] == list(engine.parse_prompt(text).prompt_token_ids)  # what /v1/completions uses
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == engine.max_model_len
    assert body["token_strs"] is None
    plain = client.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()["tokens"]
    assert plain == tokenizer.encode(text, add_special_tokens=False)
    messages = [{"role": "user", "content": text}]
    chat = client.post("/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert chat["count"] == len(chat["tokens"])
    named = client.post("/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert named["token_strs"] == tokenizer.convert_ids_to_tokens(body["tokens"])
    assert named["token_strs"][0] == tokenizer.bos_token and "".join(named["token_strs"][1:]).endswith("fox")
    back = client.post("/detokenize", json={"model": MODEL, "tokens": plain})
    assert back.status_code == 200 and back.json() == {"prompt": tokenizer.decode(plain)}


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": "nope", "prompt": "a"}, 404, "model"),
    ("/tokenize", {"prompt": "a", "messages": [{"role": "user", "content": "a"}]}, 400, "prompt"),
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "a"}], "add_special_tokens": True}, 400,
     "add_special_tokens"),
    ("/tokenize", {"messages": [{"role": "user", "content": [{"type": "prompt_embeds", "data": "AAAA"}]}]}, 400,
     "messages"),
    ("/tokenize", {"prompt": 5}, 400, "prompt"),
    ("/tokenize", {"prompt": "a", "truncate": 3}, 400, "truncate"),
    ("/detokenize", {"tokens": [1, 1 << 40]}, 400, "tokens"),
    ("/detokenize", {"tokens": [1, -1]}, 400, "tokens"),
    ("/detokenize", {"tokens": ["1"]}, 400, "tokens.0"),
    ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
])
def test_tokenize_and_detokenize_errors_name_their_field(client, path, body, status, param):
    assert error_of(client.post(path, json=body), status)["param"] == param


def test_truncate_prompt_tokens_keeps_each_prompts_last_tokens_and_rows(client, engine, tokenizer):
    """vLLM's left truncation, per prompt: text and token ids keep their last k ids (the
    usage counts what the engine saw; echo shows the kept tokens), embeddings their last
    k rows, put once; past max_model_len it is a 400 naming the field."""
    text = "one two three four five six seven"
    ids = engine.parse_prompt(text).prompt_token_ids
    rows = torch.arange(6, dtype=torch.float32)[:, None].expand(6, H)
    response = post(client, {"model": MODEL, "prompt": text, "max_tokens": 2, "echo": True,
                             "truncate_prompt_tokens": 3})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["usage"]["prompt_tokens"] == 3
    assert body["choices"][0]["text"].startswith(tokenizer.decode(list(ids[-3:])))
    both = post(client, {"model": MODEL, "prompt": [list(ids)], "prompt_embeds": encode_prompt_embeds(rows),
                         "max_tokens": 2, "truncate_prompt_tokens": 4}).json()
    assert both["usage"]["prompt_tokens"] == 4 + 4
    assert both["choices"][0]["text"].startswith("[e2")  # the embeddings' first kept row is row 2
    error = error_of(post(client, {"model": MODEL, "prompt": "hi", "truncate_prompt_tokens": 10**6}), 400)
    assert error["param"] == "truncate_prompt_tokens" and "max_model_len" in error["message"]


def test_continuous_usage_stats_give_each_chunk_its_choices_usage_so_far(client, engine):
    """vLLM's stream_options.continuous_usage_stats: every chunk carries its choice's prompt
    tokens and completion tokens so far; the last usage chunk is the request's total."""
    body = {"model": MODEL, "prompt": "alpha beta", "prompt_embeds": embeds(3, rows=5), "n": 2, "seed": 1,
            "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = [json.loads(event) for event in sse_events(post(client, body).text)[:-1]]
    total = chunks.pop()["usage"]
    text_tokens = len(engine.parse_prompt("alpha beta").prompt_token_ids)
    so_far = {}
    for chunk in chunks:
        index, usage = chunk["choices"][0]["index"], chunk["usage"]
        so_far[index] = usage["completion_tokens"]
        assert usage["prompt_tokens"] == (5 if index < 2 else text_tokens)  # embedding rows, or the text's ids
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert so_far == {0: 4, 1: 4, 2: 4, 3: 4}
    assert total["completion_tokens"] == 16 and total["prompt_tokens"] == 5 + text_tokens


def test_model_aliases_are_listed_accepted_and_echoed(engine):
    serving = OpenAIServing(engine, served_model_name=["primary", "alias"], enable_prompt_embeds=True)
    client = TestClient(build_fastapi_app(serving), raise_server_exceptions=False)
    assert [card["id"] for card in client.get("/v1/models").json()["data"]] == ["primary", "alias"]
    card = client.get("/v1/models/alias").json()
    assert (card["id"], card["object"], card["root"], card["max_model_len"]) == ("alias", "model", "primary", 64)
    assert error_of(client.get("/v1/models/other"), 404)["param"] == "model"
    assert post(client, {"model": "alias", "prompt": "hi", "max_tokens": 2}).json()["model"] == "alias"
    assert post(client, {"prompt": "hi", "max_tokens": 2}).json()["model"] == "primary"
    streamed = post(client, {"model": "alias", "prompt": "hi", "max_tokens": 2, "stream": True}).text
    assert all(json.loads(event)["model"] == "alias" for event in sse_events(streamed)[:-1])
    assert error_of(post(client, {"model": "other", "prompt": "hi"}), 404)["param"] == "model"


def test_usage_reports_cached_prompt_tokens_once_per_prompt_when_asked(engine):
    """--enable-prompt-tokens-details: usage.prompt_tokens_details.cached_tokens counts each
    prompt's first sample (the others share what it computes); without it, no such key."""
    body = {"model": MODEL, "prompt": ["one two", "three"], "n": 2, "max_tokens": 2}
    for stream in (False, True):
        engine.cached_per_start = [3, 7, 5, 9]  # prompt 0: samples 0, 1; then prompt 1
        with TestClient(make_app(engine, enable_prompt_tokens_details=True)) as client:
            if stream:
                events = sse_events(client.post("/v1/completions", json={
                    **body, "stream": True, "stream_options": {"include_usage": True}}).text)
                usage = json.loads(events[-2])["usage"]  # the usage chunk, then [DONE]
            else:
                usage = client.post("/v1/completions", json=body).json()["usage"]
        assert usage["prompt_tokens_details"] == {"cached_tokens": 3 + 5}, stream
    engine.cached_per_start = [3, 7, 5, 9]
    with TestClient(make_app(engine)) as client:
        usage = client.post("/v1/completions", json=body).json()["usage"]
    assert "prompt_tokens_details" not in usage and usage["prompt_tokens"] > 0
