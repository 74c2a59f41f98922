"""Engine faults on the session's Ray at tensor_parallel_size 2: a shard killed mid-generation
(leader or follower) and a shard that hangs (frozen with SIGSTOP, caught by the step
watchdog) end every in-flight request with an error within seconds, never a hang, and
leave no shard process behind."""

from __future__ import annotations

import os
import queue
import signal
import threading
import time

import numpy as np
import pytest
import ray
import torch

import cluster.engine_client as engine_client
from cluster import LLM, SamplingParams
from cluster.engine_args import EngineArgs
from cluster.engine_client import (
    EngineClient,
    EngineDeadError,
    RequestFailedError,
    request_error,
    shard_actor_name,
)
from workers.sampling_params import SamplingParams as Params

LONG = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
ENGINE = {"tensor_parallel_size": 2, "max_model_len": 512, "kv_cache_memory_bytes": 16 << 20}
DEADLINE_S = 10.0  # the bound on how long an in-flight request may take to fail


def wait_until(predicate, timeout_s: float, interval_s: float = 0.05) -> bool:
    """Bounded polling, for state that lives in another process."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)
    return True


def is_process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def generate_in_thread(llm: LLM, prompts) -> tuple[threading.Thread, queue.SimpleQueue]:
    """llm.generate on a thread; its result or exception lands in the queue."""
    results: queue.SimpleQueue = queue.SimpleQueue()

    def run():
        try:
            results.put(llm.generate(prompts, LONG, use_tqdm=False))
        except BaseException as exc:  # handed to the test thread to assert on
            results.put(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, results


@pytest.mark.parametrize("rank", [0, 1], ids=["leader", "follower"])
def test_killed_shard_fails_every_in_flight_request_within_10s(ray_cluster, rank):
    with LLM(**ENGINE) as llm:
        pids = [ray.get(shard.pid.remote()) for shard in llm.engine.shards]
        _, results = generate_in_thread(llm, ["The quick brown fox", "1 2 3", {"prompt_token_ids": [7, 8, 9]}])
        assert wait_until(lambda: llm.engine.stats().num_running == 3, 30)
        killed_at = time.monotonic()
        ray.kill(llm.engine.shards[rank])
        outcome = results.get(timeout=DEADLINE_S)
        failed_after = time.monotonic() - killed_at
        assert isinstance(outcome, EngineDeadError), outcome
        assert "engine shard failed" in str(outcome) and failed_after < DEADLINE_S
        print(f"killed rank {rank}: generate raised after {failed_after:.2f} s")
        # The survivor was waiting in a collective on the lost peer: killed too.
        assert wait_until(lambda: all(is_process_gone(pid) for pid in pids), 15)
        with pytest.raises(EngineDeadError, match="engine shard failed"):
            llm.generate(["again"], LONG, use_tqdm=False)


def test_hung_follower_is_caught_by_the_step_watchdog(ray_cluster):
    config, _ = EngineArgs(**ENGINE).resolve()
    engine = EngineClient(config, name="watchdog-test", step_timeout_s=2.0)
    follower_pid = ray.get(engine.shards[1].pid.remote())
    try:
        assert ray.get_actor(shard_actor_name("watchdog-test", 1)) is not None  # named for operators
        deltas: queue.SimpleQueue = queue.SimpleQueue()
        engine.add_request("r0", Params(temperature=0.0, max_tokens=400, ignore_eos=True), deltas.put,
                           prompt_token_ids=(5, 6, 7))
        assert deltas.get(timeout=30).new_token_ids  # decoding
        os.kill(follower_pid, signal.SIGSTOP)  # alive but silent: the leader waits in a collective
        frozen_at = time.monotonic()
        while (delta := deltas.get(timeout=DEADLINE_S)).finish_reason is None:
            pass
        assert delta.finish_reason == "error" and "no progress for 2 s" in delta.error
        assert time.monotonic() - frozen_at < DEADLINE_S
        print(f"frozen follower: request failed after {time.monotonic() - frozen_at:.2f} s")
        with pytest.raises(EngineDeadError, match="no progress"):
            engine.add_request("r1", Params(), deltas.put, prompt_token_ids=(5,))
    finally:
        if not is_process_gone(follower_pid):
            os.kill(follower_pid, signal.SIGCONT)  # lets ray.kill's exit request through
        engine.shutdown()
    assert wait_until(lambda: is_process_gone(follower_pid), 15)


def test_a_request_a_shard_cannot_take_fails_and_the_engine_keeps_serving(ray_cluster):
    """A request whose add_request raises on the leader shard (here a seed past 64 bits,
    let through by skipping the validation that now refuses it at the edge) ends with an
    error at once (the leader's own error delta, not a poll later) instead of waiting forever; other requests still run, and
    the follower, which took its copy, drops it with the next plan."""
    with LLM(**ENGINE) as llm:
        bad = Params(max_tokens=2)
        object.__setattr__(bad, "seed", 2**64)  # what validation would refuse
        deltas: queue.SimpleQueue = queue.SimpleQueue()
        sent_at = time.monotonic()
        llm.engine.add_request("bad", bad, deltas.put, prompt_token_ids=(5, 6, 7))
        delta = deltas.get(timeout=DEADLINE_S)
        print(f"leader could not take a request: it failed after {time.monotonic() - sent_at:.2f} s")
        assert (delta.req_id, delta.finish_reason) == ("bad", "error")
        assert "could not take request bad" in delta.error and llm.engine.num_unfinished == 0
        # What LLM.generate and the server raise for it: this request failed, the engine lives.
        assert isinstance(request_error(llm.engine, delta.error), RequestFailedError)
        [out] = llm.generate(["still serving"], SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
        assert len(out.outputs[0].token_ids) == 3
        follower = llm.engine.shards[1]
        assert ray.get(follower.__ray_call__.remote(lambda shard: len(shard.intake))) == 0


def _fail_embeddings_once_scheduled(shard) -> None:
    """On a follower (run through __ray_call__): its next fetch of a request's embeddings
    fails, but only once its step loop waits for that request, i.e. after the leader
    scheduled it; the fetch after that works again."""

    def failing(embeds, array):
        del shard._fetch_embeds
        assert wait_until(lambda: shard.intake.awaited is not None, DEADLINE_S), "the leader never scheduled it"
        raise OSError("reading the embeddings failed (injected)")

    shard._fetch_embeds = failing


def test_an_embeddings_request_a_follower_cannot_take_fails_and_the_engine_keeps_serving(ray_cluster):
    """A follower that cannot read a request's embeddings after the leader has already
    scheduled it (the step on every rank needs the request's rows): the follower runs
    the steps on a stand-in until the abort, the request ends with an error and none of
    the stand-in's tokens, the engine keeps serving, and no shard keeps anything of the
    request."""
    with LLM(**ENGINE, enable_prompt_embeds=True) as llm:
        follower = llm.engine.shards[1]
        ray.get(follower.__ray_call__.remote(_fail_embeddings_once_scheduled))
        hidden = llm.config.model_config.hidden_size
        rows = np.random.default_rng(0).standard_normal((40, hidden), dtype=np.float32)  # 2 full blocks
        deltas: queue.SimpleQueue = queue.SimpleQueue()
        sent_at = time.monotonic()
        llm.engine.add_request("bad", Params(max_tokens=300, ignore_eos=True), deltas.put,
                               prompt_embeds=rows, embeds_dtype="float32")
        received = []
        while (delta := deltas.get(timeout=DEADLINE_S)).finish_reason is None:
            received.append(delta)
        print(f"follower could not take a scheduled request: it failed after {time.monotonic() - sent_at:.2f} s")
        assert (delta.req_id, delta.finish_reason) == ("bad", "error")
        # The steps ran on the follower's stand-in: none of their tokens reached the sink.
        assert not received and not delta.new_token_ids, received[:3]
        assert "could not take request bad: OSError" in delta.error
        assert isinstance(request_error(llm.engine, delta.error), RequestFailedError)
        greedy = SamplingParams(temperature=0.0, max_tokens=3)
        before = llm.engine.stats()
        outputs = llm.generate([{"prompt_embeds": torch.from_numpy(rows)}, "still serving"], greedy, use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outputs] == [3, 3]
        # The follower's blocks of the failed request held its stand-in's K/V: the same rows
        # again found nothing cached, computed their own, and those are shared from then on.
        after = llm.engine.stats()
        assert after.prefix_cache_hits == before.prefix_cache_hits
        [again] = llm.generate([{"prompt_embeds": torch.from_numpy(rows)}], greedy, use_tqdm=False)
        assert llm.engine.stats().prefix_cache_hits == after.prefix_cache_hits + 32
        assert again.outputs[0].token_ids == outputs[0].outputs[0].token_ids
        # (Requests that finished in the last step are dropped with the next plan.)
        # The shards know it by the engine's id for it: "bad#<serial>".
        held = ray.get(follower.__ray_call__.remote(
            lambda shard: (len(shard.intake), any(r.startswith("bad#") for r in shard.runner.requests))))
        assert held == (0, False)
        assert llm.engine.num_unfinished == 0


def test_a_finished_requests_id_may_come_again_at_once(ray_cluster):
    """A caller of the engine (AsyncEngine.start, EngineClient.add_request) may reuse the
    id of a request that has just finished, while the leader still holds that request (it
    drops finished ones at its next step): the leader once refused the id from its step
    loop, and the engine died. Each use now runs, and the engine keeps serving."""
    with LLM(**ENGINE) as llm:
        outputs = []
        for _ in range(3):
            deltas: queue.SimpleQueue = queue.SimpleQueue()
            llm.engine.add_request("same", Params(temperature=0.0, max_tokens=4, ignore_eos=True), deltas.put,
                                   prompt_token_ids=(5, 6, 7))
            tokens = []
            while (delta := deltas.get(timeout=DEADLINE_S)).finish_reason is None:
                tokens += delta.new_token_ids
            tokens += delta.new_token_ids
            outputs.append((delta.req_id, delta.finish_reason, tokens))
        assert [o[:2] for o in outputs] == [("same", "length")] * 3
        assert len(outputs[0][2]) == 4 and outputs[0][2] == outputs[1][2] == outputs[2][2]
        assert llm.engine.dead_reason is None
        assert llm.generate("still serving", SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)[0].outputs[0].token_ids


def test_embeddings_prompts_run_and_share_again_when_the_hasher_dies(ray_cluster, monkeypatch):
    """The engine's hasher (the prefix cache's keys of large puts' embeddings prompts, in an
    actor of its own; here of every put) killed: the prompts sent meanwhile run and give the
    same tokens (their blocks unshared at worst), Ray restarts it and prompts share blocks
    again; shutdown ends it."""
    monkeypatch.setattr(engine_client, "INLINE_DIGESTS_MAX_BYTES", 0)
    greedy = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    with LLM(**ENGINE, enable_prompt_embeds=True) as llm:
        name = f"shardserve-{llm.engine.name}-hasher"
        hidden = llm.config.model_config.hidden_size
        rng = np.random.default_rng(5)
        first, second = (torch.from_numpy(rng.standard_normal((40, hidden), dtype=np.float32)) for _ in range(2))
        [expected] = llm.generate([{"prompt_embeds": first}], greedy, use_tqdm=False)
        ray.kill(ray.get_actor(name), no_restart=False)
        [again] = llm.generate([{"prompt_embeds": first}], greedy, use_tqdm=False)
        assert again.outputs[0].token_ids == expected.outputs[0].token_ids
        ray.get(ray.get_actor(name).__ray_ready__.remote(), timeout=60)  # restarted
        before = llm.engine.stats()
        llm.generate([{"prompt_embeds": second}], greedy, use_tqdm=False)
        [shared] = llm.generate([{"prompt_embeds": second}], greedy, use_tqdm=False)
        assert shared.num_cached_tokens == 2 * llm.config.block_size  # keyed by the restarted hasher
        assert llm.engine.stats().prefix_cache_hits - before.prefix_cache_hits == 2 * llm.config.block_size
        assert llm.engine.dead_reason is None
    with pytest.raises(ValueError):
        ray.get_actor(name)
