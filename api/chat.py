"""/v1/chat/completions: OpenAI's chat messages rendered by the served model's chat
template into one prompt, which the engine then serves as it serves a completion; the
answer in OpenAI's chat shapes (a message, or `chat.completion.chunk` deltas), logprobs as
`{"content": [...]}`. Content parts are text, or (with --enable-prompt-embeds, as vLLM's)
`{"type": "prompt_embeds", "data": <base64 of torch.save(tensor)>}`: the template is
rendered around them and their rows take their place among its tokens. Runs in the Serve
ingress."""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from api.errors import APIError
from api.logprobs import floored_logprob, ranked_token_ids, token_name
from api.protocol import GenerationRequest, UsageInfo, completion_id, unix_time
from api.responses import Choice, Responses
from cluster.tokenizer import chat_prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text"]
    text: str


class EmbedsPart(BaseModel):
    """vLLM's: a (seq_len, hidden_size) tensor, base64 of its torch.save, decoded safely."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["prompt_embeds"]
    data: str


class ChatMessage(BaseModel):
    """One message of the conversation. `content` is a string or a list of parts (joined
    by newlines, as vLLM renders them); only an assistant's may be null."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | EmbedsPart, Field(discriminator="type")]] | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _known_parts(cls, content: Any) -> Any:
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("text", "prompt_embeds"):
                raise PydanticCustomError(
                    "unsupported_content", "content parts of type {kind} are not supported; this server "
                    "takes 'text' and 'prompt_embeds' parts", {"kind": repr(kind)})
        return content

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise PydanticCustomError("missing_content", "a {role} message needs content", {"role": self.role})
        return self

    @property
    def parts(self) -> str | list[dict]:
        """The content as chat_prompt takes it: the string, or each part's type (and text)."""
        if isinstance(self.content, list):
            return [{"type": "text", "text": part.text} if isinstance(part, TextPart) else {"type": "prompt_embeds"}
                    for part in self.content]
        return self.content or ""

    @property
    def embeds_parts(self) -> list[EmbedsPart]:
        if not isinstance(self.content, list):
            return []
        return [part for part in self.content if isinstance(part, EmbedsPart)]


class ChatCompletionRequest(GenerationRequest):
    """POST /v1/chat/completions, with vLLM's template controls."""

    # Tool calling and structured output are not implemented: their "not used" values pass.
    unsupported_neutral: ClassVar[dict[str, tuple]] = {
        "tools": (None, []), "tool_choice": (None, "none"), "parallel_tool_calls": (None, True, False),
        "response_format": (None, {"type": "text"}),
    }

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # chat's default: up to max_model_len
    max_completion_tokens: int | None = None  # OpenAI's newer name; wins over max_tokens
    logprobs: bool | None = False
    top_logprobs: int | None = None  # 0-20 most likely tokens at each position, with logprobs
    # vLLM's: how the template ends the conversation, and the template's own variables
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None:
            if not self.logprobs:
                raise PydanticCustomError("invalid_field", "top_logprobs needs logprobs set to true",
                                          {"field": "top_logprobs"})
            if not 0 <= self.top_logprobs <= 20:
                raise PydanticCustomError("invalid_field", "top_logprobs must be between 0 and 20, got {value}",
                                          {"field": "top_logprobs", "value": self.top_logprobs})
        return self

    @property
    def embeds_parts(self) -> list[EmbedsPart]:
        """The conversation's prompt_embeds parts, in order."""
        return [part for message in self.messages for part in message.embeds_parts]

    def sampling_values(self) -> dict[str, Any]:
        values = super().sampling_values()
        values.pop("logprobs", None)  # a yes or no here; the number is top_logprobs
        if self.max_completion_tokens is not None:
            values["max_tokens"] = self.max_completion_tokens
        if self.logprobs:
            values["logprobs"] = self.top_logprobs or 0
        return values


def render_chat(tokenizer, request, rows_per_part: tuple[int, ...] = ()) -> tuple[list[int], tuple[tuple[int, int], ...]]:
    """cluster.tokenizer.chat_prompt of the messages of `request` (a ChatCompletionRequest,
    or a /tokenize request with the same template fields): the token ids, and the
    positions its prompt_embeds parts' rows fill (part i has rows_per_part[i] rows). A 400
    naming the field at fault (and /v1/completions, for a model without a template)."""
    try:
        return chat_prompt(tokenizer, [m.model_dump(exclude_none=True, exclude={"content"}) | {"content": m.parts}
                                       for m in request.messages], rows_per_part,
                           add_generation_prompt=request.add_generation_prompt,
                           continue_final_message=request.continue_final_message,
                           chat_template_kwargs=request.chat_template_kwargs)
    except ValueError as exc:
        message, field = str(exc), str(exc).split(" ", 1)[0].rstrip(":")
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            message += "; send the templated conversation to /v1/completions (as token ids or prompt_embeds)"
        raise APIError(400, message, param=field) from None


# Responses -----------------------------------------------------------------------------

class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop string or token id that ended it


class DeltaMessage(BaseModel):
    """A stream's piece of the message: the role in each choice's first chunk, then text."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler):
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None


def _chat_completion_id() -> str:
    return f"chat{completion_id()}"


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=_chat_completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=unix_time)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatCompletionStreamResponse(BaseModel):
    """One server-sent event; usage as in CompletionStreamResponse."""

    id: str = Field(default_factory=_chat_completion_id)
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=unix_time)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


def chat_logprobs(token_ids, entries, num_top: int, as_token_ids: bool = False) -> ChatLogprobs:
    """Each token's string, logprob and UTF-8 bytes, with the `num_top` most likely
    (OpenAI's top_logprobs: exactly those, the token itself among them only if ranked)."""
    def entry_of(entry, token_id: int) -> dict:
        name = token_name(entry, token_id, as_token_ids=as_token_ids)
        return {"token": name, "logprob": floored_logprob(entry[token_id].logprob), "bytes": list(name.encode())}

    return ChatLogprobs(content=[
        TokenLogprob(**entry_of(entry, token_id),
                     top_logprobs=[TopLogprob(**entry_of(entry, top)) for top in ranked_token_ids(entry)[:num_top]])
        for token_id, entry in zip(token_ids, entries)])


class ChatResponses(Responses):
    """The chat answers of one server: a ChatCompletionResponse, or its stream's SSE lines
    (each choice's first chunk carries the role, later ones the text)."""

    response_type = ChatCompletionResponse
    stream_chunk_type = ChatCompletionStreamResponse
    new_id = staticmethod(_chat_completion_id)

    async def _run_choice(self, request: ChatCompletionRequest, choice: Choice):
        text, token_ids, entries, last = "", [], [], None
        async for update in self._generate(choice):
            text += update.text
            token_ids += update.token_ids
            entries += update.logprobs or ()
            last = update
        return ChatChoice(index=choice.index, message=AssistantMessage(content=text),
                          logprobs=self._logprobs(request, choice, token_ids, entries),
                          finish_reason=last.finish_reason, stop_reason=last.stop_reason), len(token_ids)

    async def _chunks(self, request: ChatCompletionRequest, choice: Choice):
        yield ChatStreamChoice(index=choice.index, delta=DeltaMessage(role="assistant", content="")), 0
        num_held = 0
        async for update in self._generate(choice):
            logprobs = self._logprobs(request, choice, update.token_ids, update.logprobs or ())
            if not (update.text or logprobs or update.finish_reason):
                num_held += len(update.token_ids)  # counted in usage with the next chunk
                continue  # text held back (a partial character or a possible stop string)
            yield ChatStreamChoice(index=choice.index, delta=DeltaMessage(content=update.text), logprobs=logprobs,
                                   finish_reason=update.finish_reason,
                                   stop_reason=update.stop_reason), num_held + len(update.token_ids)
            num_held = 0

    @staticmethod
    def _logprobs(request: ChatCompletionRequest, choice: Choice, token_ids, entries) -> ChatLogprobs | None:
        if choice.params.logprobs is None:
            return None
        return chat_logprobs(token_ids, entries, choice.params.logprobs, bool(request.return_tokens_as_token_ids))
