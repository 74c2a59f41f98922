"""Backpressure in the ingress: a bound on the choices a replica has in its engine
(running + waiting), taken whole per request and given back when it ends."""

from __future__ import annotations

from api.errors import RETRY_AFTER_S, APIError

# Choices admitted beyond the engine's max_num_seqs before new requests are refused.
DEFAULT_MAX_WAITING_REQUESTS = 1024


class Admission:
    """A request is admitted whole or refused with a 503 + Retry-After, so the queue never
    grows unbounded; one larger than the bound itself is a 400 (retrying could never help)."""

    def __init__(self, max_in_flight: int):
        self.max_in_flight = max_in_flight
        self.num_in_flight = 0

    def reserve(self, num_choices: int) -> Reservation:
        if num_choices > self.max_in_flight:  # never admitted, however long the client waits
            raise APIError(400, f"this request asks for {num_choices} choices (prompts x n); the server "
                           f"runs at most {self.max_in_flight} at once", param="n")
        if self.num_in_flight + num_choices > self.max_in_flight:
            raise APIError(503, f"the server is at capacity ({self.num_in_flight} requests in flight, "
                           f"limit {self.max_in_flight}); retry after {RETRY_AFTER_S} s",
                           type="service_unavailable", retry_after_s=RETRY_AFTER_S)
        self.num_in_flight += num_choices
        return Reservation(self, num_choices)


class Reservation:
    def __init__(self, admission: Admission, num_choices: int):
        self._admission, self._num_choices = admission, num_choices

    def release(self) -> None:
        """Idempotent: called when the request ends, and again if its stream is dropped."""
        self._admission.num_in_flight -= self._num_choices
        self._num_choices = 0
