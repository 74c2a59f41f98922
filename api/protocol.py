"""Pydantic models of the OpenAI completions API as vLLM users send it (with
`prompt_embeds`), the sampling fields it shares with chat completions (api.chat) and
their mapping to SamplingParams, and error bodies; runs in the Serve ingress."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from cluster import SamplingParams  # re-exported: api imports cluster, never workers

MAX_PROMPTS = 1024  # prompts per request (embeds + text), as vLLM's default cap

_SAMPLING_FIELDS = (
    "n", "temperature", "top_p", "top_k", "min_p", "seed", "min_tokens", "stop", "stop_token_ids",
    "ignore_eos", "logprobs", "presence_penalty", "frequency_penalty", "repetition_penalty",
    "include_stop_str_in_output", "skip_special_tokens", "logit_bias", "truncate_prompt_tokens",
    "prompt_logprobs",
)


class ProtocolError(ValueError):
    """A request the server cannot serve as sent; `param` names the offending field."""

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.param = param


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM's: usage in every chunk, with include_usage


class GenerationRequest(BaseModel):
    """What /v1/completions and /v1/chat/completions share: the model, streaming, and the
    sampling fields (OpenAI's and vLLM's extras). Unknown fields are errors, never silently
    ignored; `unsupported_neutral` lists the OpenAI fields not implemented, with the values
    that mean "not used" (the official client sends a field only when the caller passes
    it, so these are accepted and dropped)."""

    model_config = ConfigDict(extra="forbid")
    unsupported_neutral: ClassVar[dict[str, tuple]] = {}

    model: str | None = None  # None: the served model
    max_tokens: int | None = 16  # null: up to max_model_len
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    logit_bias: dict[str, float] | None = None  # OpenAI's: token id (a JSON key) -> bias
    truncate_prompt_tokens: int | None = None  # vLLM's: each prompt's last k tokens or rows
    min_tokens: int | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    repetition_penalty: float | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    return_tokens_as_token_ids: bool | None = None  # logprobs' tokens as "token_id:<id>"
    cache_salt: str | None = None  # vLLM's: shares cached prefixes only with the same salt

    @model_validator(mode="before")
    @classmethod
    def _reject_unsupported_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        for name, value in data.items():
            if name in cls.model_fields:
                continue
            neutral = cls.unsupported_neutral.get(name, ())
            if not any(type(value) is type(v) and value == v for v in neutral):
                accepted = " or ".join(map(json.dumps, neutral))
                hint = f"; only {accepted} is accepted" if neutral else ""
                raise PydanticCustomError(
                    "unsupported_field", "unsupported field '{field}'{hint}",
                    {"field": name, "hint": hint})
        return {k: v for k, v in data.items() if k not in cls.unsupported_neutral}

    @model_validator(mode="after")
    def _check_stream_options(self) -> GenerationRequest:
        # As vLLM checks it: an empty {} (or null) is no option.
        if self.stream_options is not None and self.stream_options.model_fields_set and not self.stream:
            raise PydanticCustomError(
                "invalid_field", "'{field}' is only allowed when stream is true",
                {"field": "stream_options"})
        return self

    @property
    def is_include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def is_continuous_usage(self) -> bool:
        """vLLM's continuous_usage_stats: each chunk carries its choice's usage so far
        (only with include_usage, as in vLLM)."""
        return self.is_include_usage and bool(self.stream_options.continuous_usage_stats)

    def sampling_values(self) -> dict[str, Any]:
        """SamplingParams' arguments from the fields set (not null); max_tokens always."""
        values = {name: getattr(self, name) for name in _SAMPLING_FIELDS
                  if name in type(self).model_fields and getattr(self, name) is not None}
        return {**values, "max_tokens": self.max_tokens}

    def to_sampling_params(self) -> SamplingParams:
        """SamplingParams with OpenAI defaults (temperature 1.0, n 1) where a field is
        unset or null; its ValueError becomes a ProtocolError naming the field."""
        try:
            return SamplingParams(**self.sampling_values())
        except ValueError as exc:
            # SamplingParams messages start with the field name ("top_p must be in ...").
            field = str(exc).split(" ", 1)[0]
            raise ProtocolError(
                str(exc), param=field if field in type(self).model_fields else None) from None


class CompletionRequest(GenerationRequest):
    """POST /v1/completions."""

    unsupported_neutral: ClassVar[dict[str, tuple]] = {"best_of": (None, 1), "suffix": (None, "")}

    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]] | None = None
    prompt_embeds: str | list[str] | None = None  # base64 of torch.save(tensor) each
    logprobs: int | None = None
    echo: bool | None = False
    prompt_logprobs: int | None = None  # vLLM's: each choice's prompt_logprobs, top-k per prompt token

    @property
    def is_echo_only(self) -> bool:
        """echo with max_tokens 0, as vLLM takes it: the prompt back (with its logprobs, if
        asked) and nothing generated. The engine still samples one token, unsent."""
        return bool(self.echo) and self.max_tokens == 0

    def sampling_values(self) -> dict[str, Any]:
        values = super().sampling_values()
        return {**values, "max_tokens": 1} if self.is_echo_only else values


@dataclass(frozen=True)
class PromptInput:
    """One prompt of a request, in choice order; embeds stay base64 until the server
    decodes them with api.embeds_codec."""

    kind: Literal["text", "tokens", "embeds", "chat"]
    value: str | tuple[int, ...] | Any  # "chat": a ChatCompletionRequest with prompt_embeds parts


def split_prompts(
    request: CompletionRequest, *, max_prompts: int = MAX_PROMPTS
) -> list[PromptInput]:
    """All prompt_embeds first, in order, then the prompts (vLLM's choice order).
    A `prompt` of "" or null beside prompt_embeds means no text prompt."""
    embeds = [request.prompt_embeds] if isinstance(request.prompt_embeds, str) \
        else list(request.prompt_embeds or [])
    texts = _text_prompts(request.prompt)
    if not embeds and not texts:
        raise ProtocolError("either prompt or prompt_embeds must be provided", param="prompt")
    if embeds and request.echo:
        raise ProtocolError("echo is not supported with prompt_embeds", param="echo")
    if len(embeds) + len(texts) > max_prompts:
        raise ProtocolError(
            f"a request may carry at most {max_prompts} prompts (prompt_embeds and prompt "
            f"together); got {len(embeds) + len(texts)}",
            param="prompt_embeds" if len(embeds) > max_prompts else "prompt")
    return [PromptInput("embeds", item) for item in embeds] + texts


def _text_prompts(prompt) -> list[PromptInput]:
    if prompt is None or prompt == "" or prompt == []:
        return []
    if isinstance(prompt, str):
        return [PromptInput("text", prompt)]
    if isinstance(prompt[0], int):
        return [PromptInput("tokens", tuple(prompt))]
    if isinstance(prompt[0], str):
        return [PromptInput("text", text) for text in prompt]
    for index, token_ids in enumerate(prompt):
        if not token_ids:
            raise ProtocolError(f"prompt[{index}] is an empty list of token ids", param="prompt")
    return [PromptInput("tokens", tuple(token_ids)) for token_ids in prompt]


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class PromptLogprob(BaseModel):
    """One entry of vLLM's prompt_logprobs."""

    logprob: float
    rank: int | None = None  # 1 = most likely
    decoded_token: str | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    # vLLM's, with prompt_logprobs: None for the first prompt token, then {token id: entry}
    # (the token's own and the top-k); in a stream, in the choice's first chunk. Left out of
    # the JSON when not asked for.
    prompt_logprobs: list[dict[int, PromptLogprob] | None] | None = None

    @model_serializer(mode="wrap")
    def _without_unasked_prompt_logprobs(self, handler):
        return _without_unasked(self, handler, "prompt_logprobs")


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0  # prompt tokens whose K/V the prefix cache held


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    # OpenAI's; sent (as vLLM does) only with --enable-prompt-tokens-details.
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int | None = None) -> UsageInfo:
        details = PromptTokensDetails(cached_tokens=cached_tokens) if cached_tokens is not None else None
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens, prompt_tokens_details=details)

    @model_serializer(mode="wrap")
    def _without_unasked_details(self, handler):
        return _without_unasked(self, handler, "prompt_tokens_details")


def _without_unasked(model: BaseModel, handler, field: str) -> dict:
    """The model's JSON without `field` when it is None: an extra the request did not ask
    for stays out of the response, as vLLM leaves it out."""
    data = handler(model)
    if getattr(model, field) is None:
        data.pop(field, None)
    return data


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def unix_time() -> int:
    return int(time.time())


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=unix_time)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    """One server-sent event. With stream_options.include_usage the last chunk has no
    choices and carries `usage`; earlier chunks carry usage null, or, with vLLM's
    continuous_usage_stats, their choice's prompt and completion tokens so far."""

    id: str = Field(default_factory=completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=unix_time)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=unix_time)
    owned_by: str = "shardserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(default_factory=list)


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorInfo


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: int = 400) -> dict:
    """{"error": {"message", "type", "param", "code"}}, as OpenAI and vLLM answer."""
    info = ErrorInfo(message=message, type=type, param=param, code=code)
    return ErrorResponse(error=info).model_dump()


def validation_error_body(errors: list[dict]) -> dict:
    """A 400 body from pydantic's (or FastAPI's RequestValidationError's) `.errors()`: each
    error once, at the field's path (without the union member pydantic tried: "prompt",
    not "prompt.str")."""
    messages, params = [], []
    for error in errors:
        ctx = error.get("ctx") or {}
        if "field" in ctx:  # our own errors name their field in ctx
            param, text = ctx["field"], error["msg"]
        else:
            param = ".".join(str(part) for part in error.get("loc", ()) if part != "body" and not _is_union_tag(part))
            text = f"{param}: {error['msg']}" if param else error["msg"]
        params.append(param or None)
        if text not in messages:
            messages.append(text)
    return error_body("; ".join(messages), param=params[0] if params else None)


def _is_union_tag(part) -> bool:
    """A loc part naming the member of a union pydantic tried (str, list[int], ...)."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))
