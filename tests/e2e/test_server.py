"""End to end through Ray Serve and HTTP with the real `openai` client: the default model on
a tensor-parallel engine of two CPU shards, prompt embeddings on. Results are checked
against the offline LLM on the same weights; every bad payload is a 400 and the server
keeps answering; a client that goes away mid-stream frees its KV blocks."""

from __future__ import annotations

import json
import os
import random
import runpy
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema
from safetensors.torch import load_file

from api.app import build_app
from api.embeds_codec import encode_prompt_embeds
from api.settings import DEFAULT_MODEL_NAME, ServerSettings
from cluster import LLM, SamplingParams
from cluster.default_model import default_model_path, model_shape_path
from cluster.tokenizer import load_tokenizer
from scripts.bench_serving import metric_samples
from tests.api.test_embeds_codec import _sparse_coo_out_of_range, b64, call_pickle, saved, with_pickle
from tests.e2e.conftest import CONFIG_PATH, KV_CACHE_BYTES, config_application, wait_healthy

H = 256  # the default model's hidden size
MAX_MODEL_LEN = 1024
TEXTS = ["The quick brown fox", "Ray places one shard on each GPU, and"]
GREEDY = {"temperature": 0.0, "max_tokens": 8, "extra_body": {"ignore_eos": True}}


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def llm(ray_cluster):
    """A second, offline engine with the server's settings: the reference for HTTP results."""
    with LLM(tensor_parallel_size=2, enable_prompt_embeds=True, max_model_len=MAX_MODEL_LEN,
             kv_cache_memory_bytes=KV_CACHE_BYTES) as llm:
        yield llm


@pytest.fixture(scope="module")
def embed_table(server_url):
    """The default model's input embedding matrix (vocab, H)."""
    return load_file(default_model_path() / "model.safetensors")["model.embed_tokens.weight"]


def random_embeds(seed: int, rows: int = 5) -> torch.Tensor:
    return torch.randn(rows, H, generator=torch.Generator().manual_seed(seed))


def random_ids(seed: int, length: int = 6) -> list[int]:
    return torch.randint(10, 1500, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def complete(client, embeds=(), prompt="", **kwargs):
    """A completion with `embeds` (tensors) sent as prompt_embeds beside `prompt`."""
    extra_body = {**GREEDY["extra_body"], **kwargs.pop("extra_body", {})}
    kwargs = {**GREEDY, **kwargs, "extra_body": None}
    del kwargs["extra_body"]
    if embeds:
        extra_body["prompt_embeds"] = [encode_prompt_embeds(e) for e in embeds]
    return client.completions.create(model=DEFAULT_MODEL_NAME, prompt=prompt,
                                     extra_body=extra_body, **kwargs)


def stream_texts(client, embeds=(), prompt="", **kwargs) -> tuple[dict[int, str], dict | None]:
    """Concatenated text per choice index and the usage chunk of a streamed completion."""
    texts, usage = {}, None
    stream = complete(client, embeds, prompt, stream=True,
                      stream_options={"include_usage": True}, **kwargs)
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage.model_dump()
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    return texts, usage


def metrics(server_url: str) -> dict[str, float]:
    return metric_samples(httpx.get(f"{server_url}/metrics", timeout=10).text)


# The config file ----------------------------------------------------------------------

def test_config_file_is_a_valid_serve_config_whose_args_build_the_app(server_args):
    config = yaml.safe_load(CONFIG_PATH.read_text())
    schema = ServeDeploySchema.model_validate(config)
    assert (schema.http_options.host, schema.http_options.port) == ("127.0.0.1", 8000)
    application = config_application()
    assert (application["name"], application["route_prefix"], application["import_path"]) == \
        ("shardserve", "/", "api.app:build_app")
    args = application["args"]
    assert args == {"tensor_parallel_size": 2, "enable_prompt_embeds": True, "max_model_len": 1024}
    settings = ServerSettings.from_dict(args)
    assert (settings.tensor_parallel_size, settings.enable_prompt_embeds, settings.max_model_len) == (2, True, 1024)
    assert isinstance(build_app(args), Application)
    # The session's server runs these very args (plus a smaller KV cache).
    assert server_args == {**args, "kv_cache_memory_bytes": KV_CACHE_BYTES}
    with pytest.raises(ValueError, match="unknown setting"):
        build_app({**args, "tensor_parallel": 2})


# Plain endpoints ----------------------------------------------------------------------

def test_models_health_version_metrics(client, server_url):
    (card,) = client.models.list().data
    assert card.id == DEFAULT_MODEL_NAME and card.model_extra["max_model_len"] == MAX_MODEL_LEN
    assert client.models.retrieve(DEFAULT_MODEL_NAME) == card
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("another-model")
    assert httpx.get(f"{server_url}/health").status_code == 200
    assert httpx.get(f"{server_url}/version").json() == {"version": "0.1.0"}
    before = metrics(server_url)
    complete(client, prompt=TEXTS[0], max_tokens=3)
    after = metrics(server_url)
    finished = 'shardserve_requests_total{status="length"}'
    assert after[finished] == before.get(finished, 0.0) + 1
    for name in ("shardserve_time_to_first_token_seconds_count",
                 "shardserve_time_per_output_token_seconds_count"):
        assert after[name] == before[name] + 1
    assert after["shardserve_generation_tokens_total"] == before["shardserve_generation_tokens_total"] + 3
    assert after["shardserve_num_requests_running"] == after["shardserve_num_requests_waiting"] == 0
    assert after["shardserve_kv_cache_usage_perc"] == 0


def test_a_repeated_prefix_is_served_from_the_prefix_cache(client, server_url):
    prefix = random_ids(40, 48)  # three full KV blocks
    complete(client, prompt=prefix + random_ids(41, 5), max_tokens=4)
    before = metrics(server_url)
    prompt = prefix + random_ids(42, 7)
    cached = complete(client, prompt=prompt, max_tokens=4)
    after = metrics(server_url)
    assert after["shardserve_prefix_cache_hits_total"] - before["shardserve_prefix_cache_hits_total"] == 48
    assert after["shardserve_prefix_cache_queries_total"] - before["shardserve_prefix_cache_queries_total"] == 55
    assert after["shardserve_kv_cache_usage_perc"] == 0  # cached blocks no request holds are free
    # Greedy: the same text again, its prefix read from the cache again.
    assert complete(client, prompt=prompt, max_tokens=4).choices[0].text == cached.choices[0].text


def test_a_cache_salt_keeps_a_prefix_to_requests_of_that_salt(client, server_url):
    """vLLM's cache_salt over HTTP with the openai client: the same prompt under another
    salt finds nothing cached; under its own salt, its three full blocks."""
    prompt = random_ids(43, 50)

    def hits(salt):
        before = metrics(server_url)["shardserve_prefix_cache_hits_total"]
        text = complete(client, prompt=prompt, max_tokens=4, extra_body={"cache_salt": salt}).choices[0].text
        return metrics(server_url)["shardserve_prefix_cache_hits_total"] - before, text

    runs = [hits(salt) for salt in ("tenant-a", "tenant-b", "tenant-a")]
    assert [n for n, _ in runs] == [0, 0, 48] and len({text for _, text in runs}) == 1


# Prompt embeddings --------------------------------------------------------------------

def test_single_embeddings_streamed_equals_not_streamed(client):
    embeds = random_embeds(0, rows=7)
    result = complete(client, [embeds])
    (choice,) = result.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (7, 8)
    texts, usage = stream_texts(client, [embeds])
    assert texts == {0: choice.text} and usage == result.usage.model_dump()


def test_batch_of_one_and_bfloat16_embeddings_are_accepted(client):
    embeds = random_embeds(1)
    reference = complete(client, [embeds]).choices[0].text
    assert complete(client, [embeds[None]]).choices[0].text == reference
    as_bf16 = complete(client, [embeds.to(torch.bfloat16)])
    assert as_bf16.usage.prompt_tokens == 5 and as_bf16.choices[0].finish_reason == "length"


def test_list_of_embeddings_and_mixed_prompt_put_embeddings_first(client):
    first, second = random_embeds(2, rows=4), random_embeds(3, rows=9)
    singles = [complete(client, [e]).choices[0].text for e in (first, second)]
    text_only = complete(client, prompt=TEXTS[0])
    listed = complete(client, [first, second])
    assert [(c.index, c.text) for c in listed.choices] == [(0, singles[0]), (1, singles[1])]
    assert listed.usage.prompt_tokens == 13
    mixed = complete(client, [first, second], prompt=TEXTS[0])
    assert [c.text for c in mixed.choices] == [*singles, text_only.choices[0].text]
    assert [c.index for c in mixed.choices] == [0, 1, 2]
    assert mixed.usage.prompt_tokens == 13 + text_only.usage.prompt_tokens
    texts, usage = stream_texts(client, [first, second], prompt=TEXTS[0])
    assert texts == {c.index: c.text for c in mixed.choices} and usage == mixed.usage.model_dump()


def _bodies_in_serves_proxy() -> tuple[int, int]:
    """WholeBodyMiddleware's counts in the Serve HTTP proxy of this (one-node) Ray: bodies
    joined from several chunks, and bodies sent to the replica in the request's scope."""
    import ray

    [proxy] = [ray.get_actor(a["name"], namespace=a["namespace"])
               for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_PROXY_ACTOR")]

    def counts(_):
        from api.ingress import WholeBodyMiddleware
        return WholeBodyMiddleware.num_joined_bodies, WholeBodyMiddleware.num_scope_bodies

    return ray.get(proxy.__ray_call__.remote(counts))


def test_a_large_prompt_embeds_body_reaches_the_replica_whole_and_decodes_as_offline(client, llm):
    """600 rows of 256 float32: 0.8 MB of base64, which arrives at Serve's proxy in several
    chunks. The session's Ray has `shardserve serve`'s proxy settings, so the proxy reads
    the body whole before routing it and sends it in the request's scope (api/ingress.py,
    WholeBodyMiddleware); the replica reads it there, and the result is the offline engine's."""
    embeds = random_embeds(11, rows=600)
    joined, in_scope = _bodies_in_serves_proxy()
    result = complete(client, [embeds], max_tokens=4)
    assert _bodies_in_serves_proxy() == (joined + 1, in_scope + 1)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    (expected,) = llm.generate([{"prompt_embeds": embeds}], params, use_tqdm=False)[0].outputs
    assert result.usage.prompt_tokens == 600
    assert result.choices[0].text == expected.text


def test_a_small_body_also_rides_in_the_scope_streamed_or_not(client):
    """A token-id request's body too: the replica calls the proxy back for no body. A
    streamed request (whose replica also watches the proxy for a disconnect) ends as usual."""
    _, in_scope = _bodies_in_serves_proxy()
    ids = random_ids(5, length=5)
    result = complete(client, prompt=ids, max_tokens=3)
    assert result.usage.prompt_tokens == 5 and result.usage.completion_tokens == 3
    stream = complete(client, prompt=ids, max_tokens=3, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == result.choices[0].text
    assert _bodies_in_serves_proxy()[1] == in_scope + 2


def test_http_results_equal_llm_generate(client, llm, embed_table):
    ids = random_ids(4)
    prompts = [TEXTS[0], TEXTS[1], {"prompt_token_ids": ids},
               {"prompt_embeds": random_embeds(5)}, {"prompt_embeds": embed_table[ids]}]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    offline = llm.generate(prompts, params, use_tqdm=False)
    for prompt, expected in zip(prompts, offline):
        if isinstance(prompt, str):
            result = complete(client, prompt=prompt)
        elif "prompt_token_ids" in prompt:
            result = complete(client, prompt=prompt["prompt_token_ids"])
        else:
            result = complete(client, [prompt["prompt_embeds"]])
        (choice,) = result.choices
        assert choice.text == expected.outputs[0].text and choice.finish_reason == "length"
        assert result.usage.prompt_tokens == expected.num_prompt_tokens
        assert result.usage.completion_tokens == len(expected.outputs[0].token_ids)
    # The model's own embeddings of the ids continue exactly as the ids do.
    assert offline[4].outputs[0].token_ids == offline[2].outputs[0].token_ids


def test_logprobs_shape_and_values_match_the_engine(client, llm):
    embeds = random_embeds(6)
    result = complete(client, [embeds], logprobs=3, max_tokens=6)
    logprobs = result.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) \
        == len(logprobs.text_offset) == 6
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=3)
    (expected,) = llm.generate([{"prompt_embeds": embeds}], params, use_tqdm=False)[0].outputs
    offset = 0
    for i, token_id in enumerate(expected.token_ids):
        chosen = expected.logprobs[i][token_id]
        assert logprobs.tokens[i] == chosen.decoded_token
        assert logprobs.token_logprobs[i] == pytest.approx(chosen.logprob, abs=1e-4)
        top = logprobs.top_logprobs[i]
        assert 1 <= len(top) <= 3 and max(top.values()) == logprobs.token_logprobs[i]  # greedy
        assert logprobs.text_offset[i] == offset
        offset += len(logprobs.tokens[i])


@pytest.mark.parametrize("stream", [False, True])
def test_echo_with_logprobs_scores_the_prompt_as_the_engine_does(client, llm, stream):
    """How evaluation harnesses score a text (echo, logprobs, one token): the echoed
    prompt's tokens first, the first with no logprob, each other with its own and the
    top one, equal to the engine's prompt_logprobs; then the completion's token."""
    text = "Ray places one shard on each GPU, and"
    response = complete(client, prompt=text, max_tokens=1, echo=True, logprobs=1, stream=stream)
    chunks = list(response) if stream else [response]
    logprobs = {key: sum((getattr(c.choices[0].logprobs, key) for c in chunks if c.choices), [])
                for key in ("tokens", "token_logprobs", "top_logprobs")}
    assert "".join(c.choices[0].text for c in chunks if c.choices).startswith(text)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=1, prompt_logprobs=1)
    (expected,) = llm.generate([text], params, use_tqdm=False)
    ids = expected.prompt_token_ids
    assert len(logprobs["tokens"]) == len(ids) + 1
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    for position in range(1, len(ids)):
        own = expected.prompt_logprobs[position][ids[position]]
        assert logprobs["tokens"][position] == own.decoded_token
        assert logprobs["token_logprobs"][position] == pytest.approx(own.logprob, abs=1e-4)
        assert own.decoded_token in logprobs["top_logprobs"][position]
        assert 1 <= len(logprobs["top_logprobs"][position]) <= 2
    generated = expected.outputs[0].logprobs[0][expected.outputs[0].token_ids[0]]
    assert logprobs["token_logprobs"][-1] == pytest.approx(generated.logprob, abs=1e-4)


def test_echo_with_max_tokens_0_scores_the_prompt_alone(client, llm):
    text = "The quick brown fox"
    result = complete(client, prompt=text, max_tokens=0, echo=True, logprobs=0)
    (choice,) = result.choices
    assert choice.text == text and choice.finish_reason == "length" and result.usage.completion_tokens == 0
    (expected,) = llm.generate([text], SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0),
                               use_tqdm=False)
    ids = expected.prompt_token_ids
    assert choice.logprobs.token_logprobs[0] is None and len(choice.logprobs.tokens) == len(ids)
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(
        [expected.prompt_logprobs[p][ids[p]].logprob for p in range(1, len(ids))], abs=1e-4)


def test_return_tokens_as_token_ids_names_the_engine_tokens(client, llm):
    result = complete(client, prompt="The quick brown fox", max_tokens=4, logprobs=2,
                      extra_body={"return_tokens_as_token_ids": True})
    (expected,) = llm.generate(["The quick brown fox"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                               use_tqdm=False)
    logprobs = result.choices[0].logprobs
    assert logprobs.tokens == [f"token_id:{t}" for t in expected.outputs[0].token_ids]
    assert all(key.startswith("token_id:") for top in logprobs.top_logprobs for key in top)


def test_vllm_prompt_logprobs_field_equals_the_engine(client, llm):
    text = "Ray places one shard on each GPU, and"
    result = complete(client, prompt=text, max_tokens=2, extra_body={"prompt_logprobs": 2})
    served = result.choices[0].model_extra["prompt_logprobs"]
    (expected,) = llm.generate([text], SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=2),
                               use_tqdm=False)
    assert served[0] is None and len(served) == len(expected.prompt_logprobs)
    for got, want in zip(served[1:], expected.prompt_logprobs[1:]):
        assert {int(t) for t in got} == set(want)
        for token_id, entry in want.items():
            assert got[str(token_id)]["logprob"] == pytest.approx(entry.logprob, abs=1e-4)
            assert (got[str(token_id)]["rank"], got[str(token_id)]["decoded_token"]) == (entry.rank, entry.decoded_token)


def test_n_samples_are_indexed_distinct_and_reproducible_with_seed(client):
    embeds = random_embeds(7)
    sampled = {"temperature": 1.0, "n": 3, "seed": 11, "max_tokens": 8}
    first = complete(client, [embeds], **sampled)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert len({c.text for c in first.choices}) == 3
    assert [c.text for c in complete(client, [embeds], **sampled).choices] == \
        [c.text for c in first.choices]
    assert first.usage.prompt_tokens == 5 and first.usage.completion_tokens == 24
    two_prompts = complete(client, [embeds], prompt=TEXTS[0], **{**sampled, "n": 2})
    assert [c.index for c in two_prompts.choices] == [0, 1, 2, 3]
    assert [c.text for c in two_prompts.choices[:2]] == [c.text for c in first.choices[:2]]


def test_seed_reproducibility(client):
    sampled = {"temperature": 0.9, "max_tokens": 10}
    texts = [complete(client, prompt=TEXTS[1], seed=seed, **sampled).choices[0].text
             for seed in (5, 5, 6)]
    assert texts[0] == texts[1] != texts[2]


def test_tokenize_ids_embedded_by_the_client_complete_like_the_text(client, server_url, embed_table):
    """vLLM's /tokenize and /detokenize: the ids the server uses for a text; looked up in
    the model's input embeddings by the client and sent as prompt_embeds, they give the
    text's own greedy completion."""
    tokenized = httpx.post(f"{server_url}/tokenize", json={"model": DEFAULT_MODEL_NAME, "prompt": TEXTS[1]},
                           timeout=30).json()
    ids = tokenized["tokens"]
    assert tokenized["count"] == len(ids) and tokenized["max_model_len"] == MAX_MODEL_LEN
    from_text = complete(client, prompt=TEXTS[1]).choices[0].text
    assert complete(client, [embed_table[ids]]).choices[0].text == from_text
    detokenized = httpx.post(f"{server_url}/detokenize", json={"tokens": ids}, timeout=30).json()["prompt"]
    assert TEXTS[1] in detokenized  # the text, after any special tokens the tokenizer adds
    # A conversation: the ids its chat template gives, embedded, answer as the chat does.
    chat = httpx.post(f"{server_url}/tokenize", json={"messages": CHAT}, timeout=30).json()["tokens"]
    assert chat == chat_ids()
    from_chat = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=CHAT, **GREEDY)
    assert complete(client, [embed_table[chat]]).choices[0].text == from_chat.choices[0].message.content


def test_logit_bias_over_http_equals_the_offline_engine(client, llm):
    """OpenAI's logit_bias (string keys): a greedy path changed by the bias, over HTTP at
    TP=2 as LLM.generate gives it; an id outside the vocabulary is a 400 naming the field."""
    bias = {str(t): -5.0 for t in range(0, 1536, 2)}  # even ids down
    http = complete(client, prompt=TEXTS[0], extra_body={"logit_bias": bias}).choices[0]
    offline = llm.generate([TEXTS[0]], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True,
                                                      logit_bias={int(t): b for t, b in bias.items()}),
                           use_tqdm=False)[0].outputs[0]
    assert http.text == offline.text
    assert http.text != complete(client, prompt=TEXTS[0]).choices[0].text  # the bias mattered
    with pytest.raises(openai.BadRequestError, match="outside the vocabulary") as info:
        complete(client, prompt=TEXTS[0], extra_body={"logit_bias": {"99999": 1}})
    assert info.value.body["param"] == "logit_bias"


def test_truncate_prompt_tokens_over_http_equals_sending_the_last_tokens_and_rows(client):
    """vLLM's truncate_prompt_tokens through Serve: a token-id prompt and an embeddings
    prompt complete as their last 4 tokens / rows sent alone; usage counts what was kept."""
    ids, rows = random_ids(21, length=12), random_embeds(22, rows=9)
    cut = complete(client, [rows], prompt=[ids], extra_body={"truncate_prompt_tokens": 4})
    direct = complete(client, [rows[-4:]], prompt=[ids[-4:]])
    assert [c.text for c in cut.choices] == [c.text for c in direct.choices]
    assert cut.usage.prompt_tokens == direct.usage.prompt_tokens == 8


def test_min_p_of_one_samples_the_greedy_text(client):
    """vLLM's min_p over HTTP: at 1.0 only the most likely token survives, so sampling at
    temperature 1 (three seeds) gives the greedy text, where without it the seeds differ."""
    greedy = complete(client, prompt=TEXTS[0], max_tokens=10).choices[0].text
    sampled = {"temperature": 1.0, "max_tokens": 10}
    with_min_p = [complete(client, prompt=TEXTS[0], seed=seed, extra_body={"min_p": 1.0}, **sampled).choices[0].text
                  for seed in (1, 2, 3)]
    assert with_min_p == [greedy] * 3
    without = {complete(client, prompt=TEXTS[0], seed=seed, **sampled).choices[0].text for seed in (1, 2, 3)}
    assert without != {greedy}
    with pytest.raises(openai.BadRequestError, match="min_p must be in"):
        complete(client, prompt=TEXTS[0], extra_body={"min_p": 1.5})


def _stop_string(text: str) -> str:
    """A 2-character piece of `text` whose first occurrence is past its start."""
    for start in range(len(text) // 2, 0, -1):
        piece = text[start:start + 2]
        if len(piece) == 2 and "\ufffd" not in piece and text.find(piece) == start:
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings_cut_the_text_exactly(client):
    embeds = random_embeds(8)
    full = complete(client, [embeds], max_tokens=16).choices[0].text
    stop = _stop_string(full)
    result = complete(client, [embeds], max_tokens=16, stop=[stop, "never-seen-stop"])
    (choice,) = result.choices
    assert choice.text == full[:full.index(stop)]
    assert choice.finish_reason == "stop" and choice.model_extra["stop_reason"] == stop
    assert result.usage.completion_tokens < 16
    texts, usage = stream_texts(client, [embeds], max_tokens=16, stop=[stop, "never-seen-stop"])
    assert texts == {0: choice.text} and usage == result.usage.model_dump()


# Chat completions ---------------------------------------------------------------------

CHAT = [{"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "What does Ray place on each GPU?"}]


def chat_ids(messages=CHAT) -> list[int]:
    """The conversation as the default model's chat template renders it."""
    tokenizer = load_tokenizer(default_model_path())
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)


def test_chat_answers_as_the_engine_continues_the_templated_conversation(client, llm):
    ids = chat_ids()
    result = client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=CHAT, temperature=0.0, max_tokens=8,
                                            logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
    (expected,) = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0].outputs
    (choice,) = result.choices
    assert result.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.message.content == expected.text and choice.finish_reason == "length"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(ids), 8)
    assert len(choice.logprobs.content) == 8
    for entry, token_id, entries in zip(choice.logprobs.content, expected.token_ids, expected.logprobs):
        assert entry.token == entries[token_id].decoded_token and entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(entries[token_id].logprob, abs=1e-4)
        assert len(entry.top_logprobs) == 2 and entry.top_logprobs[0].token == entry.token  # greedy


def test_chat_prompt_embeds_parts_of_the_models_own_embeddings_answer_as_the_text_does(client, embed_table):
    """A message whose content is the model's input embeddings of its text, as a
    prompt_embeds part beside a text part: the template rendered around the rows gives the
    text chat's prompt, so greedy decoding answers the same (and usage counts the same)."""
    tokenizer = load_tokenizer(default_model_path())
    question = "What does Ray place on each GPU?"
    rendered = tokenizer.apply_chat_template([{"role": "system", "content": "Answer in one line."},
                                              {"role": "user", "content": "Q:\n@"}],
                                             add_generation_prompt=True, tokenize=False)
    before, after = (tokenizer.encode(piece, add_special_tokens=False) for piece in rendered.split("@"))
    ids = tokenizer.encode(question, add_special_tokens=False)
    text_chat = [CHAT[0], {"role": "user", "content": f"Q:\n{question}"}]
    assert before + ids + after == chat_ids(text_chat)  # the same prompt, token for token
    parts = [{"type": "text", "text": "Q:"}, {"type": "prompt_embeds", "data": encode_prompt_embeds(embed_table[ids])}]
    kwargs = {"model": DEFAULT_MODEL_NAME, "temperature": 0.0, "max_tokens": 10, "extra_body": {"ignore_eos": True}}
    expected = client.chat.completions.create(messages=text_chat, **kwargs)
    result = client.chat.completions.create(messages=[CHAT[0], {"role": "user", "content": parts}], **kwargs)
    assert result.choices[0].message.content == expected.choices[0].message.content
    assert result.usage.prompt_tokens == expected.usage.prompt_tokens == len(before + ids + after)
    streamed = client.chat.completions.create(messages=[CHAT[0], {"role": "user", "content": parts}], stream=True,
                                              **kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == result.choices[0].message.content
    other = [{"type": "text", "text": "Q:"}, {"type": "prompt_embeds", "data": encode_prompt_embeds(random_embeds(9))}]
    assert client.chat.completions.create(messages=[CHAT[0], {"role": "user", "content": other}],
                                          **kwargs).choices[0].message.content != result.choices[0].message.content


def test_chat_streamed_equals_not_streamed_and_bad_chats_are_400(client):
    kwargs = {"model": DEFAULT_MODEL_NAME, "messages": CHAT, "temperature": 0.8, "seed": 11, "max_tokens": 10,
              "n": 2, "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**kwargs)
    contents, roles, usage = {}, {}, None
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        assert chunk.object == "chat.completion.chunk"
        usage = chunk.usage or usage
        for choice in chunk.choices:
            if choice.delta.role is not None:
                roles[choice.index] = choice.delta.role
            contents[choice.index] = contents.get(choice.index, "") + (choice.delta.content or "")
    assert contents == {choice.index: choice.message.content for choice in whole.choices}
    assert roles == {0: "assistant", 1: "assistant"} and usage == whole.usage
    with pytest.raises(openai.BadRequestError, match="unsupported field 'tools'"):
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=CHAT, max_tokens=2,
                                       tools=[{"type": "function", "function": {"name": "lookup"}}])
    with pytest.raises(openai.BadRequestError, match="prompt_embeds part 0: "):
        client.chat.completions.create(model=DEFAULT_MODEL_NAME, max_tokens=2, messages=[
            {"role": "user", "content": [{"type": "prompt_embeds", "data": "AAAA"}]}])
    assert client.chat.completions.create(model=DEFAULT_MODEL_NAME, messages=CHAT, max_tokens=2).choices


# Bad payloads -------------------------------------------------------------------------

def _nan_embeds() -> torch.Tensor:
    tensor = random_embeds(9)
    tensor[2, 3] = float("nan")
    return tensor


def _pwned_path() -> str:
    return f"/tmp/shardserve-e2e-pwned-{os.getpid()}"


BAD_PAYLOADS = {
    "wrong hidden size": (lambda: encode_prompt_embeds(torch.randn(4, 128)),
                          "expected shape (seq_len, 256), got (4, 128)"),
    "1-D": (lambda: encode_prompt_embeds(torch.randn(H)), "expected shape (seq_len, 256), got (256,)"),
    "3-D batch of 2": (lambda: encode_prompt_embeds(torch.randn(2, 3, H)),
                       "expected shape (seq_len, 256), got (2, 3, 256)"),
    "zero rows": (lambda: encode_prompt_embeds(torch.zeros(0, H)), "at least one row"),
    "NaN": (lambda: encode_prompt_embeds(_nan_embeds()), "NaN or Inf"),
    "int dtype": (lambda: encode_prompt_embeds(torch.ones(3, H, dtype=torch.int32)), "found torch.IntStorage"),
    "sparse COO out of range": (lambda: b64(saved(_sparse_coo_out_of_range())),
                                "found torch._utils._rebuild_sparse_tensor"),
    "os.system pickle": (lambda: with_pickle(call_pickle("os", "system", f"touch {_pwned_path()}")),
                         "found os.system"),
    "truncated": (lambda: b64(saved(random_embeds(10))[:300]), "not a readable torch.save zip archive"),
    "random bytes": (lambda: b64(random.Random(0).randbytes(2000)), "not a readable torch.save zip archive"),
    "not base64": (lambda: "this is not base64!", "standard base64"),
    "too long": (lambda: encode_prompt_embeds(random_embeds(11, rows=MAX_MODEL_LEN - 4)),
                 "maximum context length is 1024"),
}


@pytest.mark.parametrize("name", list(BAD_PAYLOADS))
def test_bad_payload_is_400_on_prompt_embeds_and_the_server_keeps_answering(client, name):
    make, expected = BAD_PAYLOADS[name]
    with pytest.raises(openai.BadRequestError) as info:
        complete(client, prompt="", extra_body={"prompt_embeds": make()})
    error = info.value.body
    assert info.value.status_code == 400 and error["param"] == "prompt_embeds"
    assert expected in error["message"] and error["type"] == "invalid_request_error"
    assert not os.path.exists(_pwned_path())
    after = complete(client, [random_embeds(12)], max_tokens=2)
    assert after.choices[0].finish_reason == "length" and after.usage.completion_tokens == 2


def test_every_bad_payload_as_a_chat_part_is_400_and_the_server_keeps_answering(client):
    """The same payloads inside a chat's prompt_embeds part: the same safe decoder (and
    the context counts the template's tokens with the rows)."""
    cases = {**BAD_PAYLOADS, "too long": (BAD_PAYLOADS["too long"][0], "but max_model_len is 1024")}
    for name, (make, expected) in cases.items():
        parts = [{"type": "text", "text": "Read:"}, {"type": "prompt_embeds", "data": make()}]
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=DEFAULT_MODEL_NAME, max_tokens=2,
                                           messages=[{"role": "user", "content": parts}])
        error = info.value.body
        assert info.value.status_code == 400 and error["param"] == "messages", name
        assert expected in error["message"], name
        assert not os.path.exists(_pwned_path())
    after = client.chat.completions.create(model=DEFAULT_MODEL_NAME, max_tokens=2, messages=[
        {"role": "user", "content": [{"type": "prompt_embeds", "data": encode_prompt_embeds(random_embeds(3))}]}])
    assert after.choices[0].finish_reason == "length" and after.usage.completion_tokens == 2


# Disconnect ---------------------------------------------------------------------------

def test_client_disconnect_mid_stream_aborts_and_frees_kv_blocks(server_url):
    before = metrics(server_url)
    aborted_before = before.get("shardserve_engine_aborted_requests_total", 0.0)
    body = {"model": DEFAULT_MODEL_NAME, "prompt": TEXTS[0], "max_tokens": 1000,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", f"{server_url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            # Keep the iterator referenced: closing it (as `break` in a for loop would)
            # closes the connection, and the request must still run here.
            lines, events = response.iter_lines(), 0
            while events < 3:
                events += next(lines).startswith("data: {")
            during = metrics(server_url)
            lines.close()  # the client goes away mid-stream
    assert during["shardserve_num_requests_running"] >= 1
    assert during["shardserve_kv_cache_usage_perc"] > 0
    # The abort reaches the shards from another process: a bounded wait (usually ~40 ms,
    # seconds on a loaded machine). The engine's own abort count tells an aborted request
    # from one that ran to its length; the session's server is shared, so usage is
    # compared with the figures before the request, not with zero.
    def settled(figures):
        return (figures.get("shardserve_engine_aborted_requests_total", 0.0) == aborted_before + 1
                and figures["shardserve_kv_cache_usage_perc"] <= before["shardserve_kv_cache_usage_perc"]
                and figures["shardserve_num_requests_running"] <= before["shardserve_num_requests_running"])

    deadline = time.monotonic() + 30
    while not settled(after := metrics(server_url)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert after.get("shardserve_engine_aborted_requests_total", 0.0) == aborted_before + 1
    assert after['shardserve_requests_total{status="abort"}'] == before.get(
        'shardserve_requests_total{status="abort"}', 0.0) + 1
    assert after["shardserve_kv_cache_usage_perc"] <= before["shardserve_kv_cache_usage_perc"]
    assert after["shardserve_num_requests_running"] <= before["shardserve_num_requests_running"]


# The examples, run as written (in this process, on this session's Ray and server) -------

EXAMPLES = Path(__file__).resolve().parents[2] / "scripts" / "examples"
BENCH = EXAMPLES.parent / "bench_serving.py"


def test_offline_example_embeddings_continue_like_their_token_ids(ray_cluster, capsys):
    main = runpy.run_path(str(EXAMPLES / "offline_prompt_embeds.py"))["main"]
    from_embeds, from_ids = main(["--max-tokens", "8"])
    assert from_embeds.prompt_token_ids is None and from_embeds.num_prompt_tokens == len(from_ids.prompt_token_ids)
    assert from_embeds.outputs[0].token_ids == from_ids.outputs[0].token_ids
    assert "[prompt_embeds]" in capsys.readouterr().out


def test_openai_client_example_against_the_server(client, server_url, capsys):
    main = runpy.run_path(str(EXAMPLES / "openai_client_prompt_embeds.py"))["main"]
    text = main(["--base-url", f"{server_url}/v1", "--max-tokens", "8"])
    out = capsys.readouterr().out
    assert f"{DEFAULT_MODEL_NAME}: " in out and "streamed, same text: True" in out
    assert "as a chat message, same text: True" in out
    assert text and repr(text) in out


def test_served_embeds_check_agrees_with_token_ids_and_catches_wrong_rows(server_url, capsys):
    """scripts/check_served_embeds.py reads the embedding rows from the serving engine's
    shards (both ranks at TP 2), so the two requests match; rows in the wrong order don't."""
    script = runpy.run_path(str(EXAMPLES.parent / "check_served_embeds.py"))
    argv = ["--base-url", f"{server_url}/v1", "--prompt-len", "12", "--max-tokens", "8"]
    result = script["main"](argv)
    assert result["ok"] and result["same_text"] and result["completion_tokens"] == 8, result
    assert result["max_logprob_diff"] <= 1e-3
    right_rows = script["input_embeddings"]
    script["main"].__globals__["input_embeddings"] = lambda ids: right_rows(ids).flip(0)
    assert not script["main"](argv)["ok"]
    assert "ok=False" in capsys.readouterr().out


def test_bench_serving_reports_both_modes_and_the_serving_overhead(server_url, capsys):
    main = runpy.run_path(str(BENCH))["main"]
    report = main(["--base-url", f"{server_url}/v1", "--num-prompts", "4", "--input-len", "16",
                   "--output-len", "4", "--compare-embeds", "--rounds", "2", "--serving-overhead",
                   "--overhead-prompts", "3", "--num-warmups", "2"])
    for mode in ("token ids", "prompt_embeds"):  # two rounds of 4 prompts each; warm-ups not counted
        assert report[mode]["successful requests"] == 8 and report[mode]["failed requests"] == 0
        assert report[mode]["total output tokens"] == 32
        assert 0 < report[mode]["median TTFT (ms)"] <= report[mode]["p99 TTFT (ms)"]
        # The server's intake of each timed request (arrival to running) is part of its TTFT.
        assert 0 < report[mode]["mean server intake (ms)"] < report[mode]["mean TTFT (ms)"]
        assert report[mode]["kernel compiles while serving"] == 0  # on CPU nothing compiles
        # The bench's own CPU over its timed requests: some, and at most its one thread's.
        assert 0 < report[mode]["client CPU (% of a core)"] <= 105
        overhead = report["overhead"][mode]
        assert overhead["samples"] == 3 and overhead["median engine TTFT (ms)"] > 0
        assert overhead["serving overhead (ms)"] == pytest.approx(
            overhead["median HTTP TTFT (ms)"] - overhead["median engine TTFT (ms)"])
    out = capsys.readouterr().out
    assert "Serving Benchmark Result" in out and "serving overhead (ms)" in out and "ratio" in out


def test_bench_serving_reports_the_prefix_cache_hits_of_a_repeated_run(server_url):
    """A run's prompts are new to it (0% hits); the same run again finds each prompt's two
    full blocks cached (32 of 40 tokens), token ids and embeddings alike: the hit rate
    shows when an earlier run on the server skews a comparison."""
    main = runpy.run_path(str(BENCH))["main"]
    argv = ["--base-url", f"{server_url}/v1", "--num-prompts", "4", "--input-len", "40", "--output-len", "2",
            "--compare-embeds", "--rounds", "2", "--num-warmups", "2", "--seed", "4242"]
    first, again = main(argv), main(argv)
    for mode in ("token ids", "prompt_embeds"):
        assert first[mode]["prefix cache hit rate (%)"] == 0.0
        assert again[mode]["prefix cache hit rate (%)"] == pytest.approx(80.0)


def test_bench_serving_sends_several_prompts_a_request(server_url, capsys):
    """--prompts-per-request: each request a list of prompts (token ids or embeddings);
    every prompt's tokens are counted, and a request is timed once."""
    main = runpy.run_path(str(BENCH))["main"]
    report = main(["--base-url", f"{server_url}/v1", "--num-prompts", "6", "--input-len", "8",
                   "--output-len", "3", "--compare-embeds", "--prompts-per-request", "3", "--num-warmups", "3"])
    for mode in ("token ids", "prompt_embeds"):
        assert report[mode]["successful requests"] == 2 and report[mode]["failed requests"] == 0
        assert report[mode]["total output tokens"] == 18
        assert 0 < report[mode]["median TTFT (ms)"] and report[mode]["median TPOT (ms)"] > 0
    assert "prompts_per_request=3" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="must divide"):
        main(["--base-url", f"{server_url}/v1", "--num-prompts", "5", "--prompts-per-request", "3"])


def test_bench_serving_sends_from_several_client_processes(server_url, capsys):
    """--client-processes: the requests of each round split over processes started
    together; every request is counted once, each mode's rounds alternate as before."""
    main = runpy.run_path(str(BENCH))["main"]
    report = main(["--base-url", f"{server_url}/v1", "--num-prompts", "5", "--input-len", "8",
                   "--output-len", "3", "--compare-embeds", "--client-processes", "2", "--max-concurrency", "3",
                   "--rounds", "2", "--num-warmups", "2"])
    for mode in ("token ids", "prompt_embeds"):
        assert report[mode]["successful requests"] == 10 and report[mode]["failed requests"] == 0
        assert report[mode]["total output tokens"] == 30
        assert report[mode]["client CPU (% of a core)"] > 0
    assert "client_processes=2" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--client-processes must be between 1 and"):
        main(["--base-url", f"{server_url}/v1", "--num-prompts", "2", "--client-processes", "3"])


def test_bench_serving_reads_intake_compiles_and_cache_hits_from_the_metrics_text():
    script = runpy.run_path(str(BENCH))
    text = "\n".join([
        "# TYPE shardserve_request_intake_seconds histogram",
        'shardserve_request_intake_seconds_sum{input="prompt"} 0.25',
        'shardserve_request_intake_seconds_count{input="prompt"} 10.0',
        'shardserve_request_intake_seconds_sum{input="prompt_embeds"} 0.5',
        'shardserve_request_intake_seconds_count{input="prompt_embeds"} 4.0',
        "# TYPE shardserve_engine_kernel_compiles_total counter",
        "shardserve_engine_kernel_compiles_total 3.0",
        "# TYPE shardserve_prefix_cache_queries_total counter",
        "shardserve_prefix_cache_queries_total 480.0",
        "# TYPE shardserve_prefix_cache_hits_total counter",
        "shardserve_prefix_cache_hits_total 128.0",
    ])
    samples = script["metric_samples"](text)
    assert script["server_intake"](samples, "token ids") == (0.25, 10.0)
    assert script["server_intake"](samples, "prompt_embeds") == (0.5, 4.0)
    assert script["kernel_compiles"](samples) == 3.0
    assert list(script["prefix_cache_tokens"](samples)) == [480.0, 128.0]
    older = script["metric_samples"]("# an older server\n")
    assert script["kernel_compiles"](older) == 0.0 and list(script["prefix_cache_tokens"](older)) == [0.0, 0.0]


def test_bench_serving_alternates_modes_across_rounds():
    round_order = runpy.run_path(str(BENCH))["round_order"]
    assert round_order(["ids", "embeds"], 3) == ["ids", "embeds", "embeds", "ids", "ids", "embeds"]
    assert round_order(["ids"], 2) == ["ids", "ids"]


def test_bench_serving_on_a_model_shape_sends_random_rows_and_asks_for_each_token():
    """A shape has no weights to read rows from and no tokenizer to stream text with: its
    prompt_embeds are seeded random rows of its hidden size and dtype, and every request
    asks for logprobs so each token's chunk goes out (TTFT is the first token's)."""
    bench = runpy.run_path(str(BENCH))
    shape = model_shape_path("llama-3.2-1b")
    prompts = [[11, 12, 13], [14, 15]]
    rows = bench["embed_rows"](shape, prompts)
    assert [tuple(r.shape) for r in rows] == [(3, 2048), (2, 2048)] and rows[0].dtype == torch.bfloat16
    assert torch.equal(rows[0], bench["embed_rows"](shape, prompts)[0])  # seeded
    assert not torch.equal(rows[0], bench["embed_rows"](shape, [[21, 22, 23]])[0])  # other prompts, other rows
    body = json.loads(bench["completion_body"]("m", rows[0], 4, per_token_chunks=True))
    assert body["logprobs"] == 0 and body["prompt"] == "" and body["prompt_embeds"]
    assert "logprobs" not in json.loads(bench["completion_body"]("m", [1, 2], 4))


def test_bench_serving_refuses_non_loopback_addresses():
    main = runpy.run_path(str(BENCH))["main"]
    with pytest.raises(SystemExit, match="loopback"):
        main(["--base-url", "http://10.1.2.3:8000/v1"])


# A second application with the flag off -----------------------------------------------

def test_flag_off_application_rejects_prompt_embeds_and_guards_its_api_key(server_url):
    from ray import serve

    args = {"tensor_parallel_size": 1, "max_model_len": 256, "kv_cache_memory_bytes": 16 << 20,
            "api_key": "e2e-key"}
    serve.run(build_app(args), name="shardserve-noembeds", route_prefix="/noembeds")
    try:
        wait_healthy(f"{server_url}/noembeds")
        base = f"{server_url}/noembeds/v1"
        keyless = openai.OpenAI(base_url=base, api_key="wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            complete(keyless, prompt=TEXTS[0])
        keyed = openai.OpenAI(base_url=base, api_key="e2e-key", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as info:
            complete(keyed, [random_embeds(13)])
        assert "--enable-prompt-embeds" in info.value.body["message"]
        assert info.value.body["param"] == "prompt_embeds"
        assert complete(keyed, prompt=TEXTS[0]).choices[0].finish_reason == "length"
    finally:
        serve.delete("shardserve-noembeds")
