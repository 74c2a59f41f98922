"""Request outputs as vLLM users know them, and the per-sample tracker that turns the
engine's token deltas into text, logprobs and a finish reason. Runs on the driver or a
Serve replica."""

from __future__ import annotations

from dataclasses import dataclass, field

from cluster.detokenizer import IncrementalDetokenizer
from workers.messages import PromptLogprobs, RequestDelta
from workers.sampling_params import SamplingParams


@dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | str | None = None  # the stop token id or stop string

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """When a request reached its milestones, as vLLM's RequestOutput.metrics: wall-clock
    seconds (time.time()) in the process that called generate(). arrival_time is when
    generate() took the prompt up, before its checks (and, for embeddings, their one
    ray.put); a token's time is when its delta reached that process."""

    arrival_time: float
    first_token_time: float | None = None  # the first token of any of its samples
    last_token_time: float | None = None
    finished_time: float | None = None  # when its last sample finished

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int] | None  # None for an embeddings prompt
    num_prompt_tokens: int  # rows of prompt_embeds, or len(prompt_token_ids)
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = False
    metrics: RequestMetrics | None = None
    # With SamplingParams.prompt_logprobs, as vLLM's: None for the first prompt token (nothing
    # precedes it), then each token's {token_id: Logprob}, itself and the top-k.
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # As vLLM's: prompt tokens whose K/V came from the prefix cache (its first sample's).
    num_cached_tokens: int | None = None


class CompletionTracker:
    """One sample's state on the driver: token ids, incremental text, logprobs."""

    def __init__(self, index: int, tokenizer, prompt_token_ids, params: SamplingParams):
        self.index = index
        self.params = params
        self.tokenizer = tokenizer
        self.prompt_token_ids = prompt_token_ids
        self._token_ids: list[int] = []  # without a tokenizer; else the detokenizer's
        self.prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # with the first token
        self.num_cached_tokens: int | None = None  # with the first token
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.detokenizer = (
            IncrementalDetokenizer(tokenizer, prompt_token_ids, params) if tokenizer else None
        )
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.error: str | None = None

    @property
    def token_ids(self) -> list[int]:
        """Output tokens, ending with the one that completed a stop string if any."""
        return self.detokenizer.token_ids if self.detokenizer else self._token_ids

    @property
    def text(self) -> str:
        return self.detokenizer.text if self.detokenizer else ""

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def apply(self, delta: RequestDelta) -> str:
        """Folds in one delta; returns the text that became final. A stop string that
        matches finishes the sample here (the caller then aborts it in the engine)."""
        if self.is_finished:
            return ""
        new_text = ""
        if self.detokenizer is None:
            self._token_ids.extend(delta.new_token_ids)
        else:
            new_text = self.detokenizer.update(
                list(delta.new_token_ids), delta.finish_reason, delta.stop_reason
            )
        self._add_logprobs(delta)
        if delta.prompt_logprobs is not None and self.prompt_token_ids is not None:
            self.prompt_logprobs = self._prompt_logprobs(delta.prompt_logprobs)
        if delta.num_cached_tokens is not None:
            self.num_cached_tokens = delta.num_cached_tokens
        if self.detokenizer is not None and self.detokenizer.stop_matched is not None:
            self.finish_reason, self.stop_reason = "stop", self.detokenizer.stop_matched
            return new_text
        if delta.finish_reason is not None:
            # The engine names the eos id too (the detokenizer leaves its text out); vLLM's
            # stop_reason is only what the request asked to stop on.
            asked = delta.stop_reason in self.params.stop_token_ids
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason if asked else None
            self.error = delta.error
        return new_text

    def _add_logprobs(self, delta: RequestDelta) -> None:
        if self.logprobs is None or delta.new_logprobs is None:
            return
        # One entry per kept token: tokens after a matched stop string are dropped.
        num_kept = len(self.token_ids) - len(self.logprobs)
        for token, entry in zip(delta.new_token_ids[:num_kept], delta.new_logprobs):
            top = {tid: Logprob(lp, rank + 1, self._decode(tid)) for rank, (tid, lp) in enumerate(entry.top)}
            if token not in top:
                top[token] = Logprob(entry.token_logprob, None, self._decode(token))
            self.logprobs.append(top)
            self.cumulative_logprob += entry.token_logprob

    def _prompt_logprobs(self, computed: PromptLogprobs) -> list[dict[int, Logprob] | None]:
        entries: list[dict[int, Logprob] | None] = [None]
        rows = zip(self.prompt_token_ids[1:], computed.token_logprobs, computed.ranks, computed.top)
        for token, logprob, rank, top in rows:
            entry = {tid: Logprob(lp, i + 1, self._decode(tid)) for i, (tid, lp) in enumerate(top)}
            entry[token] = Logprob(logprob, rank, self._decode(token))
            entries.append(entry)
        return entries

    def _decode(self, token_id: int) -> str | None:
        return self.tokenizer.decode([token_id]) if self.tokenizer else None

    def output(self) -> CompletionOutput:
        return CompletionOutput(
            index=self.index,
            text=self.text,
            token_ids=list(self.token_ids),
            cumulative_logprob=self.cumulative_logprob,
            logprobs=self.logprobs,
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
        )
