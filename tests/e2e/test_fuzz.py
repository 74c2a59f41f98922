"""Hostile input against the session's server over HTTP: over 1,000 malformed requests
(random bytes, truncated zips, forbidden pickle globals, sparse tensors with bad indices,
huge declared shapes, wrong shapes and dtypes, NaN/Inf, invalid JSON, every field with a
wrong type, oversized bodies). Each is a 4xx in OpenAI's error shape with no internals;
afterwards fixed greedy requests answer exactly as before and no shard process died."""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import warnings

import httpx
import pytest
import ray
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from api.embeds_codec import encode_prompt_embeds
from api.settings import DEFAULT_MODEL_NAME
from tests.api.test_embeds_codec import b64, call_pickle, saved, tensor_pickle, with_pickle
from tests.cluster.test_engine_faults import is_process_gone

H = 256  # the default model's hidden size
FORBIDDEN = [("os", "system"), ("builtins", "eval"), ("builtins", "exec"), ("subprocess", "Popen"),
             ("posix", "system"), ("torch._utils", "_rebuild_sparse_tensor"), ("torch", "load"),
             ("builtins", "getattr"), ("pickle", "loads"), ("shutil", "rmtree")]
INTERNALS = re.compile(r"Traceback|File \"|\.py\b|/work/|/root/|site-packages|0x[0-9a-f]{6,}")
OVERSIZE = 100 << 20  # the server's default request-body limit (api.routes)
GOOD = [{"prompt": "The quick brown fox"}, {"prompt": [5, 17, 300, 9]}, {"prompt": "1 2 3 4"}]
GOOD_EMBEDS_SEEDS = (1, 2)


def body(**fields) -> dict:
    return {"model": DEFAULT_MODEL_NAME, "max_tokens": 4, **fields}  # fields override


def embeds_body(payload: str) -> dict:
    return body(prompt="", prompt_embeds=payload)


def _sparse_payloads(rng: random.Random) -> list[str]:
    """COO and CSR tensors with negative and out-of-range indices (CVE-2025-62164)."""
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sparse CSR is beta and warns on creation
        for _ in range(30):
            bad = torch.tensor([[0, -rng.randint(1, 10**6)], [rng.randint(H, 10**9), 0]])
            out.append(b64(saved(torch.sparse_coo_tensor(bad, torch.ones(2), (2, H), check_invariants=False))))
            cols = torch.tensor([rng.randint(H, 10**6), -1])
            csr = torch.sparse_csr_tensor(torch.tensor([0, 1, 2]), cols, torch.ones(2), (2, H),
                                          check_invariants=False)
            out.append(b64(saved(csr)))
    return out


def _huge_shapes(rng: random.Random) -> list[str]:
    """Declared shapes far past the size limit, with or without storage to match."""
    out = []
    for _ in range(30):
        rows = rng.choice([10**5, 10**6, 8 * 10**6])
        out.append(with_pickle(tensor_pickle(numel=rows * H, size=(rows, H), stride=(H, 1))))
        out.append(with_pickle(tensor_pickle(numel=6, size=(rows, H), stride=(H, 1))))
    return out


def bad_embeds(rng: random.Random) -> list[str]:
    """prompt_embeds payloads, each malformed or hostile in a different way."""
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    good = saved(torch.randn(4, H, generator=g))
    out = [b64(rng.randbytes(rng.randint(0, 4000))) for _ in range(200)]
    out += [b64(good[:rng.randint(0, len(good) - 1)]) for _ in range(150)]
    out += [with_pickle(call_pickle(m, n, f"touch /tmp/fuzz-pwned-{i}")) for i in range(6) for m, n in FORBIDDEN]
    out += _sparse_payloads(rng) + _huge_shapes(rng)
    out += [encode_prompt_embeds(torch.randn(rng.randint(1, 8), rng.choice([1, 128, 255, 257, 512]),
                                             generator=g)) for _ in range(60)]
    out += [encode_prompt_embeds(t) for t in
            [torch.zeros(0, H), torch.randn(H), torch.randn(2, 3, H), torch.randn(1, 1, 1, H)] * 15]
    dtypes = [torch.int32, torch.int64, torch.int8, torch.uint8, torch.bool, torch.complex64]
    out += [encode_prompt_embeds(torch.ones(3, H, dtype=d)) for d in dtypes * 10]
    for i in range(60):
        t = torch.randn(3, H, generator=g)
        t[rng.randrange(3), rng.randrange(H)] = [float("nan"), float("inf"), -float("inf")][i % 3]
        out.append(encode_prompt_embeds(t))
    return out


WRONG_TYPES = {
    "model": [123, ["m"], {"a": 1}], "user": [5, [1], {"u": 1}],
    "prompt": [3.5, {"a": 1}, [1.5], [["a"]], True, [[1, "x"]]],
    "prompt_embeds": [5, [5], {"a": 1}, [None]],
    "max_tokens": ["abc", 1.5, [1], {"a": 1}, -1, 0, 10**9],
    "temperature": ["hot", [1.0], {"t": 1}, -1.0], "top_p": ["x", [0.5], 2.0, -0.1],
    "n": ["two", 1.5, 0, -3, [2]], "stream": ["maybe", 2, [True], {"a": 1}],
    "stream_options": ["yes", 5, {"include_usage": "maybe"}, {"bogus": 1}],
    "logprobs": ["x", 1.5, -1, 10**6], "stop": [5, [1, 2], {"s": 1}], "seed": ["x", 1.5, [1]],
    "echo": ["maybe", 5, [1]], "presence_penalty": ["x", [1], 5.0], "frequency_penalty": ["x", {}, -5.0],
    "top_k": ["x", 1.5, [1], -5], "min_tokens": ["x", 1.5, -1], "ignore_eos": ["maybe", 7, [1]],
    "stop_token_ids": ["x", [1.5], ["a"], 5], "repetition_penalty": ["x", [1], 0.0, -1.0],
    "include_stop_str_in_output": ["maybe", 3], "skip_special_tokens": ["maybe", 3],
    "best_of": [3, "x"], "suffix": ["tail", 5], "logit_bias": [{"5": 1000}, "x", {"x": 1}, {"-1": 5}, {"99999999": 1}], "bogus_field": [1, "x"],
}


def wrong_type_bodies() -> list[tuple[str, bytes]]:
    """(field, body) with every field given a wrong type or an out-of-range value."""
    return [(field, json.dumps(body(**{"prompt": "hi", field: value})).encode())
            for field, values in WRONG_TYPES.items() for value in values]


def bad_bodies(rng: random.Random) -> list[bytes]:
    """Whole request bodies: invalid JSON, non-objects, strings that are not text."""
    valid = json.dumps(body(prompt="hello")).encode()
    out = [valid[:rng.randint(0, len(valid) - 1)] for _ in range(60)]
    out += [rng.randbytes(rng.randint(1, 300)) for _ in range(60)]
    out += [json.dumps(v).encode() for v in ([], [1, 2], "text", 5, None, True, 1.5)] * 4
    out += [b'{"prompt": "hi", "max_tokens": NaN}', b'{"prompt": "\\ud800"}', b'{"stop": ["\\udfff"]}',
            b'{"prompt": "a", "\\ud800": 1}', b"\xff\xfe{}", b"", b"[" * 100_000, b'{"a":' * 50_000]
    return out


def check_rejection(response: httpx.Response) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == response.status_code
    assert error["message"] and not INTERNALS.search(response.text), response.text[:300]


async def send_all(url: str, contents: list[bytes], concurrency: int = 8) -> list[httpx.Response]:
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=60) as http:
        async def send(content: bytes) -> httpx.Response:
            async with limit:
                return await http.post(f"{url}/v1/completions", content=content,
                                       headers={"content-type": "application/json"})
        return await asyncio.gather(*(send(c) for c in contents))


def shard_pids(url: str) -> dict[str, int]:
    """Shards of the session's application (named shardserve-shardserve-<replica>-rank<r>)."""
    pattern = re.compile(r"^shardserve-shardserve-[A-Za-z0-9]+-rank\d+$")
    named = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"]: ray.get(ray.get_actor(a["name"], namespace=a["namespace"]).pid.remote())
            for a in named if pattern.match(a["name"])}


def greedy_answers(url: str) -> list[str]:
    greedy = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    requests = [body(**g, **greedy) for g in GOOD]
    for seed in GOOD_EMBEDS_SEEDS:
        rows = torch.randn(5, H, generator=torch.Generator().manual_seed(seed))
        requests.append({**embeds_body(encode_prompt_embeds(rows)), **greedy})
    answers = [httpx.post(f"{url}/v1/completions", json=r, timeout=60) for r in requests]
    assert all(a.status_code == 200 for a in answers)
    return [a.json()["choices"][0]["text"] for a in answers]


@pytest.fixture(scope="module")
def before(server_url):
    return greedy_answers(server_url), shard_pids(server_url)


def test_a_thousand_malformed_requests_are_clean_4xx(server_url, before):
    rng = random.Random(5)
    embeds = [json.dumps(embeds_body(p)).encode() for p in bad_embeds(rng)]
    fields, typed = zip(*wrong_type_bodies())
    contents = embeds + list(typed) + bad_bodies(rng)
    assert len(contents) >= 1000
    responses = asyncio.run(send_all(server_url, contents))
    failed = [(c[:120], r.status_code) for c, r in zip(contents, responses) if not 400 <= r.status_code < 500]
    assert not failed, failed[:10]
    for response in responses:
        check_rejection(response)
    params = [r.json()["error"]["param"] or "" for r in responses]
    assert all(p == "prompt_embeds" for p in params[:len(embeds)])
    named = [p.split(".")[0] for p in params[len(embeds):len(embeds) + len(typed)]]
    assert [(f, p) for f, p in zip(fields, named) if f != p] == []  # each names its field
    assert not any(os.path.exists(f"/tmp/fuzz-pwned-{i}") for i in range(6))


def test_oversized_bodies_are_413(server_url, before):
    huge_field = json.dumps(body(prompt="x" * (OVERSIZE + 1))).encode()
    huge_embeds = json.dumps(embeds_body("A" * (OVERSIZE - 100))).encode()  # under the body limit
    for content, status in ((huge_field, 413), (huge_embeds, 400)):
        response = httpx.post(f"{server_url}/v1/completions", content=content, timeout=120,
                              headers={"content-type": "application/json"})
        check_rejection(response)
        assert response.status_code == status


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=2000))
def test_hypothesis_random_bytes_as_prompt_embeds_are_400(server_url, raw):
    response = httpx.post(f"{server_url}/v1/completions", json=embeds_body(b64(raw)), timeout=60)
    check_rejection(response)
    assert response.json()["error"]["param"] == "prompt_embeds"


def test_after_fuzz_answers_are_unchanged_and_no_process_died(server_url, before):
    answers, pids = before
    assert greedy_answers(server_url) == answers
    assert shard_pids(server_url) == pids and len(pids) == 2
    assert not any(is_process_gone(pid) for pid in pids.values())
    assert httpx.get(f"{server_url}/health", timeout=10).status_code == 200
