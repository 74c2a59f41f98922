"""Turns the logits of sampled rows into one token per request, with optional logprobs.
Runs once per step, on the leader shard. Logits: [num_sampled, vocab_size] float32."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from workers.kernels.argmax import argmax
from workers.messages import TokenLogprobs
from workers.request import Request
from workers.transfer import to_device

_TINY = 1e-20  # floor for exponential noise: a 0 draw would turn masked 0/0 into NaN
# A temperature above 0 is at least this (vLLM's floor): below ~1e-38 it is 0 in float32,
# and logits / 0 sample token 0 whatever the logits say.
MIN_TEMPERATURE = 1e-2


@dataclass(frozen=True)
class SampleResult:
    token_id: int
    logprobs: TokenLogprobs | None


class SampledTokens:
    """One step's draws, launched on the device. Their host copies (and the logprobs'
    top-k) are queued right behind the draws, so results() waits for this step only,
    not for a next step launched after it (async scheduling)."""

    def __init__(self, token_ids: torch.Tensor, raw_logprobs: torch.Tensor | None, requests: list[Request],
                 by_argmax: bool = False):
        self.token_ids = token_ids  # [M] long on the device, in the order of `requests`
        self.requests = requests
        self.by_argmax = by_argmax  # every token is its row's argmax of the raw logits
        tensors = [token_ids]
        self._max_k = 0
        if raw_logprobs is not None:
            self._max_k = min(max(r.sampling_params.logprobs or 0 for r in requests), raw_logprobs.shape[1])
            tensors.append(raw_logprobs.gather(1, token_ids[:, None])[:, 0])  # [M]
            if self._max_k:
                tensors.extend(raw_logprobs.topk(self._max_k, dim=-1))  # values, ids [M, k]
        self._host = [_to_host(t) for t in tensors]
        self._ready = None
        if token_ids.is_cuda:
            self._ready = torch.cuda.Event()
            self._ready.record()

    def results(self) -> list[SampleResult]:
        if self._ready is not None:
            self._ready.synchronize()
        token_ids = self._host[0].tolist()
        if len(self._host) == 1:
            return [SampleResult(token_id, None) for token_id in token_ids]
        sampled = self._host[1].tolist()
        top_values, top_ids = (self._host[2].tolist(), self._host[3].tolist()) if self._max_k else (None, None)
        results = []
        for i, request in enumerate(self.requests):
            k = request.sampling_params.logprobs
            if k is None:
                results.append(SampleResult(token_ids[i], None))
                continue
            top = tuple(zip(top_ids[i][:k], top_values[i][:k])) if k else ()
            results.append(SampleResult(token_ids[i], TokenLogprobs(token_logprob=sampled[i], top=top)))
        return results


def _to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy queued on the current stream (pinned, asynchronous) for CUDA tensors."""
    if not t.is_cuda:
        return t
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


class Sampler:
    """Order: raw logprobs, logit bias, min_tokens mask, penalties, then greedy or
    temperature, min-p, top-k, top-p and a draw. A seeded request draws from its own
    generator so its tokens do not depend on the batch; the others share this sampler's."""

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[SampleResult]:
        return self.launch(logits, requests).results()

    def launch(self, logits: torch.Tensor, requests: list[Request]) -> SampledTokens:
        """Queues the draws on the logits' device; nothing waits for them."""
        if logits.dim() != 2 or logits.shape[0] != len(requests):
            raise ValueError(
                f"logits must be [num_requests={len(requests)}, vocab_size], "
                f"got {tuple(logits.shape)}"
            )
        by_argmax = all(r.sampling_params.is_greedy and not r.changes_logits for r in requests)
        wants_logprobs = any(r.sampling_params.logprobs is not None for r in requests)
        if by_argmax and not wants_logprobs:  # the argmax of the raw logits, nothing else
            return SampledTokens(argmax(logits), None, requests, by_argmax=True)
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        if any(r.changes_logits for r in requests):
            logits = logits.clone()  # the caller's tensor stays raw
            apply_logit_bias(logits, requests)
            apply_min_tokens(logits, requests)
            apply_penalties(logits, requests)
        return SampledTokens(self._sample(logits, requests), raw_logprobs, requests, by_argmax=by_argmax)

    def _sample(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """[M, V] processed logits -> [M] token ids."""
        token_ids = argmax(logits)  # greedy rows keep this; first index on ties
        rows = [i for i, r in enumerate(requests) if not r.sampling_params.is_greedy]
        if not rows:
            return token_ids
        chosen = [requests[i] for i in rows]
        params = [r.sampling_params for r in chosen]
        device = logits.device
        rows_t = to_device(rows, device, torch.long)
        temperature = to_device([max(p.temperature, MIN_TEMPERATURE) for p in params], device, torch.float32)
        scaled = logits[rows_t] / temperature[:, None]
        if any(p.min_p > 0.0 for p in params):
            scaled = apply_min_p(scaled, to_device([p.min_p for p in params], device, torch.float32))
        if any(p.top_k > 0 or p.top_p < 1.0 for p in params):
            scaled = apply_top_k_top_p(
                scaled,
                # A top_k past the vocabulary keeps every token (and fits int64).
                to_device([min(p.top_k, logits.shape[-1]) for p in params], device, torch.long),
                to_device([p.top_p for p in params], device, torch.float32),
            )
        probs = torch.softmax(scaled, dim=-1)
        noise = self._exponential_noise(probs, chosen)
        token_ids[rows_t] = (probs / noise).argmax(dim=-1)
        return token_ids

    def _exponential_noise(self, probs: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """Exp(1) noise; argmax(probs / noise) is a draw from `probs` (the exponential race),
        so each row needs only its own noise and a seeded row uses only its generator."""
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(requests) if r.generator is None]
        if unseeded:
            draws = torch.empty(len(unseeded), probs.shape[1], device=probs.device)
            draws.exponential_(generator=self._shared_generator(probs.device))
            noise[to_device(unseeded, probs.device, torch.long)] = draws
        for i, request in enumerate(requests):
            if request.generator is not None:
                row = torch.empty(probs.shape[1], device=request.generator.device)
                noise[i] = row.exponential_(generator=request.generator).to(probs.device)
        return noise.clamp_min_(_TINY)

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            generator = torch.Generator(device=device)
            if self.seed is None:
                generator.seed()
            else:
                generator.manual_seed(self.seed)
            self._generators[device] = generator
        return self._generators[device]


def apply_logit_bias(logits: torch.Tensor, requests: list[Request]) -> None:
    """In place: each request's logit_bias added to its row (ids outside the vocab are
    refused before the request is sent; any left are skipped)."""
    vocab_size = logits.shape[1]
    for i, request in enumerate(requests):
        bias = request.sampling_params.logit_bias
        if not bias:
            continue
        ids = [t for t in bias if t < vocab_size]
        logits[i, to_device(ids, logits.device, torch.long)] += to_device(
            [bias[t] for t in ids], logits.device, torch.float32)


def apply_min_tokens(logits: torch.Tensor, requests: list[Request]) -> None:
    """In place: while a request has fewer than min_tokens outputs, its stop tokens
    (eos unless ignore_eos, and stop_token_ids) get -inf."""
    vocab_size = logits.shape[1]
    for i, request in enumerate(requests):
        if request.num_output_tokens >= request.sampling_params.min_tokens:
            continue
        token_ids = [t for t in request.end_token_ids if 0 <= t < vocab_size]
        if token_ids:
            logits[i, token_ids] = float("-inf")


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> None:
    """In place, OpenAI/vLLM semantics. Repetition: seen tokens (prompt ids + outputs) have
    positive logits divided and negative ones multiplied by the penalty. Frequency and
    presence: subtract penalty * count and penalty * (count > 0), over outputs only."""
    rows = [i for i, r in enumerate(requests) if r.sampling_params.has_penalties]
    if not rows:
        return
    vocab_size, device = logits.shape[1], logits.device
    output_counts = torch.zeros(len(rows), vocab_size, device=device)
    in_prompt = torch.zeros(len(rows), vocab_size, dtype=torch.bool, device=device)
    for j, i in enumerate(rows):
        request = requests[i]
        output_ids = _token_tensor(request.output_token_ids, vocab_size, device)
        output_counts[j].index_add_(0, output_ids, torch.ones_like(output_ids, dtype=torch.float))
        prompt_ids = request.penalized_prompt_token_ids
        if prompt_ids:
            in_prompt[j, _token_tensor(prompt_ids, vocab_size, device)] = True
    params = [requests[i].sampling_params for i in rows]
    repetition = to_device([p.repetition_penalty for p in params], device, torch.float32)[:, None]
    frequency = to_device([p.frequency_penalty for p in params], device, torch.float32)[:, None]
    presence = to_device([p.presence_penalty for p in params], device, torch.float32)[:, None]
    rows_t = to_device(rows, device, torch.long)
    selected = logits[rows_t]
    seen = in_prompt | (output_counts > 0)
    repeated = torch.where(selected > 0, selected / repetition, selected * repetition)
    selected = torch.where(seen, repeated, selected)
    selected -= frequency * output_counts + presence * (output_counts > 0).float()
    logits[rows_t] = selected


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """[M, V] temperature-scaled logits, [M] min_p (0: off) -> logits with -inf where a
    token's probability is below min_p times its row's top probability (vLLM's and Hugging
    Face's min-p; the top token always stays)."""
    probs = torch.softmax(logits, dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """[M, V] logits, [M] top_k (0: off), [M] top_p (1: off) -> logits with the rest -inf.
    top-p keeps the smallest most-likely set whose mass reaches top_p (at least one token).
    Rows with both off come back unchanged; no host sync (the caller skips all-off batches)."""
    vocab_size = logits.shape[1]
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)
    kth_logit = sorted_logits.gather(1, (k - 1)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_logit, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # 0 for the top token, so it always stays
    outside_p = (mass_before >= top_p[:, None]) & (top_p[:, None] < 1.0)
    sorted_logits = sorted_logits.masked_fill(outside_p, float("-inf"))
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def _token_tensor(token_ids: list[int], vocab_size: int, device: torch.device) -> torch.Tensor:
    """Token ids as a long tensor, ids outside the vocab (padding, ids of a larger
    tokenizer) dropped so they cannot index out of range."""
    ids = to_device(token_ids, device, torch.long)
    return ids[(ids >= 0) & (ids < vocab_size)]
