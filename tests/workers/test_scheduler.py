"""Scheduler: continuous batching, chunked prefill, preemption, aborts, stop conditions,
and a randomized workload that mirrors block tables the way a follower shard would."""

import random
import time

import pytest

from workers.block_manager import BlockManager
from workers.messages import NewRequest, PromptEmbedsRef, ScheduledRequest, TokenLogprobs
from workers.request import Request, RequestStatus
from workers.sampler import SampleResult
from workers.sampling_params import SamplingParams
from workers.scheduler import Scheduler

EOS = 2


def make_request(req_id, prompt_len, *, max_model_len=1024, eos=(EOS,), **params):
    params.setdefault("max_tokens", 16)
    prompt_token_ids = [100 + i for i in range(prompt_len)]
    params = SamplingParams(**params)
    return Request(req_id, prompt_token_ids, prompt_len, params, eos, max_model_len)


def make_scheduler(*, num_blocks=65, block_size=4, max_num_seqs=8, max_num_batched_tokens=64):
    return Scheduler(
        BlockManager(num_blocks, block_size),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=1024,
    )


def step(scheduler, token_id=7):
    """One engine step with every sampled request drawing `token_id`."""
    out = scheduler.schedule()
    samples = {req_id: SampleResult(token_id, None) for req_id in out.sampled_req_ids}
    return out, scheduler.update(out, samples)


def run_to_end(scheduler, token_id=7, max_steps=100):
    deltas = []
    for _ in range(max_steps):
        if not scheduler.has_unfinished_requests():
            return deltas
        deltas += step(scheduler, token_id)[1]
    raise AssertionError("requests did not finish")


def test_single_request_prefill_decode_finish():
    scheduler = make_scheduler(num_blocks=9, block_size=4)
    scheduler.add_request(make_request("a", 6, max_tokens=4))
    expected = [
        ScheduledRequest("a", 0, 6, (1, 2), True),
        ScheduledRequest("a", 6, 1, (), True),
        ScheduledRequest("a", 7, 1, (), True),
        ScheduledRequest("a", 8, 1, (3,), True),  # the 9th token needs a third block
    ]
    for i, want in enumerate(expected):
        out, deltas = step(scheduler, token_id=10 + i)
        assert out.scheduled == (want,)
        assert out.num_scheduled_tokens == want.num_new_tokens
        assert [d.new_token_ids for d in deltas] == [(10 + i,)]
    assert deltas[0].finish_reason == "length" and deltas[0].stop_reason is None
    assert scheduler.block_manager.num_free_blocks == 8
    assert not scheduler.has_unfinished_requests()
    last = scheduler.schedule()
    assert last.scheduled == () and last.finished_req_ids == ("a",)
    with pytest.raises(KeyError):
        scheduler.get("a")  # dropped once followers were told to drop it
    assert scheduler.schedule().finished_req_ids == ()


def test_chunked_prefill_across_steps():
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=4)
    scheduler.add_request(make_request("a", 10))
    outs = [step(scheduler) for _ in range(4)]
    assert [o.scheduled for o, _ in outs] == [
        (ScheduledRequest("a", 0, 4, (1,), False),),
        (ScheduledRequest("a", 4, 4, (2,), False),),
        (ScheduledRequest("a", 8, 2, (3,), True),),
        (ScheduledRequest("a", 10, 1, (), True),),
    ]
    assert [len(deltas) for _, deltas in outs] == [0, 0, 1, 1]
    assert scheduler.get("a").num_computed_tokens == 11


def test_token_budget_is_shared_by_decodes_and_prefill_chunks():
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=4)
    scheduler.add_request(make_request("a", 3))
    step(scheduler)
    scheduler.add_request(make_request("b", 10))
    out, deltas = step(scheduler)
    assert out.scheduled == (
        ScheduledRequest("a", 3, 1, (), True),
        ScheduledRequest("b", 0, 3, (2,), False),
    )
    assert [d.req_id for d in deltas] == ["a"]


def test_max_num_seqs_limits_running_requests():
    scheduler = make_scheduler(max_num_seqs=2)
    for req_id, max_tokens in (("a", 1), ("b", 3), ("c", 1)):
        scheduler.add_request(make_request(req_id, 4, max_tokens=max_tokens))
    out, _ = step(scheduler)
    assert [s.req_id for s in out.scheduled] == ["a", "b"]
    assert (scheduler.num_running, scheduler.num_waiting) == (1, 1)  # "a" finished
    out, _ = step(scheduler)
    assert [(s.req_id, s.num_new_tokens) for s in out.scheduled] == [("b", 1), ("c", 4)]


def test_fcfs_admission_with_chunking_and_head_of_line_blocking():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    for req_id in ("a", "b", "c"):
        scheduler.add_request(make_request(req_id, 6))
    out, _ = step(scheduler)
    assert [(s.req_id, s.num_new_tokens) for s in out.scheduled] == [("a", 6), ("b", 2)]

    # 5 usable blocks of 4: "a" takes 4, leaving 1; "b" needs 3 and holds "c" (needs 1) back.
    scheduler = make_scheduler(num_blocks=6, block_size=4)
    scheduler.add_request(make_request("a", 12))
    step(scheduler)
    scheduler.add_request(make_request("b", 12))
    scheduler.add_request(make_request("c", 4))
    out, _ = step(scheduler)
    assert [s.req_id for s in out.scheduled] == ["a"]
    assert scheduler.num_waiting == 2


def test_preemption_evicts_latest_arrival_and_recomputes_outputs():
    scheduler = make_scheduler(num_blocks=5, block_size=2)  # 4 usable blocks of 2 tokens
    scheduler.add_request(make_request("a", 3, max_tokens=3))
    scheduler.add_request(make_request("b", 3, max_tokens=3))
    step(scheduler, token_id=20)
    step(scheduler, token_id=21)
    assert scheduler.block_manager.num_free_blocks == 0
    out, deltas = step(scheduler, token_id=22)  # "a" needs a 3rd block: "b" is evicted
    assert out.preempted_req_ids == ("b",)
    assert [s.req_id for s in out.scheduled] == ["a"]
    assert deltas[0].finish_reason == "length"
    b = scheduler.get("b")
    assert (b.status, b.num_computed_tokens, b.block_ids) == (RequestStatus.WAITING, 0, [])
    assert b.output_token_ids == [20, 21]
    out, deltas = step(scheduler, token_id=23)
    (recompute,) = out.scheduled
    assert (recompute.req_id, recompute.num_computed_tokens) == ("b", 0)
    assert recompute.num_new_tokens == 5  # prompt 3 + outputs 2
    assert len(recompute.new_block_ids) == 3 and recompute.is_sampled
    assert deltas[0].new_token_ids == (23,) and deltas[0].finish_reason == "length"
    assert scheduler.get("b").output_token_ids == [20, 21, 23]
    assert scheduler.block_manager.num_free_blocks == 4


def test_request_that_needs_a_block_preempts_itself_when_latest():
    scheduler = make_scheduler(num_blocks=5, block_size=2)
    scheduler.add_request(make_request("a", 3))
    scheduler.add_request(make_request("b", 4))
    step(scheduler)
    out, _ = step(scheduler)  # "a" fits in its 2 blocks; "b" needs a 3rd
    assert [s.req_id for s in out.scheduled] == ["a"]
    assert out.preempted_req_ids == ("b",)
    assert [r.req_id for r in scheduler.waiting] == ["b"]


def test_prompt_that_never_fits_finishes_as_length_without_wedging():
    scheduler = make_scheduler(num_blocks=4, block_size=2)  # 6 tokens of cache in all
    scheduler.add_request(make_request("huge", 7))
    scheduler.add_request(make_request("small", 2))
    out, deltas = step(scheduler)
    assert [s.req_id for s in out.scheduled] == ["small"]
    assert out.finished_req_ids == ("huge",)
    huge = next(d for d in deltas if d.req_id == "huge")
    assert (huge.new_token_ids, huge.finish_reason) == ((), "length")


def test_request_outgrowing_the_cache_ends_as_length_and_frees_everything():
    scheduler = make_scheduler(num_blocks=4, block_size=2)
    scheduler.add_request(make_request("a", 5, max_tokens=10))
    deltas = run_to_end(scheduler)
    assert [d.new_token_ids for d in deltas] == [(7,), (7,), ()]
    assert deltas[-1].finish_reason == "length"
    assert scheduler.block_manager.num_free_blocks == 3


def test_abort_waiting_request():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 4))
    assert scheduler.abort_request("a")
    assert not scheduler.abort_request("a")
    assert not scheduler.abort_request("unknown")
    out = scheduler.schedule()
    assert out.scheduled == () and out.finished_req_ids == ("a",)
    deltas = scheduler.update(out, {})
    assert [(d.req_id, d.new_token_ids, d.finish_reason) for d in deltas] == [("a", (), "abort")]
    assert scheduler.update(scheduler.schedule(), {}) == []


def test_discarded_request_is_named_finished_once_and_touches_nothing_else():
    """A request the leader could not take: the next plan names it finished (followers
    drop their copies), without a delta, and the requests it does have run on."""
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 4))
    scheduler.discard("never-added")
    out = scheduler.schedule()
    assert out.finished_req_ids == ("never-added",) and [s.req_id for s in out.scheduled] == ["a"]
    assert [d.req_id for d in scheduler.update(out, {"a": SampleResult(9, None)})] == ["a"]
    assert scheduler.schedule().finished_req_ids == ()


def test_abort_running_request_frees_blocks_at_once():
    scheduler = make_scheduler(num_blocks=9, block_size=4)
    scheduler.add_request(make_request("a", 6))
    step(scheduler)
    assert scheduler.block_manager.num_free_blocks == 6
    assert scheduler.abort_request("a")
    assert scheduler.block_manager.num_free_blocks == 8
    assert [d.finish_reason for d in scheduler.take_pending_deltas()] == ["abort"]
    assert scheduler.schedule().finished_req_ids == ("a",)


def test_abort_while_step_in_flight_drops_its_sample():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 4))
    scheduler.add_request(make_request("b", 4))
    out = scheduler.schedule()
    scheduler.abort_request("a")
    samples = {req_id: SampleResult(7, None) for req_id in out.sampled_req_ids}
    deltas = scheduler.update(out, samples)
    assert [(d.req_id, d.new_token_ids, d.finish_reason) for d in deltas] == [
        ("b", (7,), None),
        ("a", (), "abort"),
    ]
    assert scheduler.schedule().finished_req_ids == ("a",)


def finish_with(token_ids, **params):
    """Feeds `token_ids` one per step; returns (output_token_ids, last delta)."""
    scheduler = make_scheduler()
    scheduler.add_request(make_request("r", 3, **params))
    request = scheduler.get("r")
    for token_id in token_ids:
        _, (delta,) = step(scheduler, token_id)
        if delta.finish_reason:
            break
    return request.output_token_ids, delta


@pytest.mark.parametrize(
    "token_ids,params,want_outputs,want_finish,want_stop_reason",
    [
        ([5, EOS, 5], {}, [5, EOS], "stop", EOS),
        ([5, 9, 5], {"stop_token_ids": (9,)}, [5, 9], "stop", 9),
        ([EOS, EOS, 5], {"min_tokens": 2}, [EOS, EOS], "stop", EOS),
        ([EOS, 5, 5, 5], {"ignore_eos": True, "max_tokens": 3}, [EOS, 5, 5], "length", None),
        ([9, 5], {"ignore_eos": True, "stop_token_ids": (9,)}, [9], "stop", 9),
        ([5, 5, 5], {"max_tokens": 2}, [5, 5], "length", None),
        ([5, EOS], {"max_tokens": 2}, [5, EOS], "stop", EOS),  # stop wins over length
        ([5, 5, 5, 5], {"max_tokens": None, "max_model_len": 5}, [5, 5], "length", None),
    ],
)
def test_stop_conditions(token_ids, params, want_outputs, want_finish, want_stop_reason):
    outputs, delta = finish_with(token_ids, **params)
    assert outputs == want_outputs
    assert (delta.finish_reason, delta.stop_reason) == (want_finish, want_stop_reason)


def test_update_forwards_logprobs_and_requires_samples():
    scheduler = make_scheduler()
    scheduler.add_request(make_request("a", 3))
    out = scheduler.schedule()
    logprobs = TokenLogprobs(-0.5, ((7, -0.5),))
    (delta,) = scheduler.update(out, {"a": SampleResult(7, logprobs)})
    assert delta.new_logprobs == (logprobs,)
    with pytest.raises(ValueError, match="no sample"):
        scheduler.update(scheduler.schedule(), {})


def test_from_new_request_and_stats():
    embeds = PromptEmbedsRef(ref=None, dtype="float32", shape=(5, 8))
    request = Request.from_new_request(NewRequest("e", None, embeds, SamplingParams()), (EOS,), 64)
    assert (request.prompt_token_ids, request.prompt_len, request.generator) == (None, 5, None)
    new = NewRequest("t", (5, 6, 7), None, SamplingParams(seed=3))
    request = Request.from_new_request(new, (EOS,), 64)
    assert (request.prompt_token_ids, request.prompt_len, request.num_tokens) == ([5, 6, 7], 3, 3)
    assert request.generator is not None
    scheduler = make_scheduler(num_blocks=9, block_size=4)
    scheduler.add_request(request)
    with pytest.raises(ValueError, match="already"):
        scheduler.add_request(make_request("t", 2))
    step(scheduler)
    stats = scheduler.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_free_blocks) == (1, 0, 7)
    assert stats.kv_cache_usage == pytest.approx(1 / 8)


def check_step(scheduler, out, tables):
    """Applies `out` to follower-style block tables and checks them against the leader."""
    for req_id in out.preempted_req_ids + out.finished_req_ids:
        tables.pop(req_id, None)
    scheduled_ids = [s.req_id for s in out.scheduled]
    assert len(set(scheduled_ids)) == len(scheduled_ids)
    assert set(scheduled_ids).isdisjoint(out.preempted_req_ids + out.finished_req_ids)
    assert out.num_scheduled_tokens <= scheduler.max_num_batched_tokens
    assert len(out.scheduled) <= scheduler.max_num_seqs
    for scheduled in out.scheduled:
        request = scheduler.get(scheduled.req_id)
        table = tables.setdefault(scheduled.req_id, [])
        assert scheduled.num_computed_tokens == request.num_computed_tokens
        table.extend(scheduled.new_block_ids)
        assert table == request.block_ids
        num_cached = scheduled.num_computed_tokens + scheduled.num_new_tokens
        assert len(table) == scheduler.block_manager.blocks_needed(num_cached)
    owned = [b for r in scheduler.running for b in r.block_ids]
    manager = scheduler.block_manager
    if not manager.enable_caching:  # with it, requests share the blocks of their prefix
        assert len(owned) == len(set(owned))
    assert len(set(owned)) + manager.num_free_blocks == manager.num_total_blocks


def random_request(rng, req_id):
    params = {
        "max_tokens": rng.choice([None, 1, 3, 8]),
        "min_tokens": rng.choice([0, 0, 1]),
        "ignore_eos": rng.random() < 0.2,
        "stop_token_ids": rng.choice([(), (3,)]),
    }
    return make_request(req_id, rng.randint(1, 20), max_model_len=rng.choice([24, 40]), **params)


@pytest.mark.parametrize("seed", range(20))
def test_random_workload_frees_every_block(seed):
    rng = random.Random(seed)
    scheduler = make_scheduler(
        num_blocks=rng.randint(6, 14),
        block_size=rng.choice([1, 2, 4]),
        max_num_seqs=rng.randint(1, 5),
        max_num_batched_tokens=rng.randint(1, 24),
    )
    num_requests, num_added, tables = 12, 0, {}
    final = {}
    for _ in range(2000):
        if num_added < num_requests and rng.random() < 0.4:
            scheduler.add_request(random_request(rng, f"r{num_added}"))
            num_added += 1
        if not scheduler.has_unfinished_requests() and num_added == num_requests:
            break
        if rng.random() < 0.03:
            scheduler.abort_request(f"r{rng.randrange(max(num_added, 1))}")
        out = scheduler.schedule()
        check_step(scheduler, out, tables)
        if rng.random() < 0.03:  # abort while the step is in flight
            scheduler.abort_request(f"r{rng.randrange(max(num_added, 1))}")
        samples = {r: SampleResult(rng.randint(2, 9), None) for r in out.sampled_req_ids}
        for delta in scheduler.update(out, samples):
            assert delta.req_id not in final, "no delta after a request's final one"
            if delta.finish_reason:
                final[delta.req_id] = delta.finish_reason
    else:
        raise AssertionError("workload did not drain")
    assert len(final) == num_requests
    assert scheduler.block_manager.num_free_blocks == scheduler.block_manager.num_total_blocks
    assert scheduler.num_running == scheduler.num_waiting == 0


# -- prefix caching ------------------------------------------------------------------------

def make_caching_scheduler(*, num_blocks=65, block_size=4, max_num_seqs=8, max_num_batched_tokens=64):
    return Scheduler(BlockManager(num_blocks, block_size, enable_caching=True), max_num_seqs=max_num_seqs,
                     max_num_batched_tokens=max_num_batched_tokens, max_model_len=1024)


def ids_request(req_id, prompt, **params):
    params.setdefault("max_tokens", 4)
    return Request(req_id, list(prompt), len(prompt), SamplingParams(**params), (EOS,), 1024)


def embeds_request(req_id, rows, block_size, **params):
    """An embeddings prompt whose rows are stood in for by ints (each row's 'bytes')."""
    params.setdefault("max_tokens", 4)
    digests = tuple(bytes(rows[i:i + block_size]) for i in range(0, len(rows), block_size))
    return Request(req_id, None, len(rows), SamplingParams(**params), (EOS,), 1024,
                   embeds_block_digests=digests)


def test_a_later_request_reuses_the_computed_blocks_of_its_prefix():
    scheduler = make_caching_scheduler(block_size=4)
    scheduler.add_request(ids_request("a", range(100, 110)))  # 10 tokens: 2 full blocks
    (out, _), = [step(scheduler)]
    a_blocks = list(out.scheduled[0].new_block_ids)
    scheduler.add_request(ids_request("b", [*range(100, 108), 50, 51, 52]))  # shares 8 tokens
    out, _ = step(scheduler)
    b = next(s for s in out.scheduled if s.req_id == "b")
    # Its first two blocks are a's, already computed; the shards get them as new blocks.
    assert b.num_computed_tokens == 8 and b.num_new_tokens == 3 and b.is_sampled
    assert b.new_block_ids[:2] == tuple(a_blocks[:2]) and b.new_block_ids[2] not in a_blocks
    stats = scheduler.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (10 + 11, 8)


def salted(request, salt):
    return Request(request.req_id, request.prompt_token_ids, request.prompt_len, request.sampling_params,
                   request.eos_token_ids, 1024, embeds_block_digests=request.embeds_block_digests,
                   cache_salt=salt)


@pytest.mark.parametrize("kind", ["ids", "embeds"])
def test_a_cache_salt_shares_blocks_only_with_prompts_of_the_same_salt(kind):
    """vLLM's cache_salt: the same prompt with another salt, or none, finds nothing cached."""
    def make(req_id, salt):
        request = ids_request(req_id, range(100, 110)) if kind == "ids" \
            else embeds_request(req_id, list(range(100, 110)), 4)
        return salted(request, salt)
    scheduler = make_caching_scheduler(block_size=4)
    computed = {}
    for req_id, salt in [("a", "tenant-1"), ("b", "tenant-2"), ("c", None), ("d", "tenant-1"), ("e", None)]:
        scheduler.add_request(make(req_id, salt))
        out, _ = step(scheduler)
        computed[req_id] = next(s for s in out.scheduled if s.req_id == req_id).num_computed_tokens
    assert computed == {"a": 0, "b": 0, "c": 0, "d": 8, "e": 8}


def test_samples_of_one_prompt_share_its_blocks_from_the_first_step():
    """n > 1: the first sample's prompt blocks are keyed when its step is planned, so the
    others, admitted in the same step, compute only their last block's rows."""
    scheduler = make_caching_scheduler(block_size=4)
    for req_id in ("s0", "s1", "s2"):
        scheduler.add_request(ids_request(req_id, range(100, 110)))
    out, _ = step(scheduler)
    first, *others = out.scheduled
    assert (first.num_computed_tokens, first.num_new_tokens) == (0, 10)
    for other in others:
        assert (other.num_computed_tokens, other.num_new_tokens) == (8, 2)
        assert other.new_block_ids[:2] == first.new_block_ids[:2]
    assert scheduler.block_manager.num_free_blocks == 64 - 3 - 2  # 3 blocks, then one more each


def test_a_block_filled_by_a_row_planned_ahead_is_keyed_once_its_token_is_known():
    scheduler = make_caching_scheduler(block_size=4)
    scheduler.add_request(ids_request("a", range(100, 106), max_tokens=8))
    step(scheduler, token_id=60)  # rows 0-5; the first block is full
    request = scheduler.get("a")
    assert request.num_cached_blocks == 1
    out = scheduler.schedule()  # row 6, input 60
    ahead = scheduler.schedule_ahead(out)  # row 7, whose input row 6 samples: not known yet
    assert ahead is not None and request.num_cached_blocks == 1
    scheduler.update(out, {"a": SampleResult(61, None)})
    assert request.num_cached_blocks == 1
    scheduler.update(ahead, {"a": SampleResult(62, None)})
    assert request.num_cached_blocks == 2  # positions 4-7: 104, 105, 60, 61
    scheduler.add_request(ids_request("b", [*range(100, 106), 60, 61, 7]))
    (b,) = [s for s in scheduler.schedule().scheduled if s.req_id == "b"]
    assert b.num_computed_tokens == 8


def test_a_request_a_shard_could_not_take_leaves_nothing_to_share():
    """Its K/V on that shard came from a stand-in: the cache forgets the blocks it keyed,
    a request already sharing them ends with an error, and later ones compute their own."""
    scheduler = make_caching_scheduler(block_size=4)
    scheduler.add_request(ids_request("bad", range(100, 110), max_tokens=8))
    scheduler.add_request(ids_request("sharer", range(100, 110), max_tokens=8))
    scheduler.add_request(ids_request("other", range(200, 210), max_tokens=8))
    out, _ = step(scheduler)
    assert [s.num_computed_tokens for s in out.scheduled] == [0, 8, 0]
    assert scheduler.fail_request("bad")
    deltas = scheduler.take_pending_deltas()
    assert {d.req_id: d.finish_reason for d in deltas} == {"bad": "abort", "sharer": "error"}
    assert "shared the cached prefix of request bad" in next(d for d in deltas if d.req_id == "sharer").error
    assert scheduler.get("other").status is RequestStatus.RUNNING
    scheduler.add_request(ids_request("later", range(100, 110)))
    out, _ = step(scheduler)
    assert next(s for s in out.scheduled if s.req_id == "later").num_computed_tokens == 0
    # Known by its keys after it finished; unknown (not taken here yet) otherwise.
    scheduler.abort_request("other")
    scheduler.schedule()  # "other" is dropped from the scheduler's requests
    probe = ids_request("probe", range(200, 210))
    assert len(scheduler.block_manager.cached_prefix(probe.full_block_hashes(2, 4))) == 2
    assert scheduler.fail_request("other")
    assert scheduler.block_manager.cached_prefix(probe.full_block_hashes(2, 4)) == []
    assert not scheduler.fail_request("never-added")


def test_failing_a_request_spares_one_that_took_its_evicted_blocks():
    """Its keys went with its blocks' eviction: a request holding those blocks now wrote its
    own K/V there, shares nothing of the failed one's, and runs on."""
    scheduler = make_caching_scheduler(num_blocks=4, block_size=4)  # 3 usable
    scheduler.add_request(ids_request("bad", range(100, 108), max_tokens=1))
    run_to_end(scheduler)  # its two keyed blocks are free, still cached
    scheduler.add_request(ids_request("innocent", range(200, 210), max_tokens=8))
    step(scheduler)  # takes every block: bad's keys are evicted
    probe = ids_request("probe", range(100, 108))
    assert scheduler.block_manager.cached_prefix(probe.full_block_hashes(2, 4)) == []
    assert scheduler.fail_request("bad")
    assert scheduler.take_pending_deltas() == []
    assert scheduler.get("innocent").status is RequestStatus.RUNNING


def test_a_whole_cached_prompt_still_computes_its_last_token():
    scheduler = make_caching_scheduler(block_size=4)
    scheduler.add_request(ids_request("a", range(8), max_tokens=1))
    run_to_end(scheduler)
    scheduler.add_request(ids_request("b", range(8)))
    out, _ = step(scheduler)
    # Both blocks are cached, but the logits need the last row: the second block is recomputed
    # into a fresh block (a shared block is never written).
    assert out.scheduled[0].num_computed_tokens == 4 and out.scheduled[0].num_new_tokens == 4


def test_prompt_logprobs_requests_and_different_kinds_do_not_hit():
    scheduler = make_caching_scheduler(block_size=2)
    scheduler.add_request(ids_request("a", [1, 2, 3, 4, 5], max_tokens=1))
    scheduler.add_request(embeds_request("e", [1, 2, 3, 4, 5], 2, max_tokens=1))
    run_to_end(scheduler)
    scheduler.add_request(ids_request("scored", [1, 2, 3, 4, 5], prompt_logprobs=1))
    scheduler.add_request(embeds_request("e-other", [1, 2, 9, 9, 9], 2))  # rows differ after block 0
    scheduler.add_request(ids_request("ids", [1, 2, 3, 4, 9]))
    out, _ = step(scheduler)
    computed = {s.req_id: s.num_computed_tokens for s in out.scheduled}
    # The scored prompt computes every row; rows equal to token ids are not those ids.
    assert computed == {"scored": 0, "e-other": 2, "ids": 4}


def test_preempted_request_finds_its_own_blocks_again():
    scheduler = make_caching_scheduler(num_blocks=7, block_size=2, max_num_batched_tokens=16)  # 6 usable
    scheduler.add_request(ids_request("a", range(10, 14), max_tokens=6, ignore_eos=True))
    scheduler.add_request(ids_request("b", range(40, 44), max_tokens=6, ignore_eos=True))
    for _ in range(10):
        out, _ = step(scheduler)
        if "b" in out.preempted_req_ids:
            break
    else:
        raise AssertionError("b was never preempted")
    while not any(s.req_id == "b" for s in out.scheduled):
        out, _ = step(scheduler)
    back = next(s for s in out.scheduled if s.req_id == "b")
    # Its blocks went back to the pool still keyed; what a did not take since is reused.
    assert back.num_computed_tokens >= 2
    assert scheduler.stats().prefix_cache_hits == back.num_computed_tokens


def shared_prefix_request(rng, req_id, prefixes, block_size):
    prefix = rng.choice(prefixes)
    params = {"max_tokens": rng.choice([1, 3, 8]), "ignore_eos": True}
    if rng.random() < 0.1:
        params["prompt_logprobs"] = 1
    prompt = prefix + [rng.randint(20, 23) for _ in range(rng.randint(1, 6))]
    if rng.random() < 0.3:
        return embeds_request(req_id, prompt, block_size, **params), [("row", v) for v in prompt]
    return ids_request(req_id, prompt, **params), list(prompt)


@pytest.mark.parametrize("seed", range(20))
def test_random_shared_prefixes_read_only_their_own_tokens(seed):
    """Simulated K/V: each row writes its request's token at its slot; every scheduled row's
    context must then read the request's own tokens, through shared blocks or not."""
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4])
    scheduler = make_caching_scheduler(num_blocks=rng.randint(8, 20), block_size=block_size,
                                       max_num_seqs=rng.randint(1, 5), max_num_batched_tokens=rng.randint(4, 24))
    prefixes = [[rng.randint(10, 13) for _ in range(rng.randint(0, 12))] for _ in range(3)]
    slots: dict[tuple[int, int], object] = {}  # (block id, offset) -> what was written there
    contents, tables, num_added = {}, {}, 0
    for _ in range(3000):
        if num_added < 16 and rng.random() < 0.4:
            request, contents[f"r{num_added}"] = shared_prefix_request(rng, f"r{num_added}", prefixes, block_size)
            scheduler.add_request(request)
            num_added += 1
        if not scheduler.has_unfinished_requests() and num_added == 16:
            break
        out = scheduler.schedule()
        check_step(scheduler, out, tables)
        # As in each layer: every row's K/V is stored, then every row attends to its context.
        for s in out.scheduled:
            request, content = scheduler.get(s.req_id), contents[s.req_id]
            tokens = content + request.output_token_ids  # an output token is written by its next row
            for position in range(s.num_computed_tokens, s.num_computed_tokens + s.num_new_tokens):
                slots[(request.block_ids[position // block_size], position % block_size)] = tokens[position]
        for s in out.scheduled:
            request, content = scheduler.get(s.req_id), contents[s.req_id]
            tokens = content + request.output_token_ids
            for position in range(s.num_computed_tokens + s.num_new_tokens):
                block_id = request.block_ids[position // block_size]
                assert slots[(block_id, position % block_size)] == tokens[position], (s, position)
        samples = {r: SampleResult(rng.randint(20, 23), None) for r in out.sampled_req_ids}
        scheduler.update(out, samples)
    else:
        raise AssertionError("workload did not drain")
    manager = scheduler.block_manager
    assert manager.num_free_blocks == manager.num_total_blocks
    stats = scheduler.stats()
    assert 0 <= stats.prefix_cache_hits <= stats.prefix_cache_queries


def test_a_prompt_whose_keys_are_on_their_way_waits_while_the_running_ones_step(monkeypatch):
    """An embeddings prompt whose row digests (the hasher's answer) have not come yet holds
    the step loop once, briefly (DIGESTS_HOLD_S); then the running requests step without it
    and nobody overtakes it (FCFS). Once they come it is admitted, and its blocks are keyed:
    the same rows sent again share them."""
    from concurrent.futures import Future

    from workers import scheduler as scheduler_module

    monkeypatch.setattr(scheduler_module, "DIGESTS_HOLD_S", 0.02)
    scheduler = make_caching_scheduler(block_size=4)
    scheduler.add_request(ids_request("a", range(100, 106), max_tokens=8))
    step(scheduler)
    rows = list(range(1, 11))
    answer: Future = Future()
    on_its_way = embeds_request("e", rows, 4)
    digests = on_its_way.embeds_block_digests
    on_its_way = Request("e", None, len(rows), on_its_way.sampling_params, (EOS,), 1024, embeds_block_digests=answer)
    scheduler.add_request(on_its_way)
    scheduler.add_request(ids_request("i", range(200, 205)))  # behind it
    held = []
    for _ in range(3):
        began = time.monotonic()
        out, _ = step(scheduler)
        held.append(time.monotonic() - began)
        assert [s.req_id for s in out.scheduled] == ["a"]  # "a" decodes; nobody is admitted
    assert held[0] >= 0.015 and max(held[1:]) < 0.015  # held once only
    assert scheduler.awaited_digests() is answer
    answer.set_result(digests)
    assert scheduler.awaited_digests() is None
    out, _ = step(scheduler)
    assert [s.req_id for s in out.scheduled] == ["a", "e", "i"]
    run_to_end(scheduler)
    scheduler.add_request(embeds_request("again", rows, 4))
    out, _ = step(scheduler)
    assert out.scheduled[0].num_computed_tokens == 8  # e's two full blocks
