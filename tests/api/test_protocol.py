"""OpenAI completions protocol: request parsing, prompt order, sampling mapping, and what
the real `openai` client sends and accepts back (through an httpx mock transport)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch
from pydantic import ValidationError

from api.embeds_codec import decode_prompt_embeds, encode_prompt_embeds
from api.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    ModelCard,
    ModelList,
    PromptInput,
    ProtocolError,
    UsageInfo,
    error_body,
    split_prompts,
    validation_error_body,
)


def parse(**body) -> CompletionRequest:
    return CompletionRequest.model_validate(body)


def rejected(**body) -> dict:
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate(body)
    return validation_error_body(info.value.errors())["error"]


def test_every_field_parses_and_maps_to_sampling_params():
    request = parse(
        model="m", prompt="hi", max_tokens=7, temperature=0.5, top_p=0.9, n=2, stream=True,
        stream_options={"include_usage": True}, logprobs=3, stop=["\n", "END"], seed=11,
        echo=True, presence_penalty=0.1, frequency_penalty=-0.2, user="u", top_k=40, min_p=0.05,
        min_tokens=2, ignore_eos=True, stop_token_ids=[5, 6], repetition_penalty=1.1,
        include_stop_str_in_output=True, skip_special_tokens=False)
    assert request.is_include_usage and request.user == "u" and request.echo
    params = request.to_sampling_params()
    assert (params.max_tokens, params.temperature, params.top_p, params.n) == (7, 0.5, 0.9, 2)
    assert (params.logprobs, params.stop, params.seed, params.top_k) == (3, ("\n", "END"), 11, 40)
    assert params.min_p == 0.05
    assert (params.presence_penalty, params.frequency_penalty) == (0.1, -0.2)
    assert (params.min_tokens, params.ignore_eos, params.stop_token_ids) == (2, True, (5, 6))
    assert params.repetition_penalty == 1.1 and params.include_stop_str_in_output
    assert not params.skip_special_tokens


def test_defaults_follow_openai():
    params = parse(model="m", prompt="hi").to_sampling_params()
    assert (params.temperature, params.max_tokens, params.n, params.top_p) == (1.0, 16, 1, 1.0)
    assert params.stop == () and params.logprobs is None and params.seed is None


def test_nulls_mean_defaults_and_null_max_tokens_means_fill_the_context():
    request = parse(model="m", prompt="hi", temperature=None, n=None, stop=None, logprobs=None,
                    max_tokens=None, stream=None, echo=None, stream_options=None)
    params = request.to_sampling_params()
    assert (params.temperature, params.n, params.max_tokens) == (1.0, 1, None)
    assert parse(prompt="x", stop="a").to_sampling_params().stop == ("a",)


@pytest.mark.parametrize("name, value", [
    ("suffix", "tail"), ("best_of", 2), ("best_of", True),
    ("guided_json", {"type": "object"}), ("use_beam_search", True), ("frobnicate", 1),
])
def test_unsupported_and_unknown_fields_are_rejected_by_name(name, value):
    error = rejected(model="m", prompt="hi", **{name: value})
    assert error["message"].startswith(f"unsupported field '{name}'")
    assert error["param"] == name and error["code"] == 400


@pytest.mark.parametrize("extra", [
    {"best_of": 1}, {"best_of": None}, {"suffix": None}, {"suffix": ""},
    {"logit_bias": None}, {"logit_bias": {}},
])
def test_neutral_values_of_unsupported_openai_fields_are_accepted(extra):
    assert parse(model="m", prompt="hi", **extra).prompt == "hi"


def test_logit_bias_maps_json_keys_to_token_ids():
    params = parse(prompt="hi", logit_bias={"50": -100, "7": 2.5}).to_sampling_params()
    assert params.logit_bias == {50: -100.0, 7: 2.5}
    assert parse(prompt="hi", logit_bias={}).to_sampling_params().logit_bias is None


@pytest.mark.parametrize("bias", [{"x": 1}, {"-3": 1}, {"5": 100.5}, {"5": -101}])
def test_bad_logit_bias_names_its_field(bias):
    with pytest.raises(ProtocolError, match="logit_bias") as info:
        parse(prompt="a", logit_bias=bias).to_sampling_params()
    assert info.value.param == "logit_bias"


def test_unknown_nested_stream_option_is_rejected():
    error = rejected(prompt="hi", stream=True, stream_options={"include_usage": True, "per_token_stats": True})
    assert error["param"] == "stream_options.per_token_stats"


def test_stream_options_need_stream():
    error = rejected(prompt="hi", stream_options={"include_usage": True})
    assert error["param"] == "stream_options" and "stream is true" in error["message"]


@pytest.mark.parametrize("prompt, expected", [
    ("hi", [PromptInput("text", "hi")]),
    (["a", "b"], [PromptInput("text", "a"), PromptInput("text", "b")]),
    ([1, 2, 3], [PromptInput("tokens", (1, 2, 3))]),
    ([[1], [2, 3]], [PromptInput("tokens", (1,)), PromptInput("tokens", (2, 3))]),
])
def test_prompt_forms(prompt, expected):
    assert split_prompts(parse(prompt=prompt)) == expected


@pytest.mark.parametrize("prompt", [["1", 2], [True, 2], [1.0], [[1], "a"], 5, {"a": 1}])
def test_prompt_must_be_one_of_the_openai_forms(prompt):
    assert rejected(prompt=prompt)["param"].startswith("prompt")


def test_embeds_come_first_in_order_then_prompts():
    request = parse(prompt=["a", "b"], prompt_embeds=["E1", "E2"])
    assert split_prompts(request) == [
        PromptInput("embeds", "E1"), PromptInput("embeds", "E2"),
        PromptInput("text", "a"), PromptInput("text", "b")]
    assert split_prompts(parse(prompt=[7, 8], prompt_embeds="E")) == [
        PromptInput("embeds", "E"), PromptInput("tokens", (7, 8))]


@pytest.mark.parametrize("prompt", ["", None, []])
def test_empty_or_null_prompt_beside_embeds_is_no_text_prompt(prompt):
    assert split_prompts(parse(prompt=prompt, prompt_embeds="E")) == [PromptInput("embeds", "E")]


@pytest.mark.parametrize("body", [
    {}, {"prompt": ""}, {"prompt": None, "prompt_embeds": None}, {"prompt_embeds": []},
    {"prompt": [], "prompt_embeds": []},
])
def test_neither_prompt_nor_embeds_is_rejected(body):
    with pytest.raises(ProtocolError, match="either prompt or prompt_embeds must be provided"):
        split_prompts(parse(**body))


def test_embeds_list_may_be_empty_beside_a_prompt():
    assert split_prompts(parse(prompt="a", prompt_embeds=[])) == [PromptInput("text", "a")]


def test_echo_with_embeds_is_rejected_but_fine_with_text():
    with pytest.raises(ProtocolError, match="echo is not supported with prompt_embeds") as info:
        split_prompts(parse(prompt="a", prompt_embeds="E", echo=True))
    assert info.value.param == "echo"
    assert split_prompts(parse(prompt="a", echo=True)) == [PromptInput("text", "a")]


def test_empty_token_list_and_too_many_prompts_are_rejected():
    with pytest.raises(ProtocolError, match=r"prompt\[1\] is an empty list"):
        split_prompts(parse(prompt=[[1], []]))
    with pytest.raises(ProtocolError, match="at most 2 prompts") as info:
        split_prompts(parse(prompt=["a"], prompt_embeds=["E1", "E2"]), max_prompts=2)
    assert info.value.param == "prompt"


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("min_p", 1.5), ("n", 0),
    ("max_tokens", 0), ("min_tokens", -1), ("logprobs", 21), ("logprobs", -1),
    ("presence_penalty", 2.5), ("frequency_penalty", -3.0), ("repetition_penalty", 0.0),
    ("stop", [""]),
])
def test_bad_sampling_values_name_their_field(field, value):
    with pytest.raises(ProtocolError, match=field) as info:
        parse(prompt="a", **{field: value}).to_sampling_params()
    assert info.value.param == field


def test_min_tokens_above_max_tokens_names_min_tokens():
    message = r"min_tokens \(9\) must be <= max_tokens \(4\)"
    with pytest.raises(ProtocolError, match=message) as info:
        parse(prompt="a", min_tokens=9, max_tokens=4).to_sampling_params()
    assert info.value.param == "min_tokens"


def test_type_errors_name_their_field():
    error = rejected(prompt="a", temperature="hot")
    assert error["param"] == "temperature" and error["message"].startswith("temperature: ")


def test_error_body_shape():
    assert error_body("bad", param="prompt_embeds") == {"error": {
        "message": "bad", "type": "invalid_request_error", "param": "prompt_embeds", "code": 400}}


def _client(handler) -> openai.OpenAI:
    transport = httpx.MockTransport(handler)
    return openai.OpenAI(api_key="sk-test", base_url="http://shardserve.test/v1",
                         http_client=httpx.Client(transport=transport))


def _response() -> CompletionResponse:
    logprobs = CompletionLogprobs(tokens=[" hi"], token_logprobs=[-0.1],
                                  top_logprobs=[{" hi": -0.1}], text_offset=[0])
    choice = CompletionChoice(index=0, text=" hi", logprobs=logprobs, finish_reason="length")
    return CompletionResponse(model="m", choices=[choice], usage=UsageInfo.of(4, 1))


@pytest.mark.parametrize("prompt", ["", None])
def test_openai_client_body_with_extra_body_embeds_parses(prompt):
    tensor = torch.randn(4, 8)
    bodies = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json=_response().model_dump())

    completion = _client(handler).completions.create(
        model="m", prompt=prompt, max_tokens=1, logprobs=1,
        extra_body={"prompt_embeds": encode_prompt_embeds(tensor)})
    assert set(bodies[0]) == {"model", "prompt", "max_tokens", "logprobs", "prompt_embeds"}
    inputs = split_prompts(CompletionRequest.model_validate(bodies[0]))
    assert [item.kind for item in inputs] == ["embeds"]
    decoded = decode_prompt_embeds(inputs[0].value, hidden_size=8, dtype=torch.float32,
                                   max_bytes=1 << 20)
    assert torch.equal(decoded, tensor)
    assert completion.id.startswith("cmpl-") and completion.object == "text_completion"
    assert completion.choices[0].logprobs.tokens == [" hi"]
    assert (completion.usage.prompt_tokens, completion.usage.total_tokens) == (4, 5)


def test_openai_client_reads_stream_chunks_and_usage():
    chunks = [CompletionStreamResponse(id="cmpl-1", model="m",
                                       choices=[CompletionChoice(index=0, text=word)])
              for word in (" a", " b")]
    chunks.append(CompletionStreamResponse(id="cmpl-1", model="m", choices=[],
                                           usage=UsageInfo.of(3, 2)))
    events = "".join(f"data: {chunk.model_dump_json()}\n\n" for chunk in chunks)
    stream = _client(lambda request: httpx.Response(
        200, text=events + "data: [DONE]\n\n", headers={"content-type": "text/event-stream"},
    )).completions.create(model="m", prompt="x", stream=True,
                          stream_options={"include_usage": True})
    received = list(stream)
    assert [c.choices[0].text for c in received[:2]] == [" a", " b"]
    assert received[-1].choices == [] and received[-1].usage.total_tokens == 5


def test_openai_client_reads_model_list_and_error_body():
    models = ModelList(data=[ModelCard(id="m", max_model_len=128)])
    listed = _client(lambda request: httpx.Response(200, json=models.model_dump())).models.list()
    assert [model.id for model in listed] == ["m"]
    body = error_body("prompt_embeds: expected shape (seq_len, 8)", param="prompt_embeds")
    client = _client(lambda request: httpx.Response(400, json=body))
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="m", prompt="x")
    assert info.value.param == "prompt_embeds" and "expected shape" in info.value.message


def test_truncate_prompt_tokens_maps_and_bad_values_name_it():
    assert parse(prompt="hi", truncate_prompt_tokens=5).to_sampling_params().truncate_prompt_tokens == 5
    assert parse(prompt="hi", truncate_prompt_tokens=-1).to_sampling_params().truncate_prompt_tokens == -1
    for bad in (0, -2):
        with pytest.raises(ProtocolError, match="truncate_prompt_tokens must be") as info:
            parse(prompt="a", truncate_prompt_tokens=bad).to_sampling_params()
        assert info.value.param == "truncate_prompt_tokens"
