"""The /v1/completions and /v1/chat/completions logic: request → validated prompts (prompt_embeds decoded safely
and put into the object store once; a large payload off the event loop) → every choice
started in the engine at once (from the decoding thread when its embeddings come last) →
an OpenAI response or SSE stream, whose end (however it comes) aborts what the engine has
not finished. Runs in the Serve ingress; the engine sits behind the AsyncEngine protocol."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
import uuid

import numpy as np

from api.admission import DEFAULT_MAX_WAITING_REQUESTS, Admission, Reservation
from api.chat import ChatCompletionRequest, ChatResponses, render_chat
from api.embeds_codec import decode_prompt_embeds
from api.errors import APIError
from api.metrics import Metrics
from api.protocol import (
    CompletionRequest,
    GenerationRequest,
    ModelCard,
    ModelList,
    PromptInput,
    ProtocolError,
    split_prompts,
    unix_time,
)
from api.responses import Choice, CompletionStream, Responses
from cluster import SamplingParams
from cluster.prompts import (EnginePrompt, check_length, concat_rows, truncate_prompt, truncation_length,
                             validate_cache_salt)

DEFAULT_MAX_EMBEDS_BYTES = 64 << 20

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
                 inline_decode_max_chars: int = INLINE_DECODE_MAX_CHARS,
                 enable_prompt_tokens_details: bool = False,
                 max_embeds_in_flight_bytes: int | None = None):
        self.engine = engine
        if max_embeds_in_flight_bytes is None:  # the engine's own (cluster.engine_client.embeds_in_flight_bound)
            max_embeds_in_flight_bytes = engine.max_embeds_in_flight_bytes
        self.admission = Admission(max_in_flight, max_embeds_in_flight_bytes)
        self.served_model_names = [served_model_name] if isinstance(served_model_name, str) else list(served_model_name)
        self.served_model_name = self.served_model_names[0]  # responses to requests naming no model
        self.enable_prompt_embeds = enable_prompt_embeds
        self.created = unix_time()  # the models' cards' `created`: when this server took them up
        self.max_embeds_bytes = max_embeds_bytes
        self.inline_decode_max_chars = inline_decode_max_chars
        self.metrics = metrics or Metrics()
        self.responses = Responses(engine, self.metrics, self.served_model_name,
                                   prompt_tokens_details=enable_prompt_tokens_details)
        self.chat_responses = ChatResponses(engine, self.metrics, self.served_model_name,
                                            prompt_tokens_details=enable_prompt_tokens_details)

    def list_models(self) -> ModelList:
        return ModelList(data=[self.model_card(name) for name in self.served_model_names])

    def model_card(self, name: str) -> ModelCard:
        """A served name's card (OpenAI's GET /v1/models/{model}); 404 for another name."""
        self.check_model(name)
        return ModelCard(id=name, created=self.created, root=self.served_model_name,
                         max_model_len=self.engine.max_model_len)

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
        params, truncation = self._sampling(request)
        try:
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
        return await self._serve(request, params, inputs, truncation, self.responses, arrival_time)

    async def create_chat_completion(self, request: ChatCompletionRequest, arrival_time: float | None = None):
        """A ChatCompletionResponse, or a CompletionStream of its chunks when streaming:
        the conversation, rendered by the model's chat template, served as one prompt of
        token ids."""
        arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.check_model(request.model)
        params, truncation = self._sampling(request)
        if request.embeds_parts:  # decoded (in a thread when large), then rendered around
            inputs = [PromptInput("chat", request)]
        else:
            inputs = [PromptInput("tokens", tuple(render_chat(self.engine.tokenizer, request)[0]))]
        return await self._serve(request, params, inputs, truncation, self.chat_responses, arrival_time)

    async def _serve(self, request: GenerationRequest, params: SamplingParams, inputs: list[PromptInput],
                     truncation: int | None, responses: Responses, arrival_time: float):
        """Every choice started (within this server's admission), then the answer that
        `responses` makes of them: whole, or a stream whose end ends the request."""
        reservation = self.admission.reserve(len(inputs) * params.n, self._embeds_bytes(inputs) * params.n)
        try:
            choices = await self._start(inputs, params, truncation, request.cache_salt)
        except BaseException:
            reservation.release()
            raise
        has_embeds = any(i.kind in ("embeds", "chat") for i in inputs)  # "chat": one with prompt_embeds parts
        self.metrics.observe_intake("prompt_embeds" if has_embeds else "prompt",
                                    max(c.stream.start_time for c in choices) - arrival_time)
        end = functools.partial(self._end, reservation, choices)
        if request.stream:
            return CompletionStream(responses.stream(request, choices, end), end)
        try:
            return await responses.complete(request, choices)
        finally:
            end()

    def _embeds_bytes(self, inputs: list[PromptInput]) -> int:
        """At most the bytes one sample of the inputs' embeddings holds on each shard, known
        before decoding: the payloads' decoded size, as rows of the model's dtype cast from
        the narrowest floats (2 bytes) they could hold."""
        chars = sum(_payload_chars(item) for item in inputs)
        return chars * 3 // 4 * max(1, self.engine.dtype.itemsize // 2)

    def _sampling(self, request: GenerationRequest) -> tuple[SamplingParams, int | None]:
        """The sampling params and the prompt truncation length; a 400 naming the field
        that is wrong (the model's facts checked here too: logit_bias ids in its
        vocabulary, truncate_prompt_tokens within max_model_len)."""
        try:
            params = request.to_sampling_params()
        except ProtocolError as exc:
            raise APIError(400, str(exc), param=exc.param) from None
        try:
            params.check_vocab(self.engine.vocab_size)
            truncation = truncation_length(params.truncate_prompt_tokens, self.engine.max_model_len)
            validate_cache_salt(request.cache_salt)
        except ValueError as exc:  # the messages start with the field's name
            raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0]) from None
        return params, truncation

    async def _start(self, inputs: list[PromptInput], params: SamplingParams,
                     truncation: int | None = None, cache_salt: str | None = None) -> list[Choice]:
        """Validates every prompt (each cut to its last `truncation` tokens or rows, if
        set, and salted with `cache_salt`, if any), then starts every choice in the engine,
        the prompts' embeddings put into the object store together first. When the last
        prompt is embeddings decoded in a worker thread, that thread puts and starts them
        itself: the engine begins while the event loop (busy with other streams) has yet to
        pick the request up again. When only earlier prompts have embeddings, their put
        runs in a thread too."""
        loop = asyncio.get_running_loop()
        salted = functools.partial(dataclasses.replace, cache_salt=cache_salt) if cache_salt else lambda p: p
        prompts = [salted(await self._prepare(item, truncation)) for item in inputs[:-1]]

        def start(last: EnginePrompt) -> list[Choice]:
            return self._start_choices([*prompts, salted(last)], params, loop)

        if self._decodes_inline(inputs[-1]) and any(isinstance(p.prompt_embeds, np.ndarray) for p in prompts):
            return await asyncio.to_thread(start, await self._prepare(inputs[-1], truncation))
        return await self._prepare(inputs[-1], truncation, start)

    def _decodes_inline(self, item: PromptInput) -> bool:
        """Whether the item is decoded on the event loop (text, token ids, embeddings up to
        inline_decode_max_chars) rather than in a worker thread."""
        return _payload_chars(item) <= self.inline_decode_max_chars

    async def _prepare(self, item: PromptInput, truncation: int | None = None, then=lambda prompt: prompt):
        """then(the validated prompt); for embeddings past inline_decode_max_chars, in the
        worker thread that decodes them. A bad prompt is a 400 naming its field."""
        if item.kind in ("embeds", "chat"):
            param = "prompt_embeds" if item.kind == "embeds" else "messages"
            if not self.enable_prompt_embeds:
                raise APIError(400, "prompt_embeds is disabled on this server; start it with "
                               "--enable-prompt-embeds to accept embeddings", param=param)
            if item.kind == "embeds":
                decode = functools.partial(self._decode_embeds, item.value, truncation)
            else:
                decode = functools.partial(self._chat_embeds_prompt, item.value, truncation)
            if self._decodes_inline(item):
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
        """The safe decoder, which also validates the tensor (so the engine does not read
        it again): the prompt of its last `truncation` rows, if set, or of all of them."""
        try:
            tensor = decode_prompt_embeds(data, hidden_size=self.engine.hidden_size, dtype=self.engine.dtype,
                                          max_bytes=self.max_embeds_bytes)
        except ValueError as exc:
            raise APIError(400, str(exc), param="prompt_embeds") from None
        if truncation is not None:
            tensor = tensor[-truncation:]
        return self.engine.embeds_prompt(tensor)

    def _chat_embeds_prompt(self, request: ChatCompletionRequest, truncation: int | None = None) -> EnginePrompt:
        """A chat's prompt_embeds parts decoded safely and the conversation rendered around
        them: one prompt of its ids and all parts' rows."""
        if truncation is not None:
            raise APIError(400, "truncate_prompt_tokens cannot cut a conversation with prompt_embeds parts",
                           param="truncate_prompt_tokens")
        rows = []
        for index, part in enumerate(request.embeds_parts):
            try:
                rows.append(decode_prompt_embeds(part.data, hidden_size=self.engine.hidden_size,
                                                 dtype=self.engine.dtype, max_bytes=self.max_embeds_bytes))
            except ValueError as exc:
                raise APIError(400, f"prompt_embeds part {index}: {exc}", param="messages") from None
        token_ids, spans = render_chat(self.engine.tokenizer, request, tuple(r.shape[0] for r in rows))
        return self.engine.mixed_prompt(token_ids, concat_rows(rows), spans)

    def _start_choices(self, prompts: list[EnginePrompt], params: SamplingParams,
                       loop: asyncio.AbstractEventLoop) -> list[Choice]:
        """Every prompt's length checked, their embeddings put into the object store (one
        object for them all), then each (prompt, sample) started in the engine, its stream
        read on `loop`. Any thread; the put blocks for about a millisecond."""
        base = uuid.uuid4().hex
        max_tokens_of = []
        for prompt in prompts:
            try:
                max_tokens_of.append(check_length(prompt.num_tokens, params.max_tokens, self.engine.max_model_len))
            except ValueError as exc:  # embedding rows count against the context, as the issue asks
                param = ("messages" if prompt.embeds_spans is not None
                         else "prompt_embeds" if prompt.prompt_embeds is not None else "max_tokens")
                raise APIError(400, str(exc), param=param) from None
        planned = []
        for position, (prompt, max_tokens) in enumerate(zip(self.engine.put_prompts(prompts), max_tokens_of)):
            for sample in range(params.n):
                sample_params = dataclasses.replace(params.for_sample(sample), max_tokens=max_tokens)
                planned.append((position * params.n + sample, prompt, sample_params))
        choices = []
        try:
            with self.engine.together():  # one call per shard for the request's choices
                for index, prompt, sample_params in planned:
                    stream = self.engine.start(f"cmpl-{base}-{index}", prompt, sample_params, loop)
                    choices.append(Choice(index, prompt, sample_params, stream))
        except BaseException:
            for choice in choices:
                choice.stream.close()
            raise
        return choices

    def _end(self, reservation: Reservation, choices: list[Choice]) -> None:
        """A request's end, however it came: its admission released, and any choice the
        engine has not finished aborted (a no-op for the rest) and, if never read,
        counted as aborted."""
        reservation.release()
        for choice in choices:
            choice.stream.close()
            self.responses.count_finished(choice, "abort")


def _payload_chars(item: PromptInput) -> int:
    """Base64 characters of an input's prompt_embeds payloads (a chat's parts together; 0
    for text or token ids)."""
    if item.kind == "embeds":
        return len(item.value)
    if item.kind == "chat":
        return sum(len(part.data) for part in item.value.embeds_parts)
    return 0
