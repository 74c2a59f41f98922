"""AsyncEngine: the engine behind an async-generator protocol, for the Serve ingress.
Each sample is a `SampleStream` of `SampleUpdate`s, started from any thread and read on
the event loop; ending it early aborts the request and frees its KV blocks. Runs in a
Serve replica (or any asyncio program)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import torch
from ray.util.placement_group import PlacementGroup

from cluster.engine_args import EngineArgs
from cluster.engine_client import (
    DEFAULT_STEP_TIMEOUT_S,
    EngineAttachment,
    EngineClient,
    EngineDeadError,
    request_error,
)
from cluster.outputs import CompletionTracker, Logprob
from cluster.prompts import EnginePrompt, check_prompt_logprobs, embeds_prompt, mixed_prompt, parse_engine_prompt
from workers.messages import EngineStats
from workers.sampling_params import SamplingParams


@dataclass(frozen=True)
class SampleUpdate:
    """What one sample gained since its previous update."""

    text: str  # newly final text
    token_ids: tuple[int, ...]
    logprobs: tuple[dict[int, Logprob], ...] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    first_token_time: float | None = None  # monotonic time of the sample's first token
    # With params.prompt_logprobs, in the update with the first token: as RequestOutput's.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # In the update with the first token: prompt tokens whose K/V the prefix cache held.
    num_cached_tokens: int | None = None


class AsyncEngine:
    def __init__(self, engine_args: EngineArgs, placement_group: PlacementGroup | None = None, *,
                 name: str | None = None, step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S):
        self.config, self.tokenizer = engine_args.resolve()
        self.engine = EngineClient(self.config, placement_group, name=name, step_timeout_s=step_timeout_s)

    @classmethod
    def attach(cls, engine_args: EngineArgs, attachment: EngineAttachment, *,
               step_timeout_s: float = DEFAULT_STEP_TIMEOUT_S) -> AsyncEngine:
        """An AsyncEngine on a running engine that another process owns (`engine_args`:
        that engine's): EngineClient.attach. Its shutdown() detaches, never stops the engine."""
        self = cls.__new__(cls)
        self.config, self.tokenizer = engine_args.resolve()
        self.engine = EngineClient.attach(self.config, attachment, step_timeout_s=step_timeout_s)
        return self

    @property
    def max_model_len(self) -> int:
        return self.config.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.config.model_config.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.config.model_config.hidden_size

    @property
    def dtype(self):
        return self.config.torch_dtype

    def parse_prompt(self, prompt) -> EnginePrompt:
        """Validates a text / token-id / embeddings prompt; ValueError if bad."""
        return parse_engine_prompt(prompt, self.config, self.tokenizer)

    def embeds_prompt(self, tensor: torch.Tensor) -> EnginePrompt:
        """The prompt of a (seq_len, hidden) tensor that validate_prompt_embeds already
        returned (api.embeds_codec.decode_prompt_embeds runs it); put_prompts puts it."""
        return embeds_prompt(tensor, self.hidden_size, self.dtype)

    def mixed_prompt(self, token_ids: list[int], rows: torch.Tensor,
                     embeds_spans: tuple[tuple[int, int], ...]) -> EnginePrompt:
        """embeds_prompt for a prompt of token ids whose embeds_spans positions take `rows`
        (validated, in order) instead."""
        return mixed_prompt(tuple(token_ids), rows, embeds_spans, self.hidden_size, self.dtype)

    @property
    def max_embeds_in_flight_bytes(self) -> int:
        """What the server's admission holds in flight at most (EngineClient's)."""
        return self.engine.max_embeds_in_flight_bytes

    def put_prompts(self, prompts: list[EnginePrompt]) -> list[EnginePrompt]:
        """The prompts of one request, their embeddings put into the object store as one
        object, once for all of their samples (EngineClient.put_prompts). Blocks: call it
        off the loop."""
        return self.engine.put_prompts(prompts)

    def together(self):
        """A block whose start() calls reach the shards together (EngineClient.together)."""
        return self.engine.together()

    def start(self, req_id: str, prompt: EnginePrompt, params: SamplingParams,
              loop: asyncio.AbstractEventLoop) -> SampleStream:
        """Adds one sample (params.n must be 1) to the engine now and returns its stream,
        read on `loop`. Callable from any thread: the worker thread that has just put a
        prompt's embeddings into the object store starts its samples without first
        waiting for a busy event loop. EngineDeadError if the engine is dead; ValueError
        for prompt_logprobs of an embeddings prompt."""
        check_prompt_logprobs(prompt, params)
        return SampleStream(self.engine, self.tokenizer, req_id, prompt, params, loop)

    async def generate(
        self, req_id: str, prompt: EnginePrompt, params: SamplingParams
    ) -> AsyncIterator[SampleUpdate]:
        """start() and the stream's updates, on the running loop; closing this generator
        early aborts the request (an `async for` does not close the inner one itself)."""
        stream = self.start(req_id, prompt, params, asyncio.get_running_loop())
        try:
            async for update in stream.updates():
                yield update
        finally:
            stream.close()

    async def stats(self) -> EngineStats | None:
        """The leader's scheduler figures; None once the engine is dead."""
        if self.engine.dead_reason is not None:
            return None
        try:
            return await self.engine.leader.stats.remote()
        except Exception:  # died since the check: /metrics still answers, without them
            return None

    def check_health(self) -> None:
        """Raises if the engine is dead, so Serve replaces the replica."""
        if self.engine.dead_reason is not None:
            raise EngineDeadError(self.engine.dead_reason)

    def shutdown(self) -> None:
        self.engine.shutdown()


class SampleStream:
    """One sample's engine request, running from construction; its updates are read once,
    on the loop given. Ending early (the updates generator closed, or close()) aborts the
    request and frees its KV blocks."""

    def __init__(self, engine: EngineClient, tokenizer, req_id: str, prompt: EnginePrompt,
                 params: SamplingParams, loop: asyncio.AbstractEventLoop):
        self.req_id = req_id
        self.start_time = time.monotonic()
        self._engine = engine
        self._deltas: asyncio.Queue = asyncio.Queue()  # bound to the loop at its first wait
        self._tracker = CompletionTracker(0, tokenizer, prompt.prompt_token_ids, params)
        self._engine_finished = False
        self._closed = False
        deltas = self._deltas
        engine.add_request(
            req_id, params, lambda d: loop.call_soon_threadsafe(deltas.put_nowait, d),
            prompt.prompt_token_ids, prompt.prompt_embeds, prompt.embeds_dtype, prompt.cache_salt,
            prompt.embeds_spans,
        )

    def close(self) -> None:
        """Aborts the request unless the engine finished it; idempotent, any thread."""
        if not self._closed:
            self._closed = True
            if not self._engine_finished:
                # A client that went away, or a stop string matched on this side.
                self._engine.abort(self.req_id)

    async def updates(self) -> AsyncIterator[SampleUpdate]:
        """The sample's updates. Raises EngineDeadError if the engine fails mid-request."""
        tracker, deltas = self._tracker, self._deltas
        first_token_time, prompt_logprobs_sent, cached_sent = None, False, False
        try:
            while not tracker.is_finished:
                pending = [await deltas.get()]
                while not deltas.empty():  # a consumer that lags gets one update, not many
                    pending.append(deltas.get_nowait())
                num_tokens, num_logprobs = len(tracker.token_ids), len(tracker.logprobs or ())
                text = ""
                for delta in pending:
                    self._engine_finished = delta.finish_reason is not None
                    text += tracker.apply(delta)
                    if tracker.is_finished:
                        break
                if first_token_time is None and tracker.token_ids:
                    first_token_time = time.monotonic()
                if tracker.finish_reason == "error":
                    raise request_error(self._engine, tracker.error)
                prompt_logprobs = num_cached_tokens = None
                if tracker.prompt_logprobs is not None and not prompt_logprobs_sent:
                    prompt_logprobs, prompt_logprobs_sent = tracker.prompt_logprobs, True
                if tracker.num_cached_tokens is not None and not cached_sent:
                    num_cached_tokens, cached_sent = tracker.num_cached_tokens, True
                yield SampleUpdate(
                    text=text,
                    token_ids=tuple(tracker.token_ids[num_tokens:]),
                    logprobs=tuple(tracker.logprobs[num_logprobs:]) if tracker.logprobs is not None else None,
                    finish_reason=tracker.finish_reason,
                    stop_reason=tracker.stop_reason,
                    first_token_time=first_token_time,
                    prompt_logprobs=prompt_logprobs,
                    num_cached_tokens=num_cached_tokens,
                )
        finally:
            self.close()
