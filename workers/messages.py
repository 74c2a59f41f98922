"""Typed messages that cross process boundaries.

driver -> every shard, once per request (Ray call): NewRequest
leader -> followers, once per step (torch.distributed broadcast): StepPlan, deltas only
leader -> driver, batched (Ray long-poll): RequestDelta"""

from __future__ import annotations

from dataclasses import dataclass

from workers.sampling_params import SamplingParams


@dataclass(frozen=True)
class PromptEmbedsRef:
    """A (seq_len, hidden_size) array in the Ray object store, put there once.

    The array is numpy (zero-copy on a node); bfloat16 travels viewed as uint16, so
    `dtype` names the torch dtype to view it back as."""

    ref: object  # ray.ObjectRef of a numpy array; None on a shard (the array came as an argument)
    dtype: str  # "float32" | "bfloat16" | "float16"
    shape: tuple[int, int]
    # The array's place in a list of several prompts' arrays put as one object
    # (EngineClient.put_prompts); None: the object is this array alone.
    index: int | None = None
    # With prefix caching: each of the object's prompts' block digests, by index (a list,
    # made where the rows were put), or the ray.ObjectRef of the EmbedsHasher's answer for
    # a large object; the leader gets them, the request not.
    digests: object = None


@dataclass(frozen=True)
class NewRequest:
    """A request's full data, sent to every shard once, at intake."""

    req_id: str
    prompt_token_ids: tuple[int, ...] | None  # None for an embeddings prompt
    prompt_embeds: PromptEmbedsRef | None
    sampling_params: SamplingParams
    cache_salt: str | None = None  # salts the leader's prefix-cache keys of this prompt
    # A prompt of token ids and embeddings together (a chat with prompt_embeds parts): the
    # positions [start, end) that prompt_embeds' rows fill, in order; the token ids there
    # are placeholders. None: the embeddings are the whole prompt (or there are none).
    embeds_spans: tuple[tuple[int, int], ...] | None = None

    @property
    def prompt_len(self) -> int:
        if self.prompt_token_ids is not None:
            return len(self.prompt_token_ids)
        return self.prompt_embeds.shape[0]


@dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step: rows [num_computed_tokens, +num_new_tokens)."""

    req_id: str
    num_computed_tokens: int  # tokens whose K/V are already in the cache
    num_new_tokens: int  # rows this step computes
    new_block_ids: tuple[int, ...]  # appended to the request's block table this step
    is_sampled: bool  # the step reaches the request's last token: sample one more


@dataclass(frozen=True)
class StepPlan:
    """What every shard executes in one step. Followers apply it to their mirror of
    request state; the leader applies the same plan so all ranks stay identical."""

    step_id: int
    appended_tokens: tuple[tuple[str, int], ...]  # (req_id, token) sampled last step
    preempted_req_ids: tuple[str, ...]  # block tables cleared; recomputed from 0 later
    finished_req_ids: tuple[str, ...]  # finished or aborted: state dropped
    scheduled: tuple[ScheduledRequest, ...]
    shutdown: bool = False
    # Planned before the previous step's samples were read (all rows decodes): a row whose
    # input token the mirrors lack takes it from the previous step's sampled tokens, which
    # stay on the device (broadcast from the leader); appended_tokens lag one step more.
    feeds_back: bool = False
    # With feeds_back: the previous step's tokens were each row's argmax of the raw logits
    # (greedy, no penalties or min_tokens mask), which every shard holds bit for bit, so
    # followers take them from their own logits and nothing is broadcast.
    feedback_is_argmax: bool = False


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probabilities (raw model distribution) for one generated token."""

    token_logprob: float
    top: tuple[tuple[int, float], ...]  # (token_id, logprob), most likely first


@dataclass(frozen=True)
class PromptLogprobs:
    """Log-probabilities of prompt tokens first_position + 1, + 2, ... given what precedes
    each (the raw model distribution): the token's own, its rank (1 = most likely), and
    the top-k."""

    first_position: int  # the row that predicts prompt token first_position + 1
    token_logprobs: tuple[float, ...]
    ranks: tuple[int, ...]
    top: tuple[tuple[tuple[int, float], ...], ...]  # per token: (token_id, logprob), most likely first


@dataclass(frozen=True)
class RequestDelta:
    """New tokens of one request since the last delta the driver received."""

    req_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[TokenLogprobs, ...] | None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: int | None = None  # the stop token id that ended it, if any
    error: str | None = None
    # With a request's first token, if it asked for them: prompt tokens 1 .. prompt_len - 1.
    prompt_logprobs: PromptLogprobs | None = None
    # With a request's first token: its prompt tokens whose K/V the prefix cache held.
    num_cached_tokens: int | None = None

    @classmethod
    def not_taken(cls, req_id: str, exc: BaseException) -> "RequestDelta":
        """The final delta of a request a shard could not take (its _take raised)."""
        return cls(req_id, (), None, finish_reason="error",
                   error=f"the engine could not take request {req_id}: {type(exc).__name__}")


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_total_blocks: int
    num_free_blocks: int
    num_aborted: int = 0  # requests aborted since the engine started (their blocks freed)
    # Since the engine started: prompt tokens (with a preempted request's outputs) looked
    # up in the prefix cache when a request was admitted, and those found there.
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    # Triton kernels the leader compiled after it began serving (each stalled a step:
    # workers/kernels/compile_watch.py).
    num_kernel_compiles: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.num_free_blocks / max(self.num_total_blocks, 1)
