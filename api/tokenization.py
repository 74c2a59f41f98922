"""vLLM's /tokenize and /detokenize: the served model's tokenizer over HTTP, so a client
can build prompt embeddings from the token ids the server itself would use for a text, or
(with `messages`) for a conversation its chat template renders. Runs in the Serve replica."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, StrictInt, model_validator
from pydantic_core import PydanticCustomError

from api.chat import ChatMessage, render_chat
from api.errors import APIError


class TokenizeRequest(BaseModel):
    """A text `prompt`, or chat `messages` with the template fields of /v1/chat/completions."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # a prompt's: true by default, as /v1/completions tokenizes it
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False  # vLLM's: each token's string in the vocabulary too

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise PydanticCustomError("invalid_field", "give either prompt or messages", {"field": "prompt"})
        if self.messages is not None and self.add_special_tokens:
            raise PydanticCustomError("invalid_field", "add_special_tokens is for a prompt: the chat template "
                                      "adds the special tokens of messages", {"field": "add_special_tokens"})
        if any(m.embeds_parts for m in self.messages or ()):
            raise PydanticCustomError("invalid_field", "prompt_embeds parts have no token ids to give",
                                      {"field": "messages"})
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str


def tokenize(engine, request: TokenizeRequest) -> TokenizeResponse:
    tokenizer = _tokenizer(engine)
    if request.messages is not None:
        ids, _ = render_chat(tokenizer, request)
    else:
        ids = tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens is not False)
    token_strs = tokenizer.convert_ids_to_tokens(ids) if request.return_token_strs else None
    return TokenizeResponse(count=len(ids), max_model_len=engine.max_model_len, tokens=list(ids),
                            token_strs=token_strs)


def detokenize(engine, request: DetokenizeRequest) -> DetokenizeResponse:
    vocab_size = engine.vocab_size
    bad = next((t for t in request.tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise APIError(400, f"tokens must be integers in [0, {vocab_size}); got {bad}", param="tokens")
    return DetokenizeResponse(prompt=_tokenizer(engine).decode(request.tokens))


def _tokenizer(engine):
    if engine.tokenizer is None:
        raise APIError(400, "this model has no tokenizer, so it has no text to tokenize or detokenize; "
                       "send token ids (a list of ids as the prompt) or prompt_embeds to /v1/completions")
    return engine.tokenizer
