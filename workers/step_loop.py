"""The step loop that runs on the shards, with no Ray call per step.

Leader (rank 0): schedule, broadcast the plan, execute, sample, update, hand deltas to
the outbox. In steady decoding the next step is planned and launched before this one's
samples are read, so the host's work overlaps the device's (async scheduling). Follower:
receive the plan, execute. Runs on one thread of each shard actor."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections import OrderedDict
from concurrent import futures
from dataclasses import dataclass, field

from workers.block_manager import BlockManager
from workers.config import EngineConfig
from workers.intake import Intake
from workers.messages import EngineStats, PromptLogprobs, RequestDelta, StepPlan
from workers.model_runner import ModelRunner
from workers.parallel import ProcessGroup
from workers.request import Request
from workers.sampler import SampledTokens, Sampler
from workers.scheduler import Scheduler, SchedulerOutput

# An idle leader still broadcasts an empty plan this often, so followers blocked in the
# broadcast never reach the process group's timeout.
KEEPALIVE_S = 30.0
# How long a follower waits for a scheduled request's data to arrive through Ray.
INTAKE_TIMEOUT_S = 120.0
MAX_EARLY_ABORTS = 4096
# With nothing else to run, how long the loop waits for a queue head's cache keys before it
# looks for commands (an abort, say) again. It wakes as soon as they come.
DIGESTS_POLL_S = 0.005
# The engine client that started the shards; clients that attach later get ids after it.
OWNER_CLIENT = 0
# An attached engine client polls for outputs at least once a second while it lives; one
# that has not for this long is gone, and its requests are aborted.
CLIENT_TIMEOUT_S = 30.0


class StepTimeoutError(RuntimeError):
    """The watchdog's verdict: the step in progress exceeded the step timeout."""


class Outbox:
    """Deltas waiting for one engine client's long-poll; batched when the client lags."""

    def __init__(self) -> None:
        self._deltas: list[RequestDelta] = []
        self._cond = threading.Condition()
        self._closed = False

    def put(self, deltas: list[RequestDelta]) -> None:
        with self._cond:
            self._deltas.extend(deltas)
            self._cond.notify_all()

    def take(self, timeout_s: float) -> list[RequestDelta]:
        with self._cond:
            self._cond.wait_for(lambda: self._deltas or self._closed, timeout_s)
            deltas, self._deltas = self._deltas, []
            return deltas

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


class UnknownClientError(KeyError):
    """An engine client's id the leader does not know: it detached, or stopped polling for
    longer than its timeout and was dropped (its requests aborted)."""


class Outboxes:
    """The leader's outboxes, one per engine client: the owner's (OWNER_CLIENT, the engine
    client that started the shards) and one for each client that attached to the running
    engine (an API server process of its own, `--api-server-count`). Each request's deltas
    go to the client that sent it; a request no client claimed is the owner's.

    An attached client that stops polling (its process died or hangs) is dropped once it
    has not polled for its timeout: expire() hands back its requests still running, for the
    leader to abort, so that a dead API server does not keep their KV blocks."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._boxes: dict[int, Outbox] = {OWNER_CLIENT: Outbox()}
        self._client_of: dict[str, int] = {}  # running requests of attached clients
        # Attached clients: their timeout, when their last poll ended (None while one runs),
        # and how many requests each has sent.
        self._timeouts: dict[int, float] = {}
        self._idle_since: dict[int, float | None] = {}
        self._num_sent: dict[int, int] = {OWNER_CLIENT: 0}
        self._ids = itertools.count(OWNER_CLIENT + 1)
        self._closed = False

    def attach(self, timeout_s: float = CLIENT_TIMEOUT_S) -> int:
        """A new client's id; its outbox exists from now on."""
        if timeout_s <= 0:
            raise ValueError(f"a client's timeout must be > 0 s, got {timeout_s}")
        with self._lock:
            client = next(self._ids)
            box = Outbox()
            if self._closed:
                box.close()
            self._boxes[client] = box
            self._timeouts[client] = timeout_s
            self._idle_since[client] = time.monotonic()
            self._num_sent[client] = 0
            return client

    def detach(self, client: int) -> list[str]:
        """Drops an attached client's outbox; returns its requests still running (the
        caller aborts them: their deltas have nowhere to go)."""
        if client == OWNER_CLIENT:
            raise ValueError("the engine's owner cannot detach: it stops the engine")
        with self._lock:
            return self._drop(client)

    def _drop(self, client: int) -> list[str]:
        box = self._boxes.pop(client, None)
        if box is None:
            return []
        box.close()
        del self._timeouts[client], self._idle_since[client], self._num_sent[client]
        # Still the gone client's until their final deltas (their aborts): dropped, not the owner's.
        return [req_id for req_id, owner in self._client_of.items() if owner == client]

    def route(self, req_ids: list[str], client: int) -> None:
        """The requests are `client`'s: called before the leader takes them, so that even
        the delta of one it cannot take reaches that client. UnknownClientError for a
        client that is gone (the requests must not run)."""
        with self._lock:
            if client not in self._boxes:
                raise UnknownClientError(client)
            self._num_sent[client] += len(req_ids)
            if client != OWNER_CLIENT:
                self._client_of.update(dict.fromkeys(req_ids, client))

    def put(self, deltas: list[RequestDelta]) -> None:
        """Each delta to its request's client's outbox; a gone client's are dropped."""
        by_client: dict[int, list[RequestDelta]] = {}
        with self._lock:
            for delta in deltas:
                client = self._client_of.get(delta.req_id, OWNER_CLIENT)
                if delta.finish_reason is not None:
                    self._client_of.pop(delta.req_id, None)
                by_client.setdefault(client, []).append(delta)
            boxes = [(self._boxes.get(client), of_client) for client, of_client in by_client.items()]
        for box, of_client in boxes:
            if box is not None:
                box.put(of_client)

    def take(self, timeout_s: float, client: int = OWNER_CLIENT) -> list[RequestDelta]:
        """A client's long-poll. UnknownClientError for a client that is gone."""
        with self._lock:
            box = self._boxes.get(client)
            if box is None:
                raise UnknownClientError(client)
            if client != OWNER_CLIENT:
                self._idle_since[client] = None
        try:
            return box.take(timeout_s)
        finally:
            with self._lock:
                if client in self._idle_since:
                    self._idle_since[client] = time.monotonic()

    def expire(self) -> list[str]:
        """Drops each attached client that has not polled for its timeout; returns their
        requests still running, for the leader to abort."""
        now = time.monotonic()
        with self._lock:
            gone = [client for client, since in self._idle_since.items()
                    if since is not None and now - since > self._timeouts[client]]
            return [req_id for client in gone for req_id in self._drop(client)]

    def clients(self) -> dict[int, int]:
        """Each client's id (the owner's first) and the requests it has sent."""
        with self._lock:
            return dict(self._num_sent)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            boxes = list(self._boxes.values())
        for box in boxes:
            box.close()


@dataclass(frozen=True)
class LaunchedStep:
    """A step queued on the device whose samples the host has not read yet."""

    out: SchedulerOutput
    samples: SampledTokens | None  # None when the step samples nobody (prefill chunks)
    prompt_logprobs: dict[str, PromptLogprobs] = field(default_factory=dict)


class LeaderLoop:
    def __init__(self, config: EngineConfig, runner: ModelRunner, pg: ProcessGroup, intake: Intake):
        self.config = config
        self.runner = runner
        self.pg = pg
        self.intake = intake
        self.outbox = Outboxes()
        self.scheduler = Scheduler(
            BlockManager(runner.num_blocks, config.block_size, enable_caching=config.enable_prefix_caching),
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=config.max_model_len,
        )
        self.sampler = Sampler(seed=config.seed)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # Aborts that overtook their request (actor threads run calls concurrently), or
        # that raced its finish. Bounded: a stale entry only costs a finished request.
        self._early_aborts: OrderedDict[str, None] = OrderedDict()
        self._stats = self.scheduler.stats()
        # Monotonic start of the step in progress (None between steps), read by the
        # watchdog on another thread: a stuck collective shows as a step that never ends.
        self.step_started: float | None = None
        self._step_id = 0
        self._unsent_tokens: tuple[tuple[str, int], ...] = ()  # applied, not yet in a plan

    # Called from actor threads other than the loop's.
    def add_requests(self, requests: list[Request]) -> None:
        """Requests the next step may schedule, all together: a step never begins with
        only the first of them."""
        self._commands.put(("add", requests))

    def abort(self, req_id: str) -> None:
        self._commands.put(("abort", req_id))

    def discard(self, req_id: str) -> None:
        """For a request whose add failed on this shard: see Scheduler.discard."""
        self._commands.put(("discard", req_id))

    def fail(self, req_id: str) -> None:
        """For a request whose add failed on another shard: see Scheduler.fail_request."""
        self._commands.put(("fail", req_id))

    def stop(self) -> None:
        self._commands.put(("stop", None))

    def stats(self) -> EngineStats:
        return self._stats

    def check_progress(self, step_timeout_s: float) -> None:
        """Raises StepTimeoutError if the step in progress has run past step_timeout_s
        (a shard hangs, or a collective waits on a peer that will never answer)."""
        started = self.step_started
        if started is not None and time.monotonic() - started > step_timeout_s:
            raise StepTimeoutError(
                f"a step made no progress for {step_timeout_s:g} s (a shard hangs or a "
                "collective waits on a dead peer)")

    def run(self) -> None:
        launched: LaunchedStep | None = None
        try:
            while self._drain_commands(busy=launched is not None):
                self.step_started = time.monotonic()
                if launched is None:
                    out = self.scheduler.schedule()
                    if out.is_empty and self._await_digests():
                        continue
                    launched = self._launch(out)
                ahead = self._launch_ahead(launched)
                self._complete(launched)
                launched = ahead
                self.step_started = None
            if launched is not None:
                self._complete(launched)
            self.pg.broadcast_object(StepPlan(self._step_id, (), (), (), (), shutdown=True))
        finally:
            self.outbox.close()

    def _await_digests(self) -> bool:
        """With nothing to run but a head of the queue whose cache keys are on their way:
        waits for them (or DIGESTS_POLL_S, then looks at the commands again) instead of
        stepping nobody. False when nothing is awaited."""
        digests = self.scheduler.awaited_digests()
        if digests is None:
            return False
        self.step_started = None
        futures.wait([digests], timeout=DIGESTS_POLL_S)
        return True

    def _launch(self, out: SchedulerOutput, feedback: SampledTokens | None = None) -> LaunchedStep:
        """Broadcasts the plan and queues its forward pass and draws on the device."""
        plan = StepPlan(self._step_id, self._unsent_tokens, out.preempted_req_ids, out.finished_req_ids,
                        out.scheduled, feeds_back=feedback is not None,
                        feedback_is_argmax=feedback is not None and feedback.by_argmax)
        self._step_id += 1
        self._unsent_tokens = ()
        self.pg.broadcast_object(plan)
        self.runner.apply(plan, self.intake, INTAKE_TIMEOUT_S,
                          feedback.token_ids if feedback is not None else None)
        logits = self.runner.execute(plan.scheduled)
        sampled = [self.scheduler.get(req_id) for req_id in out.sampled_req_ids]
        return LaunchedStep(out, self.sampler.launch(logits, sampled) if sampled else None,
                            self.runner.take_prompt_logprobs())

    def _launch_ahead(self, launched: LaunchedStep) -> LaunchedStep | None:
        """The next step, launched before `launched`'s samples are read, when the batch is
        in steady decoding and no command waits; None otherwise."""
        if (not self.config.async_scheduling or launched.samples is None
                or not self._commands.empty()):
            return None
        out = self.scheduler.schedule_ahead(launched.out)
        return self._launch(out, feedback=launched.samples) if out is not None else None

    def _complete(self, launched: LaunchedStep) -> None:
        """Reads the step's samples (the host's one wait on the device) and applies them."""
        samples = {}
        if launched.samples is not None:
            samples = dict(zip(launched.out.sampled_req_ids, launched.samples.results()))
        deltas = self.scheduler.update(launched.out, samples, launched.prompt_logprobs)
        self._unsent_tokens += tuple((d.req_id, t) for d in deltas for t in d.new_token_ids)
        self._stats = self.scheduler.stats()
        if deltas:
            self.outbox.put(deltas)

    def _drain_commands(self, busy: bool) -> bool:
        """Applies queued adds and aborts; waits for one when there is no work (nothing
        unfinished and no step in flight). Returns False once asked to stop."""
        idle = not busy and not self.scheduler.has_unfinished_requests()
        try:
            command = self._commands.get(timeout=KEEPALIVE_S) if idle else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            kind, arg = command
            if kind == "stop":
                return False
            if kind == "add":
                for request in arg:
                    self._add(request)
            elif kind == "discard":
                self.scheduler.discard(arg)
            elif kind == "fail":
                if not self.scheduler.fail_request(arg):
                    self._remember_early_abort(arg)  # taken later: aborted at once, nothing keyed
            elif not self.scheduler.abort_request(arg):
                self._remember_early_abort(arg)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _remember_early_abort(self, req_id: str) -> None:
        self._early_aborts[req_id] = None
        if len(self._early_aborts) > MAX_EARLY_ABORTS:
            self._early_aborts.popitem(last=False)

    def _add(self, request: Request) -> None:
        self.scheduler.add_request(request)
        if self._early_aborts.pop(request.req_id, 0) is None:
            # Added then aborted at once, so every shard hears it finished and drops it.
            self.scheduler.abort_request(request.req_id)


def run_follower(runner: ModelRunner, pg: ProcessGroup, intake: Intake) -> None:
    while True:
        plan = pg.broadcast_object()
        if plan.shutdown:
            return
        runner.apply(plan, intake, INTAKE_TIMEOUT_S)
        runner.execute(plan.scheduled)
