"""Continuous batching with chunked prefill over a paged KV cache, vLLM-v1 style: one token
budget per step, shared by decodes and prefill chunks. Runs on the leader shard; pure Python.

Call order per step: schedule() -> forward pass -> sampler -> update(out, samples). In steady
decoding the next step can be planned before this one's samples are read:
schedule_ahead(out) -> its forward pass -> update(out, samples) -> ..."""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from workers.block_manager import BlockManager
from workers.messages import EngineStats, PromptLogprobs, RequestDelta, ScheduledRequest
from workers.request import DIGESTS_HOLD_S, Request, RequestStatus

if TYPE_CHECKING:
    from concurrent.futures import Future

    from workers.sampler import SampleResult

MAX_FINISHED_KEYS = 4096


@dataclass(frozen=True)
class SchedulerOutput:
    """One step's decisions; the step loop copies these three fields into a StepPlan."""

    scheduled: tuple[ScheduledRequest, ...]
    preempted_req_ids: tuple[str, ...]  # blocks freed; recomputed from token 0 later
    finished_req_ids: tuple[str, ...]  # finished or aborted since the previous schedule()

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        """Nothing to run and nothing for the followers to hear."""
        return not (self.scheduled or self.preempted_req_ids or self.finished_req_ids)

    @property
    def sampled_req_ids(self) -> tuple[str, ...]:
        """Requests sampled this step, in `scheduled` order (the order of the logits rows)."""
        return tuple(s.req_id for s in self.scheduled if s.is_sampled)


class Scheduler:
    """FCFS admission, running requests first, recompute-mode preemption.

    Invariants: `running` and `waiting` are each in arrival order and every running request
    arrived before every waiting one, so the last running request is the latest-arrived
    (the preemption victim) and a preempted request goes back to the front of `waiting`."""

    def __init__(
        self,
        block_manager: BlockManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
    ) -> None:
        for name, value in (
            ("max_num_seqs", max_num_seqs),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_model_len", max_model_len),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.requests: dict[str, Request] = {}  # live, plus finished until next schedule()
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._num_arrived = 0
        self.num_aborted = 0
        # Prompt tokens looked up in the prefix cache at admission, and those found there.
        self.num_prefix_cache_queries = 0
        self.num_prefix_cache_hits = 0
        # The keys finished requests made, for fail_request (a shard's failure to take a
        # request reaches the leader a little after the request may have finished).
        self._finished_keys: OrderedDict[str, list] = OrderedDict()
        self._finished_req_ids: list[str] = []  # since the previous schedule()
        self._pending_deltas: list[RequestDelta] = []  # requests that finished outside a step

    # -- intake and queries ------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        if request.req_id in self.requests:
            raise ValueError(f"request id {request.req_id!r} is already in the scheduler")
        if request.status is not RequestStatus.WAITING or request.block_ids:
            raise ValueError(f"request {request.req_id!r} must be new (waiting, no blocks)")
        request.arrival_index = self._num_arrived
        self._num_arrived += 1
        self.requests[request.req_id] = request
        self.waiting.append(request)

    def abort_request(self, req_id: str) -> bool:
        """Frees the request's blocks now; its "abort" delta comes out of the next update()
        (or take_pending_deltas()). False when the id is unknown or already finished."""
        request = self.requests.get(req_id)
        if request is None or request.is_finished:
            return False
        self._finish(request, RequestStatus.FINISHED_ABORTED)
        self._pending_deltas.append(_final_delta(request))
        self.num_aborted += 1
        return True

    def fail_request(self, req_id: str) -> bool:
        """A request that a shard could not take: that shard computed its rows from a
        stand-in, so the K/V it keyed must not be shared. The cache forgets them, requests
        that already share them end with an error, and the request is aborted. False when
        the id is unknown (its add has not reached this shard yet)."""
        request = self.requests.get(req_id)
        keys = request.keyed_blocks if request is not None else self._finished_keys.pop(req_id, None)
        if keys is None:
            return False
        poisoned = self.block_manager.uncache(keys)
        for other in [r for r in self.running if r is not request and poisoned.intersection(r.block_ids)]:
            self._finish(other, RequestStatus.FINISHED_ABORTED)
            self._pending_deltas.append(RequestDelta(
                other.req_id, (), None, finish_reason="error",
                error=f"request {other.req_id} shared the cached prefix of request {req_id}, which a shard "
                      "could not take"))
        if request is not None:
            self.abort_request(req_id)
        return True

    def discard(self, req_id: str) -> None:
        """A request this shard could not take (its add raised here, so it was never
        added): named among the next plan's finished requests, so the shards that did take
        it drop their copies instead of keeping them forever."""
        self._finished_req_ids.append(req_id)

    def get(self, req_id: str) -> Request:
        try:
            return self.requests[req_id]
        except KeyError:
            raise KeyError(f"unknown request id {req_id!r}") from None

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.num_running,
            num_waiting=self.num_waiting,
            num_total_blocks=self.block_manager.num_total_blocks,
            num_free_blocks=self.block_manager.num_free_blocks,
            num_aborted=self.num_aborted,
            prefix_cache_queries=self.num_prefix_cache_queries,
            prefix_cache_hits=self.num_prefix_cache_hits,
        )

    def take_pending_deltas(self) -> list[RequestDelta]:
        """Deltas of requests that finished outside a step: aborted ("abort") or never
        fitting the KV cache ("length"). update() returns them too; call this when there
        is no step to update."""
        deltas, self._pending_deltas = self._pending_deltas, []
        return deltas

    # -- schedule ----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Running requests first, in order, then waiting ones FCFS. A step that preempts
        admits nobody, so a preempted request never reappears in the step that evicted it."""
        scheduled, preempted, budget = self._schedule_running(self.max_num_batched_tokens)
        if not preempted:
            scheduled += self._schedule_waiting(budget)
        finished = tuple(self._finished_req_ids)
        self._finished_req_ids.clear()
        for req_id in finished:  # followers drop them with this plan; so do we
            self.requests.pop(req_id, None)  # None: discarded, never added here
        return SchedulerOutput(tuple(scheduled), tuple(preempted), finished)

    def schedule_ahead(self, out: SchedulerOutput) -> SchedulerOutput | None:
        """The step after `out` while `out` still runs (its samples not yet applied): the
        same requests, one decode row each, at the position after out's row. Only for a
        batch in steady decoding, where schedule() would decide the same; None otherwise
        (anyone waiting while a seat is free, anyone finished, a request whose row in `out`
        may be its last by length, penalties or a min_tokens mask, which read the output
        tokens, or too few free blocks). Requests waiting for a seat (all max_num_seqs
        taken) keep waiting, as they would in schedule(). A request that ends in `out` by a
        stop token wastes its ahead row: update() skips it, and its blocks are freed with
        it; a request waiting for its seat gets it one step later."""
        if self.waiting and len(self.running) < self.max_num_seqs:
            return None
        if self._finished_req_ids or self._pending_deltas or out.preempted_req_ids:
            return None
        if len(out.scheduled) != len(self.running) or len(self.running) > self.max_num_batched_tokens:
            return None
        num_blocks = []
        for sched, request in zip(out.scheduled, self.running):
            if sched.req_id != request.req_id or sched.num_new_tokens != 1 or not sched.is_sampled:
                return None
            if not self._can_decode_ahead(request):
                return None
            num_blocks.append(self._num_blocks_to_append(request, 2))  # out's row, then ours
        if not self.block_manager.can_allocate(sum(num_blocks)):
            return None
        scheduled = []
        for request, n in zip(self.running, num_blocks):
            new_block_ids = self._allocate(request, n)
            scheduled.append(ScheduledRequest(
                req_id=request.req_id,
                num_computed_tokens=request.num_computed_tokens + 1,
                num_new_tokens=1,
                new_block_ids=tuple(new_block_ids),
                is_sampled=True,
            ))
        return SchedulerOutput(tuple(scheduled), (), ())

    @staticmethod
    def _can_decode_ahead(request: Request) -> bool:
        """After its in-flight row the request is unfinished unless that row samples a stop
        token, and its sampling does not read output tokens the host has not seen yet."""
        params = request.sampling_params
        num_outputs = request.num_output_tokens + 1  # with the in-flight row's token
        if params.max_tokens is not None and num_outputs >= params.max_tokens:
            return False
        if request.num_tokens + 1 >= request.max_model_len:
            return False
        return not request.reads_output_tokens

    def _schedule_running(self, budget: int) -> tuple[list[ScheduledRequest], list[str], int]:
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []
        req_index = 0
        while req_index < len(self.running) and budget > 0:
            request = self.running[req_index]
            # 1 row when decoding; the rest of the prompt (or recompute) when chunked.
            num_new_tokens = min(request.num_tokens - request.num_computed_tokens, budget)
            new_block_ids = self._allocate_or_preempt(request, num_new_tokens, preempted)
            if new_block_ids is None:
                break  # it preempted itself: it was the last running request
            scheduled.append(_scheduled(request, num_new_tokens, new_block_ids))
            self._cache_full_blocks(request, request.num_computed_tokens + num_new_tokens)
            budget -= num_new_tokens
            req_index += 1
        return scheduled, preempted, budget

    def _allocate_or_preempt(
        self, request: Request, num_new_tokens: int, preempted: list[str]
    ) -> list[int] | None:
        """Blocks for the request's next rows, preempting the latest-arrived running
        requests until they fit. None when the request itself had to be preempted."""
        num_blocks = self._num_blocks_to_append(request, num_new_tokens)
        while not self.block_manager.can_allocate(num_blocks):
            victim = self.running.pop()
            self._preempt(victim)
            preempted.append(victim.req_id)
            if victim is request:
                return None
        return self._allocate(request, num_blocks)

    def _schedule_waiting(self, budget: int) -> list[ScheduledRequest]:
        scheduled: list[ScheduledRequest] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            if not self._can_ever_fit(request):
                # Finished as "length" (vLLM's FINISHED_IGNORED) so it cannot wedge the queue.
                self._finish(request, RequestStatus.FINISHED_LENGTH)
                self._pending_deltas.append(_final_delta(request))
                continue
            if self._looks_up(request) and request.digests_pending(hold_s=DIGESTS_HOLD_S):
                break  # FCFS: its cache keys are on their way (the running requests step meanwhile)
            cached = self._cached_prefix(request)
            num_cached_tokens = len(cached) * self.block_manager.block_size
            num_new_tokens = min(request.num_tokens - num_cached_tokens, budget)
            num_blocks = self.block_manager.blocks_needed(num_cached_tokens + num_new_tokens) - len(cached)
            if not self.block_manager.can_allocate(num_blocks + self.block_manager.num_reclaimed(cached)):
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._share_prefix(request, cached)
            new_block_ids = self._allocate(request, num_blocks)
            scheduled.append(_scheduled(request, num_new_tokens, cached + new_block_ids))
            self._cache_full_blocks(request, request.num_computed_tokens + num_new_tokens)
            budget -= num_new_tokens
        return scheduled

    def awaited_digests(self) -> Future | None:
        """The hasher's answer the head of the queue waits for before it is admitted
        (schedule() admits nobody meanwhile), or None."""
        head = self.waiting[0] if self.waiting else None
        if head is None or not self._looks_up(head) or not head.digests_pending():
            return None
        return head.digests_future

    def _cached_prefix(self, request: Request) -> list[int]:
        """The cached blocks of the request's longest cached prefix (it has none computed:
        new, or preempted). At least its last token is left to compute, for its logits;
        a request that scores its prompt (prompt_logprobs) computes every row."""
        if not self._looks_up(request):
            return []
        max_blocks = (request.num_tokens - 1) // self.block_manager.block_size
        return self.block_manager.cached_prefix(request.full_block_hashes(max_blocks, self.block_manager.block_size))

    def _looks_up(self, request: Request) -> bool:
        return self.block_manager.enable_caching and request.sampling_params.prompt_logprobs is None

    def _share_prefix(self, request: Request, cached: list[int]) -> None:
        """The request starts with the cached blocks, its K/V there computed; the shards
        get them as the first of its new blocks."""
        self.block_manager.share(cached)
        request.block_ids = list(cached)
        request.num_computed_tokens = len(cached) * self.block_manager.block_size
        request.num_cached_blocks = len(cached)
        if request.num_cached_tokens is None:
            request.num_cached_tokens = request.num_computed_tokens
        if self._looks_up(request):
            self.num_prefix_cache_queries += request.num_tokens
            self.num_prefix_cache_hits += request.num_computed_tokens

    def _cache_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Keys the request's blocks that are full once its first `num_computed_tokens`
        are computed, as far as their tokens are known here. Keyed when the step that
        computes them is scheduled: a request that shares them later in the same step reads
        them in each layer after this one wrote them (every row's K/V is stored before any
        row attends). A row planned ahead (schedule_ahead) holds a token not read back yet:
        its block is keyed in update()."""
        block_size = self.block_manager.block_size
        num_full = min(num_computed_tokens, request.num_tokens) // block_size
        if not self.block_manager.enable_caching or num_full <= request.num_cached_blocks:
            return
        hashes = request.full_block_hashes(num_full, block_size)
        for index in range(request.num_cached_blocks, len(hashes)):
            if self.block_manager.cache(request.block_ids[index], hashes[index]):
                request.keyed_blocks.append((request.block_ids[index], hashes[index]))
        request.num_cached_blocks = len(hashes)

    def _can_ever_fit(self, request: Request) -> bool:
        """Its whole sequence (prompt + outputs kept across a preemption) fits an empty cache."""
        num_blocks = self.block_manager.blocks_needed(request.num_tokens)
        return (
            num_blocks <= self.block_manager.num_total_blocks
            and request.num_tokens <= self.max_model_len
        )

    def _num_blocks_to_append(self, request: Request, num_new_tokens: int) -> int:
        num_cached = request.num_computed_tokens + num_new_tokens
        return max(0, self.block_manager.blocks_needed(num_cached) - len(request.block_ids))

    def _allocate(self, request: Request, num_blocks: int) -> list[int]:
        new_block_ids = self.block_manager.allocate(num_blocks)
        request.block_ids.extend(new_block_ids)
        return new_block_ids

    def _preempt(self, request: Request) -> None:
        """Recompute mode: drop the KV cache, keep the output tokens, requeue at the front."""
        self.block_manager.free(request.block_ids)
        request.block_ids = []
        request.num_computed_tokens = 0
        request.num_cached_blocks = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)

    # -- update ------------------------------------------------------------------------

    def update(self, out: SchedulerOutput, samples: dict[str, SampleResult],
               prompt_logprobs: dict[str, PromptLogprobs] | None = None) -> list[RequestDelta]:
        """Applies a finished step: advances computed tokens, keeps the prompt logprobs it
        computed, appends sampled tokens, checks stop conditions. One delta per sampled
        request (its first one with its prompt logprobs), then pending abort/length deltas."""
        deltas: list[RequestDelta] = []
        for scheduled in out.scheduled:
            request = self.requests.get(scheduled.req_id)
            if request is None or request.is_finished:
                continue  # aborted while its step ran; its "abort" delta is pending
            request.num_computed_tokens += scheduled.num_new_tokens
            self._cache_full_blocks(request, request.num_computed_tokens)
            if prompt_logprobs and scheduled.req_id in prompt_logprobs:
                request.add_prompt_logprobs(prompt_logprobs[scheduled.req_id])
            if not scheduled.is_sampled:
                continue
            if scheduled.req_id not in samples:
                raise ValueError(f"no sample for sampled request {scheduled.req_id!r}")
            deltas.append(self._append_sample(request, samples[scheduled.req_id]))
        deltas.extend(self.take_pending_deltas())
        return deltas

    def _append_sample(self, request: Request, sample: SampleResult) -> RequestDelta:
        request.output_token_ids.append(sample.token_id)
        status = _check_stop(request, sample.token_id)
        if status is not None:
            self._finish(request, status)
        logprobs = (sample.logprobs,) if sample.logprobs is not None else None
        return RequestDelta(
            req_id=request.req_id,
            new_token_ids=(sample.token_id,),
            new_logprobs=logprobs,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            prompt_logprobs=request.take_prompt_logprobs(),
            num_cached_tokens=request.num_cached_tokens if request.num_output_tokens == 1 else None,
        )

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        if request.block_ids:
            self.block_manager.free(request.block_ids)
            request.block_ids = []
        if request.keyed_blocks:  # until a shard's failure to take it can no longer come
            self._finished_keys[request.req_id] = request.keyed_blocks
            if len(self._finished_keys) > MAX_FINISHED_KEYS:
                self._finished_keys.popitem(last=False)
        request.status = status
        self._finished_req_ids.append(request.req_id)


def _check_stop(request: Request, token_id: int) -> RequestStatus | None:
    """Stop token (once min_tokens is reached) first, then max_tokens, then max_model_len.
    A stop token stays in output_token_ids (vLLM convention); the driver strips its text."""
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens and token_id in request.end_token_ids:
        request.stop_reason = token_id
        return RequestStatus.FINISHED_STOPPED
    if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
        return RequestStatus.FINISHED_LENGTH
    if request.num_tokens >= request.max_model_len:
        return RequestStatus.FINISHED_LENGTH
    return None


def _scheduled(request: Request, num_new_tokens: int, new_block_ids: list[int]) -> ScheduledRequest:
    return ScheduledRequest(
        req_id=request.req_id,
        num_computed_tokens=request.num_computed_tokens,
        num_new_tokens=num_new_tokens,
        new_block_ids=tuple(new_block_ids),
        is_sampled=request.num_computed_tokens + num_new_tokens == request.num_tokens,
    )


def _final_delta(request: Request) -> RequestDelta:
    """A request that finished without sampling: no new tokens, just the reason."""
    return RequestDelta(
        req_id=request.req_id,
        new_token_ids=(),
        new_logprobs=None,
        finish_reason=request.finish_reason,
    )
