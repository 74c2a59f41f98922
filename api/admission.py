"""Backpressure in the ingress: bounds on the choices a replica has in its engine
(running + waiting) and on the bytes of prompt embeddings they hold there, taken whole per
request and given back when it ends."""

from __future__ import annotations

from api.errors import RETRY_AFTER_S, APIError

# Choices admitted beyond the engine's max_num_seqs before new requests are refused.
DEFAULT_MAX_WAITING_REQUESTS = 1024


class Admission:
    """A request is admitted whole or refused with a 503 + Retry-After, so the queue never
    grows unbounded; one larger than a bound itself is a 400 (retrying could never help).
    Each shard holds a running or waiting choice's embeddings rows on its device, outside
    the KV cache's memory: max_embeds_bytes bounds them as generate() bounds its own (the
    engine's max_embeds_in_flight_bytes)."""

    def __init__(self, max_in_flight: int, max_embeds_bytes: int):
        self.max_in_flight = max_in_flight
        self.num_in_flight = 0
        self.max_embeds_bytes = max_embeds_bytes
        self.embeds_bytes = 0

    def reserve(self, num_choices: int, embeds_bytes: int = 0) -> Reservation:
        if num_choices > self.max_in_flight:  # never admitted, however long the client waits
            raise APIError(400, f"this request asks for {num_choices} choices (prompts x n); the server "
                           f"runs at most {self.max_in_flight} at once", param="n")
        if embeds_bytes > self.max_embeds_bytes:
            raise APIError(400, f"this request's prompt_embeds would hold up to {embeds_bytes} bytes in the "
                           f"engine (their rows, once per sample); the server holds at most "
                           f"{self.max_embeds_bytes} at once", param="prompt_embeds")
        if self.num_in_flight + num_choices > self.max_in_flight:
            raise APIError(503, f"the server is at capacity ({self.num_in_flight} requests in flight, "
                           f"limit {self.max_in_flight}); retry after {RETRY_AFTER_S} s",
                           type="service_unavailable", retry_after_s=RETRY_AFTER_S)
        if embeds_bytes and self.embeds_bytes + embeds_bytes > self.max_embeds_bytes:
            raise APIError(503, f"the server is at capacity ({self.embeds_bytes} bytes of prompt embeddings "
                           f"in flight, limit {self.max_embeds_bytes}); retry after {RETRY_AFTER_S} s",
                           type="service_unavailable", retry_after_s=RETRY_AFTER_S)
        self.num_in_flight += num_choices
        self.embeds_bytes += embeds_bytes
        return Reservation(self, num_choices, embeds_bytes)


class Reservation:
    def __init__(self, admission: Admission, num_choices: int, embeds_bytes: int = 0):
        self._admission, self._num_choices, self._embeds_bytes = admission, num_choices, embeds_bytes

    def release(self) -> None:
        """Idempotent: called when the request ends, and again if its stream is dropped."""
        self._admission.num_in_flight -= self._num_choices
        self._admission.embeds_bytes -= self._embeds_bytes
        self._num_choices = self._embeds_bytes = 0
