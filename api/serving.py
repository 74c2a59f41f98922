"""The /v1/completions logic: request → validated prompts (prompt_embeds decoded safely
and put into the object store once; a large payload off the event loop) → every choice
started in the engine at once (from the decoding thread when its embeddings come last) →
an OpenAI response or SSE stream, whose end (however it comes) aborts what the engine has
not finished. Runs in the Serve ingress; the engine sits behind the AsyncEngine protocol."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import logging
import time
import uuid
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

from api.embeds_codec import decode_prompt_embeds
from api.admission import DEFAULT_MAX_WAITING_REQUESTS, Admission, Reservation
from api.errors import ENGINE_UNAVAILABLE, APIError
from api.logprobs import decoded_length, echoed_prompt_logprobs, joined, openai_logprobs, vllm_prompt_logprobs
from api.metrics import Metrics
from api.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
    ModelCard,
    ModelList,
    PromptInput,
    ProtocolError,
    UsageInfo,
    error_body,
    split_prompts,
)
from cluster.async_engine import SampleStream
from cluster.engine_client import EngineDeadError, RequestFailedError
from cluster.prompts import EnginePrompt, check_length, truncate_prompt, truncation_length
from cluster import SamplingParams

logger = logging.getLogger(__name__)

DEFAULT_MAX_EMBEDS_BYTES = 64 << 20
@dataclass(eq=False)
class Choice:
    """One (prompt, sample) pair of a request, in response order, its engine request
    running."""

    index: int
    prompt: EnginePrompt
    params: SamplingParams
    stream: SampleStream
    status: str | None = None  # how it ended, once counted in the metrics


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


# A prompt_embeds payload of up to this many base64 characters is decoded and put into the
# object store on the event loop (≈ 2 ms for 0.7 MB, a (64, 4096) bf16 tensor); a larger one
# in a worker thread, so that no stream waits long for its next chunk. Under load the hop to
# a thread costs more than the work it moves: the thread and the loop take turns holding
# the GIL, each turn up to Python's 5 ms switch interval. On nvidia-h200 (Llama-3.1-8B
# shape, 16 concurrent streams of such payloads) the thread took 9.6 ms to decode, 3.0 to
# put and 4.6 to pass the request there and back; on the loop, 1.4, 0.7 and 0.5
# (BENCHMARKS.md, "Online serving", session 10). The loop does wait out a put into a full
# object store (Ray spills to make room). Admission bounds what this replica holds there:
# its max_in_flight choices (1,280 by default), each prompt's rows (≤ 0.75 MB from such a
# payload) held until its choices end: under 1 GB, against a store of 30% of the node's RAM.
INLINE_DECODE_MAX_CHARS = 1 << 20


class OpenAIServing:
    def __init__(self, engine, *, served_model_name: str | list[str], enable_prompt_embeds: bool,
                 max_embeds_bytes: int = DEFAULT_MAX_EMBEDS_BYTES, metrics: Metrics | None = None,
                 max_in_flight: int = 256 + DEFAULT_MAX_WAITING_REQUESTS,
                 inline_decode_max_chars: int = INLINE_DECODE_MAX_CHARS):
        self.engine = engine
        self.admission = Admission(max_in_flight)
        self.served_model_names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
        self.served_model_name = self.served_model_names[0]  # responses to requests naming no model
        self.enable_prompt_embeds = enable_prompt_embeds
        self.max_embeds_bytes = max_embeds_bytes
        self.inline_decode_max_chars = inline_decode_max_chars
        self.metrics = metrics or Metrics()

    def list_models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=name, root=self.served_model_name, max_model_len=self.engine.max_model_len)
                               for name in self.served_model_names])

    def check_model(self, name: str | None) -> None:
        """404 for a model name other than the served ones (None: the primary one)."""
        if name is not None and name not in self.served_model_names:
            raise APIError(404, f"The model `{name}` does not exist.", type="NotFoundError", param="model")

    async def create_completion(self, request: CompletionRequest, arrival_time: float | None = None):
        """A CompletionResponse, or a CompletionStream of SSE lines when streaming.
        arrival_time (time.monotonic(), before the body was read; default now) starts the
        request's intake, which ends when its last choice runs in the engine."""
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.check_model(request.model)
        params, inputs, truncation = self._parse(request)
        reservation = self.admission.reserve(len(inputs) * params.n)
        try:
            choices = await self._start(inputs, params, truncation)
        except BaseException:
            reservation.release()
            raise
        self.metrics.observe_intake("prompt_embeds" if any(i.kind == "embeds" for i in inputs) else "prompt",
                                    max(c.stream.start_time for c in choices) - arrival_time)
        if request.stream:
            return CompletionStream(self._stream(request, choices, reservation),
                                    functools.partial(self._end, reservation, choices))
        try:
            return await self._complete(request, choices)
        finally:
            self._end(reservation, choices)

    def _parse(self, request: CompletionRequest) -> tuple[SamplingParams, list[PromptInput], int | None]:
        """The sampling params, the prompts in choice order and the prompt truncation
        length; a 400 naming the field that is wrong (the model's facts checked here too:
        logit_bias ids in its vocabulary, truncate_prompt_tokens within max_model_len)."""
        try:
            params = request.to_sampling_params()
            inputs = split_prompts(request)
        except ProtocolError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        if params.prompt_logprobs is not None and any(i.kind == "embeds" for i in inputs):
            raise APIError(400, "prompt_logprobs needs prompts of text or token ids; prompt_embeds "
                           "have no tokens to score", param="prompt_logprobs")
        if request.echo and params.logprobs is not None:
            # The echoed prompt's tokens get theirs too, as OpenAI and vLLM answer (how
            # evaluation harnesses score a text's likelihood).
            params = dataclasses.replace(params, prompt_logprobs=max(params.logprobs, params.prompt_logprobs or 0))
        try:
            params.check_vocab(self.engine.vocab_size)
            truncation = truncation_length(params.truncate_prompt_tokens, self.engine.max_model_len)
        except ValueError as exc:  # the messages start with the field's name
            raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0]) from None
        return params, inputs, truncation

    async def _start(self, inputs: list[PromptInput], params: SamplingParams,
                     truncation: int | None = None) -> list[Choice]:
        """Validates every prompt (each cut to its last `truncation` tokens or rows, if
        set), then starts every choice in the engine. When the last prompt is embeddings
        decoded in a worker thread, that thread starts the choices itself: the engine
        begins while the event loop (busy with other streams) has yet to pick the request
        up again."""
        loop = asyncio.get_running_loop()
        prompts = [await self._prepare(item, truncation) for item in inputs[:-1]]
        return await self._prepare(inputs[-1], truncation,
                                   lambda last: self._start_choices([*prompts, last], params, loop))

    async def _prepare(self, item: PromptInput, truncation: int | None = None, then=lambda prompt: prompt):
        """then(the validated prompt); for embeddings past inline_decode_max_chars, in the
        worker thread that decodes them. A bad prompt is a 400 naming its field."""
        if item.kind == "embeds":
            if not self.enable_prompt_embeds:
                raise APIError(400, "prompt_embeds is disabled on this server; start it with "
                               "--enable-prompt-embeds to accept embeddings", param="prompt_embeds")
            decode = functools.partial(self._decode_embeds, item.value, truncation)
            if len(item.value) <= self.inline_decode_max_chars:
                return then(decode())
            return await asyncio.to_thread(lambda: then(decode()))
        try:
            if item.kind == "text":
                prompt = self.engine.parse_prompt({"prompt": item.value})
            else:
                prompt = self.engine.parse_prompt({"prompt_token_ids": list(item.value)})
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt") from None
        return then(truncate_prompt(prompt, truncation))

    def _decode_embeds(self, data: str, truncation: int | None = None) -> EnginePrompt:
        """The safe decoder, which also validates the tensor (so the
        engine does not read it again), then the one ray.put of the prompt's embeddings
        (their last `truncation` rows, if set)."""
        try:
            tensor = decode_prompt_embeds(data, hidden_size=self.engine.hidden_size, dtype=self.engine.dtype,
                                          max_bytes=self.max_embeds_bytes)
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt_embeds") from None
        if truncation is not None:
            tensor = tensor[-truncation:]
        return self.engine.put_embeds_prompt(tensor)

    def _start_choices(self, prompts: list[EnginePrompt], params: SamplingParams,
                       loop: asyncio.AbstractEventLoop) -> list[Choice]:
        """Every prompt's length checked, then each (prompt, sample) started in the engine,
        its stream read on `loop`. Any thread."""
        base = uuid.uuid4().hex
        planned = []
        for position, prompt in enumerate(prompts):
            try:
                max_tokens = check_length(prompt.num_tokens, params.max_tokens, self.engine.max_model_len)
            except ValueError as exc:  # embedding rows count against the context, as the issue asks
                param = "prompt_embeds" if prompt.prompt_embeds is not None else "max_tokens"
                raise APIError(400, str(exc), param=param) from None
            for sample in range(params.n):
                sample_params = dataclasses.replace(params.for_sample(sample), max_tokens=max_tokens)
                planned.append((position * params.n + sample, prompt, sample_params))
        choices = []
        try:
            for index, prompt, sample_params in planned:
                stream = self.engine.start(f"cmpl-{base}-{index}", prompt, sample_params, loop)
                choices.append(Choice(index, prompt, sample_params, stream))
        except BaseException:
            for choice in choices:
                choice.stream.close()
            raise
        return choices

    async def _complete(self, request: CompletionRequest, choices: list[Choice]) -> CompletionResponse:
        results = await asyncio.gather(*(self._run_choice(request, c) for c in choices))
        completion_tokens = sum(num for _, num in results)
        return CompletionResponse(
            model=request.model or self.served_model_name,  # the alias asked for, as vLLM answers
            choices=[choice for choice, _ in results],
            usage=UsageInfo.of(_prompt_tokens(choices), completion_tokens),
        )

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
                                      self.engine.tokenizer, bool(request.return_tokens_as_token_ids))

    async def _generate(self, choice: Choice):
        """The engine's updates for one choice, timed for the metrics."""
        start = choice.stream.start_time
        num_tokens, status = 0, "error"
        try:
            async for update in choice.stream.updates():
                num_tokens += len(update.token_ids)
                yield update
                if update.finish_reason is not None:
                    status = update.finish_reason
                    self.metrics.observe_request(start, update.first_token_time, time.monotonic(), num_tokens)
        except (asyncio.CancelledError, GeneratorExit):
            if status == "error":
                status = "abort"  # the client went away before the end: not an engine error
            raise
        finally:
            self._count_finished(choice, status)

    def _count_finished(self, choice: Choice, status: str) -> None:
        if choice.status is None:
            choice.status = status
            self.metrics.count_finished(status)

    def _end(self, reservation: Reservation, choices: list[Choice]) -> None:
        """A request's end, however it came: its admission released, and any choice the
        engine has not finished aborted (a no-op for the rest) and, if never read,
        counted as aborted."""
        reservation.release()
        for choice in choices:
            choice.stream.close()
            self._count_finished(choice, "abort")

    def _echo(self, request: CompletionRequest, choice: Choice) -> str:
        if not request.echo:
            return ""
        if choice.prompt.prompt is not None:
            return choice.prompt.prompt
        if self.engine.tokenizer is None:  # a model shape: its tokens have no text
            return ""
        return self.engine.tokenizer.decode(list(choice.prompt.prompt_token_ids))

    async def _stream(self, request: CompletionRequest, choices: list[Choice],
                      reservation: Reservation) -> AsyncIterator[str]:
        """SSE lines: a chunk per update per choice, the usage chunk if asked, [DONE].
        A failure after the 200 went out is an error event, then [DONE]."""
        created, response_id = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
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
                yield _sse(CompletionStreamResponse(id=response_id, created=created, model=model,
                                                    choices=[chunk], usage=usage))
            else:
                if request.is_include_usage:
                    usage = UsageInfo.of(_prompt_tokens(choices), completion_tokens)
                    yield _sse(CompletionStreamResponse(id=response_id, created=created,
                                                        model=model, choices=[], usage=usage))
            yield "data: [DONE]\n\n"
        finally:
            for task in tasks:
                task.cancel()  # a disconnected client: each choice's engine request is aborted
            self._end(reservation, choices)  # and those whose task never ran

    async def _pump(self, request: CompletionRequest, choice: Choice, queue: asyncio.Queue) -> None:
        try:
            echo, num_held = self._echo(request, choice), 0
            offset = len(echo)
            async for update in self._generate(choice):
                if request.is_echo_only:  # the prompt back, without the token sampled for it
                    logprobs = self._echoed_logprobs(request, choice, update.prompt_logprobs)
                    queue.put_nowait((CompletionChoice(
                        index=choice.index, text=echo, logprobs=logprobs, finish_reason="length",
                        prompt_logprobs=self._vllm_prompt_logprobs(request, choice, update.prompt_logprobs)), 0))
                    break
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
                chunk = CompletionChoice(index=choice.index, text=echo + update.text, logprobs=logprobs,
                                         finish_reason=update.finish_reason, stop_reason=update.stop_reason,
                                         prompt_logprobs=self._vllm_prompt_logprobs(request, choice,
                                                                                    update.prompt_logprobs))
                echo = ""
                queue.put_nowait((chunk, num_held + len(update.token_ids)))
                num_held = 0
            queue.put_nowait(None)
        except Exception as exc:
            queue.put_nowait(exc)


def _prompt_tokens(choices: list[Choice]) -> int:
    """Prompt tokens count once per prompt (embedding rows for embeddings), not per sample."""
    seen = {}
    for choice in choices:
        seen[id(choice.prompt)] = choice.prompt.num_tokens
    return sum(seen.values())


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
