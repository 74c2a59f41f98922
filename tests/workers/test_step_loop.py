"""The leader's step loop in one process (world size 1, CPU): async scheduling (the next
decode step planned and launched before this one's samples are read) gives the same
tokens as planning each step after the last, through stop tokens that end requests
mid-batch, length limits, seeded sampling, penalties, logprobs, late arrivals and aborts."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from workers.config import EngineConfig, ModelConfig
from workers.intake import Intake, RequestState
from workers.messages import NewRequest
from workers.model_runner import ModelRunner
from workers.parallel import ProcessGroup
from workers.request import Request
from workers.sampling_params import SamplingParams
from workers.scheduler import Scheduler
from workers.step_loop import LeaderLoop


class Engine:
    """A LeaderLoop on its own thread, fed directly (no Ray)."""

    def __init__(self, path, async_scheduling: bool, max_num_seqs: int = 256):
        model_config = ModelConfig.from_pretrained(path)
        self.config = EngineConfig(model=str(path), model_config=model_config, max_model_len=64,
                                   block_size=4, kv_cache_memory_bytes=1 << 20, max_num_seqs=max_num_seqs,
                                   async_scheduling=async_scheduling, eos_token_ids=(2,))
        self.runner = ModelRunner(self.config, ProcessGroup(), torch.device("cpu"))
        self.intake = Intake()
        self.loop = LeaderLoop(self.config, self.runner, ProcessGroup(), self.intake)
        self.thread = threading.Thread(target=self.loop.run, daemon=True)
        self.thread.start()

    def add(self, req_id: str, prompt: list[int], params: SamplingParams) -> None:
        new = NewRequest(req_id, tuple(prompt), None, params)
        self.intake.put(RequestState(req_id, len(prompt), list(prompt), None))
        self.loop.add_requests([Request.from_new_request(new, self.config.eos_token_ids, self.config.max_model_len)])

    def collect(self, num_requests: int, on_delta=None) -> dict[str, tuple]:
        tokens: dict[str, list[int]] = {}
        logprobs: dict[str, list] = {}
        finished: dict[str, str] = {}
        deadline = time.monotonic() + 120
        while len(finished) < num_requests:
            assert time.monotonic() < deadline, f"only {sorted(finished)} finished"
            assert self.thread.is_alive(), "the step loop died"
            for delta in self.loop.outbox.take(timeout_s=1):
                tokens.setdefault(delta.req_id, []).extend(delta.new_token_ids)
                logprobs.setdefault(delta.req_id, []).extend(delta.new_logprobs or ())
                if delta.finish_reason is not None:
                    finished[delta.req_id] = delta.finish_reason
                if on_delta is not None:
                    on_delta(delta)
        return {r: (tuple(tokens.get(r, ())), finished[r], tuple(logprobs.get(r, ()))) for r in finished}

    def stop(self) -> None:
        self.loop.stop()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


@pytest.fixture(scope="module")
def model_path(tiny_checkpoints):
    return tiny_checkpoints("llama")


def _workload(stop_token: int) -> list[tuple[str, list[int], SamplingParams]]:
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, 301, (n,), generator=gen).tolist() for n in (5, 9, 3, 12, 7, 6)]
    return [
        ("greedy", prompts[0], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)),
        ("stops", prompts[1], SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=(stop_token,))),
        ("seeded", prompts[2], SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=7, max_tokens=25)),
        ("penalties", prompts[3], SamplingParams(temperature=0.0, max_tokens=15, repetition_penalty=1.3,
                                                 frequency_penalty=0.5)),
        ("logprobs", prompts[4], SamplingParams(temperature=0.0, max_tokens=18, logprobs=3, min_tokens=4)),
        ("to-max-len", prompts[5], SamplingParams(temperature=0.0, max_tokens=None, ignore_eos=True)),
    ]


def _count_ahead(engine: Engine, while_waiting: bool = False) -> dict:
    """Counts the steps schedule_ahead plans (only those planned while requests wait,
    with while_waiting) into the returned dict's "ahead"."""
    calls = {"ahead": 0}
    scheduler = engine.loop.scheduler
    schedule_ahead = scheduler.schedule_ahead

    def counting(out):
        result = schedule_ahead(out)
        calls["ahead"] += result is not None and (bool(scheduler.waiting) or not while_waiting)
        return result

    scheduler.schedule_ahead = counting
    return calls


def _collect_all(engine: Engine, num_requests: int, on_delta=None) -> dict:
    """Every request's result, once all have finished and freed their blocks."""
    results = engine.collect(num_requests, on_delta)
    stats = engine.loop.stats()
    assert stats.num_free_blocks == stats.num_total_blocks, "blocks leaked"
    return results


def _run(path, async_scheduling: bool, stop_token: int):
    engine = Engine(path, async_scheduling)
    calls = _count_ahead(engine)
    try:
        workload = _workload(stop_token)
        for req_id, prompt, params in workload[:3]:
            engine.add(req_id, prompt, params)
        late = workload[3:]

        def add_late(delta):  # arrivals while a batch is decoding
            if late and delta.req_id == "greedy" and len(late) == 3:
                for req_id, prompt, params in late:
                    engine.add(req_id, prompt, params)
                late.clear()

        return _collect_all(engine, len(workload), add_late), calls["ahead"]
    finally:
        engine.stop()


def test_async_scheduling_matches_sync(model_path):
    baseline, _ = _run(model_path, False, stop_token=-1)
    # A stop token the "stops" request meets mid-way, while others keep decoding.
    stop_token = baseline["stops"][0][5]
    sync, num_sync_ahead = _run(model_path, False, stop_token)
    overlapped, num_ahead = _run(model_path, True, stop_token)
    assert num_sync_ahead == 0
    assert num_ahead > 10, "async scheduling never ran ahead"
    assert sync["stops"][1] == "stop" and sync["stops"][0][-1] == stop_token
    assert len(sync["stops"][0]) < 30
    assert sync["to-max-len"][1] == "length" and len(sync["to-max-len"][0]) == 64 - 6
    for req_id in sync:
        assert overlapped[req_id][:2] == sync[req_id][:2], req_id
        assert len(overlapped[req_id][2]) == len(sync[req_id][2])
        for a, b in zip(overlapped[req_id][2], sync[req_id][2]):
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert a.token_logprob == pytest.approx(b.token_logprob, abs=1e-5)


def _run_queued(path, async_scheduling: bool, stop_token: int):
    """Five requests through two seats: three wait while the seats decode."""
    engine = Engine(path, async_scheduling, max_num_seqs=2)
    calls = _count_ahead(engine, while_waiting=True)
    try:
        gen = torch.Generator().manual_seed(5)
        for i, max_tokens in enumerate((12, 20, 9, 15, 11)):
            prompt = torch.randint(3, 301, (4 + i,), generator=gen).tolist()
            engine.add(f"q{i}", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                       stop_token_ids=(stop_token,)))
        return _collect_all(engine, 5), calls["ahead"]
    finally:
        engine.stop()


def test_async_scheduling_runs_ahead_while_requests_wait_for_a_seat(model_path):
    """With every seat taken, waiting requests cannot change the next step, so it is
    planned ahead; a seat freed by a stop token is taken one step later, and the tokens
    are those of step-by-step planning."""
    baseline, _ = _run_queued(model_path, False, stop_token=-1)
    stop_token = baseline["q1"][0][4]  # q1 (a seat holder) stops early
    sync, _ = _run_queued(model_path, False, stop_token)
    overlapped, num_ahead_with_queue = _run_queued(model_path, True, stop_token)
    assert sync["q1"][1] == "stop" and len(sync["q1"][0]) < 20
    assert num_ahead_with_queue > 5, "never ran ahead while requests waited"
    assert {r: v[:2] for r, v in overlapped.items()} == {r: v[:2] for r, v in sync.items()}


def test_abort_while_running_ahead(model_path):
    """An abort that lands while a step is launched ahead frees the request's blocks; the
    rest of the batch finishes unchanged."""
    engine = Engine(model_path, async_scheduling=True)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        engine.add("a", [5, 6, 7], params)
        engine.add("b", [8, 9, 10, 11], params)

        def abort_a(delta):
            if delta.req_id == "a" and delta.new_token_ids and delta.finish_reason is None:
                if not getattr(abort_a, "sent", False):
                    abort_a.sent = True
                    engine.loop.abort("a")

        results = engine.collect(2, abort_a)
        assert results["a"][1] == "abort" and len(results["a"][0]) < 40
        assert results["b"][1] == "length" and len(results["b"][0]) == 40
        stats = engine.loop.stats()
        assert stats.num_free_blocks == stats.num_total_blocks
    finally:
        engine.stop()


def test_schedule_ahead_declines_unsteady_batches():
    from workers.block_manager import BlockManager

    def scheduler_with(*params_list, num_blocks=64):
        scheduler = Scheduler(BlockManager(num_blocks, 4), max_num_seqs=8, max_num_batched_tokens=64,
                              max_model_len=32)
        for i, params in enumerate(params_list):
            scheduler.add_request(Request(f"r{i}", [5, 6, 7], 3, params, (2,), 32))
        return scheduler

    plain = SamplingParams(temperature=0.0, max_tokens=10)
    scheduler = scheduler_with(plain, plain)
    prefill = scheduler.schedule()
    assert scheduler.schedule_ahead(prefill) is None  # prefill rows: not a steady batch
    from workers.sampler import SampleResult

    scheduler.update(prefill, {r: SampleResult(9, None) for r in prefill.sampled_req_ids})
    decode = scheduler.schedule()
    ahead = scheduler.schedule_ahead(decode)
    assert [s.num_computed_tokens for s in ahead.scheduled] == [4, 4]  # after decode's row 3
    assert all(s.num_new_tokens == 1 and s.is_sampled for s in ahead.scheduled)
    assert [len(s.new_block_ids) for s in ahead.scheduled] == [1, 1]  # position 4: block 2
    scheduler.add_request(Request("late", [5], 1, plain, (2,), 32))
    assert scheduler.schedule_ahead(ahead) is None  # someone waits for a free seat: plan normally
    scheduler.update(decode, {r: SampleResult(9, None) for r in decode.sampled_req_ids})
    assert scheduler.schedule_ahead(ahead) is None
    scheduler.max_num_seqs = 2  # every seat taken: schedule() would admit nobody either
    assert [s.num_computed_tokens for s in scheduler.schedule_ahead(ahead).scheduled] == [5, 5]
    assert [r.req_id for r in scheduler.waiting] == ["late"]

    for params in (SamplingParams(max_tokens=2), SamplingParams(repetition_penalty=1.2),
                   SamplingParams(min_tokens=3)):
        scheduler = scheduler_with(params)
        prefill = scheduler.schedule()
        scheduler.update(prefill, {r: SampleResult(9, None) for r in prefill.sampled_req_ids})
        assert scheduler.schedule_ahead(scheduler.schedule()) is None, params
    scheduler = scheduler_with(plain, num_blocks=2)  # block 1 holds positions 0-3; none free for 4
    prefill = scheduler.schedule()
    scheduler.update(prefill, {r: SampleResult(9, None) for r in prefill.sampled_req_ids})
    assert scheduler.schedule_ahead(scheduler.schedule()) is None


def test_decodes_go_on_while_an_embeddings_prompts_cache_keys_are_late(model_path, monkeypatch, caplog):
    """The hasher does not answer (restarting): the loop keeps stepping the running request
    meanwhile, then runs the embeddings prompt unshared once DIGESTS_WAIT_S is up, with no
    empty steps while it only waits."""
    from concurrent.futures import Future

    from workers import request as request_module
    from workers.messages import PromptEmbedsRef

    monkeypatch.setattr(request_module, "DIGESTS_WAIT_S", 0.6)
    engine = Engine(model_path, async_scheduling=True)
    try:
        engine.add("ids", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
        rows = torch.randn(9, engine.config.model_config.hidden_size)
        never: Future = Future()
        tokens_while_waiting = []

        def add_embeds(delta):
            if delta.req_id == "ids" and not hasattr(add_embeds, "at"):
                add_embeds.at = time.monotonic()
                new = NewRequest("embeds", None, PromptEmbedsRef(None, "float32", tuple(rows.shape)),
                                 SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
                engine.intake.put(RequestState("embeds", len(rows), None, rows))
                engine.loop.add_requests([Request.from_new_request(
                    new, engine.config.eos_token_ids, engine.config.max_model_len, embeds_block_digests=never)])
            elif delta.req_id == "ids" and time.monotonic() - add_embeds.at < 0.4:
                tokens_while_waiting.extend(delta.new_token_ids)
            if delta.req_id == "embeds" and delta.new_token_ids and not hasattr(add_embeds, "first"):
                add_embeds.first = time.monotonic() - add_embeds.at

        results = engine.collect(2, add_embeds)
        assert results["ids"][1] == "length" and len(results["ids"][0]) == 30
        assert results["embeds"][1] == "length" and len(results["embeds"][0]) == 4
        assert len(tokens_while_waiting) >= 20  # the decodes did not wait for the keys
        assert 0.5 < add_embeds.first < 5.0  # it waited for them until its time was up
        assert "did not come within 0.6 s" in caplog.text
        assert engine.loop._step_id < 30 + 4 + 10  # no empty steps while it only waited
    finally:
        engine.stop()
