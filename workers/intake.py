"""Where a request's data waits on a shard between its arrival (a Ray call, on an actor
thread) and the step that first schedules it (on the step-loop thread)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch


@dataclass
class RequestState:
    """A shard's mirror of one request: what it needs to build model inputs."""

    req_id: str
    prompt_len: int
    prompt_token_ids: list[int] | None  # None for an embeddings prompt
    # The prompt's embedding rows on the device, in the model dtype: (prompt_len, hidden),
    # or, for a prompt that mixes token ids and embeddings, only the rows of embeds_spans,
    # in order (a chat's few rows are not spread over its whole length).
    prompt_embeds: torch.Tensor | None
    # A mixed prompt's (start, end) positions that take embedding rows; None: every prompt
    # position does (when prompt_embeds is given).
    embeds_spans: tuple[tuple[int, int], ...] | None = None
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    # Top-k of the prompt's log-probabilities (SamplingParams.prompt_logprobs), or None;
    # every rank computes the prompt rows' logits (a collective) until the first sample.
    prompt_logprobs: int | None = None
    first_sampled: bool = False
    stand_in: bool = False  # a follower's copy of a request it could not take (zeros for rows)

    def embeds_rows(self, start: int, end: int) -> list[tuple[int, torch.Tensor]]:
        """The embedding rows among positions [start, end), as (offset from start, rows):
        one piece for an embeddings prompt, one per span met for a mixed prompt, none past
        the prompt or for a prompt of token ids."""
        end = min(end, self.prompt_len)
        if self.prompt_embeds is None or start >= end:
            return []
        if self.embeds_spans is None:
            return [(0, self.prompt_embeds[start:end])]
        pieces, first = [], 0  # first: the span's first row in prompt_embeds
        for span_start, span_end in self.embeds_spans:
            low, high = max(span_start, start), min(span_end, end)
            if low < high:
                pieces.append((low - start, self.prompt_embeds[first + low - span_start : first + high - span_start]))
            first += span_end - span_start
        return pieces

    def token_ids(self, start: int, end: int) -> list[int]:
        """Token ids at positions [start, end); embedding positions read as 0."""
        prompt_end = min(end, self.prompt_len)
        ids: list[int] = []
        if start < prompt_end:
            if self.prompt_token_ids is None:
                ids = [0] * (prompt_end - start)
            else:
                ids = self.prompt_token_ids[start:prompt_end]
        if end <= self.prompt_len:
            return ids
        out_start = max(start, self.prompt_len) - self.prompt_len
        return ids + self.output_token_ids[out_start : end - self.prompt_len]


class Intake:
    """Thread-safe hand-off of RequestStates, keyed by req_id.

    A follower may be told a request finished (aborted while waiting) before its own
    copy arrived; the id is remembered so the late copy is dropped, not leaked."""

    def __init__(self) -> None:
        self._pending: dict[str, RequestState] = {}
        self._dropped: set[str] = set()
        self._cond = threading.Condition()
        self.awaited: str | None = None  # the request a step waits for (the plan outran it)

    def put(self, state: RequestState) -> None:
        with self._cond:
            if state.req_id in self._dropped:
                self._dropped.discard(state.req_id)
                return
            self._pending[state.req_id] = state
            self._cond.notify_all()

    def take(self, req_id: str, timeout_s: float) -> RequestState:
        """The request's state, waiting for it to arrive if the plan outran it."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            try:
                while req_id not in self._pending:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise TimeoutError(f"request {req_id} was scheduled but never reached this shard")
                    self.awaited = req_id
                    self._cond.wait(remaining)
            finally:
                self.awaited = None
            return self._pending.pop(req_id)

    def drop(self, req_id: str) -> None:
        """Forgets a request that finished before it was scheduled on this shard."""
        with self._cond:
            if self._pending.pop(req_id, None) is None:
                self._dropped.add(req_id)

    def __len__(self) -> int:
        with self._cond:
            return len(self._pending)
