"""EngineClient: owns one tensor-parallel engine's shard actors. Takes requests in
(prompt embeddings put once into the object store, the reference fanned out to every
shard), streams deltas out, aborts, shuts down. Runs on the driver or a Serve replica."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import queue
import threading
import uuid
from typing import Callable

import numpy as np
import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group

from cluster.embeds_hasher import hasher_name, start_hasher
from cluster.placement import create_placement_group, shard_actor_options
from cluster.prompts import EnginePrompt
from workers.block_hash import prompt_block_digests
from workers.config import EngineConfig
from workers.messages import EngineStats, NewRequest, PromptEmbedsRef, RequestDelta
from workers.sampling_params import SamplingParams
from workers.shard_worker import ShardWorker
from workers.step_loop import CLIENT_TIMEOUT_S, OWNER_CLIENT

logger = logging.getLogger(__name__)

INIT_TIMEOUT_S = 600.0  # loading a large checkpoint; a hung rendezvous fails, not wedges
POLL_TIMEOUT_S = 1.0
# A request's first tokens wait for every shard's add_requests to have returned (a shard
# that could not take it said so; its tokens came from a stand-in). A shard's add has
# taken the request before any step with it runs, so this waits only for the reply.
ADD_REPLY_TIMEOUT_S = 5.0
# The watchdog: a step running longer than this marks the engine dead (a hung shard or a
# collective waiting on a dead peer). Generous: a long prefill on CPU takes seconds.
DEFAULT_STEP_TIMEOUT_S = 60.0
# With prefix caching, a put of up to this many bytes of rows is hashed right here and its
# digests travel with the requests, so the leader never waits for them. A server's request
# of (64, 4096) bf16 rows (0.5 MiB) takes 0.15 ms. That is as long as the call to the
# hasher actor it replaces took on the caller's thread, and that call's answer took 3.3 ms to
# come back (CPU development machine, BENCHMARKS.md "Online serving", session 36). Meanwhile
# the leader's scheduler held its step loop for them, stalling every running request's
# next step. Hashing here delays the request's send, by 0.27 ms a MiB on one of the H200
# host's cores (BENCHMARKS.md, "Prefix caching", session 27); so a larger put (an offline
# group, a long prompt) goes to the hasher, whose threads hash it beside the engine.
INLINE_DIGESTS_MAX_BYTES = 1 << 20
# Actor threads: the step loop, the output long-poll, request intake and control calls.
SHARD_MAX_CONCURRENCY = 16
# Requests in one add_requests call (those queued together); their first tokens wait for
# the call's reply, so not many more than a step takes at once.
MAX_REQUESTS_PER_CALL = 32

# Each shard holds a running or waiting prompt's embeddings rows on its device, outside the
# KV cache, from when the prompt is added until it finishes. generate() and the server's
# admission keep at most this many bytes of them in flight (1,000 prompts of 256 rows of the
# 8B's width), and on a GPU at most half of what its shards had free once started
# (embeds_in_flight_bound).
EMBEDS_IN_FLIGHT_MAX_BYTES = 2 << 30

# A page of the object store that no process has written costs a put a fault and the
# kernel a zeroed page; its allocator comes back to freed pages only once Ray has freed the
# dropped objects, which it does in batches about once a second. So a fresh engine's first
# puts of embeddings land on fresh pages: 16 MiB took 3.8 ms there against 1.3 ms on
# written ones (the H200 host, BENCHMARKS.md session 28). An engine that takes embeddings
# writes this much of the store once, while its shards start, at most an eighth of its
# node's store (warm_object_store): its first 512 MiB of puts then land on written pages.
STORE_WARMUP_MAX_BYTES = 512 << 20

DeltaSink = Callable[[RequestDelta], None]


def embeds_in_flight_bound(config: EngineConfig, free_device_bytes: list[int | None]) -> int:
    """Bytes of prompts' embeddings rows an engine holds in flight at most: 2 GiB; on a GPU,
    at most half of the device memory its emptiest shard had free once started (the KV
    cache, the graphs and the warm-up steps took theirs: the rows share the rest with the
    steps' own memory); never less than one prompt of max_model_len rows."""
    bound = EMBEDS_IN_FLIGHT_MAX_BYTES
    measured = [free for free in free_device_bytes if free is not None]
    if measured:
        bound = min(bound, min(measured) // 2)
    return max(bound, one_prompt_embeds_bytes(config))


def one_prompt_embeds_bytes(config: EngineConfig) -> int:
    """The bytes of a prompt of max_model_len embeddings rows in the model's dtype."""
    return config.max_model_len * config.model_config.hidden_size * config.torch_dtype.itemsize


def warm_object_store(max_bytes: int = STORE_WARMUP_MAX_BYTES) -> int:
    """Writes store_warmup_bytes of this node's object store and drops them, so that the
    allocator hands this process's later puts pages it has already written: each such put
    then costs a copy, not a fault per 4 KiB. Returns the bytes written: none through Ray
    Client (`ray://`), whose puts cross the network to a store this process never maps."""
    if ray.util.client.ray.is_connected():
        return 0
    node_id = ray.get_runtime_context().get_node_id()
    store = next((node["Resources"].get("object_store_memory", 0) for node in ray.nodes()
                  if node["NodeID"] == node_id and node["Alive"]), 0)
    nbytes = store_warmup_bytes(store, max_bytes)
    if nbytes:
        ray.put(np.zeros(nbytes, dtype=np.uint8))  # dropped at once: Ray frees it in its next batch
    return nbytes


def store_warmup_bytes(store_bytes: float, max_bytes: int = STORE_WARMUP_MAX_BYTES) -> int:
    """What an engine's warm-up writes of an object store of `store_bytes`: `max_bytes`, at
    most an eighth of the store (0 for a store it cannot see)."""
    return max(0, int(min(max_bytes, store_bytes // 8)))


class EngineDeadError(RuntimeError):
    """The engine's shards stopped; in-flight requests end with finish_reason "error"."""


class RequestFailedError(RuntimeError):
    """One request failed inside a live engine (a shard could not take it): the same
    request would fail again, and other requests are not affected."""


def request_error(engine: EngineClient, message: str) -> RuntimeError:
    """The error for a request that ended with finish_reason "error": EngineDeadError if
    the engine died (its sweep ends every request so), else RequestFailedError."""
    return EngineDeadError(message) if engine.dead_reason is not None else RequestFailedError(message)


@dataclasses.dataclass(frozen=True)
class EngineAttachment:
    """What an engine client in another process needs to attach to a running engine
    (EngineClient.attach); its owner's EngineClient.open_client makes one."""

    name: str  # the engine's name: its shards are shardserve-<name>-rank<r>
    namespace: str  # the Ray namespace the shards' names live in
    client: int  # the attached client's id at the leader
    num_kv_blocks: int
    # The attached client's share of the engine's bound on embeddings rows in flight.
    max_embeds_in_flight_bytes: int


class EngineClient:
    """`name` names the shard actors `shardserve-<name>-rank<r>` (what operators see in
    `ray list actors`); a random one by default.

    The EngineClient constructed owns its engine: it starts the shards and stops them. Other
    processes may attach to that running engine (EngineClient.attach, with an attachment
    from open_client), each with an outbox of its own at the leader: API servers beside the
    one that owns the engine (`--api-server-count`), each taking requests in on a process
    and an event loop of its own."""

    def __init__(self, config: EngineConfig, placement_group: PlacementGroup | None = None, *,
                 name: str | None = None, step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S):
        self._init_state(config, name or uuid.uuid4().hex[:8], step_timeout_s)
        self._owns_group = placement_group is None
        self.placement_group = placement_group or create_placement_group(
            config.tensor_parallel_size, config.device, config.placement_strategy
        )
        # The prefix cache's keys of embeddings prompts, hashed out of the leader's process;
        # up before the first request (its process starts while the shards load).
        self._hasher = None
        if config.enable_prefix_caching and config.enable_prompt_embeds:
            self._hasher = start_hasher(self.name, config.block_size)
        warmup = None
        if config.enable_prompt_embeds:  # the store's pages this process puts rows on, while the shards start
            warmup = threading.Thread(target=self._warm_object_store, name="shardserve-store-warmup", daemon=True)
            warmup.start()
        try:
            self.shards = self._start_shards()
        except Exception:
            if self._hasher is not None:
                ray.kill(self._hasher, no_restart=True)
            raise
        finally:
            if warmup is not None:
                warmup.join()
        if self._hasher is not None:
            try:
                ray.get(self._hasher.__ray_ready__.remote(), timeout=INIT_TIMEOUT_S)
            except Exception as exc:  # its calls wait for it; prompts past the leader's wait run unshared
                logger.warning("the prefix-cache hasher of engine %s has not started (%s: %s); embeddings "
                               "prompts run with their blocks unshared until it does", self.name,
                               type(exc).__name__, exc)
        self.leader = self.shards[0]
        self._run_refs = [shard.run.remote() for shard in self.shards]
        self._start_io()

    @classmethod
    def attach(cls, config: EngineConfig, attachment: EngineAttachment, *,
               step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S) -> EngineClient:
        """A client of a running engine that another EngineClient owns (`config` is that
        engine's): it sends requests and reads their outputs as the owner does, through an
        outbox of its own at the leader. It never stops the engine: shutdown() detaches it
        (its requests still running are aborted). If the engine dies, its requests end with
        an error, as the owner's do."""
        self = cls.__new__(cls)
        self._init_state(config, attachment.name, step_timeout_s)
        self._client = attachment.client
        self._owns_engine = self._owns_group = False
        self.placement_group = None
        self.shards = [ray.get_actor(shard_actor_name(attachment.name, rank), namespace=attachment.namespace)
                       for rank in range(config.tensor_parallel_size)]
        self._hasher = None
        if config.enable_prefix_caching and config.enable_prompt_embeds:
            self._hasher = ray.get_actor(hasher_name(attachment.name), namespace=attachment.namespace)
        if config.enable_prompt_embeds:
            self._warm_object_store()
        self.num_kv_blocks = attachment.num_kv_blocks
        self.max_embeds_in_flight_bytes = attachment.max_embeds_in_flight_bytes
        self.leader = self.shards[0]
        self._run_refs = []  # the owner's: a follower's death reaches this client as the leader's
        self._start_io()
        return self

    def _init_state(self, config: EngineConfig, name: str, step_timeout_s: float) -> None:
        if step_timeout_s <= 0:
            raise ValueError(f"step_timeout_s must be > 0, got {step_timeout_s}")
        self.config = config
        self.name = name
        self.step_timeout_s = step_timeout_s
        self._client = OWNER_CLIENT
        self._owns_engine = True
        # Running requests by their id in the engine (the caller's id and a serial number: the
        # shards may still know a finished request's id, so a caller's id can come again):
        # the caller's id and its sink; and each caller's id's engine id, for its abort. An
        # attached client's engine ids carry its client id too: they are unique in the engine.
        self._sinks: dict[str, tuple[str, DeltaSink]] = {}
        self._engine_ids: dict[str, str] = {}
        self._serials = itertools.count()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._closed = False
        self.dead_reason: str | None = None

    def open_client(self, share: int = 1, timeout_s: float = CLIENT_TIMEOUT_S) -> EngineAttachment:
        """Opens an outbox at the leader for a client in another process (EngineClient.attach
        there, promptly: the client's timeout runs from now). `share`: how many clients split
        the engine's bound on embeddings rows in flight. A client that stops polling for
        outputs for `timeout_s` is dropped, and its requests aborted."""
        client = ray.get(self.leader.attach_client.remote(timeout_s), timeout=INIT_TIMEOUT_S)
        return EngineAttachment(self.name, ray.get_runtime_context().namespace, client, self.num_kv_blocks,
                                max(self.max_embeds_in_flight_bytes // share, one_prompt_embeds_bytes(self.config)))

    def clients(self, timeout_s: float = INIT_TIMEOUT_S) -> dict[int, int]:
        """The engine's clients still polling, its owner's and those attached: each one's id
        and the requests it has sent."""
        return ray.get(self.leader.clients.remote(), timeout=timeout_s)

    def _start_io(self) -> None:
        # Requests and aborts go to the shards from this thread, never from the caller's:
        # Ray cancels, recursively, the calls a cancelled task made, and a Serve request
        # whose client went away is such a task. Its abort would be lost (the request
        # running to its length), or an add that one shard had not yet run (the others
        # then waiting for that shard's data).
        self._calls: queue.SimpleQueue = queue.SimpleQueue()
        # (req_ids, the shards' add_requests refs), sent and not yet seen to succeed: the
        # output thread fails a request a shard could not take, not leave it waiting. Each
        # request's unchecked entry: those refs, and its place in their replies.
        self._sent_adds: collections.deque = collections.deque()
        self._unchecked_adds: dict[str, tuple[list, int]] = {}
        self._together = threading.Lock()  # held while a caller adds requests together()
        self._caller = threading.Thread(target=self._make_calls, name="shardserve-calls", daemon=True)
        self._caller.start()
        # Last: its first poll may return at once, and it then reads the state above.
        self._poller = threading.Thread(target=self._poll_outputs, name="shardserve-outputs", daemon=True)
        self._poller.start()

    def _warm_object_store(self) -> None:
        try:
            warm_object_store()
        except Exception as exc:  # noqa: BLE001 - a full store: the first puts only take longer
            logger.warning("engine %s could not write its object-store warm-up (%s: %s); its first "
                           "embeddings puts fault fresh pages", self.name, type(exc).__name__, exc)

    def _start_shards(self) -> list:
        actor_cls = ray.remote(max_concurrency=SHARD_MAX_CONCURRENCY)(ShardWorker)
        shards = [
            actor_cls.options(
                name=shard_actor_name(self.name, rank),
                **shard_actor_options(self.placement_group, rank, self.config.device),
            ).remote(self.config, rank)
            for rank in range(self.config.tensor_parallel_size)
        ]
        try:
            host, port = ray.get(shards[0].rendezvous_address.remote(), timeout=INIT_TIMEOUT_S)
            started = ray.get([s.init.remote(host, port) for s in shards], timeout=INIT_TIMEOUT_S)
        except Exception:
            for shard in shards:
                ray.kill(shard)
            self._release_group()
            raise
        self.num_kv_blocks = started[0][0]
        self.max_embeds_in_flight_bytes = embeds_in_flight_bound(self.config, [free for _, free in started])
        return shards

    def next_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    @staticmethod
    def put_prompt_embeds(array: np.ndarray, dtype: str) -> PromptEmbedsRef:
        """A prompt's (seq_len, hidden) array into the object store, once: every shard on
        a node reads the same zero-copy buffer. Pass the result to add_request for each
        sample of the prompt. Blocks for the put (~1 ms): keep it off an event loop."""
        return PromptEmbedsRef(ray.put(array), dtype, tuple(array.shape))

    def put_prompt(self, prompt: EnginePrompt) -> EnginePrompt:
        """The prompt, its embeddings array (if any) replaced by their reference in the
        object store: put once, then every sample's add_request passes the reference."""
        if not isinstance(prompt.prompt_embeds, np.ndarray):
            return prompt
        ref = self.put_prompt_embeds(prompt.prompt_embeds, prompt.embeds_dtype)
        ref = dataclasses.replace(ref, digests=self._digests_of(ref.ref, [prompt]))
        return dataclasses.replace(prompt, prompt_embeds=ref)

    def put_prompts(self, prompts: list[EnginePrompt]) -> list[EnginePrompt]:
        """put_prompt of several prompts, their embeddings arrays put as one object (a list):
        one put for them all, and, for their requests sent together, one fetch per shard,
        where each prompt's own put and fetch cost about 1 ms apiece."""
        with_rows = [p for p in prompts if isinstance(p.prompt_embeds, np.ndarray)]
        if len(with_rows) < 2:
            return [self.put_prompt(p) for p in prompts]
        ref = ray.put([p.prompt_embeds for p in with_rows])
        digests, index = self._digests_of(ref, with_rows), itertools.count()
        return [dataclasses.replace(p, prompt_embeds=PromptEmbedsRef(ref, p.embeds_dtype, tuple(p.prompt_embeds.shape),
                                                                     next(index), digests))
                if isinstance(p.prompt_embeds, np.ndarray) else p for p in prompts]

    def _digests_of(self, ref, prompts: list[EnginePrompt]):
        """With prefix caching, the block digests of the put object `ref`'s prompts, in
        order: made here, up to INLINE_DIGESTS_MAX_BYTES of rows (a list), else the
        reference to the hasher's answer, asked for now. None without prefix caching."""
        if self._hasher is None:
            return None
        if sum(p.prompt_embeds.nbytes for p in prompts) <= INLINE_DIGESTS_MAX_BYTES:
            return [prompt_block_digests(p.prompt_embeds, p.embeds_dtype, p.embeds_spans, self.config.block_size)
                    for p in prompts]
        return self._hasher.digests.remote(ref, [(p.embeds_dtype, p.embeds_spans) for p in prompts])

    def add_request(
        self,
        req_id: str,
        sampling_params: SamplingParams,
        sink: DeltaSink,
        prompt_token_ids: tuple[int, ...] | None = None,
        prompt_embeds: np.ndarray | PromptEmbedsRef | None = None,
        embeds_dtype: str | None = None,
        cache_salt: str | None = None,
        embeds_spans: tuple[tuple[int, int], ...] | None = None,
    ) -> None:
        """Sends a validated request to every shard; `sink` receives its deltas (with
        req_id) on the output thread, the last one with a finish_reason. EngineDeadError
        once dead; ValueError for the id of a request still running (a finished one's id
        may come again: the shards know each request by an id of the engine's own).
        An embeddings array is put into the object store here; a PromptEmbedsRef was."""
        embeds_ref = prompt_embeds
        if isinstance(prompt_embeds, np.ndarray):
            rows = EnginePrompt(None, None, prompt_embeds, embeds_dtype, embeds_spans=embeds_spans)
            embeds_ref = self.put_prompt(rows).prompt_embeds
        with self._lock:  # with _mark_dead's swap: a sink is never added after the sweep
            if self.dead_reason is not None:
                raise EngineDeadError(self.dead_reason)
            if req_id in self._engine_ids:  # its abort could not tell the two apart
                raise ValueError(f"request id {req_id!r} is already running")
            engine_id = f"{req_id}#{next(self._serials)}"
            if self._client != OWNER_CLIENT:
                engine_id = f"{engine_id}@{self._client}"
            self._sinks[engine_id] = (req_id, sink)
            self._engine_ids[req_id] = engine_id
        new = NewRequest(engine_id, prompt_token_ids, embeds_ref, sampling_params, cache_salt, embeds_spans)
        # The ref goes as a top-level argument, so Ray fetches the array before the call
        # runs, not on an actor thread beside the step loop; the request the shards get
        # holds no nested ref, so none of them becomes a borrower of it (0.17 ms a call).
        # The digests go to the leader alone; a ref to the hasher's answer nested, so that
        # the call need not wait for it.
        array_ref = digests_ref = None
        if embeds_ref is not None:
            array_ref, digests_ref = embeds_ref.ref, embeds_ref.digests
            new = dataclasses.replace(new, prompt_embeds=dataclasses.replace(embeds_ref, ref=None, digests=None))
        self._calls.put((self._send_requests, ([new], array_ref, digests_ref)))

    @contextlib.contextmanager
    def together(self):
        """Requests added inside the block (one prompt's samples, a group that
        put_prompts put) reach the shards together, in as few calls as their embeddings
        objects allow: the calls thread waits for the block's end before it sends them,
        so the engine's next step does not begin with the first alone."""
        with self._together:
            yield

    def _send_requests(self, news: list[NewRequest], array_ref, digests_ref=None) -> None:
        digests = [digests_ref] if digests_ref is not None else None  # in a list: Ray passes a ref as it is
        refs = [self.leader.add_requests.remote(news, array_ref, digests, self._client)]
        refs += [shard.add_requests.remote(news, array_ref) for shard in self.shards[1:]]
        self._sent_adds.append((tuple(new.req_id for new in news), refs))

    def abort(self, req_id: str) -> None:
        """Stops a request and frees its KV blocks; its sink gets a final "abort" delta."""
        with self._lock:
            engine_id = self._engine_ids.get(req_id)
        if engine_id is not None and self.dead_reason is None:
            self._calls.put((self.leader.abort.remote, (engine_id,)))

    def _make_calls(self) -> None:
        """The calls thread: sends queued requests and aborts in order, until shutdown.
        Requests queued one after another with the same embeddings object (a group that
        put_prompts put, or none: token ids) go in one call per shard, up to
        MAX_REQUESTS_PER_CALL, so the shards fetch that object once."""
        queued = None  # taken from the queue, not yet sent
        while True:
            call, args = queued or self._calls.get()
            queued = None
            if call is None:
                return
            if call == self._send_requests:
                news, array_ref, digests_ref = args
                news = list(news)
                with self._together:  # the rest of what a caller adds together
                    while len(news) < MAX_REQUESTS_PER_CALL:
                        try:
                            queued = self._calls.get_nowait()
                        except queue.Empty:
                            break
                        if queued[0] != self._send_requests or queued[1][1] is not array_ref:
                            break
                        news += queued[1][0]
                        queued = None
                args = (news, array_ref, digests_ref)
            try:
                call(*args)
            except Exception:  # a dead actor: the output thread reports the engine dead
                logger.exception("sending a call to the shards failed")

    def stats(self) -> EngineStats:
        return ray.get(self.leader.stats.remote())

    @property
    def num_unfinished(self) -> int:
        with self._lock:
            return len(self._sinks)

    def _poll_outputs(self) -> None:
        while not self._closed:
            try:
                deltas = self._get_outputs()
            except Exception as exc:  # the leader died, hangs, or its watchdog fired
                if not self._closed:
                    self._mark_dead(f"engine shard failed: {type(exc).__name__}: {exc}")
                return
            for delta in deltas:
                if delta.new_token_ids:
                    self._check_adds(delta.req_id)
                self._deliver(delta)
            self._check_adds()
            # A follower that died leaves the leader waiting in a collective: its run()
            # call is what fails first (the owner's; the owner then kills the leader).
            if not self._run_refs:
                continue
            done, _ = ray.wait(self._run_refs, num_returns=1, timeout=0)
            if done and not self._closed:
                self._mark_dead(self._run_failure(done[0]))
                return

    def _get_outputs(self) -> list[RequestDelta]:
        """One long-poll; a leader process that stops answering (frozen, not dead) is
        caught by the timeout on the call itself."""
        ref = self.leader.get_outputs.remote(POLL_TIMEOUT_S, self.step_timeout_s, self._client)
        return ray.get(ref, timeout=POLL_TIMEOUT_S + self.step_timeout_s)

    def _check_adds(self, before_tokens_of: str | None = None) -> None:
        """On the output thread: fails each request a shard's add_requests could not take
        (it would otherwise wait forever), aborting it at the leader in case that one
        took it. Adds not finished yet are checked again after the next poll; those of
        `before_tokens_of`, a request whose tokens are about to be delivered, are waited
        for first, so no token a stand-in produced reaches its sink."""
        while self._sent_adds:
            req_ids, refs = self._sent_adds.popleft()
            for index, req_id in enumerate(req_ids):
                self._unchecked_adds[req_id] = (refs, index)
        if before_tokens_of is not None:
            entry = self._unchecked_adds.get(before_tokens_of)
            if entry is None:
                return
            ray.wait(entry[0], num_returns=len(entry[0]), timeout=ADD_REPLY_TIMEOUT_S)
            pending = {before_tokens_of: entry}
        else:
            pending = self._unchecked_adds
        if not pending:
            return
        all_refs = list(dict.fromkeys(ref for refs, _ in pending.values() for ref in refs))
        done = set(ray.wait(all_refs, num_returns=len(all_refs), timeout=0)[0])
        replies_of: dict[int, list] = {}  # one ray.get per call, shared by the requests it sent
        for req_id, (refs, index) in list(pending.items()):
            if not all(ref in done for ref in refs):
                continue
            del self._unchecked_adds[req_id]
            try:
                if id(refs) not in replies_of:
                    replies_of[id(refs)] = ray.get(refs)
                errors = [replies[index] for replies in replies_of[id(refs)]]
            except ray.exceptions.ActorDiedError:
                continue  # a shard died, not this request: the engine's death (its run() failed) ends it
            except Exception as exc:  # noqa: BLE001 - any other failure of the call fails its requests
                self._fail_request(req_id, exc)
                continue
            error = next((error for error in errors if error is not None), None)
            if error is not None:
                self._fail_request(req_id, error)

    def _fail_request(self, req_id: str, exc: Exception) -> None:
        logger.error("a shard could not take request %s: %s", req_id, exc)
        if self.dead_reason is None:
            self._calls.put((self.leader.fail.remote, (req_id,)))
        cause = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None else exc
        self._deliver(RequestDelta.not_taken(req_id, cause))  # a no-op if the leader's came first

    def _deliver(self, delta: RequestDelta) -> None:
        """To the request's sink, under the caller's id."""
        with self._lock:
            entry = self._sinks.get(delta.req_id)
            if entry is not None and delta.finish_reason is not None:
                del self._sinks[delta.req_id]
                del self._engine_ids[entry[0]]
        if entry is not None:
            req_id, sink = entry
            error = delta.error.replace(delta.req_id, req_id) if delta.error else delta.error
            _call_sink(sink, dataclasses.replace(delta, req_id=req_id, error=error))

    @staticmethod
    def _run_failure(ref) -> str:
        try:
            ray.get(ref)
        except Exception as exc:
            return f"engine shard failed: {type(exc).__name__}: {exc}"
        return "engine shard stopped"

    def _mark_dead(self, reason: str) -> None:
        """Ends every in-flight request with an error instead of leaving it hanging,
        then kills the shards still alive: their step loops wait in a collective on the
        lost peer and would hold their threads (and the devices) forever."""
        logger.error("shardserve engine %s is dead: %s", self.name, reason)
        self._end_requests(reason)
        if self._owns_engine:  # an attached client's view may be its own fault: the owner decides
            for shard in self.shards:
                ray.kill(shard)

    def _end_requests(self, reason: str) -> None:
        """Ends every request in flight with an error; from now on add_request raises."""
        with self._lock:
            self.dead_reason = reason
            sinks, self._sinks, self._engine_ids = self._sinks, {}, {}
        for req_id, sink in sinks.values():
            _call_sink(sink, RequestDelta(req_id, (), None, finish_reason="error", error=reason))

    def start_profile(self) -> None:
        """Starts torch.profiler on every shard (see stop_profile)."""
        ray.get([shard.start_profile.remote() for shard in self.shards])

    def stop_profile(self, directory: str) -> list[str]:
        """Stops it; each shard writes rank<r>.json and rank<r>.txt into `directory` on
        its node. Returns the paths written."""
        paths = ray.get([shard.stop_profile.remote(directory) for shard in self.shards])
        return [path for shard_paths in paths for path in shard_paths]

    def shutdown(self, timeout_s: float = 30.0) -> None:
        """Stops the step loops, then the actors, then frees the placement group. An
        attached client detaches instead, its requests still running aborted."""
        if self._closed:
            return
        self._closed = True
        if self._owns_engine:
            self._stop_engine(timeout_s)
            stopped = f"shardserve engine {self.name} was shut down"
        else:
            self._detach(timeout_s)
            stopped = f"the client of shardserve engine {self.name} was shut down"
        self._calls.put((None, ()))
        self._poller.join(timeout=POLL_TIMEOUT_S * 2)
        self._caller.join(timeout=POLL_TIMEOUT_S * 2)
        # Nothing more comes for this client (the leader stopped, or its outbox is closed): a
        # request still running would wait forever.
        if self.dead_reason is None:
            self._end_requests(stopped)

    def _stop_engine(self, timeout_s: float) -> None:
        if self.dead_reason is None:
            self.leader.shutdown.remote()
            ray.wait(self._run_refs, num_returns=len(self._run_refs), timeout=timeout_s)
        for shard in self.shards:
            ray.kill(shard)
        if self._hasher is not None:
            ray.kill(self._hasher, no_restart=True)
        self._release_group()

    def _detach(self, timeout_s: float) -> None:
        if self.dead_reason is None:
            try:
                ray.get(self.leader.detach_client.remote(self._client), timeout=timeout_s)
            except Exception as exc:  # noqa: BLE001 - a dead engine: nothing to detach from
                logger.warning("engine client %d could not detach from engine %s (%s: %s)", self._client,
                               self.name, type(exc).__name__, exc)

    def _release_group(self) -> None:
        if self._owns_group:
            remove_placement_group(self.placement_group)


def _call_sink(sink: DeltaSink, delta: RequestDelta) -> None:
    """A sink that raises (a stream whose event loop has closed) loses its own deltas, not
    the output thread and with it every other request."""
    try:
        sink(delta)
    except Exception:
        logger.exception("the sink of request %s raised; its deltas are dropped", delta.req_id)


def shard_actor_name(engine_name: str, rank: int) -> str:
    return f"shardserve-{engine_name}-rank{rank}"
