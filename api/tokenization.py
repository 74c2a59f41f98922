"""vLLM's /tokenize and /detokenize: the served model's tokenizer over HTTP, so a client
can build prompt embeddings from the token ids the server itself would use for a text.
Runs in the Serve replica."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, StrictInt

from api.errors import APIError


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # as /v1/completions tokenizes a text prompt
    return_token_strs: bool = False  # vLLM's: each token's string in the vocabulary too


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
    ids = tokenizer.encode(request.prompt, add_special_tokens=request.add_special_tokens)
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
