"""Intake workers: processes beside a Serve replica that take the costly part of an
embeddings request's intake off the replica's event loop, as vLLM's `--api-server-count`
takes request processing out of its engine's process. A worker parses the completions
body, decodes its prompt_embeds safely and puts their rows into the object store; the
replica then only admits the request, starts its choices and streams them.

Why: on nvidia-h200, at 16 concurrent streams, that intake held the replica's one event
loop 2.1 ms longer per request than a token-id request's, and every stream's chunks wait
behind it. A thread does not help (the work holds the GIL: BENCHMARKS.md, "Online
serving", session 33); another process does. The hop costs latency (the call and its
answer), so a worker takes a body only while the replica has other requests in flight:
an idle replica decodes on its loop, as before.

The body reaches the worker through a memory region the two share (a file the replica
creates, both map, and the replica unlinks once the worker has it), never through the
object store: the request's rows go there once, from the worker. Runs in the replica
(IntakePool) and in the workers (IntakeWorker), on the replica's node."""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import tempfile
import threading
import uuid
from dataclasses import dataclass

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from api.errors import APIError
from api.protocol import CompletionRequest, parse_body
from api.serving import decode_embeds_prompt
from cluster.engine_client import put_prompts
from cluster.prompts import EnginePrompt, truncation_length

logger = logging.getLogger(__name__)

# A worker's share of memory with the replica: bodies up to this size can go to it (a
# (1024, 4096) bfloat16 prompt is an 11 MB body); larger ones are decoded in the replica,
# in a thread. Only the pages a body touches take memory.
REGION_BYTES = 16 << 20
# Smaller bodies (token ids, text, a few rows) cost the loop less than the hop.
MIN_BODY_BYTES = 64 << 10


@dataclass(frozen=True)
class Refusal:
    """An APIError as a value, to cross between processes (an exception whose __init__
    takes more than its message does not unpickle)."""

    status: int
    message: str
    type: str
    param: str | None

    @classmethod
    def of(cls, exc: APIError) -> "Refusal":
        return cls(exc.status, exc.message, exc.type, exc.param)

    def error(self) -> APIError:
        return APIError(self.status, self.message, type=self.type, param=self.param)


class IntakeWorker:
    """One worker (a Ray actor, no CPU reserved): reads a completions body from the region
    it shares with its replica, and answers the request with each prompt_embeds payload
    replaced by its prompt, validated and put (or by the Refusal the replica's own decode
    would have raised). One body at a time: the replica writes the next one only after
    the answer."""

    def __init__(self, region_path: str, region_bytes: int, *, hidden_size: int, dtype: torch.dtype,
                 max_embeds_bytes: int, max_model_len: int, hasher=None):
        with open(region_path, "r+b") as region:
            self._region = mmap.mmap(region.fileno(), region_bytes)
        self.hidden_size, self.dtype = hidden_size, dtype
        self.max_embeds_bytes, self.max_model_len = max_embeds_bytes, max_model_len
        self.hasher = hasher

    def take_completion(self, nbytes: int) -> CompletionRequest | Refusal:
        try:
            request = parse_body(self._region[:nbytes], CompletionRequest)
        except APIError as exc:
            return Refusal.of(exc)
        if request.prompt_embeds is None:
            return request
        payloads = [request.prompt_embeds] if isinstance(request.prompt_embeds, str) else request.prompt_embeds
        truncation = self._truncation(request)
        prompts = []
        for data in payloads:
            try:
                prompts.append(decode_embeds_prompt(data, hidden_size=self.hidden_size, dtype=self.dtype,
                                                    max_bytes=self.max_embeds_bytes, truncation=truncation))
            except APIError as exc:
                prompts.append(Refusal.of(exc))
        put = iter(put_prompts([p for p in prompts if isinstance(p, EnginePrompt)], self.hasher))
        prompts = [next(put) if isinstance(p, EnginePrompt) else p for p in prompts]
        return request.model_copy(update={"prompt_embeds": prompts})

    def _truncation(self, request: CompletionRequest) -> int | None:
        """The rows each prompt keeps. A bad truncate_prompt_tokens: None, for the replica
        refuses the request (its checks of the sampling fields run before the prompts')."""
        try:
            return truncation_length(request.truncate_prompt_tokens, self.max_model_len)
        except ValueError:
            return None


@dataclass
class _Worker:
    actor: object
    region: mmap.mmap
    name: str
    ready: bool = False  # its process is up


class IntakePool:
    """A replica's intake workers, started on its node without waiting for them: each
    takes bodies once its process is up. take_completion() hands a body to an idle one;
    None when none is idle or the body is not for one (too small, too large), or when
    the worker was lost (a replacement starts): the caller then parses it itself."""

    def __init__(self, num_workers: int, *, name: str, hidden_size: int, dtype: torch.dtype, max_embeds_bytes: int,
                 max_model_len: int, hasher=None, region_bytes: int = REGION_BYTES,
                 min_body_bytes: int = MIN_BODY_BYTES):
        self.name = name
        self.region_bytes, self.min_body_bytes = region_bytes, min_body_bytes
        self._worker_args = dict(hidden_size=hidden_size, dtype=dtype, max_embeds_bytes=max_embeds_bytes,
                                 max_model_len=max_model_len, hasher=hasher)
        self._node_id = ray.get_runtime_context().get_node_id()
        self._lock = threading.Lock()  # _idle and _workers: ready callbacks run on Ray's thread
        self._idle: list[_Worker] = []
        self._workers: list[_Worker] = []
        self._closed = False
        self.num_started = 0
        for _ in range(num_workers):
            self._start_worker()

    @property
    def num_ready(self) -> int:
        """Workers up and taking bodies (idle or busy)."""
        with self._lock:
            return sum(1 for worker in self._workers if worker.ready)

    def _start_worker(self) -> None:
        directory = "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
        path = os.path.join(directory, f"shardserve-intake-{uuid.uuid4().hex}")
        with open(path, "w+b") as region_file:
            region_file.truncate(self.region_bytes)
            region = mmap.mmap(region_file.fileno(), self.region_bytes)
        self.num_started += 1
        name = f"shardserve-{self.name}-intake{self.num_started}"
        actor = ray.remote(IntakeWorker).options(
            name=name, num_cpus=0, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(self._node_id, soft=False),
        ).remote(path, self.region_bytes, **self._worker_args)
        worker = _Worker(actor, region, name)
        with self._lock:
            self._workers.append(worker)
        actor.__ray_ready__.remote().future().add_done_callback(
            lambda future: self._started(worker, path, future))

    def _started(self, worker: _Worker, path: str, future) -> None:
        os.unlink(path)  # both have it mapped: the memory lives until both let go
        if future.exception() is not None:
            logger.warning("intake worker %s did not start (%s); its bodies are parsed in the replica",
                           worker.name, future.exception())
            self._drop(worker)
            return
        with self._lock:
            if self._closed:
                return
            worker.ready = True
            self._idle.append(worker)

    async def take_completion(self, body: bytes | bytearray) -> CompletionRequest | None:
        """The body as a CompletionRequest whose prompt_embeds are prompts already put
        (EnginePrompt) or APIErrors to raise in their turn; None to parse it here. An
        APIError for a body that is no request at all (bad JSON or fields)."""
        if not self.min_body_bytes <= len(body) <= self.region_bytes:
            return None
        with self._lock:
            if not self._idle:
                return None
            worker = self._idle.pop()
        worker.region[:len(body)] = body
        # Shielded: a request cancelled meanwhile (its client gone) leaves the call to end,
        # and the worker to come back idle, on its own.
        taken = await asyncio.shield(asyncio.ensure_future(self._call(worker, len(body))))
        if isinstance(taken, Refusal):
            raise taken.error()
        if taken is not None and isinstance(taken.prompt_embeds, list):
            prompts = [p.error() if isinstance(p, Refusal) else p for p in taken.prompt_embeds]
            taken = taken.model_copy(update={"prompt_embeds": prompts})
        return taken

    async def _call(self, worker: _Worker, nbytes: int):
        try:
            taken = await worker.actor.take_completion.remote(nbytes)
        except ray.exceptions.RayActorError as exc:
            logger.warning("intake worker %s was lost (%s); a new one starts, and the replica parses the "
                           "body itself", worker.name, exc)
            self._drop(worker)
            if not self._closed:
                self._start_worker()
            return None
        except Exception:  # noqa: BLE001 - a bug in the worker: the replica's own path answers
            logger.exception("intake worker %s failed on a body; the replica parses it itself", worker.name)
            taken = None
        with self._lock:
            if not self._closed:
                self._idle.append(worker)
        return taken

    def _drop(self, worker: _Worker) -> None:
        with self._lock:
            if worker in self._workers:
                self._workers.remove(worker)
            if worker in self._idle:
                self._idle.remove(worker)
        worker.region.close()

    def shutdown(self) -> None:
        """Ends every worker (idempotent)."""
        with self._lock:
            self._closed, workers = True, list(self._workers)
            self._workers.clear()
            self._idle.clear()
        for worker in workers:
            ray.kill(worker.actor, no_restart=True)
