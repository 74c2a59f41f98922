"""Engine clients attached to a running engine (the API servers of `--api-server-count`),
on the session's Ray at tensor_parallel_size 2: each attached client, in a process of its
own, gets its own requests' outputs, equal to the owner's for the same greedy requests;
detaching, or a client process that dies, aborts its requests and frees their KV blocks;
the owner's shutdown ends an attached client's requests with an error, never a hang."""

from __future__ import annotations

import queue
import time

import numpy as np
import pytest
import ray

from cluster.engine_args import EngineArgs
from cluster.engine_client import EngineAttachment, EngineClient, EngineDeadError
from tests.cluster.test_engine_faults import wait_until
from workers.messages import RequestDelta
from workers.sampling_params import SamplingParams

ENGINE = {"tensor_parallel_size": 2, "max_model_len": 2048, "kv_cache_memory_bytes": 16 << 20,
          "enable_prompt_embeds": True}
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
LONG = SamplingParams(temperature=0.0, max_tokens=2000, ignore_eos=True)  # runs for seconds
PROMPTS = [(5, 17, 99, 3, 42), (7, 8, 9, 10, 11, 12, 13)]
EMBEDS = np.random.default_rng(0).standard_normal((6, 256)).astype(np.float32) * 0.02


def collect(engine: EngineClient, req_id: str, params: SamplingParams, token_ids=None, embeds=None,
            on_first=None, timeout_s: float = 60.0) -> tuple[list[int], RequestDelta]:
    """Runs one request on `engine` to its end: its tokens and final delta."""
    deltas: queue.SimpleQueue = queue.SimpleQueue()
    engine.add_request(req_id, params, deltas.put, token_ids, embeds, "float32" if embeds is not None else None)
    tokens: list[int] = []
    while True:
        delta = deltas.get(timeout=timeout_s)
        if on_first is not None and not tokens and delta.new_token_ids:
            on_first()
        tokens += delta.new_token_ids
        if delta.finish_reason is not None:
            return tokens, delta


@ray.remote(num_cpus=0, max_concurrency=4)  # finish() waits while shutdown() runs
class Frontend:
    """An attached engine client in a process of its own, as an API server replica holds one."""

    def __init__(self, config, attachment: EngineAttachment | None = None):
        self.config = config
        if attachment is not None:
            self.attach(attachment)

    def attach(self, attachment: EngineAttachment) -> None:
        self.engine = EngineClient.attach(self.config, attachment)

    def generate(self, req_id: str, params: SamplingParams, token_ids=None, embeds=None):
        tokens, last = collect(self.engine, req_id, params, token_ids, embeds)
        return tokens, last.finish_reason

    def start(self, req_id: str, params: SamplingParams, token_ids) -> None:
        """Starts a request and returns once its first token came (it keeps running)."""
        self._deltas: queue.SimpleQueue = queue.SimpleQueue()
        self.engine.add_request(req_id, params, self._deltas.put, token_ids)
        while not (delta := self._deltas.get(timeout=60)).new_token_ids:
            assert delta.finish_reason is None, delta

    def finish(self, timeout_s: float) -> tuple[str | None, str | None]:
        """The started request's finish reason and error, once it ends."""
        while (delta := self._deltas.get(timeout=timeout_s)).finish_reason is None:
            pass
        return delta.finish_reason, delta.error

    def shutdown(self) -> None:
        self.engine.shutdown()


@pytest.fixture(scope="module")
def owner(ray_cluster):
    config, _ = EngineArgs(**ENGINE).resolve()
    engine = EngineClient(config, name="attach-test")
    yield engine
    engine.shutdown()


def is_idle(engine: EngineClient) -> bool:
    stats = engine.stats()
    return stats.num_running == 0 and stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks


def test_attached_clients_get_their_own_outputs_equal_to_the_owners(owner):
    frontends = [Frontend.remote(owner.config, owner.open_client(share=2)) for _ in range(2)]
    expected = [collect(owner, f"own-{i}", GREEDY, token_ids=prompt)[0] for i, prompt in enumerate(PROMPTS)]
    expected_embeds = collect(owner, "own-embeds", GREEDY, embeds=EMBEDS)[0]
    # The same request ids in both frontends and the owner: each client's are its own.
    runs = [frontend.generate.remote(f"req-{i}", GREEDY, token_ids=prompt)
            for frontend in frontends for i, prompt in enumerate(PROMPTS)]
    runs += [frontend.generate.remote("req-e", GREEDY, embeds=EMBEDS) for frontend in frontends]
    mine = collect(owner, "req-0", GREEDY, token_ids=PROMPTS[1])[0]
    results = ray.get(runs, timeout=120)
    assert [tokens for tokens, _ in results] == [*expected, *expected, expected_embeds, expected_embeds]
    assert all(reason == "length" for _, reason in results)
    assert mine == expected[1]
    clients = ray.get(owner.leader.clients.remote())
    assert len(clients) == 3 and all(sent >= 3 for sent in clients.values()), clients
    for frontend in frontends:
        ray.get(frontend.shutdown.remote())
    assert len(owner.clients()) == 1


def test_detaching_aborts_the_clients_running_requests(owner):
    frontend = Frontend.remote(owner.config, owner.open_client())
    ray.get(frontend.start.remote("long", LONG, PROMPTS[0]), timeout=60)
    assert owner.stats().num_running == 1
    finished = frontend.finish.remote(30)
    ray.get(frontend.shutdown.remote(), timeout=30)
    reason, error = ray.get(finished, timeout=30)
    assert reason == "error" and "was shut down" in error
    assert wait_until(lambda: is_idle(owner), 10), owner.stats()
    assert len(owner.clients()) == 1


def test_a_client_process_that_dies_is_dropped_and_its_requests_aborted(owner):
    frontend = Frontend.remote(owner.config)
    ray.get(frontend.__ray_ready__.remote())
    attachment = owner.open_client(timeout_s=2.0)
    ray.get(frontend.attach.remote(attachment))
    ray.get(frontend.start.remote("orphan", LONG, PROMPTS[1]), timeout=60)
    ray.kill(frontend)
    died_at = time.monotonic()
    assert wait_until(lambda: is_idle(owner), 20), owner.stats()
    print(f"the dead client's request was aborted {time.monotonic() - died_at:.1f} s after its process died")
    assert len(owner.clients()) == 1
    assert owner.stats().num_aborted >= 1


def test_an_attached_client_of_a_stopped_engine_ends_its_requests_with_an_error(owner):
    """Last in this module: it stops the module's engine."""
    frontend = Frontend.remote(owner.config, owner.open_client())
    ray.get(frontend.start.remote("cut", LONG, PROMPTS[0]), timeout=60)
    finished = frontend.finish.remote(30)
    owner.shutdown()
    reason, error = ray.get(finished, timeout=30)
    assert reason == "error" and error, error
    with pytest.raises(EngineDeadError):
        ray.get(frontend.generate.remote("after", GREEDY, token_ids=PROMPTS[0]), timeout=30)
