"""The leader shard's mutable record of one request: tokens so far, KV blocks, status.
Built from a NewRequest at intake; read by the scheduler and the sampler."""

from __future__ import annotations

import enum
import logging
import time
from concurrent.futures import Future, wait

import torch

from workers.block_hash import BlockHash, hash_block, salted_root
from workers.messages import NewRequest, PromptLogprobs
from workers.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

# How long after it arrives a request's embeddings digests may keep it waiting: they take
# milliseconds (cluster/embeds_hasher.py); longer means the hasher is restarting, and the
# request then runs with its blocks unshared.
DIGESTS_WAIT_S = 1.0
# How long the scheduler holds its step loop for them, once per request: about a decode step
# of an 8B model. Past that the loop steps the running requests meanwhile, and the request
# (the head of the queue) is admitted when they come or its DIGESTS_WAIT_S is up.
DIGESTS_HOLD_S = 0.005


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "finished_stopped"
    FINISHED_LENGTH = "finished_length"
    FINISHED_ABORTED = "finished_aborted"


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """One request as the scheduler sees it.

    An embeddings prompt has no token ids (`prompt_token_ids is None`): it still takes
    `prompt_len` KV slots, but penalties only see the output tokens. A prompt that mixes
    the two has ids at every position and `embeds_spans`, where they are placeholders."""

    def __init__(
        self,
        req_id: str,
        prompt_token_ids: list[int] | None,
        prompt_len: int,
        sampling_params: SamplingParams,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        *,
        device: str | torch.device = "cpu",
        embeds_block_digests: tuple[bytes | None, ...] | Future | None = None,
        cache_salt: str | None = None,
        embeds_spans: tuple[tuple[int, int], ...] | None = None,
    ) -> None:
        if prompt_len < 1:
            raise ValueError(f"request {req_id!r}: prompt must have >= 1 token, got {prompt_len}")
        if prompt_token_ids is not None and len(prompt_token_ids) != prompt_len:
            raise ValueError(
                f"request {req_id!r}: prompt_len {prompt_len} != "
                f"len(prompt_token_ids) {len(prompt_token_ids)}"
            )
        self.req_id = req_id
        self.prompt_token_ids = list(prompt_token_ids) if prompt_token_ids is not None else None
        self.prompt_len = prompt_len
        self.embeds_spans = embeds_spans
        self.has_embeds = prompt_token_ids is None or embeds_spans is not None
        # The prompt's ids that penalties see (every step): none of an embeddings prompt,
        # and not a mixed prompt's placeholders.
        self.penalized_prompt_token_ids = self._ids_outside(embeds_spans)
        self.sampling_params = sampling_params
        self.eos_token_ids = tuple(eos_token_ids)
        self.max_model_len = max_model_len
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.block_ids: list[int] = []
        self.status = RequestStatus.WAITING
        self.stop_reason: int | None = None  # the stop token id that finished it
        self.arrival_index = -1  # set by Scheduler.add_request; orders FCFS and preemption
        # Prefix caching: an embeddings prompt's per-block row digests (block_hash; None for
        # a block of a mixed prompt with token ids only), or the Future of the hasher's answer
        # (met when the scheduler first keys the prompt); the
        # hashes of the full blocks so far, and how many of block_ids the cache holds.
        self._embeds_block_digests = embeds_block_digests
        self._digests_deadline = time.monotonic() + DIGESTS_WAIT_S
        self._digests_held_loop = False  # digests_pending has held the step loop for them once
        self._root_hash = salted_root(cache_salt)  # the first block's parent
        self.block_hashes: list[BlockHash] = []
        self.num_cached_blocks = 0
        self.keyed_blocks: list[tuple[int, BlockHash]] = []  # the (block, hash) keys it made
        self.num_cached_tokens: int | None = None  # prompt tokens found cached when first admitted
        # Prompt logprobs (sampling_params.prompt_logprobs) of positions 0.. so far, as
        # (logprob, rank, top) of the token after each; sent once, with the first token.
        self._prompt_logprobs: list[tuple[float, int, tuple]] = []
        self._prompt_logprobs_sent = False
        # Own generator so a seeded request samples the same tokens whatever its batch.
        self.generator: torch.Generator | None = None
        if sampling_params.seed is not None:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(sampling_params.seed)

    @classmethod
    def from_new_request(
        cls,
        new: NewRequest,
        eos_token_ids: tuple[int, ...],
        max_model_len: int,
        *,
        device: str | torch.device = "cpu",
        embeds_block_digests: tuple[bytes | None, ...] | Future | None = None,
    ) -> "Request":
        prompt_token_ids = list(new.prompt_token_ids) if new.prompt_token_ids is not None else None
        return cls(
            new.req_id,
            prompt_token_ids,
            new.prompt_len,
            new.sampling_params,
            eos_token_ids,
            max_model_len,
            device=device,
            embeds_block_digests=embeds_block_digests,
            cache_salt=new.cache_salt,
            embeds_spans=new.embeds_spans,
        )

    @property
    def embeds_block_digests(self) -> tuple[bytes | None, ...] | None:
        """The row digests once they came. None while they are on their way
        (digests_pending), and for good once the hashing failed or did not answer within
        DIGESTS_WAIT_S of the request's arrival: its blocks are then never shared, and it
        runs all the same."""
        return None if self.digests_pending() else self._embeds_block_digests

    @property
    def digests_future(self) -> Future | None:
        """The hasher's answer while it is awaited (a Future), else None."""
        digests = self._embeds_block_digests
        return digests if isinstance(digests, Future) else None

    def digests_pending(self, hold_s: float = 0.0) -> bool:
        """Whether its rows' digests are still on their way and may yet come in time, after
        waiting up to `hold_s` for them (the first call that asks only: the caller's thread
        is the step loop). Once they came, failed or are late, False for good."""
        digests = self.digests_future
        if digests is None:
            return False
        if hold_s > 0 and not self._digests_held_loop:
            self._digests_held_loop = True
            wait([digests], timeout=max(0.0, min(hold_s, self._digests_deadline - time.monotonic())))
        if not digests.done() and time.monotonic() < self._digests_deadline:
            return True
        if not digests.done():
            logger.warning("request %r: its embeddings rows' digests did not come within %g s; its blocks "
                           "stay unshared", self.req_id, DIGESTS_WAIT_S)
            self._embeds_block_digests = None
        elif digests.exception() is not None:  # a cache key lost is no reason to fail the request
            logger.error("request %r: hashing its embeddings rows failed; its blocks stay unshared",
                         self.req_id, exc_info=digests.exception())
            self._embeds_block_digests = None
        else:
            self._embeds_block_digests = digests.result()
        return False

    def full_block_hashes(self, num_blocks: int, block_size: int) -> list[BlockHash]:
        """The hashes of its first `num_blocks` full blocks, computed once each. An
        embeddings prompt without row digests has none: never, if they were lost; not yet,
        while they are on their way (its blocks are keyed when they come)."""
        if self.has_embeds and self.embeds_block_digests is None:
            return []
        num_blocks = min(num_blocks, self.num_tokens // block_size)
        while len(self.block_hashes) < num_blocks:
            index = len(self.block_hashes)
            start, end = index * block_size, (index + 1) * block_size
            parent = self.block_hashes[-1] if self.block_hashes else self._root_hash
            self.block_hashes.append(hash_block(parent, *self._block_content(start, end)))
        return self.block_hashes[:num_blocks]

    def _ids_outside(self, spans: tuple[tuple[int, int], ...] | None) -> list[int] | None:
        if spans is None or self.prompt_token_ids is None:
            return self.prompt_token_ids
        ids = list(self.prompt_token_ids)
        for start, end in reversed(spans):
            del ids[start:end]
        return ids

    def _block_content(self, start: int, end: int) -> tuple[list[int], bytes | None]:
        """Positions [start, end): their token ids, and the digest of the embeddings rows
        among them (an embeddings prompt's rows have no ids)."""
        outputs = self.output_token_ids[max(start - self.prompt_len, 0):max(end - self.prompt_len, 0)]
        if start >= self.prompt_len:
            return outputs, None
        digests, index = self.embeds_block_digests, start // (end - start)
        digest = digests[index] if digests is not None and index < len(digests) else None
        if self.prompt_token_ids is not None:  # a mixed prompt's embeddings rows: their digest
            return self.prompt_token_ids[start:end] + outputs, digest
        return outputs, digest

    def add_prompt_logprobs(self, chunk: PromptLogprobs) -> None:
        """Keeps the positions not held yet: a recompute after a preemption repeats some."""
        held = len(self._prompt_logprobs)
        if chunk.first_position > held:
            raise RuntimeError(f"request {self.req_id!r}: prompt logprobs from position "
                               f"{chunk.first_position} came before those from {held}")
        rows = list(zip(chunk.token_logprobs, chunk.ranks, chunk.top))
        self._prompt_logprobs.extend(rows[held - chunk.first_position:])

    def take_prompt_logprobs(self) -> PromptLogprobs | None:
        """Every prompt position's, once (None after, or if the request asked for none)."""
        if self.sampling_params.prompt_logprobs is None or self.prompt_token_ids is None \
                or self._prompt_logprobs_sent:
            return None
        self._prompt_logprobs_sent = True
        logprobs, ranks, top = zip(*self._prompt_logprobs) if self._prompt_logprobs else ((), (), ())
        return PromptLogprobs(0, tuple(logprobs), tuple(ranks), tuple(top))

    @property
    def num_tokens(self) -> int:
        return self.prompt_len + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def reads_output_tokens(self) -> bool:
        """Its logits depend on its output tokens: penalties, or a min_tokens mask not yet
        lifted."""
        params = self.sampling_params
        return params.has_penalties or self.num_output_tokens < params.min_tokens

    @property
    def changes_logits(self) -> bool:
        """Its logits are changed before sampling (a logit bias, or what reads its output
        tokens), so its token is not the argmax of the raw logits."""
        return self.reads_output_tokens or bool(self.sampling_params.logit_bias)

    @property
    def is_finished(self) -> bool:
        return self.status in _FINISH_REASONS

    @property
    def finish_reason(self) -> str | None:
        """"stop" | "length" | "abort" once finished, else None."""
        return _FINISH_REASONS.get(self.status)

    @property
    def end_token_ids(self) -> tuple[int, ...]:
        """Tokens that end the request (once min_tokens is reached): eos unless
        ignore_eos, plus the request's stop_token_ids."""
        params = self.sampling_params
        eos = () if params.ignore_eos else self.eos_token_ids
        return eos + params.stop_token_ids

    def __repr__(self) -> str:
        return (
            f"Request({self.req_id!r}, status={self.status.name}, prompt_len={self.prompt_len}, "
            f"num_output_tokens={self.num_output_tokens}, "
            f"num_computed_tokens={self.num_computed_tokens}, blocks={len(self.block_ids)})"
        )
