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
    prompt_embeds: torch.Tensor | None  # (prompt_len, hidden) in the model dtype
    # [prompt_len] bool on the device, True where prompt_embeds' row is the input, for a
    # prompt that mixes token ids and embeddings; None: every prompt row is an embedding.
    embeds_mask: torch.Tensor | None = None
    output_token_ids: list[int] = field(default_factory=list)
    block_ids: list[int] = field(default_factory=list)
    # Top-k of the prompt's log-probabilities (SamplingParams.prompt_logprobs), or None;
    # every rank computes the prompt rows' logits (a collective) until the first sample.
    prompt_logprobs: int | None = None
    first_sampled: bool = False
    stand_in: bool = False  # a follower's copy of a request it could not take (zeros for rows)

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
