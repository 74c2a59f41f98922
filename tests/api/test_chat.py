"""/v1/chat/completions around the fake engine, no Ray: the conversation the engine gets
(the model's chat template, tokenized as the template has it), OpenAI's chat shapes whole
and streamed, logprobs, and each request the server cannot serve as a 400 naming its field."""

from __future__ import annotations

import copy
import json

import pytest
from starlette.testclient import TestClient

from api.chat import ChatCompletionRequest, render_chat
from tests.api.test_routes import MODEL, FakeEngine, embeds, error_of, make_app, sse_events, tokenizer  # noqa: F401

HELLO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does Ray place?"}]
LOOK = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "prompt_embeds", "data": embeds(1, 3)},
                                     {"type": "text", "text": "and"}, {"type": "prompt_embeds", "data": embeds(2, 2)}]}]


class RecordingEngine(FakeEngine):
    """Also keeps each started prompt's token ids and embeddings spans."""

    def __init__(self, tokenizer):
        super().__init__(tokenizer)
        self.prompt_ids: list[tuple[int, ...]] = []
        self.prompts = []

    def start(self, req_id, prompt, params, loop):
        self.prompt_ids.append(tuple(prompt.prompt_token_ids))
        self.prompts.append(prompt)
        return super().start(req_id, prompt, params, loop)


@pytest.fixture
def engine(tokenizer):
    return RecordingEngine(tokenizer)


@pytest.fixture
def client(engine):
    return TestClient(make_app(engine), raise_server_exceptions=False)


def chat(client, messages=HELLO, **fields):
    return client.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, **fields})


def templated(tokenizer, messages=HELLO, **kwargs) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False, **kwargs)


def fake_text(num_prompt_tokens: int, max_tokens: int) -> str:
    """FakeEngine's text for a token-id prompt."""
    return f"[t{num_prompt_tokens}|sNone]" + "".join(f" w{i}" for i in range(1, max_tokens))


def test_the_engine_gets_the_templated_conversation_and_the_answer_is_a_chat_completion(client, engine, tokenizer):
    response = chat(client, max_tokens=4)
    assert response.status_code == 200, response.text
    body = response.json()
    ids = templated(tokenizer)
    assert engine.prompt_ids == [tuple(ids)]
    assert ids.count(tokenizer.bos_token_id) == 1  # the template's own BOS, none added on top
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-") and body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert choice["message"] == {"role": "assistant", "content": fake_text(len(ids), 4)}
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 4, "total_tokens": len(ids) + 4}


def test_max_tokens_defaults_to_the_rest_of_the_context_and_max_completion_tokens_wins(client, engine, tokenizer):
    num_prompt = len(templated(tokenizer))
    body = chat(client).json()
    assert body["usage"]["completion_tokens"] == engine.max_model_len - num_prompt
    body = chat(client, max_tokens=9, max_completion_tokens=3).json()
    assert body["usage"]["completion_tokens"] == 3


def test_text_parts_are_joined_by_newlines_and_names_reach_the_template(client, engine, tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    assert chat(client, parts, max_tokens=1).status_code == 200
    assert engine.prompt_ids[-1] == tuple(templated(tokenizer, [{"role": "user", "content": "one\ntwo"}]))


def test_continue_final_message_leaves_the_assistant_turn_open(client, engine, tokenizer):
    messages = [*HELLO, {"role": "assistant", "content": "Ray places"}]
    response = chat(client, messages, max_tokens=1, add_generation_prompt=False, continue_final_message=True)
    assert response.status_code == 200, response.text
    text = tokenizer.decode(list(engine.prompt_ids[-1]))
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nRay places")


def test_chat_template_kwargs_are_the_templates_variables(engine, tokenizer):
    greeting = copy.deepcopy(tokenizer)
    greeting.chat_template = "{{ bos_token }}{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    engine.tokenizer = greeting
    client = TestClient(make_app(engine), raise_server_exceptions=False)
    assert chat(client, max_tokens=1, chat_template_kwargs={"greeting": "Hi!"}).status_code == 200
    assert greeting.decode(list(engine.prompt_ids[-1])) == "<|begin_of_text|>Hi!Be brief.What does Ray place?"


def test_streamed_chunks_carry_the_role_first_then_the_text_of_the_whole_answer(client, tokenizer):
    whole = chat(client, max_tokens=5, n=2).json()
    response = chat(client, max_tokens=5, n=2, stream=True, stream_options={"include_usage": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    *content_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == whole["usage"]
    for index in (0, 1):
        deltas = [c["choices"][0] for c in content_chunks if c["choices"][0]["index"] == index]
        assert deltas[0]["delta"] == {"role": "assistant", "content": ""}
        assert all(set(d["delta"]) == {"content"} for d in deltas[1:])
        assert "".join(d["delta"]["content"] for d in deltas) == whole["choices"][index]["message"]["content"]
        assert [d["finish_reason"] for d in deltas][-1] == "length"
        assert all(d["finish_reason"] is None for d in deltas[:-1])


@pytest.mark.parametrize("stream", [False, True])
def test_logprobs_are_chat_shaped_with_exactly_top_logprobs_alternatives(client, engine, stream):
    response = chat(client, max_tokens=3, logprobs=True, top_logprobs=1, stream=stream)
    assert response.status_code == 200, response.text
    if stream:
        choices = [json.loads(e)["choices"][0] for e in sse_events(response.text)[:-1]]
        content = [entry for c in choices if c["logprobs"] for entry in c["logprobs"]["content"]]
    else:
        content = response.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 3
    for i, entry in enumerate(content):
        piece = f" w{i}" if i else entry["token"]
        assert entry["token"] == piece and entry["bytes"] == list(piece.encode())
        assert entry["logprob"] == engine.logprob_of(i)
        assert entry["top_logprobs"] == [{"token": piece, "logprob": engine.logprob_of(i), "bytes": list(piece.encode())}]
    no_alternatives = chat(client, max_tokens=2, logprobs=True).json()["choices"][0]["logprobs"]["content"]
    assert [entry["top_logprobs"] for entry in no_alternatives] == [[], []]


@pytest.mark.parametrize("fields, param, expected", [
    ({"messages": []}, "messages", "messages: List should have at least 1 item"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages.0.role", "Input should be"),
    ({"messages": [{"role": "user", "content": None}]}, "messages.0", "a user message needs content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content", "content parts of type 'image_url' are not supported"),
    ({"messages": [{"role": "user", "content": [{"type": "prompt_embeds", "data": "AAAA"}]}]},
     "messages", "prompt_embeds part 0: "),
    ({"messages": [{"role": "user", "content": [{"type": "prompt_embeds"}]}]}, "messages.0.content",
     "messages.0.content.0.prompt_embeds.data: Field required"),
    ({"messages": LOOK, "truncate_prompt_tokens": 4}, "truncate_prompt_tokens",
     "cannot cut a conversation with prompt_embeds parts"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "unsupported field 'tools'"),
    ({"response_format": {"type": "json_object"}}, "response_format", "unsupported field 'response_format'"),
    ({"echo": True}, "echo", "unsupported field 'echo'"),
    ({"top_logprobs": 2}, "top_logprobs", "top_logprobs needs logprobs set to true"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "top_logprobs must be between 0 and 20, got 21"),
    ({"temperature": -1}, "temperature", "temperature"),
    ({"max_tokens": 60}, "max_tokens", "maximum context length is 64 tokens"),
    ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs", "may not set 'tokenize'"),
    ({"add_generation_prompt": True, "continue_final_message": True}, "messages",
     "messages: the chat template could not render them: continue_final_message and add_generation_prompt"),
])
def test_requests_the_server_cannot_serve_are_400_naming_the_field(client, engine, fields, param, expected):
    error = error_of(chat(client, **fields), 400)
    assert error["param"] == param and expected in error["message"], error
    assert engine.started == []


def test_the_not_used_values_of_unimplemented_fields_pass(client):
    response = chat(client, max_tokens=1, tools=[], tool_choice="none", parallel_tool_calls=True,
                    response_format={"type": "text"})
    assert response.status_code == 200, response.text


def test_an_unknown_model_is_404(client):
    assert error_of(chat(client, model="other"), 404)["param"] == "model"


class ShapeEngine(RecordingEngine):
    """A model shape for dummy weights: no tokenizer files."""

    vocab_size = 2048


def test_a_model_without_a_chat_template_or_tokenizer_is_400_pointing_at_completions(engine, tokenizer):
    engine.tokenizer = copy.deepcopy(tokenizer)
    engine.tokenizer.chat_template = None
    shape = ShapeEngine(None)
    for served, expected in [(engine, "messages need a chat template"), (shape, "messages need a tokenizer")]:
        client = TestClient(make_app(served), raise_server_exceptions=False)
        error = error_of(chat(client), 400)
        assert error["param"] == "messages" and expected in error["message"] and "/v1/completions" in error["message"]
        assert served.started == []


def test_render_chat_matches_the_tokenizers_own_template(tokenizer):
    request = ChatCompletionRequest(messages=HELLO)
    assert render_chat(tokenizer, request) == (templated(tokenizer), ())


def test_prompt_embeds_parts_take_their_rows_places_among_the_templates_tokens(client, engine, tokenizer):
    response = chat(client, LOOK, max_tokens=2)
    assert response.status_code == 200, response.text
    (prompt,) = engine.prompts
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Look:\n@\nand\n@"}],
                                         add_generation_prompt=True, tokenize=False)
    first, middle, last = (tokenizer.encode(piece, add_special_tokens=False) for piece in text.split("@"))
    assert prompt.prompt_token_ids == tuple(first + [0] * 3 + middle + [0] * 2 + last)
    second = len(first) + 3 + len(middle)
    assert prompt.embeds_spans == ((len(first), len(first) + 3), (second, second + 2))
    assert prompt.prompt_embeds[:3].tolist() == [[1.0] * 16] * 3 and prompt.prompt_embeds[3:].tolist() == [[2.0] * 16] * 2
    assert engine.num_embeds_puts == 1  # every part's rows, put once
    assert response.json()["usage"]["prompt_tokens"] == len(prompt.prompt_token_ids)
    chat(client, max_tokens=1)  # a text chat beside it: each counted in the intake of its input
    metrics = client.get("/metrics").text.splitlines()
    for kind in ("prompt_embeds", "prompt"):
        assert f'shardserve_request_intake_seconds_count{{input="{kind}"}} 1.0' in metrics


def test_prompt_embeds_parts_need_the_flag(engine):
    client = TestClient(make_app(engine, enable_prompt_embeds=False), raise_server_exceptions=False)
    error = error_of(chat(client, LOOK), 400)
    assert error["param"] == "messages" and "--enable-prompt-embeds" in error["message"]
    assert engine.started == [] and engine.num_embeds_puts == 0


def test_a_template_that_drops_a_part_is_400(engine, tokenizer):
    engine.tokenizer = copy.deepcopy(tokenizer)
    engine.tokenizer.chat_template = "{% for m in messages if m['role'] != 'system' %}{{ m['content'] }}{% endfor %}"
    client = TestClient(make_app(engine), raise_server_exceptions=False)
    dropped = [{"role": "system", "content": [{"type": "prompt_embeds", "data": embeds(1, 2)}]}, *HELLO[1:]]
    error = error_of(chat(client, dropped), 400)
    assert error["param"] == "messages" and "rendered 0 of the 1 prompt_embeds parts" in error["message"]
