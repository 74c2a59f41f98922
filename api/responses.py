"""How a request's running choices become OpenAI's answer: one CompletionResponse, or the
SSE lines of a stream (a chunk per update per choice, the usage chunk if asked, [DONE]).
Echoed prompts, logprobs in OpenAI's and vLLM's shapes, and each choice's end counted in
the metrics; api.chat.ChatResponses gives chat's shapes to the same machinery. Runs in the
Serve ingress, on the replica's event loop."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from api.errors import ENGINE_UNAVAILABLE
from api.logprobs import decoded_length, echoed_prompt_logprobs, joined, openai_logprobs, vllm_prompt_logprobs
from api.metrics import Metrics
from api.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    UsageInfo,
    completion_id,
    error_body,
)
from cluster import SamplingParams
from cluster.async_engine import SampleStream
from cluster.engine_client import EngineDeadError, RequestFailedError
from cluster.prompts import EnginePrompt

logger = logging.getLogger(__name__)

@dataclass(eq=False)
class Choice:
    """One (prompt, sample) pair of a request, in response order, its engine request
    running."""

    index: int
    prompt: EnginePrompt
    params: SamplingParams
    stream: SampleStream
    status: str | None = None  # how it ended, once counted in the metrics
    num_cached_tokens: int | None = None  # its prompt tokens the prefix cache held, once known


class CompletionStream:
    """A streamed completion's SSE lines. aclose() ends the request however far it got,
    also when it was never iterated (the client gone before the first line); so does
    dropping it unclosed, at collection."""

    def __init__(self, lines: AsyncGenerator[str, None], end: Callable[[], None]):
        self._lines, self._end = lines, end
        weakref.finalize(self, end)

    def __aiter__(self) -> CompletionStream:
        return self

    async def __anext__(self) -> str:
        return await self._lines.__anext__()

    async def aclose(self) -> None:
        try:
            await self._lines.aclose()
        finally:
            self._end()


class Responses:
    """The answers of one server: `engine` gives the tokenizer (echoed token ids), `metrics`
    counts each choice's end, and a request naming no model is answered with
    `served_model_name`."""

    response_type = CompletionResponse
    stream_chunk_type = CompletionStreamResponse
    new_id = staticmethod(completion_id)

    def __init__(self, engine, metrics: Metrics, served_model_name: str, *, prompt_tokens_details: bool = False):
        self.engine = engine
        self.metrics = metrics
        self.served_model_name = served_model_name
        self.prompt_tokens_details = prompt_tokens_details  # usage.prompt_tokens_details.cached_tokens

    async def complete(self, request: CompletionRequest, choices: list[Choice]) -> CompletionResponse:
        """The whole response, once every choice has finished."""
        results = await asyncio.gather(*(self._run_choice(request, c) for c in choices))
        completion_tokens = sum(num for _, num in results)
        return self.response_type(
            model=request.model or self.served_model_name,  # the alias asked for, as vLLM answers
            choices=[choice for choice, _ in results],
            usage=self._usage(choices, completion_tokens),
        )

    def _usage(self, choices: list[Choice], completion_tokens: int) -> UsageInfo:
        cached = cached_tokens(choices) if self.prompt_tokens_details else None
        return UsageInfo.of(prompt_tokens(choices), completion_tokens, cached)

    async def _run_choice(self, request: CompletionRequest, choice: Choice):
        echo = self._echo(request, choice)
        text, token_ids, logprobs, prompt_logprobs, last = echo, [], [], None, None
        async for update in self._generate(choice):
            text += update.text
            token_ids += update.token_ids
            logprobs += update.logprobs or ()
            prompt_logprobs = update.prompt_logprobs or prompt_logprobs
            last = update
        finish_reason, stop_reason = last.finish_reason, last.stop_reason
        if request.is_echo_only:  # the prompt back, without the token sampled for it
            text, token_ids, logprobs, finish_reason, stop_reason = echo, [], [], "length", None
        choice_logprobs = None
        if choice.params.logprobs is not None:
            choice_logprobs = openai_logprobs(token_ids, logprobs, choice.params.logprobs, len(echo),
                                              bool(request.return_tokens_as_token_ids))
            echoed = self._echoed_logprobs(request, choice, prompt_logprobs)
            if echoed is not None:  # the echoed prompt's come first
                choice_logprobs = joined(echoed, choice_logprobs)
        return CompletionChoice(
            index=choice.index, text=text, logprobs=choice_logprobs,
            finish_reason=finish_reason, stop_reason=stop_reason,
            prompt_logprobs=self._vllm_prompt_logprobs(request, choice, prompt_logprobs),
        ), len(token_ids)

    def _vllm_prompt_logprobs(self, request: CompletionRequest, choice: Choice, entries):
        if request.prompt_logprobs is None or entries is None:
            return None
        return vllm_prompt_logprobs(list(choice.prompt.prompt_token_ids), entries, request.prompt_logprobs)

    def _echoed_logprobs(self, request: CompletionRequest, choice: Choice, entries) -> CompletionLogprobs | None:
        """The echoed prompt's part of the completions logprobs: with echo and logprobs,
        once the prompt's entries came (with the first token); else None."""
        if not request.echo or choice.params.logprobs is None or entries is None:
            return None
        return echoed_prompt_logprobs(list(choice.prompt.prompt_token_ids), entries, choice.params.logprobs,
                                      self.engine.tokenizer, self._echo(request, choice),
                                      bool(request.return_tokens_as_token_ids))

    async def _generate(self, choice: Choice):
        """The engine's updates for one choice, timed for the metrics."""
        start = choice.stream.start_time
        num_tokens, status = 0, "error"
        try:
            async for update in choice.stream.updates():
                num_tokens += len(update.token_ids)
                if update.num_cached_tokens is not None:
                    choice.num_cached_tokens = update.num_cached_tokens
                yield update
                if update.finish_reason is not None:
                    status = update.finish_reason
                    self.metrics.observe_request(start, update.first_token_time, time.monotonic(), num_tokens)
        except (asyncio.CancelledError, GeneratorExit):
            if status == "error":
                status = "abort"  # the client went away before the end: not an engine error
            raise
        finally:
            self.count_finished(choice, status)

    def count_finished(self, choice: Choice, status: str) -> None:
        """Counts how the choice ended, once (the first status given stands)."""
        if choice.status is None:
            choice.status = status
            self.metrics.count_finished(status)


    def _echo(self, request: CompletionRequest, choice: Choice) -> str:
        if not request.echo:
            return ""
        if choice.prompt.prompt is not None:
            return choice.prompt.prompt
        if self.engine.tokenizer is None:  # a model shape: its tokens have no text
            return ""
        return self.engine.tokenizer.decode(list(choice.prompt.prompt_token_ids))

    async def stream(self, request: CompletionRequest, choices: list[Choice],
                     end: Callable[[], None]) -> AsyncIterator[str]:
        """SSE lines: a chunk per update per choice, the usage chunk if asked, [DONE].
        A failure after the 200 went out is an error event, then [DONE]. end() runs last,
        however the stream stops."""
        created, response_id = int(time.time()), self.new_id()
        model = request.model or self.served_model_name
        queue: asyncio.Queue = asyncio.Queue()
        tasks = [asyncio.create_task(self._pump(request, c, queue)) for c in choices]
        completion_tokens, remaining = 0, len(tasks)
        per_choice = {c.index: [c.prompt.num_tokens, 0] for c in choices} if request.is_continuous_usage else None
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, BaseException):
                    yield _error_event(item)
                    break
                if item is None:
                    remaining -= 1
                    continue
                chunk, num_tokens = item
                completion_tokens += num_tokens
                usage = None
                if per_choice is not None:  # continuous_usage_stats
                    counts = per_choice[chunk.index]
                    counts[1] += num_tokens
                    usage = UsageInfo.of(*counts)
                yield _sse(self.stream_chunk_type(id=response_id, created=created, model=model,
                                                  choices=[chunk], usage=usage))
            else:
                if request.is_include_usage:
                    usage = self._usage(choices, completion_tokens)
                    yield _sse(self.stream_chunk_type(id=response_id, created=created,
                                                      model=model, choices=[], usage=usage))
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()  # a disconnected client: each choice's engine request is aborted
            end()  # and those whose task never ran

    async def _pump(self, request, choice: Choice, queue: asyncio.Queue) -> None:
        """Each (chunk, tokens it carries) of the choice into `queue`, then None; or the
        exception that ended it."""
        try:
            async for item in self._chunks(request, choice):
                queue.put_nowait(item)
            queue.put_nowait(None)
        except Exception as exc:
            queue.put_nowait(exc)

    async def _chunks(self, request: CompletionRequest, choice: Choice):
        """(chunk, tokens it carries) per update that has something to send: the echoed
        prompt leads the first; held-back tokens are counted with the next chunk."""
        echo, num_held = self._echo(request, choice), 0
        offset = len(echo)
        async for update in self._generate(choice):
            if request.is_echo_only:  # the prompt back, without the token sampled for it
                logprobs = self._echoed_logprobs(request, choice, update.prompt_logprobs)
                yield CompletionChoice(
                    index=choice.index, text=echo, logprobs=logprobs, finish_reason="length",
                    prompt_logprobs=self._vllm_prompt_logprobs(request, choice, update.prompt_logprobs)), 0
                self.count_finished(choice, "length")  # as the full response counts it, not "abort"
                return
            logprobs = None
            if choice.params.logprobs is not None:
                logprobs = openai_logprobs(update.token_ids, update.logprobs or (), choice.params.logprobs,
                                           offset, bool(request.return_tokens_as_token_ids))
                offset += decoded_length(update.token_ids, update.logprobs or ())
                echoed = self._echoed_logprobs(request, choice, update.prompt_logprobs)
                if echoed is not None:  # the echoed prompt's come first
                    logprobs = joined(echoed, logprobs)
            if not (echo or update.text or logprobs or update.finish_reason):
                num_held += len(update.token_ids)  # counted in usage with the next chunk
                continue  # text held back (a partial character or a possible stop string)
            yield CompletionChoice(index=choice.index, text=echo + update.text, logprobs=logprobs,
                                   finish_reason=update.finish_reason, stop_reason=update.stop_reason,
                                   prompt_logprobs=self._vllm_prompt_logprobs(request, choice,
                                                                              update.prompt_logprobs)), \
                num_held + len(update.token_ids)
            echo, num_held = "", 0


def prompt_tokens(choices: list[Choice]) -> int:
    """Prompt tokens count once per prompt (embedding rows for embeddings), not per sample."""
    seen = {}
    for choice in choices:
        seen[id(choice.prompt)] = choice.prompt.num_tokens
    return sum(seen.values())


def cached_tokens(choices: list[Choice]) -> int:
    """Prompt tokens the prefix cache held, once per prompt: its first sample's (the
    others share what that one computes)."""
    first: dict[int, int] = {}
    for choice in sorted(choices, key=lambda c: c.index):
        if choice.num_cached_tokens is not None:
            first.setdefault(id(choice.prompt), choice.num_cached_tokens)
    return sum(first.values())


def _error_event(exc: BaseException) -> str:
    """The SSE event for a stream that fails mid-way, in OpenAI's error shape."""
    if isinstance(exc, EngineDeadError):
        body = error_body(ENGINE_UNAVAILABLE, type="service_unavailable", code=503)
    elif isinstance(exc, RequestFailedError):
        body = error_body(str(exc), type="internal_server_error", code=500)
    else:
        logger.error("a streamed completion failed", exc_info=exc)
        body = error_body("internal server error", type="internal_server_error", code=500)
    return f"data: {json.dumps(body)}\n\n"


def _sse(chunk: CompletionStreamResponse) -> str:
    return f"data: {chunk.model_dump_json()}\n\n"
