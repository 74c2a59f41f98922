"""Intake workers (api.intake) on the session's application, which runs one beside its
replica (tests/e2e/conftest.py). While another request streams, a large prompt_embeds body
goes to the worker, which parses it and decodes and puts its rows: the answers equal the
replica's own path's, every bad payload is the same 400, a hostile pickle runs nowhere,
and a lost worker is replaced while the replica parses the bodies itself."""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading

import httpx
import openai
import pytest
import ray

from api.embeds_codec import encode_prompt_embeds
from api.intake import MIN_BODY_BYTES
from api.settings import DEFAULT_MODEL_NAME
from tests.e2e.test_server import BAD_PAYLOADS, GREEDY, TEXTS, _pwned_path, complete, metrics, random_embeds

ROWS = 80  # (80, 256) float32: a 110 KB body, past MIN_BODY_BYTES
TAKEN = "shardserve_intake_worker_requests_total"
WORKER_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def client(server_url):
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="unused", max_retries=0, timeout=60)


def intake_workers() -> dict[str, object]:
    """name -> handle of the session application's intake workers."""
    pattern = re.compile(r"^shardserve-shardserve-[A-Za-z0-9]+-intake\d+$")
    return {a["name"]: ray.get_actor(a["name"], namespace=a["namespace"])
            for a in ray.util.list_named_actors(all_namespaces=True) if pattern.match(a["name"])}


@contextlib.contextmanager
def busy(server_url: str):
    """The block runs while a long stream runs on the replica (its first chunk came), so
    that large bodies go to the worker; the stream is dropped after it."""
    started, done = threading.Event(), threading.Event()
    body = {"model": DEFAULT_MODEL_NAME, "prompt": TEXTS[0], "max_tokens": 1000, "ignore_eos": True,
            "stream": True}

    def stream():
        with httpx.stream("POST", f"{server_url}/v1/completions", json=body, timeout=60) as response:
            for _ in response.iter_lines():
                started.set()
                if done.is_set():
                    return

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    assert started.wait(WORKER_TIMEOUT_S), "the background stream never started"
    try:
        yield
    finally:
        done.set()
        thread.join(WORKER_TIMEOUT_S)


def taken(server_url: str) -> float:
    return metrics(server_url).get(TAKEN, 0.0)


def wait_for_a_worker(client, server_url: str) -> None:
    """Until the replica's pool has a worker up: its process started (the actor answers),
    then requests beside a stream until one is taken (the pool learns of the start a
    moment later), each a real request, within a bound."""
    for handle in intake_workers().values():
        ray.get(handle.__ray_ready__.remote(), timeout=WORKER_TIMEOUT_S)
    before = taken(server_url)
    with busy(server_url):
        for _ in range(50):
            complete(client, [random_embeds(30, ROWS)], max_tokens=1)
            if taken(server_url) > before:
                return
    pytest.fail("no intake worker took a body")


@pytest.fixture(scope="module")
def worker_up(client, server_url):
    assert len(intake_workers()) == 1
    wait_for_a_worker(client, server_url)


def answers(response) -> list[tuple[int, str, str]]:
    return [(c.index, c.text, c.finish_reason) for c in response.choices]


def test_large_bodies_beside_a_stream_go_to_the_worker_and_answer_as_the_replica_does(client, server_url,
                                                                                     worker_up):
    rows = [random_embeds(seed, ROWS) for seed in (1, 2)]
    assert len(json.dumps({"prompt_embeds": encode_prompt_embeds(rows[0])})) > MIN_BODY_BYTES
    requests = [
        dict(embeds=[rows[0]]),
        dict(embeds=rows, prompt=TEXTS[1]),  # a list, then a text prompt: the embeddings' choices first
        dict(embeds=rows, n=2, seed=7, temperature=1.0),  # samples of one put, seeded
        dict(embeds=[rows[1]], extra_body={"truncate_prompt_tokens": 20}),  # the worker cuts the rows
    ]
    alone = [complete(client, **r) for r in requests]  # nothing else in flight: the replica decodes
    before = taken(server_url)
    with busy(server_url):
        beside = [complete(client, **r) for r in requests]
    assert taken(server_url) - before == len(requests)
    for one, other in zip(alone, beside):
        assert answers(one) == answers(other)
        assert one.usage.prompt_tokens == other.usage.prompt_tokens
    assert [c.index for c in beside[1].choices] == [0, 1, 2]
    assert beside[1].usage.prompt_tokens > 2 * ROWS
    assert beside[3].usage.prompt_tokens == 20


@pytest.mark.parametrize("name", list(BAD_PAYLOADS))
def test_a_bad_payload_the_worker_decodes_is_the_replicas_400(client, server_url, worker_up, name):
    """Beside a good large payload (so the body goes to the worker), the bad one is the
    same 400 that the replica's own decode gives, and the server keeps answering."""
    make, expected = BAD_PAYLOADS[name]
    extra_body = {"prompt_embeds": [encode_prompt_embeds(random_embeds(3, ROWS)), make()]}
    before = taken(server_url)
    with busy(server_url):
        with pytest.raises(openai.BadRequestError) as info:
            complete(client, prompt="", extra_body=extra_body)
        assert taken(server_url) == before + 1
        after = complete(client, [random_embeds(12, ROWS)], max_tokens=2)
    error = info.value.body
    assert info.value.status_code == 400 and error["param"] == "prompt_embeds"
    assert expected in error["message"] and error["type"] == "invalid_request_error"
    assert not os.path.exists(_pwned_path())
    assert after.choices[0].finish_reason == "length" and after.usage.completion_tokens == 2


def test_a_large_body_that_is_no_request_is_the_replicas_400(client, server_url, worker_up):
    padding = "x" * MIN_BODY_BYTES
    cases = {
        b'{"prompt": "' + padding.encode(): "request body is not valid JSON",
        json.dumps({"model": DEFAULT_MODEL_NAME, "prompt": padding, "best_of": 3}).encode(): "best_of",
        json.dumps({"model": DEFAULT_MODEL_NAME, "prompt": padding, "colour": 1}).encode(): "colour",
    }
    with busy(server_url):
        for content, expected in cases.items():
            response = httpx.post(f"{server_url}/v1/completions", content=content, timeout=60,
                                  headers={"content-type": "application/json"})
            assert response.status_code == 400, content[:40]
            assert expected in response.json()["error"]["message"]


def test_a_lost_worker_is_replaced_and_the_replica_answers_meanwhile(client, server_url, worker_up):
    (name, handle), = intake_workers().items()
    rows = random_embeds(40, ROWS)
    expected = answers(complete(client, [rows]))
    ray.kill(handle, no_restart=True)
    before = taken(server_url)
    with busy(server_url):
        assert answers(complete(client, [rows])) == expected  # the call fails: parsed here
    assert taken(server_url) == before
    assert [n for n in intake_workers() if n != name], "no worker was started in the lost one's place"
    wait_for_a_worker(client, server_url)
    with busy(server_url):
        assert answers(complete(client, [rows])) == expected
