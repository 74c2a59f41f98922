"""The answers other than 200 that the ingress raises, as values: status, an OpenAI error
type and the field at fault (api.routes turns them into OpenAI's error shape)."""

from __future__ import annotations

RETRY_AFTER_S = 1
ENGINE_UNAVAILABLE = "the engine is unavailable (a shard failed or stopped); retry shortly"


class APIError(Exception):
    """An answer other than 200: status, message, OpenAI error type and param."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, retry_after_s: int | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type, param
        self.retry_after_s = retry_after_s
